/**
 * The training loop: bit-exact resume, flat memory, the non-finite guard, checkpoints and logs —
 * with textual inversion on the tiny model and with a model-free toy method (the loop knows
 * neither).
 */
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

import * as tf from '@tensorflow/tfjs';
import sharp from 'sharp';
import { beforeAll, describe, expect, it } from 'vitest';
import { z } from 'zod';

import { initBackend } from '../../src/backend.js';
import { SafetensorsFile } from '../../src/io/safetensors.js';
import { trainingConfigSchema } from '../../src/methods/registry.js';
import { TOKEN_TABLE_KEY } from '../../src/methods/textual-inversion.js';
import type { TrainingMethod } from '../../src/methods/types.js';
import { disposeStableDiffusion, loadStableDiffusion, type StableDiffusion } from '../../src/pipeline/load.js';
import { listCheckpoints, readCheckpoint } from '../../src/train/checkpoint.js';
import { checkCommonFields, commonFields, loadTrainingConfig, type MethodConfig } from '../../src/train/config.js';
import { NonFiniteError } from '../../src/train/grad-utils.js';
import { train, type StepReport } from '../../src/train/loop.js';
import { readMetrics } from '../../src/train/metrics.js';
import { TINY_SD } from '../helpers/fixtures.js';

const IMAGES = '/work/shared/data/images_cc0';

let imageDir: string;
beforeAll(async () => {
  await initBackend({ backend: 'wasm', log: () => {} });
  imageDir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-loop-images-'));
  for (const name of ['chelsea.png', 'coffee.png', 'rocket.jpg']) {
    await sharp(path.join(IMAGES, name)).resize(48, 48).png().toFile(path.join(imageDir, `${path.parse(name).name}.png`));
  }
});

async function tiConfig(outputDir: string, sets: readonly string[] = []): Promise<MethodConfig> {
  const { config } = await loadTrainingConfig(
    undefined,
    [
      'method=textual_inversion',
      `model=${TINY_SD}`,
      `output_dir=${outputDir}`,
      `data.dir=${imageDir}`,
      'data.resolution=32',
      'data.random_flip=true',
      'data.center_crop=false',
      'placeholder_token=<tiny-thing>',
      'initializer_token=cat',
      'backend=wasm',
      'learning_rate=5e-3',
      'save_formats=[a1111_safetensors, diffusers]',
      ...sets,
    ],
    trainingConfigSchema(),
  );
  return config;
}

async function tmp(prefix: string): Promise<string> {
  return mkdtemp(path.join(os.tmpdir(), `sdwb-loop-${prefix}-`));
}

const quiet = { progress: false as const, log: () => {} };

describe('resume', () => {
  it('continues bit for bit: 6 steps straight = 3 steps, stop, resume to 6', async () => {
    // Accumulation, clipping, a warmup + cosine schedule, random crops/flips and templates all in play.
    const sets = ['steps=6', 'gradient_accumulation_steps=2', 'max_grad_norm=0.01', 'lr_scheduler=cosine', 'lr_warmup_steps=2', 'save_every=100'];
    const straightDir = await tmp('straight');
    const straight = await train(await tiConfig(straightDir, sets), quiet);
    expect(straight.steps.map((s) => s.step)).toEqual([1, 2, 3, 4, 5, 6]);

    const splitDir = await tmp('split');
    const stop = new AbortController();
    const first = await train(await tiConfig(splitDir, sets), {
      ...quiet,
      signal: stop.signal,
      onStep: (r) => {
        if (r.step === 3) stop.abort();
      },
    });
    expect(first.interrupted).toBe(true);
    expect(first.step).toBe(3);
    expect(first.outputs).toEqual([]);
    expect(await listCheckpoints(splitDir)).toEqual([3]);
    const second = await train(await tiConfig(splitDir, sets), { ...quiet, resume: 'latest' });
    expect(second.steps.map((s) => s.step)).toEqual([4, 5, 6]);

    const losses = (r: readonly StepReport[]) => r.map((s) => s.loss);
    expect(losses([...first.steps, ...second.steps])).toEqual(losses(straight.steps));
    expect([...first.steps, ...second.steps].map((s) => s.gradNorm)).toEqual(straight.steps.map((s) => s.gradNorm));
    // The trained embedding and the optimizer moments end identical too.
    expect(await readFile(path.join(splitDir, 'learned_embeds.safetensors'))).toEqual(await readFile(path.join(straightDir, 'learned_embeds.safetensors')));
    const rows = async (dir: string) => {
      const f = await SafetensorsFile.open(path.join(dir, 'tiny-thing.safetensors'));
      const data = await f.readFloat32('emb_params');
      await f.close();
      return Array.from(data);
    };
    expect(await rows(splitDir)).toEqual(await rows(straightDir));
    const a = await readCheckpoint(path.join(straightDir, 'checkpoint-6'));
    const b = await readCheckpoint(path.join(splitDir, 'checkpoint-6'));
    expect(b.optimizer).toEqual(a.optimizer);
    expect(b.state.data).toEqual(a.state.data);
    // metrics.jsonl has each step once, in order.
    expect((await readMetrics(path.join(splitDir, 'metrics.jsonl'))).map((m) => [m.step, m.loss])).toEqual(
      straight.steps.map((s) => [s.step, s.loss]),
    );
    console.log(`[resume] losses ${losses(straight.steps).map((l) => l.toFixed(6)).join(' ')} (bit-identical after resume)`);
  });

  it('refuses a missing checkpoint and one trained with another seed', async () => {
    const dir = await tmp('refuse');
    await expect(train(await tiConfig(dir, ['steps=2']), { ...quiet, resume: 'latest' })).rejects.toThrow(/--resume latest: no checkpoint-<step>\/ folder/);
    await train(await tiConfig(dir, ['steps=1', 'gradient_accumulation_steps=1']), quiet);
    await expect(train(await tiConfig(dir, ['steps=2', 'seed=7']), { ...quiet, resume: 'latest' })).rejects.toThrow(
      /trained with seed 0, the config says 7; resume with the same seed/,
    );
  });
});

describe('memory', () => {
  it('tf.memory().numTensors stays flat over steps (with checkpoints and sample images)', async () => {
    const dir = await tmp('memory');
    const counts: number[] = [];
    const sampling = ['sample_every=2', 'sample_prompts=[<tiny-thing>]', 'sample_steps=2'];
    await train(await tiConfig(dir, ['steps=6', 'gradient_accumulation_steps=2', 'max_grad_norm=1', 'save_every=3', ...sampling]), {
      ...quiet,
      onStep: () => counts.push(tf.memory().numTensors),
    });
    // Step 1 creates the AdamW moments; from then on every step frees what it made.
    expect(new Set(counts.slice(1)).size).toBe(1);
    console.log(`[memory] numTensors after each step: ${counts.join(' ')}`);
  });
});

describe('checkpoints and logs', () => {
  it('writes checkpoint-<step>/ folders, metrics.jsonl, TensorBoard events and sample grids; prunes old checkpoints', async () => {
    const dir = await tmp('logs');
    // Left by a killed run: a half-written checkpoint folder and a half-written file.
    await mkdir(path.join(dir, '.checkpoint-1.tmp-123-abcd'), { recursive: true });
    await writeFile(path.join(dir, '.tiny-thing.safetensors.123.tmp'), 'partial');
    const result = await train(
      await tiConfig(dir, ['steps=4', 'gradient_accumulation_steps=1', 'save_every=1', 'keep_checkpoints=2', 'sample_every=2', 'sample_prompts=[a photo of <tiny-thing>, <tiny-thing>]', 'sample_steps=2']),
      quiet,
    );
    const names = await readdir(dir);
    expect(names.filter((n) => n.startsWith('.'))).toEqual([]);
    expect(await listCheckpoints(dir)).toEqual([3, 4]);
    expect(result.checkpoint).toBe(path.join(dir, 'checkpoint-4'));
    const ckpt = await readdir(path.join(dir, 'checkpoint-4'));
    expect(ckpt.sort()).toEqual(['config.json', 'learned_embeds.safetensors', 'optimizer.safetensors', 'state.json', 'tiny-thing.safetensors', 'trainable.safetensors']);
    const metrics = await readMetrics(path.join(dir, 'metrics.jsonl'));
    expect(metrics.map((m) => m.step)).toEqual([1, 2, 3, 4]);
    expect(metrics.every((m) => typeof m['grad_norm'] === 'number' && m.lr === 5e-3)).toBe(true);
    const events = await readdir(path.join(dir, 'logs'));
    expect(events).toHaveLength(1);
    expect((await stat(path.join(dir, 'logs', events[0]!))).size).toBeGreaterThan(200);
    const samples = (await readdir(path.join(dir, 'samples'))).sort();
    expect(samples).toEqual(['step-000002.png', 'step-000004.png']);
    const grid = await sharp(path.join(dir, 'samples', 'step-000004.png')).metadata();
    expect([grid.width, grid.height]).toEqual([64, 32]); // two 32×32 samples side by side
    // The checkpoint's trainable rows are the final embedding.
    const f = await SafetensorsFile.open(path.join(dir, 'tiny-thing.safetensors'));
    const final = await f.readFloat32('emb_params');
    await f.close();
    const saved = (await readCheckpoint(path.join(dir, 'checkpoint-4'))).trainable.get('text_encoder.token_embedding.new_rows')!;
    expect(Array.from(saved.data)).toEqual(Array.from(final));
  });
});

describe('what training touches', () => {
  it('only the new rows change: every UNet, VAE and text-encoder tensor (the token table included) stays bit-identical', async () => {
    const dir = await tmp('untouched');
    const fingerprints: Map<string, string>[] = [];
    let loaded: StableDiffusion | undefined;
    let rowsAfter: Float32Array | undefined;
    await train(await tiConfig(dir, ['steps=3', 'gradient_accumulation_steps=1', 'learning_rate=5e-2', 'save_every=100']), {
      ...quiet,
      loadModel: async (m) => {
        loaded = await loadStableDiffusion(m);
        fingerprints.push(fingerprint(loaded));
        return loaded;
      },
      onStep: (r) => {
        if (r.step === 3) fingerprints.push(fingerprint(loaded!));
      },
    });
    const [before, after] = fingerprints as [Map<string, string>, Map<string, string>];
    expect(before.size).toBeGreaterThan(200);
    expect([...after]).toEqual([...before]);
    const f = await SafetensorsFile.open(path.join(dir, 'learned_embeds.safetensors'));
    rowsAfter = await f.readFloat32('<tiny-thing>');
    await f.close();
    // …while the new row did move away from its initializer ('cat').
    const model = await loadStableDiffusion(TINY_SD);
    const cat = model.tokenizer.contentIds('cat')[0]!;
    const catRow = tf.tidy(() => tf.slice(model.text.store.get(TOKEN_TABLE_KEY)!, [cat, 0], [1, -1]).dataSync());
    disposeStableDiffusion(model);
    expect(Array.from(rowsAfter)).not.toEqual(Array.from(catRow));
  });
});

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

describe('data.cache_latents', () => {
  it('trains on cached posteriors like on encoded pixels, and fills the cache once per image', async () => {
    const base = ['steps=3', 'gradient_accumulation_steps=1', 'data.center_crop=true', 'data.random_flip=false', 'save_every=100'];
    const plain = await train(await tiConfig(await tmp('nocache'), base), quiet);
    const dir = await tmp('cache');
    const cached = await train(await tiConfig(dir, [...base, 'data.cache_latents=true']), quiet);
    const entries = (await readdir(path.join(dir, 'latent-cache'), { recursive: true })).filter((n) => String(n).endsWith('.safetensors'));
    expect(entries).toHaveLength(3);
    for (const [i, s] of cached.steps.entries()) expect(Math.abs(s.loss - plain.steps[i]!.loss)).toBeLessThan(1e-5);
  });
});

// A model-free method: fit w to a target by least squares; NaN at chosen steps.
const toySchema = z.strictObject({ method: z.literal('toy'), ...commonFields({ steps: 10, learning_rate: 0.1 }), nan_at: z.array(z.number()).default([]) }).superRefine(checkCommonFields);
type ToyConfig = z.infer<typeof toySchema>;
interface ToyState {
  readonly cfg: ToyConfig;
  readonly w: tf.Variable;
}
const TARGET = [1, -2, 3, 0.5];
const toy: TrainingMethod<ToyConfig, ToyState, { target: tf.Tensor; poison: number }> = {
  id: 'toy',
  description: 'least squares',
  configSchema: toySchema,
  async setup(_ctx, cfg) {
    return { cfg, w: tf.variable(tf.zeros([4])) };
  },
  trainable: (s) => ({ w: s.w }),
  async prepare(ctx, s) {
    return { target: tf.tensor1d(TARGET), poison: s.cfg.nan_at.includes(ctx.step + 1) ? NaN : 0 };
  },
  loss: (_ctx, s, b) => tf.add(tf.mean(tf.square(tf.sub(s.w, b.target))), b.poison) as tf.Scalar,
  async artifacts() {
    return [];
  },
  generationPatch: () => ({}),
  applyArtifact: () => Promise.reject(new Error('no artifacts')),
  dispose: (s) => s.w.dispose(),
};

function toyConfig(dir: string, extra: Record<string, unknown>): ToyConfig {
  return toySchema.parse({ method: 'toy', model: 'unused', output_dir: dir, backend: 'wasm', ...extra });
}

describe('a method the loop has never heard of', () => {
  it('trains without a model: the loss falls', async () => {
    const dir = await tmp('toy');
    const r = await train(toyConfig(dir, { steps: 30, adam_weight_decay: 0 }), { ...quiet, method: toy });
    expect(r.steps[29]!.loss).toBeLessThan(r.steps[0]!.loss / 10);
  });

  it('skips non-finite steps without touching the weights, counts them, and stops after max_nonfinite_steps in a row', async () => {
    const dir = await tmp('nan');
    const r = await train(toyConfig(dir, { steps: 6, nan_at: [2, 4], save_every: 100 }), { ...quiet, method: toy });
    expect(r.steps.map((s) => s.skipped)).toEqual([false, true, false, true, false, false]);
    expect(r.skippedSteps).toBe(2);
    const ckpt = await readCheckpoint(path.join(dir, 'checkpoint-6'));
    expect(ckpt.optimizer.step).toBe(4); // two of six updates skipped
    expect(ckpt.state.nonfinite).toEqual({ skipped: 2, consecutive: 0 });

    const dir2 = await tmp('diverge');
    await expect(train(toyConfig(dir2, { steps: 10, nan_at: [3, 4, 5], max_nonfinite_steps: 3 }), { ...quiet, method: toy })).rejects.toThrow(NonFiniteError);
    await expect(train(toyConfig(await tmp('diverge2'), { steps: 10, nan_at: [3, 4, 5], max_nonfinite_steps: 3 }), { ...quiet, method: toy })).rejects.toThrow(
      /step 5: loss = NaN; 3 consecutive steps skipped \(3 in total\)/,
    );
  });

  it('restores the skip counters on resume', async () => {
    const dir = await tmp('nan-resume');
    const stop = new AbortController();
    await train(toyConfig(dir, { steps: 8, nan_at: [2, 3], save_every: 100, max_nonfinite_steps: 3 }), {
      ...quiet,
      method: toy,
      signal: stop.signal,
      onStep: (s) => s.step === 3 && stop.abort(),
    });
    expect((await readCheckpoint(path.join(dir, 'checkpoint-3'))).state.nonfinite).toEqual({ skipped: 2, consecutive: 2 });
    // One more NaN in a row (step 4) makes three: the resumed run stops where the straight one would.
    await expect(
      train(toyConfig(dir, { steps: 8, nan_at: [2, 3, 4], save_every: 100, max_nonfinite_steps: 3 }), { ...quiet, method: toy, resume: 'latest' }),
    ).rejects.toThrow(/step 4: loss = NaN; 3 consecutive steps skipped \(3 in total\)/);
  });
});
