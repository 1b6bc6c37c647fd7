/**
 * The finetune method on the tiny fixture model and toy images: with fixed noise the loss falls;
 * the saved model has a changed UNet and text encoder and a byte-identical VAE; with
 * train_text_encoder false the text encoder is saved unchanged.
 */
import { createHash } from 'node:crypto';
import { mkdtemp, readFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

import { beforeAll, describe, expect, it } from 'vitest';

import { initBackend } from '../../src/backend.js';
import { trainingConfigSchema } from '../../src/methods/registry.js';
import { loadTrainingConfig } from '../../src/train/config.js';
import { train } from '../../src/train/loop.js';
import { writeToyDataset } from '../../src/toy/dataset.js';
import { TINY_SD } from '../helpers/fixtures.js';

let dataDir: string;
beforeAll(async () => {
  await initBackend({ backend: 'wasm', log: () => {} });
  dataDir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-ft-data-'));
  await writeToyDataset({ dir: dataDir, seed: 0, split: 'pretrain', size: 32, count: 4 });
});

const sha = async (f: string) => createHash('sha256').update(await readFile(f)).digest('hex');
const FILES = { unet: 'unet/diffusion_pytorch_model.safetensors', text: 'text_encoder/model.safetensors', vae: 'vae/diffusion_pytorch_model.safetensors' } as const;

async function run(sets: readonly string[]) {
  const out = await mkdtemp(path.join(os.tmpdir(), 'sdwb-ft-out-'));
  const base = ['method=finetune', `model=${TINY_SD}`, `output_dir=${out}`, `data.dir=${dataDir}`, 'data.resolution=32', 'backend=wasm', 'batch_size=2', 'fixed_noise=true', 'learning_rate=1e-3', 'save_every=1000'];
  const { config } = await loadTrainingConfig(undefined, [...base, ...sets], trainingConfigSchema());
  const result = await train(config, { progress: false, log: () => {} });
  return { out, result };
}

describe('finetune', () => {
  it('loss falls with fixed noise; UNet and text encoder change, the VAE does not', async () => {
    const { out, result } = await run(['steps=6']);
    const losses = result.steps.map((s) => s.loss);
    expect(losses[losses.length - 1]!).toBeLessThan(losses[0]! * 0.9);
    const saved = path.join(out, 'model');
    expect(await sha(path.join(saved, FILES.vae))).toBe(await sha(path.join(TINY_SD, FILES.vae)));
    expect(await sha(path.join(saved, FILES.unet))).not.toBe(await sha(path.join(TINY_SD, FILES.unet)));
    expect(await sha(path.join(saved, FILES.text))).not.toBe(await sha(path.join(TINY_SD, FILES.text)));
  }, 120_000);

  it('train_text_encoder false keeps the text encoder', async () => {
    const { out } = await run(['steps=2', 'train_text_encoder=false']);
    const saved = path.join(out, 'model');
    expect(await sha(path.join(saved, FILES.text))).toBe(await sha(path.join(TINY_SD, FILES.text)));
    expect(await sha(path.join(saved, FILES.unet))).not.toBe(await sha(path.join(TINY_SD, FILES.unet)));
  }, 120_000);
});
