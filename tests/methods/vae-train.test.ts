/**
 * The vae method on the tiny fixture model: with fixed noise the loss falls; only the VAE changes
 * in the saved model; the saved scaling factor makes the training images' latent samples unit
 * variance (measured here with the saved VAE and our own noise).
 */
import { createHash } from 'node:crypto';
import { mkdtemp, readFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

import * as tf from '@tensorflow/tfjs';
import { beforeAll, describe, expect, it } from 'vitest';

import { initBackend } from '../../src/backend.js';
import { trainingConfigSchema } from '../../src/methods/registry.js';
import { imageToTensor, vaeEncode } from '../../src/models/vae/vae.js';
import { tfOps } from '../../src/ops/tfjs-ops.js';
import { disposeStableDiffusion, loadStableDiffusion } from '../../src/pipeline/load.js';
import { TorchGenerator } from '../../src/schedulers/rng.js';
import { toySamples, writeToyDataset } from '../../src/toy/dataset.js';
import { loadTrainingConfig } from '../../src/train/config.js';
import { train } from '../../src/train/loop.js';
import { TINY_SD } from '../helpers/fixtures.js';

let dataDir: string;
beforeAll(async () => {
  await initBackend({ backend: 'wasm', log: () => {} });
  dataDir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-vae-data-'));
  await writeToyDataset({ dir: dataDir, seed: 1, split: 'pretrain', size: 32, count: 8 });
});

const sha = async (f: string) => createHash('sha256').update(await readFile(f)).digest('hex');

describe('vae', () => {
  it('reconstruction loss falls; only the VAE changes; latents × scaling_factor have unit variance', async () => {
    const out = await mkdtemp(path.join(os.tmpdir(), 'sdwb-vae-out-'));
    const sets = ['method=vae', `model=${TINY_SD}`, `output_dir=${out}`, `data.dir=${dataDir}`, 'data.resolution=32', 'backend=wasm', 'batch_size=4', 'steps=8', 'fixed_noise=true', 'learning_rate=2e-3'];
    const { config } = await loadTrainingConfig(undefined, sets, trainingConfigSchema());
    const result = await train(config, { progress: false, log: () => {} });
    const losses = result.steps.map((s) => s.loss);
    expect(losses[losses.length - 1]!).toBeLessThan(losses[0]! * 0.8);

    const saved = path.join(out, 'model');
    expect(await sha(path.join(saved, 'unet/diffusion_pytorch_model.safetensors'))).toBe(await sha(path.join(TINY_SD, 'unet/diffusion_pytorch_model.safetensors')));
    expect(await sha(path.join(saved, 'text_encoder/model.safetensors'))).toBe(await sha(path.join(TINY_SD, 'text_encoder/model.safetensors')));
    expect(await sha(path.join(saved, 'vae/diffusion_pytorch_model.safetensors'))).not.toBe(await sha(path.join(TINY_SD, 'vae/diffusion_pytorch_model.safetensors')));

    const model = await loadStableDiffusion(saved);
    try {
      const images = toySamples({ seed: 1, split: 'pretrain', size: 32, count: 8 }).map((s) => s.image);
      const x = imageToTensor(images);
      const z = tf.tidy(() => {
        const post = vaeEncode(tfOps, model.vae.store.scope(), tf.tensor4d(x.data, x.shape), model.vae.cfg);
        const eps = tf.tensor(new TorchGenerator(99).randn(post.mean.shape), post.mean.shape);
        return tf.mul(tf.add(post.mean, tf.mul(post.std, eps)), model.vae.cfg.scalingFactor);
      });
      const values = z.dataSync() as Float32Array;
      z.dispose();
      const mean = values.reduce((a, v) => a + v, 0) / values.length;
      const std = Math.sqrt(values.reduce((a, v) => a + (v - mean) ** 2, 0) / values.length);
      expect(std).toBeGreaterThan(0.9);
      expect(std).toBeLessThan(1.1);
    } finally {
      disposeStableDiffusion(model);
    }
  }, 180_000);

  it('train_part decoder: only decoder and post_quant_conv weights change; the encoder and scaling_factor stay bit-identical', async () => {
    const out = await mkdtemp(path.join(os.tmpdir(), 'sdwb-vae-dec-'));
    const sets = ['method=vae', `model=${TINY_SD}`, `output_dir=${out}`, `data.dir=${dataDir}`, 'data.resolution=32', 'backend=wasm', 'batch_size=4', 'steps=8', 'fixed_noise=true', 'learning_rate=5e-4', 'train_part=decoder'];
    const { config } = await loadTrainingConfig(undefined, sets, trainingConfigSchema());
    const result = await train(config, { progress: false, log: () => {} });
    const losses = result.steps.map((s) => s.loss);
    expect(losses[losses.length - 1]!).toBeLessThan(losses[0]!);
    const base = await loadStableDiffusion(TINY_SD);
    const saved = await loadStableDiffusion(path.join(out, 'model'));
    try {
      expect(saved.vae.cfg.scalingFactor).toBe(base.vae.cfg.scalingFactor);
      let changed = 0;
      for (const key of base.vae.store.keys()) {
        const same = Buffer.from(base.vae.store.get(key)!.dataSync().buffer).equals(Buffer.from(saved.vae.store.get(key)!.dataSync().buffer));
        const trains = key.startsWith('decoder.') || key.startsWith('post_quant_conv.');
        if (!trains) expect(same, key).toBe(true);
        else if (!same) changed++;
      }
      expect(changed).toBeGreaterThan(10);
    } finally {
      disposeStableDiffusion(base);
      disposeStableDiffusion(saved);
    }
  }, 180_000);
});
