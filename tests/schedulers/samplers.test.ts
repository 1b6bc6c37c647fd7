/**
 * PNDM, LMS, Euler, Euler ancestral and DPM-Solver++(2M), which have no reference run: their
 * grids against values worked out by hand from diffusers' formulas and the reference ᾱ table, and
 * their dynamics against closed forms —
 * - a "perfect denoiser" (data = one known point x₀, model ε = (x_t − √ᾱ x₀)/√(1−ᾱ)) keeps every
 *   deterministic sampler exactly on the line x_σ = x₀ + σ ε, so each step's output is known;
 * - Gaussian data x₀ ~ N(μ, s²) has an exact probability-flow ODE solution,
 *   x_σ = μ + √((s² + σ²)/(s² + σ₀²)) (x_σ₀ − μ), which each sampler must approach at its order.
 */
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { beforeAll, describe, expect, it } from 'vitest';
import { initBackend } from '../../src/backend.js';
import { tfOps } from '../../src/ops/tfjs-ops.js';
import { readSchedulerConfig, samplerFromConfig, type SchedulerConfig } from '../../src/schedulers/config.js';
import { lmsCoefficient } from '../../src/schedulers/lms.js';
import type { Sampler, SamplerKind, SamplerOptions, StepResult } from '../../src/schedulers/sampler.js';
import { TorchGenerator } from '../../src/schedulers/rng.js';
import { get, readRef, TINY_SD } from '../helpers/fixtures.js';

let cfg: SchedulerConfig;
let alphaBar: Float32Array;

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: () => {} });
  cfg = await readSchedulerConfig(path.join(TINY_SD, 'scheduler'));
  alphaBar = get(await readRef('scheduler.safetensors'), 'alphas_cumprod').data;
});

/** σ of a training timestep from the reference ᾱ. */
const sigmaAt = (t: number) => Math.sqrt((1 - alphaBar[t]!) / alphaBar[t]!);
/** σ at a fractional timestep: linear interpolation in t (np.interp). */
const sigmaInterp = (t: number) => {
  const j = Math.floor(t);
  return j === t ? sigmaAt(j) : sigmaAt(j) + (t - j) * (sigmaAt(j + 1) - sigmaAt(j));
};
/** The SD 1.x leading grid by hand: 1000 // n · k + 1, descending. */
const leading = (n: number) => Array.from({ length: n }, (_, k) => (n - 1 - k) * Math.floor(1000 / n) + 1);

const x0 = [0.3, -0.8, 0.5, 0.1, -0.2, 0.9, -0.4, 0.7, 0.0, -1.1, 0.25, 0.6, -0.55, 0.15, 1.2, -0.3];
const xi = [1.2, -0.3, 0.4, -1.6, 0.9, 0.1, -0.7, 0.5, 2.1, -0.2, -1.0, 0.8, 0.35, -1.3, 0.6, -0.05];

/** A denoiser given ᾱ of the step, returning ε for the VP input x_t. */
type Model = (xt: Float64Array, alphaBar: number) => Float64Array;

/** The optimal ε for data concentrated on x₀. */
const perfect: Model = (xt, a) => xt.map((v, k) => (v - Math.sqrt(a) * x0[k]!) / Math.sqrt(1 - a));

/** The optimal ε for x₀ ~ N(μ, s²): E[x₀|x_t] = μ + √ᾱ s²/(ᾱ s² + 1 − ᾱ) (x_t − √ᾱ μ). */
function gaussian(mu: number, s: number): Model {
  return (xt, a) =>
    xt.map((v) => {
      const mean = mu + ((Math.sqrt(a) * s * s) / (a * s * s + 1 - a)) * (v - Math.sqrt(a) * mu);
      return (v - Math.sqrt(a) * mean) / Math.sqrt(1 - a);
    });
}

/**
 * Runs a sampler from VP noise ξ with `model`, where `alphaBarOf(i)` is ᾱ of step i (worked out
 * by the test, not taken from the sampler). Returns x after every step.
 */
function run(
  s: Sampler<tf.Tensor>,
  model: Model,
  alphaBarOf: (i: number) => number,
  noise?: (i: number) => number[],
): Float64Array[] {
  const shape = [1, xi.length];
  let x = tf.tidy(() => tf.mul(tf.tensor(xi, shape), s.initNoiseSigma));
  let state = s.initialState;
  const out: Float64Array[] = [];
  for (let i = 0; i < s.timesteps.length; i++) {
    const xIn = Float64Array.from(tf.tidy(() => s.scaleModelInput(tfOps, x, i).dataSync()));
    let r!: StepResult<tf.Tensor, unknown>;
    tf.tidy(() => {
      const eps = tf.tensor(Float32Array.from(model(xIn, alphaBarOf(i))), shape);
      const z = noise === undefined ? undefined : tf.tensor(noise(i), shape);
      r = s.step(tfOps, state, eps, i, x, z);
      for (const t of [r.prev, ...s.heldTensors(r.state)]) tf.keep(t);
    });
    const held = s.heldTensors(r.state);
    for (const t of [x, ...s.heldTensors(state)]) if (!held.includes(t)) t.dispose();
    x = r.prev;
    state = r.state;
    out.push(Float64Array.from(x.dataSync()));
  }
  for (const t of new Set([x, ...s.heldTensors(state)])) t.dispose();
  return out;
}

const make = (kind: SamplerKind, opts: SamplerOptions) => samplerFromConfig<tf.Tensor>(kind, cfg, opts);

function maxRelError(actual: ArrayLike<number>, expected: ArrayLike<number>): number {
  let err = 0;
  let scale = 0;
  for (let k = 0; k < expected.length; k++) {
    err = Math.max(err, Math.abs(actual[k]! - expected[k]!));
    scale = Math.max(scale, Math.abs(expected[k]!));
  }
  return err / scale;
}

describe('grids by hand (SD 1.5 config: leading spacing, steps_offset 1)', () => {
  it('PNDM repeats its second timestep (PLMS warm-up)', () => {
    expect(make('pndm', { steps: 10 }).timesteps).toEqual([901, 801, 801, 701, 601, 501, 401, 301, 201, 101, 1]);
  });

  it('Euler/LMS: leading timesteps, σ from ᾱ, initial scale √(σ_max² + 1)', () => {
    for (const kind of ['euler', 'lms', 'euler_a'] as const) {
      const s = make(kind, { steps: 10 });
      expect(s.timesteps).toEqual(leading(10));
      expect(s.initNoiseSigma).toBeCloseTo(Math.sqrt(sigmaAt(901) ** 2 + 1), 5);
    }
  });

  it('Euler with linspace spacing: fractional timesteps, σ interpolated in t, initial scale σ_max', () => {
    const s = make('euler', { steps: 4, timestepSpacing: 'linspace' });
    expect(s.timesteps).toEqual([999, 666, 333, 0]);
    expect(s.initNoiseSigma).toBeCloseTo(sigmaAt(999), 4);
    const s7 = make('euler', { steps: 7, timestepSpacing: 'linspace' });
    expect(s7.timesteps).toEqual([999, 832.5, 666, 499.5, 333, 166.5, 0]);
    // scaleModelInput divides by √(σ² + 1) at the interpolated σ
    const scaled = tf.tidy(() => s7.scaleModelInput(tfOps, tf.ones([1, 1]), 1).dataSync()[0]!);
    expect(scaled).toBeCloseTo(1 / Math.sqrt(sigmaInterp(832.5) ** 2 + 1), 6);
  });

  it('DPM-Solver++ uses n of n + 1 grid points', () => {
    // leading: (0..10)·⌊1000/11⌋ reversed, last dropped, + 1
    expect(make('dpmpp_2m', { steps: 10 }).timesteps).toEqual([901, 811, 721, 631, 541, 451, 361, 271, 181, 91]);
    // linspace: round(linspace(0, 999, 11)) reversed, last dropped (499.5 → 500)
    expect(make('dpmpp_2m', { steps: 10, timestepSpacing: 'linspace' }).timesteps).toEqual([999, 899, 799, 699, 599, 500, 400, 300, 200, 100]);
  });

  it('Karras σ (ρ = 7) between the grid extremes, mapped back to timesteps by log σ interpolation', () => {
    const rho = 7;
    const karras = (min: number, max: number, n: number) =>
      Array.from({ length: n }, (_, i) => (max ** (1 / rho) + (i / (n - 1)) * (min ** (1 / rho) - max ** (1 / rho))) ** rho);
    // DPM-Solver++: over the whole training range; timesteps rounded
    const dpmSigmas = karras(sigmaAt(0), sigmaAt(999), 10);
    const s = make('dpmpp_2m', { steps: 10, karrasSigmas: true });
    expect(s.timesteps[0]).toBe(999);
    expect(s.timesteps.at(-1)).toBe(0);
    const logT = (sigma: number) => {
      // the t with log σ(t) = log sigma, linear in log σ between integer neighbours
      let j = 0;
      while (j < 998 && Math.log(sigmaAt(j + 1)) <= Math.log(sigma)) j++;
      const w = (Math.log(sigmaAt(j)) - Math.log(sigma)) / (Math.log(sigmaAt(j)) - Math.log(sigmaAt(j + 1)));
      return j + Math.min(1, Math.max(0, w));
    };
    expect(s.timesteps).toEqual(dpmSigmas.map((sigma) => Math.round(logT(sigma))));
    // Euler: between the spaced grid's own extremes, fractional timesteps
    const e = make('euler', { steps: 10, karrasSigmas: true });
    const eulerSigmas = karras(sigmaAt(1), sigmaAt(901), 10);
    e.timesteps.forEach((t, i) => expect(t).toBeCloseTo(logT(eulerSigmas[i]!), 2));
  });
});

describe('LMS coefficients', () => {
  const sigmas = [14.6, 9.7, 6.2, 3.9, 2.2, 1.1, 0.4, 0];

  it('order 1 is the Euler step σ_{i+1} − σ_i; every order sums to it', () => {
    for (let i = 0; i < 7; i++) {
      const dt = sigmas[i + 1]! - sigmas[i]!;
      expect(lmsCoefficient(sigmas, 1, i, 0)).toBeCloseTo(dt, 12);
      for (let order = 2; order <= Math.min(i + 1, 4); order++) {
        const sum = Array.from({ length: order }, (_, j) => lmsCoefficient(sigmas, order, i, j)).reduce((a, b) => a + b, 0);
        expect(sum).toBeCloseTo(dt, 12);
      }
    }
  });

  it('order 2 integrates the linear Lagrange basis: ((σ_{i+1} − σ_{i−1})² − (σ_i − σ_{i−1})²) / 2(σ_i − σ_{i−1})', () => {
    const [prev, cur, next] = [sigmas[2]!, sigmas[3]!, sigmas[4]!];
    expect(lmsCoefficient(sigmas, 2, 3, 0)).toBeCloseTo(((next - prev) ** 2 - (cur - prev) ** 2) / (2 * (cur - prev)), 12);
  });

  it('on an evenly spaced σ grid they are the Adams–Bashforth weights × h', () => {
    const h = -0.5;
    const even = Array.from({ length: 8 }, (_, k) => 5 + k * h);
    const ab = { 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24] } as const;
    for (const order of [2, 3, 4] as const) {
      ab[order].forEach((w, j) => expect(lmsCoefficient(even, order, 4, j)).toBeCloseTo(w * h, 12));
    }
  });
});

describe('perfect denoiser: every deterministic sampler stays on x_σ = x₀ + σ ε', () => {
  /** ε implied by the start (VP ξ at ᾱ of timestep t0). */
  const epsOf = (t0: number) => xi.map((v, k) => (v - Math.sqrt(alphaBar[t0]!) * x0[k]!) / Math.sqrt(1 - alphaBar[t0]!));
  /** The VP sample at ᾱ on that line. */
  const onLine = (a: number, eps: number[]) => x0.map((v, k) => Math.sqrt(a) * v + Math.sqrt(1 - a) * eps[k]!);

  it('PNDM: each output at the next grid level, ending at ᾱ₀', () => {
    const s = make('pndm', { steps: 10 });
    const ts = [901, 801, 801, 701, 601, 501, 401, 301, 201, 101, 1];
    const eps = epsOf(901);
    const traj = run(s, perfect, (i) => alphaBar[ts[i]!]!);
    // the level each evaluation leaves x at: 801 twice (the repeated warm-up step), then down by 100
    const after = [801, 801, 701, 601, 501, 401, 301, 201, 101, 1, 0];
    traj.forEach((x, i) => expect(maxRelError(x, onLine(alphaBar[after[i]!]!, eps)), `step ${i}`).toBeLessThan(1e-5));
  });

  it.each(['lms', 'euler'] as const)('%s: x after step i is x₀ + σ_{i+1} ε; ends at x₀', (kind) => {
    const s = make(kind, { steps: 10 });
    const ts = leading(10);
    const sigmas = [...ts.map(sigmaAt), 0];
    const x0PlusSigmaEps = (sigma: number) => {
      // ε in σ-space from the start x_σ₀ = ξ·√(σ₀² + 1)
      const start = xi.map((v) => v * Math.sqrt(sigmas[0]! ** 2 + 1));
      return x0.map((v, k) => v + sigma * ((start[k]! - v) / sigmas[0]!));
    };
    const traj = run(s, perfect, (i) => alphaBar[ts[i]!]!);
    traj.forEach((x, i) => expect(maxRelError(x, x0PlusSigmaEps(sigmas[i + 1]!)), `step ${i}`).toBeLessThan(1e-5));
  });

  it('DPM-Solver++(2M): x_t = α x₀ + σ_t ε at each level, ends at x₀ (also with Karras σ)', () => {
    const ts = [901, 811, 721, 631, 541, 451, 361, 271, 181, 91];
    const eps = epsOf(901);
    const traj = run(make('dpmpp_2m', { steps: 10 }), perfect, (i) => alphaBar[ts[i]!]!);
    traj.forEach((x, i) => {
      const expected = i + 1 < ts.length ? onLine(alphaBar[ts[i + 1]!]!, eps) : x0;
      expect(maxRelError(x, expected), `step ${i}`).toBeLessThan(1e-5);
    });
    // Karras: the denoiser is told ᾱ = 1/(σ² + 1) of the Karras level (worked out here)
    const rho = 7;
    const [lo, hi] = [sigmaAt(0), sigmaAt(999)];
    const karras = Array.from({ length: 10 }, (_, i) => (hi ** (1 / rho) + (i / 9) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho);
    const k = run(make('dpmpp_2m', { steps: 10, karrasSigmas: true }), perfect, (i) => 1 / (karras[i]! ** 2 + 1));
    expect(maxRelError(k.at(-1)!, x0)).toBeLessThan(1e-5);
  });

  it('Euler ancestral: one step is x₀ + σ_down ε + σ_up z; the last lands on x₀ whatever the noise', () => {
    const s = make('euler_a', { steps: 10 });
    expect(s.needsNoise).toBe(true);
    const ts = leading(10);
    const gen = new TorchGenerator(42);
    const zs = Array.from({ length: 10 }, () => Array.from(gen.randn([16])));
    const traj = run(s, perfect, (i) => alphaBar[ts[i]!]!, (i) => zs[i]!);
    const [from, to] = [sigmaAt(ts[0]!), sigmaAt(ts[1]!)];
    const up = Math.sqrt((to ** 2 * (from ** 2 - to ** 2)) / from ** 2);
    const down = Math.sqrt(to ** 2 - up ** 2);
    const start = xi.map((v) => v * Math.sqrt(from ** 2 + 1));
    const first = x0.map((v, k) => v + down * ((start[k]! - v) / from) + up * zs[0]![k]!);
    expect(maxRelError(traj[0]!, first)).toBeLessThan(1e-5);
    expect(maxRelError(traj.at(-1)!, x0)).toBeLessThan(1e-5);
  });
});

describe('Gaussian data: convergence to the exact probability-flow ODE solution', () => {
  const [mu, s] = [0.5, 0.6];
  const level = 99; // a noise level every trailing grid below reaches (1000/n·k − 1)

  /**
   * The error at σ(99) of a sampler on the trailing grid of `steps`, against the exact solution
   * from its start: x_σ₀ = ξ·σ₀ for σ samplers (diffusers' init_noise_sigma = σ_max on trailing
   * grids), ξ·√(σ₀² + 1) for VP samplers, whose outputs are x_σ/√(σ² + 1).
   */
  function errorAtLevel(kind: SamplerKind, steps: number): number {
    const sampler = make(kind, { steps, timestepSpacing: 'trailing' });
    const ts = sampler.timesteps;
    const traj = run(sampler, gaussian(mu, s), (i) => alphaBar[ts[i]!]!);
    const vp = kind === 'ddim' || kind === 'pndm' || kind === 'dpmpp_2m';
    const sigma0 = sigmaAt(ts[0]!);
    const sigma = sigmaAt(level);
    const start = xi.map((v) => v * (vp ? Math.sqrt(sigma0 ** 2 + 1) : sigma0));
    const exact = start.map((v) => mu + Math.sqrt((s * s + sigma ** 2) / (s * s + sigma0 ** 2)) * (v - mu));
    // every sampler's output after step i sits at the level of timesteps[i + 1]
    const index = ts.lastIndexOf(level) - 1;
    return maxRelError(traj[index]!, vp ? exact.map((v) => v / Math.sqrt(sigma ** 2 + 1)) : exact);
  }

  it('first-order samplers (Euler, DDIM) halve their error when the steps double', () => {
    for (const kind of ['euler', 'ddim'] as const) {
      const [coarse, fine] = [50, 100].map((n) => errorAtLevel(kind, n)) as [number, number];
      const order = Math.log2(coarse / fine);
      expect(fine, `${kind}: error ${fine.toExponential(2)} at 100 steps`).toBeLessThan(1e-2);
      expect(order, `${kind}: errors ${coarse.toExponential(2)} → ${fine.toExponential(2)}, order ${order.toFixed(2)}`).toBeGreaterThan(0.8);
      expect(order).toBeLessThan(1.2);
    }
  });

  it.each(['lms', 'pndm', 'dpmpp_2m'] as const)('multistep %s is ≥ 50× closer than Euler at 100 steps', (kind) => {
    const euler = errorAtLevel('euler', 100);
    const error = errorAtLevel(kind, 100);
    const report = `${kind}: error ${error.toExponential(2)} vs Euler ${euler.toExponential(2)} at 100 steps`;
    expect(error, report).toBeLessThan(1e-4);
    expect(error * 50, report).toBeLessThan(euler);
  });
});

describe('explicit state', () => {
  it('a step is a pure function of (state, output, i, x)', () => {
    for (const kind of ['pndm', 'lms', 'dpmpp_2m'] as const) {
      const s = make(kind, { steps: 10 });
      tf.tidy(() => {
        const x = tf.tensor([xi]);
        const first = s.step(tfOps, s.initialState, tf.tensor([x0]), 0, x);
        const second = s.step(tfOps, first.state, tf.mul(tf.tensor([x0]), 0.5), 1, first.prev);
        const again = s.step(tfOps, first.state, tf.mul(tf.tensor([x0]), 0.5), 1, first.prev);
        expect(Array.from(again.prev.dataSync())).toEqual(Array.from(second.prev.dataSync()));
        expect(s.heldTensors(second.state).length).toBeGreaterThan(0);
      });
    }
  });

  it('keeping only heldTensors across steps leaks nothing', () => {
    for (const kind of ['pndm', 'lms', 'dpmpp_2m', 'euler'] as const) {
      const before = tf.memory().numTensors;
      run(make(kind, { steps: 10 }), perfect, (i) => alphaBar[leading(10)[Math.min(i, 9)]!]!);
      expect(tf.memory().numTensors, kind).toBe(before);
    }
  });
});
