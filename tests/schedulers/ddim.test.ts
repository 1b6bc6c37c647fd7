/**
 * DDIM against the reference 10-step run (every step bit for bit) and against DDIM's update
 * written out by hand (η > 0, clipping, ᾱ_prev = 1, the three prediction types) with the
 * reference ᾱ table.
 */
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { beforeAll, describe, expect, it } from 'vitest';
import { initBackend } from '../../src/backend.js';
import { tfOps } from '../../src/ops/tfjs-ops.js';
import { readSchedulerConfig, samplerFromConfig, type SchedulerConfig } from '../../src/schedulers/config.js';
import type { Sampler } from '../../src/schedulers/sampler.js';
import { diff, get, readRef, TINY_SD, type RefTensor } from '../helpers/fixtures.js';

const TOL = 1e-4;
let cfg: SchedulerConfig;
let sampling: Map<string, RefTensor>;
let sched: Map<string, RefTensor>;
let alphaBar: Float32Array;

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: () => {} });
  cfg = await readSchedulerConfig(path.join(TINY_SD, 'scheduler'));
  sampling = await readRef('sampling.safetensors');
  sched = await readRef('scheduler.safetensors');
  alphaBar = get(sched, 'alphas_cumprod').data;
});

/** Step i of a [10, 1, 4, 16, 16] per-step reference tensor (layout irrelevant: DDIM is elementwise). */
function stepSlice(key: string, i: number): Float32Array {
  const t = get(sampling, key);
  const n = t.data.length / t.shape[0]!;
  return t.data.subarray(i * n, (i + 1) * n);
}

function runStep(s: Sampler<tf.Tensor>, out: ArrayLike<number>, i: number, x: ArrayLike<number>, noise?: ArrayLike<number>): Float32Array {
  return tf.tidy(() => {
    const shape = [1, x.length];
    const z = noise === undefined ? undefined : tf.tensor(Float32Array.from(noise), shape);
    return s.step(tfOps, s.initialState, tf.tensor(Float32Array.from(out), shape), i, tf.tensor(Float32Array.from(x), shape), z).prev.dataSync() as Float32Array;
  });
}

describe('DDIM vs the reference run (10 steps, η = 0, SD 1.5 config)', () => {
  it('uses the reference timesteps', () => {
    const s = samplerFromConfig<tf.Tensor>('ddim', cfg, { steps: 10 });
    expect(s.timesteps).toEqual(Array.from(get(sampling, 'timesteps').data));
    expect(s.initNoiseSigma).toBe(1);
    expect(s.needsNoise).toBe(false);
  });

  it('step(guided_i, t_i, x_t[i]) equals x_prev[i] for every step', () => {
    const s = samplerFromConfig<tf.Tensor>('ddim', cfg, { steps: 10 });
    for (let i = 0; i < 10; i++) {
      const d = diff(runStep(s, stepSlice('steps.guided', i), i, stepSlice('steps.x_t', i)), stepSlice('steps.x_prev', i));
      expect(d.rel, `step ${i}: max abs error ${d.maxAbs} at scale ${d.scale}`).toBeLessThanOrEqual(TOL);
      expect(d.maxAbs, `step ${i}: expected bit-identical float32 arithmetic`).toBe(0);
    }
  });

  it('chained from x_t[0] with the reference guided ε, reaches final_latents', () => {
    const s = samplerFromConfig<tf.Tensor>('ddim', cfg, { steps: 10 });
    let x = stepSlice('steps.x_t', 0);
    for (let i = 0; i < 10; i++) {
      x = runStep(s, stepSlice('steps.guided', i), i, x);
      if (i < 9) expect(diff(x, stepSlice('steps.x_t', i + 1)).maxAbs).toBe(0);
    }
    const d = diff(x, get(sampling, 'final_latents').data);
    expect(d.maxAbs, `final latents: max abs error ${d.maxAbs}`).toBe(0);
  });
});

describe('DDIM update by hand (DDIM eqs. 12, 16) with the reference ᾱ', () => {
  const x0 = [0.3, -0.8, 0.5, 0.1, -0.2, 0.9, -0.4, 0.7];
  const eps = [1.1, -0.4, 0.2, -1.5, 0.8, 0.05, -0.9, 0.6];
  const z = [0.5, -1.2, 0.3, 0.9, -0.1, 1.4, -0.7, 0.2];
  const noisy = (t: number) => x0.map((v, k) => Math.sqrt(alphaBar[t]!) * v + Math.sqrt(1 - alphaBar[t]!) * eps[k]!);

  it('ε, v and x₀ predictions of the same (x₀, ε) give √ᾱ_prev x₀ + √(1−ᾱ_prev) ε', () => {
    const [t, prevT] = [901, 801];
    const a = alphaBar[t]!;
    const expected = x0.map((v, k) => Math.sqrt(alphaBar[prevT]!) * v + Math.sqrt(1 - alphaBar[prevT]!) * eps[k]!);
    const outputs = {
      epsilon: eps,
      v_prediction: x0.map((v, k) => Math.sqrt(a) * eps[k]! - Math.sqrt(1 - a) * v),
      sample: x0,
    } as const;
    for (const [prediction, out] of Object.entries(outputs)) {
      const s = samplerFromConfig<tf.Tensor>('ddim', { ...cfg, predictionType: prediction as keyof typeof outputs }, { steps: 10 });
      const d = diff(runStep(s, out, 0, noisy(t)), expected);
      expect(d.rel, `${prediction}: rel error ${d.rel}`).toBeLessThan(1e-5);
    }
  });

  it('η > 0 adds σ_t z with σ_t = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev)', () => {
    const [t, prevT, eta] = [501, 401, 0.7];
    const [a, ap] = [alphaBar[t]!, alphaBar[prevT]!];
    const sigma = eta * Math.sqrt((1 - ap) / (1 - a)) * Math.sqrt(1 - a / ap);
    const expected = x0.map((v, k) => Math.sqrt(ap) * v + Math.sqrt(1 - ap - sigma * sigma) * eps[k]! + sigma * z[k]!);
    const s = samplerFromConfig<tf.Tensor>('ddim', cfg, { steps: 10, eta });
    expect(s.needsNoise).toBe(true);
    expect(() => runStep(s, eps, 4, noisy(t))).toThrow(/needs a noise tensor/);
    const d = diff(runStep(s, eps, 4, noisy(t), z), expected);
    expect(d.rel, `rel error ${d.rel}`).toBeLessThan(1e-5);
  });

  it('clip_sample clamps x̂₀ (DDIM default when the config omits it)', () => {
    const [t, prevT] = [101, 1];
    const big = x0.map((v) => 3 * v); // |x₀| up to 2.7
    const xt = big.map((v, k) => Math.sqrt(alphaBar[t]!) * v + Math.sqrt(1 - alphaBar[t]!) * eps[k]!);
    const expected = big.map((v, k) => Math.sqrt(alphaBar[prevT]!) * Math.min(1, Math.max(-1, v)) + Math.sqrt(1 - alphaBar[prevT]!) * eps[k]!);
    const s = samplerFromConfig<tf.Tensor>('ddim', { ...cfg, clipSample: undefined }, { steps: 10 });
    const d = diff(runStep(s, eps, 8, xt), expected);
    expect(d.rel, `rel error ${d.rel}`).toBeLessThan(1e-5);
  });

  it('the last step lands on x̂₀ with set_alpha_to_one, on ᾱ₀ without', () => {
    const t = 1;
    const withOne = samplerFromConfig<tf.Tensor>('ddim', { ...cfg, finalAlphaIsOne: true }, { steps: 10 });
    expect(diff(runStep(withOne, eps, 9, noisy(t)), x0).rel).toBeLessThan(1e-5);
    const withoutOne = samplerFromConfig<tf.Tensor>('ddim', cfg, { steps: 10 });
    const expected = x0.map((v, k) => Math.sqrt(alphaBar[0]!) * v + Math.sqrt(1 - alphaBar[0]!) * eps[k]!);
    expect(diff(runStep(withoutOne, eps, 9, noisy(t)), expected).rel).toBeLessThan(1e-5);
  });
});
