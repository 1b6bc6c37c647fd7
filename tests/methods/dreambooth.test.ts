/**
 * DreamBooth pieces: the example configs and the adapter-dependent defaults, min-SNR-γ weights,
 * what `prepare` builds (ε and v targets, the class half, loss weights) and the class-image
 * cache (generated once, only what is missing, the same images however they are batched).
 */
import { mkdtemp, readdir, readFile, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

import * as tf from '@tensorflow/tfjs';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { initBackend } from '../../src/backend.js';
import {
  dreambooth,
  dreamboothConfigSchema,
  ensureClassImages,
  minSnrWeight,
  type ClassImageOptions,
  type DreamBoothState,
} from '../../src/methods/dreambooth.js';
import { trainingConfigSchema } from '../../src/methods/registry.js';
import type { SetupCtx } from '../../src/methods/types.js';
import { clipTextEncoder } from '../../src/models/clip/text-encoder.js';
import { tfOps } from '../../src/ops/tfjs-ops.js';
import { disposeStableDiffusion, loadStableDiffusion, type StableDiffusion } from '../../src/pipeline/load.js';
import { noiseSchedule } from '../../src/schedulers/tables.js';
import { ConfigError, loadTrainingConfig, parseTrainingConfig } from '../../src/train/config.js';
import { setupRandom, stepRandom } from '../../src/train/rng-state.js';
import { TINY_SD } from '../helpers/fixtures.js';

const ROOT = path.resolve(import.meta.dirname, '../..');

let model: StableDiffusion;
let imageDir: string;
beforeAll(async () => {
  await initBackend({ backend: 'wasm', log: () => {} });
  model = await loadStableDiffusion(TINY_SD);
  imageDir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-db-images-'));
  // A "subject": a red disc on blue, at two positions.
  for (const [i, x] of [8, 20].entries()) {
    const svg = `<svg width="32" height="32"><rect width="32" height="32" fill="#2040c0"/><circle cx="${x}" cy="16" r="6" fill="#e02020"/></svg>`;
    await sharp(Buffer.from(svg)).png().toFile(path.join(imageDir, `subject-${i}.png`));
  }
});
afterAll(() => disposeStableDiffusion(model));

function config(extra: Record<string, unknown> = {}) {
  return dreamboothConfigSchema.parse({
    method: 'dreambooth',
    model: TINY_SD,
    output_dir: '/tmp/unused',
    data: { dir: imageDir, instance_prompt: 'a photo of sks dog', resolution: 32 },
    ...extra,
  });
}

function setupCtx(log: (line: string) => void = () => {}): SetupCtx {
  return { model: async () => model, random: setupRandom(0), log };
}

describe('configs', () => {
  it('configs/dreambooth.yaml and configs/dreambooth-lora.yaml parse as documented', async () => {
    const full = (await loadTrainingConfig(path.join(ROOT, 'configs/dreambooth.yaml'), [], trainingConfigSchema())).config;
    expect(full).toMatchObject({ method: 'dreambooth', adapter: 'full', learning_rate: 5e-6, steps: 800, with_prior_preservation: true, gradient_checkpointing: true, save_formats: ['diffusers'] });
    const lora = (await loadTrainingConfig(path.join(ROOT, 'configs/dreambooth-lora.yaml'), ['rank=8'], trainingConfigSchema())).config;
    expect(lora).toMatchObject({ method: 'dreambooth', adapter: 'lora', rank: 8, lora_alpha: null, learning_rate: 1e-4, steps: 500, save_formats: ['kohya', 'diffusers'], output_name: 'sks-dog' });
    expect((lora as { lora_targets: string[] }).lora_targets).toEqual(['to_q', 'to_k', 'to_v', 'to_out.0']);
  });

  it("defaults follow the adapter: diffusers' 5e-6 / 400 steps / a folder (full), 1e-4 / 500 / kohya (lora)", () => {
    expect(config()).toMatchObject({ adapter: 'full', learning_rate: 5e-6, steps: 400, save_formats: ['diffusers'], max_grad_norm: 1, prior_loss_weight: 1, num_class_images: 100 });
    expect(config({ adapter: 'lora' })).toMatchObject({ learning_rate: 1e-4, steps: 500, save_formats: ['kohya'], rank: 4, lora_alpha: null, lora_init: 'gaussian' });
    expect(config({ adapter: 'lora', learning_rate: 3e-4, steps: 7 })).toMatchObject({ learning_rate: 3e-4, steps: 7 });
  });

  it('says what is missing or mismatched, one line per field', () => {
    const issues = (raw: Record<string, unknown>): string => {
      try {
        parseTrainingConfig(raw, trainingConfigSchema(), 'db.yaml');
      } catch (e) {
        if (e instanceof ConfigError) return e.issues.join('\n');
        throw e;
      }
      throw new Error('expected a ConfigError');
    };
    const raw = { method: 'dreambooth', model: 'm', output_dir: 'o', data: { dir: 'd' }, adapter: 'lora', with_prior_preservation: true, save_formats: ['single_file'] };
    expect(issues({ ...raw, rnak: 4 })).toMatch(/rnak: unknown field \(did you mean 'rank'\?\)/);
    const found = issues(raw);
    expect(found).toMatch(/data\.instance_prompt: required/);
    expect(found).toMatch(/class_prompt: required with with_prior_preservation/);
    const sidecar = issues({ ...raw, class_captions: 'sidecar' });
    expect(sidecar).toMatch(/class_data_dir: required with class_captions: sidecar/);
    expect(sidecar).not.toMatch(/class_prompt/);
    expect(found).toMatch(/save_formats\.0: 'single_file' is not a format of adapter lora/);
  });
});

describe('min-SNR-γ weights', () => {
  it('are min(SNR, γ)/SNR for ε and that + 1 for v, SNR = ᾱ/(1−ᾱ)', () => {
    const schedule = noiseSchedule(model.scheduler);
    for (const t of [0, 10, 250, 500, 999]) {
      const a = schedule.alphasCumprod[t]!;
      const snr = a / (1 - a);
      const eps = Math.min(snr, 5) / snr;
      expect(Math.abs(minSnrWeight(schedule, t, 5, 'epsilon') - eps)).toBeLessThan(1e-6 * Math.max(1, eps));
      expect(Math.abs(minSnrWeight(schedule, t, 5, 'v_prediction') - (eps + 1))).toBeLessThan(1e-6 * (eps + 1));
    }
    // Low noise (large SNR) is down-weighted; noisy timesteps keep weight 1.
    expect(minSnrWeight(schedule, 0, 5, 'epsilon')).toBeLessThan(0.01);
    expect(minSnrWeight(schedule, 999, 5, 'epsilon')).toBe(1);
  });
});

describe('prepare', () => {
  const pixels = new Float32Array(2 * 32 * 32 * 3).map((_, i) => Math.sin(i) * 0.5);
  const raw = { step: 0, micro: 0, images: { captions: ['a photo of sks dog', 'a photo of sks dog'], pixels, count: 2, height: 32, width: 32 } };

  it('v targets are (ε − √(1−ᾱ)·x_t)/√ᾱ of the ε run with the same draws; SNR weights per sample', async () => {
    const batches = [];
    for (const prediction_type of ['epsilon', 'v_prediction'] as const) {
      const s = (await dreambooth.setup(setupCtx(), config({ adapter: 'lora', prediction_type, snr_gamma: 5 }))) as DreamBoothState;
      batches.push({ s, b: await dreambooth.prepare({ step: 0, micro: 0, random: stepRandom(3, 0, 0) }, s, raw) });
    }
    const [eps, v] = batches as [(typeof batches)[0], (typeof batches)[0]];
    expect(Array.from(v.b.noisy.dataSync())).toEqual(Array.from(eps.b.noisy.dataSync()));
    const t = Array.from(eps.b.timesteps.dataSync());
    const schedule = noiseSchedule(model.scheduler);
    const [xt, e, vt] = [eps.b.noisy.dataSync(), eps.b.target.dataSync(), v.b.target.dataSync()];
    const per = xt.length / 2;
    let worst = 0;
    for (let i = 0; i < xt.length; i++) {
      const a = schedule.alphasCumprod[t[Math.floor(i / per)]!]!;
      const want = (e[i]! - Math.sqrt(1 - a) * xt[i]!) / Math.sqrt(a);
      worst = Math.max(worst, Math.abs(vt[i]! - want) / (1 + Math.abs(want)));
    }
    expect(worst).toBeLessThan(1e-4);
    expect(Array.from(eps.b.weights.dataSync())).toEqual(t.map((ti) => Math.fround(minSnrWeight(schedule, ti, 5, 'epsilon') / 2)));
    expect(Array.from(v.b.weights.dataSync())).toEqual(t.map((ti) => Math.fround(minSnrWeight(schedule, ti, 5, 'v_prediction') / 2)));
    for (const { s, b } of batches) {
      tf.dispose(Object.values(b));
      dreambooth.dispose(s);
    }
  });

  it('with prior preservation: instance then class samples, class prompt states, prior_loss_weight/B', async () => {
    const classDir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-db-class-'));
    await sharp({ create: { width: 32, height: 32, channels: 3, background: '#808080' } }).png().toFile(path.join(classDir, 'a.png'));
    const s = (await dreambooth.setup(
      setupCtx(),
      config({ adapter: 'lora', with_prior_preservation: true, class_prompt: 'a photo of dog', class_data_dir: classDir, num_class_images: 1, prior_loss_weight: 0.5 }),
    )) as DreamBoothState;
    const b = await dreambooth.prepare({ step: 0, micro: 0, random: stepRandom(0, 0, 0) }, s, raw);
    expect(b.noisy.shape).toEqual([4, 16, 16, 4]);
    expect(Array.from(b.weights.dataSync())).toEqual([0.5, 0.5, 0.25, 0.25]);
    const states = (prompt: string) =>
      tf.tidy(() => clipTextEncoder(tfOps, model.text.store.scope(), tf.tensor2d([model.tokenizer.encode(prompt)], undefined, 'int32'), model.text.cfg).lastHiddenState.dataSync());
    const text = b.text.dataSync();
    const row = text.length / 4;
    expect(Array.from(text.slice(0, row))).toEqual(Array.from(states('a photo of sks dog')));
    expect(Array.from(text.slice(3 * row))).toEqual(Array.from(states('a photo of dog')));
    tf.dispose(Object.values(b));
    dreambooth.dispose(s);
  });

  it('with class_captions sidecar: each class image trains with its own .txt caption, and none is generated', async () => {
    const classDir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-db-reg-'));
    for (const [name, colour, caption] of [['a', '#808080', 'a grey square'], ['b', '#20c020', 'a green circle']] as const) {
      await sharp({ create: { width: 32, height: 32, channels: 3, background: colour } }).png().toFile(path.join(classDir, `${name}.png`));
      await writeFile(path.join(classDir, `${name}.txt`), caption);
    }
    const before = (await readdir(classDir)).sort();
    const s = (await dreambooth.setup(
      setupCtx(),
      config({ adapter: 'lora', with_prior_preservation: true, class_captions: 'sidecar', class_data_dir: classDir, num_class_images: 10 }),
    )) as DreamBoothState;
    expect((await readdir(classDir)).sort()).toEqual(before);
    const b = await dreambooth.prepare({ step: 0, micro: 0, random: stepRandom(0, 0, 0) }, s, raw);
    const states = (prompt: string) =>
      tf.tidy(() => Array.from(clipTextEncoder(tfOps, model.text.store.scope(), tf.tensor2d([model.tokenizer.encode(prompt)], undefined, 'int32'), model.text.cfg).lastHiddenState.dataSync()));
    const text = b.text.dataSync();
    const row = text.length / 4;
    const classRows = [Array.from(text.slice(2 * row, 3 * row)), Array.from(text.slice(3 * row))];
    // The two class samples of the first batch are the two images, in the dataset's seeded order.
    const captions = [states('a grey square'), states('a green circle')];
    expect(classRows.some((r) => JSON.stringify(r) === JSON.stringify(captions[0]))).toBe(true);
    expect(classRows.some((r) => JSON.stringify(r) === JSON.stringify(captions[1]))).toBe(true);
    tf.dispose(Object.values(b));
    dreambooth.dispose(s);
  });

  it('class_caption_dropout_rate trains some class samples with the empty caption, never an instance sample', async () => {
    const classDir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-db-drop-'));
    await sharp({ create: { width: 32, height: 32, channels: 3, background: '#808080' } }).png().toFile(path.join(classDir, 'a.png'));
    const states = (prompt: string) =>
      tf.tidy(() => JSON.stringify(Array.from(clipTextEncoder(tfOps, model.text.store.scope(), tf.tensor2d([model.tokenizer.encode(prompt)], undefined, 'int32'), model.text.cfg).lastHiddenState.dataSync())));
    const [instance, klass, empty] = [states('a photo of sks dog'), states('a photo of dog'), states('')];
    const seen = async (rate: number) => {
      const s = (await dreambooth.setup(
        setupCtx(),
        config({ adapter: 'lora', with_prior_preservation: true, class_prompt: 'a photo of dog', class_data_dir: classDir, num_class_images: 1, class_caption_dropout_rate: rate }),
      )) as DreamBoothState;
      const rows: string[][] = [];
      for (let step = 0; step < 8; step++) {
        const b = await dreambooth.prepare({ step, micro: 0, random: stepRandom(0, step, 0) }, s, { ...raw, step });
        const text = b.text.dataSync();
        const row = text.length / 4;
        rows.push([0, 1, 2, 3].map((i) => JSON.stringify(Array.from(text.slice(i * row, (i + 1) * row)))));
        tf.dispose(Object.values(b));
      }
      dreambooth.dispose(s);
      return rows;
    };
    const all = await seen(1);
    expect(all.every((r) => r[0] === instance && r[1] === instance && r[2] === empty && r[3] === empty)).toBe(true);
    const half = await seen(0.5);
    expect(half.every((r) => r[0] === instance && r[1] === instance)).toBe(true);
    const classRows = half.flatMap((r) => r.slice(2));
    expect(classRows.every((r) => r === klass || r === empty)).toBe(true);
    expect(classRows.filter((r) => r === empty).length).toBeGreaterThan(2);
    expect(classRows.filter((r) => r === klass).length).toBeGreaterThan(2);
    expect(JSON.stringify(await seen(0.5))).toBe(JSON.stringify(half));
  });
});

describe('class images', () => {
  const options = (dir: string, extra: Partial<ClassImageOptions> = {}): ClassImageOptions => ({
    dir,
    prompt: 'a photo of dog',
    negativePrompt: '',
    count: 3,
    width: 32,
    height: 32,
    steps: 2,
    guidance: 1,
    batchSize: 2,
    seed: 7,
    ...extra,
  });
  const contents = async (dir: string) => {
    const names = (await readdir(dir)).sort();
    return Promise.all(names.map(async (n) => ({ n, bytes: await readFile(path.join(dir, n)), mtime: (await stat(path.join(dir, n))).mtimeMs })));
  };

  it('are generated once: only the missing ones, the same pixels however they are batched', async () => {
    const a = await mkdtemp(path.join(os.tmpdir(), 'sdwb-db-gen-a-'));
    expect(await ensureClassImages(model, options(a), () => {})).toEqual({ existing: 0, generated: 3 });
    const first = await contents(a);
    expect(first.map((f) => f.n.replace(/-[0-9a-f]{40}\.png$/, ''))).toEqual(['00000', '00001', '00002']);
    const lines: string[] = [];
    expect(await ensureClassImages(model, options(a), (l) => lines.push(l))).toEqual({ existing: 3, generated: 0 });
    expect(lines).toEqual([]);
    expect(await contents(a)).toEqual(first);

    // One at a time, in two sittings: image i is still image i.
    const b = await mkdtemp(path.join(os.tmpdir(), 'sdwb-db-gen-b-'));
    expect(await ensureClassImages(model, options(b, { count: 1, batchSize: 1 }), () => {})).toEqual({ existing: 0, generated: 1 });
    expect(await ensureClassImages(model, options(b, { batchSize: 1 }), () => {})).toEqual({ existing: 1, generated: 2 });
    const second = await contents(b);
    expect(second.map((f) => f.n)).toEqual(first.map((f) => f.n));
    expect(second.map((f) => f.bytes)).toEqual(first.map((f) => f.bytes));
    // Different images, not one image three times.
    expect(new Set(first.map((f) => f.n.slice(6))).size).toBe(3);
  });
});
