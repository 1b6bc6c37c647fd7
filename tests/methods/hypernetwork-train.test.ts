/**
 * Training a hypernetwork on the tiny model: only its weights change (every base tensor hashes
 * the same before and after), memory stays flat, the loss falls on a fixed objective, and `sdwb train
 * configs/hypernetwork.yaml` runs end to end with sample images and an A1111 file that loads.
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtemp, readdir } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';

import * as tf from '@tensorflow/tfjs';
import sharp from 'sharp';
import { beforeAll, describe, expect, it } from 'vitest';

import { initBackend } from '../../src/backend.js';
import { readHypernetworkPt } from '../../src/methods/hypernetwork-file.js';
import { trainingConfigSchema } from '../../src/methods/registry.js';
import { loadStableDiffusion, type StableDiffusion } from '../../src/pipeline/load.js';
import { readCheckpoint } from '../../src/train/checkpoint.js';
import { loadTrainingConfig, type MethodConfig } from '../../src/train/config.js';
import { train } from '../../src/train/loop.js';
import { readMetrics } from '../../src/train/metrics.js';
import { TINY_SD } from '../helpers/fixtures.js';

const ROOT = path.resolve(import.meta.dirname, '../..');
const CONFIG = path.join(ROOT, 'configs/hypernetwork.yaml');
const IMAGES = '/work/shared/data/images_cc0';

let imageDir: string;
let oneImageDir: string;
beforeAll(async () => {
  await initBackend({ backend: 'wasm', log: () => {} });
  imageDir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-hn-images-'));
  oneImageDir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-hn-image-'));
  for (const name of ['chelsea.png', 'coffee.png']) {
    await sharp(path.join(IMAGES, name)).resize(32, 32).png().toFile(path.join(imageDir, `${path.parse(name).name}.png`));
  }
  await sharp(path.join(IMAGES, 'chelsea.png')).resize(32, 32).png().toFile(path.join(oneImageDir, 'chelsea.png'));
});

/** The example config with the tiny model's widths and a tiny run. */
async function hnConfig(outputDir: string, sets: readonly string[]): Promise<MethodConfig> {
  const { config } = await loadTrainingConfig(
    CONFIG,
    [
      `model=${TINY_SD}`,
      `output_dir=${outputDir}`,
      `data.dir=${imageDir}`,
      'data.resolution=32',
      'data.instance_prompt=a photo of a thing',
      'enable_sizes=[32, 64]',
      'backend=wasm',
      'sample_every=null',
      ...sets,
    ],
    trainingConfigSchema(),
  );
  return config;
}

function fingerprint(model: StableDiffusion): Map<string, string> {
  const out = new Map<string, string>();
  for (const [part, store] of [['text', model.text.store], ['unet', model.unet.store], ['vae', model.vae.store]] as const) {
    for (const key of store.keys()) {
      const data = store.get(key)!.dataSync() as Float32Array;
      out.set(`${part}.${key}`, createHash('sha256').update(new Uint8Array(data.buffer, data.byteOffset, data.byteLength)).digest('hex'));
    }
  }
  return out;
}

const mean = (xs: readonly number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;

describe('hypernetwork training', () => {
  it('changes only the hypernetwork, and the loss falls on a fixed objective', async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-hn-train-'));
    // fixed_noise: the same x_t, t and target every step, so the fall is the hypernetwork's
    // doing; one image (center crop, no flip) so the batch never changes either.
    const cfg = await hnConfig(dir, [
      'steps=30',
      'learning_rate=2e-3',
      'fixed_noise=true',
      'data.random_flip=false',
      'save_every=1',
      'keep_checkpoints=null',
      'activation_func=relu',
      `data.dir=${oneImageDir}`,
    ]);
    let model: StableDiffusion | undefined;
    let before: Map<string, string> | undefined;
    let after: Map<string, string> | undefined;
    const tensors: number[] = [];
    const result = await train(cfg, {
      progress: false,
      log: () => {},
      loadModel: async (m) => {
        model = await loadStableDiffusion(m);
        before = fingerprint(model);
        return model;
      },
      // The model is freed when train returns: fingerprint it after the last step.
      onStep: (r) => {
        tensors.push(tf.memory().numTensors);
        if (r.step === 30) after = fingerprint(model!);
      },
    });
    expect(result.steps).toHaveLength(30);
    expect(before!.size).toBeGreaterThan(100);
    expect([...after!]).toEqual([...before!]);
    // The loop owns memory: nothing a step of this method creates outlives it.
    expect(new Set(tensors.slice(2)).size, `tensor counts ${tensors.join(' ')}`).toBe(1);

    // Every hypernetwork tensor moved between step 1 and step 30.
    const first = (await readCheckpoint(path.join(dir, 'checkpoint-1'))).trainable;
    const last = (await readCheckpoint(path.join(dir, 'checkpoint-30'))).trainable;
    expect([...first.keys()].sort()).toEqual([...last.keys()].sort());
    expect([...first.keys()].every((k) => k.startsWith('hypernetwork.32.') || k.startsWith('hypernetwork.64.'))).toBe(true);
    for (const [key, t] of first) expect(Array.from(last.get(key)!.data), key).not.toEqual(Array.from(t.data));
    // The final file holds the last weights.
    const file = await readHypernetworkPt(path.join(dir, `${path.basename(dir)}.pt`));
    expect(file.step).toBe(30);
    expect(Array.from(file.modules.get(64)![1].get('linear.2.weight')!.data)).toEqual(Array.from(last.get('hypernetwork.64.v.linear.2.weight')!.data));

    const losses = (await readMetrics(path.join(dir, 'metrics.jsonl'))).map((m) => m.loss!);
    const start = mean(losses.slice(0, 3));
    const end = mean(losses.slice(-3));
    console.log(`[hypernetwork train] loss mean of steps 1-3 ${start.toFixed(5)}, of steps 28-30 ${end.toFixed(5)}`);
    expect(losses.every(Number.isFinite)).toBe(true);
    expect(end).toBeLessThan(start * 0.97);
  });
});

describe('sdwb train configs/hypernetwork.yaml', () => {
  it('trains the tiny model with sample images and writes an A1111 .pt', async () => {
    const out = await mkdtemp(path.join(os.tmpdir(), 'sdwb-hn-cli-'));
    const sets = [
      `model=${TINY_SD}`,
      `output_dir=${out}`,
      `data.dir=${imageDir}`,
      'data.resolution=32',
      'enable_sizes=[32, 64]',
      'hypernetwork_name=tiny-style',
      'data.instance_prompt=a painting',
      'backend=wasm',
      'steps=4',
      'save_every=4',
      'sample_every=2',
      'sample_steps=3',
      'learning_rate=1e-3',
      'use_dropout=true',
    ];
    let r: { stdout: string; stderr: string };
    try {
      r = await promisify(execFile)(process.execPath, ['--import', 'tsx', path.join(ROOT, 'src/cli/main.ts'), 'train', CONFIG, ...sets.flatMap((s) => ['--set', s])], {
        cwd: ROOT,
        maxBuffer: 1 << 26,
      });
    } catch (e) {
      throw new Error(`sdwb train failed: ${(e as { stderr?: string }).stderr ?? String(e)}`);
    }
    expect(r.stdout.trim().split('\n')).toContain(path.join(out, 'tiny-style.pt'));
    expect((await readdir(path.join(out, 'samples'))).sort()).toEqual(['step-000002.png', 'step-000004.png']);
    const grid = await sharp(path.join(out, 'samples', 'step-000004.png')).metadata();
    expect([grid.width, grid.height]).toEqual([64, 32]); // the config's two prompts side by side
    const file = await readHypernetworkPt(path.join(out, 'tiny-style.pt'));
    expect(file).toMatchObject({ name: 'tiny-style', step: 4, useDropout: true, arch: { dropoutStructure: [0, 0.3, 0] } });
    expect([...file.modules.keys()]).toEqual([32, 64]);
    expect((await readMetrics(path.join(out, 'metrics.jsonl'))).map((m) => m.step)).toEqual([1, 2, 3, 4]);
  });
});
