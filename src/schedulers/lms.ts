/**
 * Linear multistep in σ (Karras et al. 2022's k-diffusion `sample_lms`), as diffusers'
 * LMSDiscreteScheduler with order 4.
 *
 * Symbols: σ_i the step's noise level, d_k = (x_k − x̂₀_k)/σ_k the probability-flow ODE slope at
 * step k (Karras et al. eq. 4 with their denoiser D = x̂₀). With r = min(i + 1, 4) slopes,
 *   x_{i+1} = x_i + Σ_{j<r} c_j d_{i−j},   c_j = ∫_{σ_i}^{σ_{i+1}} ℓ_j(τ) dτ,
 *   ℓ_j(τ) = Π_{k<r, k≠j} (τ − σ_{i−k}) / (σ_{i−j} − σ_{i−k})   (Lagrange basis on past σ's).
 * diffusers integrates ℓ_j with scipy's adaptive quadrature; ℓ_j is a polynomial of degree ≤ 3, so
 * 3-point Gauss–Legendre quadrature (exact to degree 5) gives the same integral exactly.
 */
import type { Ops } from '../ops/ops.js';
import {
  checkPrediction,
  checkStepIndex,
  sigmaGrid,
  sigmaSamplerBase,
  sigmaX0,
  type Sampler,
  type SamplerSetup,
} from './sampler.js';

export const LMS_ORDER = 4;

export interface LmsState<T> {
  /** ODE slopes of the last steps, oldest first (at most {@link LMS_ORDER}). */
  readonly derivatives: readonly T[];
}

export interface LmsOptions {
  readonly karrasSigmas: boolean;
}

const GAUSS_NODES = [-Math.sqrt(3 / 5), 0, Math.sqrt(3 / 5)];
const GAUSS_WEIGHTS = [5 / 9, 8 / 9, 5 / 9];

/**
 * c_j = ∫_{σ_i}^{σ_{i+1}} ℓ_j(τ) dτ for the Lagrange basis on σ_i, σ_{i−1}, …, σ_{i−order+1}
 * (diffusers' `get_lms_coefficient(order, i, j)`).
 */
export function lmsCoefficient(sigmas: ArrayLike<number>, order: number, i: number, j: number): number {
  const basis = (tau: number): number => {
    let prod = 1;
    for (let k = 0; k < order; k++) {
      if (k === j) continue;
      prod *= (tau - sigmas[i - k]!) / (sigmas[i - j]! - sigmas[i - k]!);
    }
    return prod;
  };
  const from = sigmas[i]!;
  const to = sigmas[i + 1]!;
  const half = (to - from) / 2;
  const mid = (to + from) / 2;
  let sum = 0;
  for (let q = 0; q < GAUSS_NODES.length; q++) sum += GAUSS_WEIGHTS[q]! * basis(mid + half * GAUSS_NODES[q]!);
  return sum * half;
}

/** LMS (order 4) over the config's schedule (diffusers' default spacing: linspace). */
export function lmsSampler<T>(setup: SamplerSetup, opts: LmsOptions): Sampler<T, LmsState<T>> {
  const grid = sigmaGrid(setup, opts.karrasSigmas);
  const { sigmas } = grid;
  const prediction = setup.config.predictionType;
  checkPrediction('lms', prediction, ['epsilon', 'v_prediction', 'sample']);

  return {
    ...sigmaSamplerBase<T>('lms', grid),
    needsNoise: false,
    initialState: { derivatives: [] },
    heldTensors: (s) => s.derivatives,
    step(o: Ops<T>, state: LmsState<T>, modelOutput: T, i: number, x: T) {
      checkStepIndex('lms', grid.timesteps, i);
      const sigma = sigmas[i]!;
      // 1. x̂₀ and the ODE slope d = (x − x̂₀)/σ.
      const x0 = sigmaX0(o, prediction, modelOutput, x, sigma);
      const derivatives = [...state.derivatives, o.div(o.sub(x, x0), sigma)].slice(-LMS_ORDER);
      // 2. x_{i+1} = x_i + Σ_j c_j d_{i−j}, newest slope first. Starting mid-schedule (img2img)
      // with fewer slopes than the order, diffusers pairs coefficients and slopes as zip() does.
      const order = Math.min(i + 1, LMS_ORDER);
      let update: T | undefined;
      for (let j = 0; j < Math.min(order, derivatives.length); j++) {
        const term = o.mul(derivatives[derivatives.length - 1 - j]!, lmsCoefficient(sigmas, order, i, j));
        update = update === undefined ? term : o.add(update, term);
      }
      return { prev: o.add(x, update!), state: { derivatives }, x0 };
    },
  };
}
