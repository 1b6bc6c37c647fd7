/**
 * ESD against the reference fixtures (`erasure-reference/esd.safetensors`, README there): both
 * versions of the official code — the 2023 CompVis DDIM x_t for every stored t_enc from the stored
 * start code, the 2024 pipeline x_t from the stored seed, and for both the frozen predictions, the
 * loss and the gradients at the stored x_t / t; the 2023 Adam step.
 */
import path from 'node:path';

import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { initBackend } from '../../src/backend.js';
import { hwioToOihw } from '../../src/io/layout.js';
import { esd, esdBatchAt, esdConfigSchema, esdLoss, frozenPredictions, sampleXt2023, sampleXt2024, type EsdState } from '../../src/methods/esd.js';
import { compvisDdimGrid, lossTimestepRange, tillTIndices } from '../../src/methods/esd-sampling.js';
import { disposeStableDiffusion, loadStableDiffusion, type StableDiffusion } from '../../src/pipeline/load.js';
import { AdamOptimizer } from '../../src/train/optimizer.js';
import { setupRandom } from '../../src/train/rng-state.js';
import { diff, ERASURE_REF, get, readRef, TINY_SD, toNhwc, type RefTensor } from '../helpers/fixtures.js';

const TOL = 1e-4;
const TO_K = 'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight';
const CONV_IN = 'conv_in.weight';
const T_ENCS = [0, 1, 2, 10, 25, 49];
const RUN_TILLS = [0, 10, 49];

let ref: Map<string, RefTensor>;
let model: StableDiffusion;
const report: string[] = [];

beforeAll(async () => {
  await initBackend({ backend: 'wasm', log: () => {} });
  ref = await readRef(path.join(ERASURE_REF, 'esd.safetensors'));
  model = await loadStableDiffusion(TINY_SD);
});
afterAll(() => {
  disposeStableDiffusion(model);
  console.log(`[esd reference]\n${report.join('\n')}`);
});

function config(preset: 'esd-2023' | 'esd-2024', parameters: string) {
  return esdConfigSchema.parse({ method: 'esd', model: TINY_SD, output_dir: '/tmp/unused', concept: 'Van Gogh', preset, parameters });
}

async function setup(preset: 'esd-2023' | 'esd-2024', parameters: string): Promise<EsdState> {
  return esd.setup({ model: async () => model, random: setupRandom(0), log: () => {} }, config(preset, parameters));
}

function nhwcTensor(t: RefTensor): tf.Tensor {
  const n = toNhwc(t);
  return tf.tensor(n.data, n.shape, 'float32');
}

function expectClose(name: string, actual: ArrayLike<number>, expected: RefTensor): void {
  const d = diff(actual, expected.data);
  report.push(`${name}: maxAbs ${d.maxAbs.toExponential(2)} rel ${d.rel.toExponential(2)} (scale ${d.scale.toExponential(2)})`);
  expect(d.rel, `${name}: max-abs ${d.maxAbs} vs scale ${d.scale}`).toBeLessThanOrEqual(TOL);
}

/** NHWC tensor → NCHW values (the reference layout). */
async function nchw(t: tf.Tensor): Promise<Float32Array> {
  const [n, h, w, c] = t.shape as [number, number, number, number];
  const data = await t.data<'float32'>();
  const out = new Float32Array(data.length);
  for (let b = 0; b < n; b++) for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) for (let k = 0; k < c; k++) out[((b * c + k) * h + y) * w + x] = data[((b * h + y) * w + x) * c + k]!;
  return out;
}

/** Gradient of `key` in the reference layout (conv filters OIHW). */
async function gradOf(grads: tf.NamedTensorMap, s: EsdState, key: string): Promise<Float32Array> {
  const v = s.variables.get(key)!;
  const g = grads[v.name]!;
  const data = Float32Array.from(await g.data<'float32'>());
  return g.shape.length === 4 ? hwioToOihw(data, g.shape).data : data;
}

describe('esd-2023 (train-esd.py, CompVis DDIM)', () => {
  it('steps through the grid with the script’s off-by-one: 981 dropped, stop after index t_enc − 1', () => {
    const grid = compvisDdimGrid(model.scheduler, 50);
    expect(grid.timesteps.slice(0, 3)).toEqual([1, 21, 41]);
    expect(grid.timesteps.at(-1)).toBe(981);
    expect(tillTIndices(grid, 0)).toHaveLength(49);
    expect(tillTIndices(grid, 1)).toEqual(tillTIndices(grid, 0));
    expect(tillTIndices(grid, 49)).toEqual([48]);
    expect(tillTIndices(grid, 10).at(-1)).toBe(9);
    // The stored loss timesteps are lower + 7 of each t_enc's interval (params.json esd2023_rows).
    for (const k of T_ENCS) {
      const [lo, hi] = lossTimestepRange(k, 50);
      expect(hi - lo).toBe(20);
      expect(get(ref, `esd2023.t_enc_${k}.t`).data[0]).toBe(lo + 7);
    }
  });

  it('samples x_t for every stored t_enc from the stored start code (trained model = original at step 0)', async () => {
    const s = await setup('esd-2023', 'xattn');
    try {
      const start = nhwcTensor(get(ref, 'esd2023.start_code'));
      for (const k of T_ENCS) {
        const xT = await sampleXt2023(s, start, k, 0);
        expectClose(`esd2023.t_enc_${k}.x_t`, await nchw(xT), get(ref, `esd2023.t_enc_${k}.x_t`));
        xT.dispose();
      }
      start.dispose();
    } finally {
      esd.dispose(s);
    }
  });

  it('matches the frozen predictions, loss and gradients at the stored x_t / t, and one Adam step', async () => {
    const s = await setup('esd-2023', 'full');
    try {
      for (const k of T_ENCS) {
        const xT = nhwcTensor(get(ref, `esd2023.t_enc_${k}.x_t`));
        const t = get(ref, `esd2023.t_enc_${k}.t`).data[0]!;
        const p = frozenPredictions(s, xT, t, 0);
        expectClose(`esd2023.t_enc_${k}.e_0`, await nchw(p.eNull), get(ref, `esd2023.t_enc_${k}.e_0`));
        expectClose(`esd2023.t_enc_${k}.e_p`, await nchw(p.eConcept), get(ref, `esd2023.t_enc_${k}.e_p`));
        tf.dispose([p.eNull, p.eConcept]);
        const batch = esdBatchAt(s, xT, t, 0);
        const { value, grads } = tf.variableGrads(() => esdLoss(s, batch), [...s.variables.values()]);
        const loss = (await value.data())[0]!;
        const expected = get(ref, `esd2023.t_enc_${k}.loss`);
        const rel = Math.abs(loss - expected.data[0]!) / Math.abs(expected.data[0]!);
        report.push(`esd2023.t_enc_${k}.loss: ${loss} vs ${expected.data[0]} rel ${rel.toExponential(2)}`);
        expect(rel).toBeLessThanOrEqual(TOL);
        for (const key of [TO_K, CONV_IN]) expectClose(`esd2023.t_enc_${k}.grad.${key}`, await gradOf(grads, s, key), get(ref, `esd2023.t_enc_${k}.grad.${key}`));
        if (k === 10) {
          // torch.optim.Adam(lr=1e-5) = the loop's AdamW with the ESD config's weight decay 0.
          const cfg = s.cfg;
          expect([cfg.learning_rate, cfg.adam_weight_decay, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon]).toEqual([1e-5, 0, 0.9, 0.999, 1e-8]);
          const v = s.variables.get(TO_K)!;
          const before = Float32Array.from(await v.data<'float32'>());
          const opt = new AdamOptimizer([v], { kind: 'adamw', lr: cfg.learning_rate, weightDecay: cfg.adam_weight_decay });
          opt.step({ [v.name]: grads[v.name]! });
          const after = await v.data<'float32'>();
          const expectedAfter = get(ref, `esd2023.adam_step1.${TO_K}`);
          expectClose(`esd2023.adam_step1.${TO_K}`, after, expectedAfter);
          // The update itself (≈ ±lr per element), relative to its own size.
          const ours = after.map((a, i) => a - before[i]!);
          const theirs = expectedAfter.data.map((a, i) => a - before[i]!);
          const d = diff(ours, theirs);
          report.push(`esd2023.adam_step1 update: maxAbs ${d.maxAbs.toExponential(2)} rel ${d.rel.toExponential(2)} (scale ${d.scale.toExponential(2)})`);
          expect(d.rel).toBeLessThanOrEqual(1e-2);
          opt.dispose();
          v.assign(tf.tensor(before, v.shape));
        }
        tf.dispose([xT, value, batch, ...Object.values(grads)]);
      }
    } finally {
      esd.dispose(s);
    }
  });
});

describe('esd-2024 (esd_sd.py, pipeline scheduler)', () => {
  it('uses the pipeline’s PNDM timesteps and reproduces x_t from the stored seed', async () => {
    const s = await setup('esd-2024', 'esd-x');
    try {
      expect(s.sampler!.timesteps).toEqual(Array.from(get(ref, 'esd2024.scheduler_timesteps_50').data));
      for (const r of RUN_TILLS) {
        const seed = get(ref, `esd2024.run_till_${r}.seed`).data[0]!;
        const { xT, t } = await sampleXt2024(s, seed, r, 0);
        expect(t).toBe(get(ref, `esd2024.run_till_${r}.t`).data[0]);
        expectClose(`esd2024.run_till_${r}.x_t (seed ${seed})`, await nchw(xT), get(ref, `esd2024.run_till_${r}.x_t`));
        xT.dispose();
      }
    } finally {
      esd.dispose(s);
    }
  });

  it('matches the frozen predictions, loss and gradients at the stored x_t / t', async () => {
    const s = await setup('esd-2024', 'esd-all');
    try {
      expect(s.cfg.negative_guidance).toBe(2);
      for (const r of RUN_TILLS) {
        const xT = nhwcTensor(get(ref, `esd2024.run_till_${r}.x_t`));
        const t = get(ref, `esd2024.run_till_${r}.t`).data[0]!;
        const p = frozenPredictions(s, xT, t, 0);
        expectClose(`esd2024.run_till_${r}.e_erase`, await nchw(p.eConcept), get(ref, `esd2024.run_till_${r}.e_erase`));
        expectClose(`esd2024.run_till_${r}.e_null`, await nchw(p.eNull), get(ref, `esd2024.run_till_${r}.e_null`));
        tf.dispose([p.eNull, p.eConcept]);
        const batch = esdBatchAt(s, xT, t, 0);
        const { value, grads } = tf.variableGrads(() => esdLoss(s, batch), [...s.variables.values()]);
        const loss = (await value.data())[0]!;
        const expected = get(ref, `esd2024.run_till_${r}.loss`).data[0]!;
        const rel = Math.abs(loss - expected) / Math.abs(expected);
        report.push(`esd2024.run_till_${r}.loss: ${loss} vs ${expected} rel ${rel.toExponential(2)}`);
        expect(rel).toBeLessThanOrEqual(TOL);
        for (const key of [TO_K, CONV_IN]) expectClose(`esd2024.run_till_${r}.grad.${key}`, await gradOf(grads, s, key), get(ref, `esd2024.run_till_${r}.grad.${key}`));
        tf.dispose([xT, value, batch, ...Object.values(grads)]);
      }
    } finally {
      esd.dispose(s);
    }
  });
});
