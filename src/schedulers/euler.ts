/**
 * Euler steps on the probability-flow ODE in σ (Karras et al. 2022, Alg. 1 without churn), and the
 * ancestral variant (k-diffusion `sample_euler_ancestral`), as diffusers' EulerDiscreteScheduler
 * and EulerAncestralDiscreteScheduler.
 *
 * Symbols: x_σ = x₀ + σ ε, x̂₀ the denoised estimate, d = (x − x̂₀)/σ the ODE slope.
 *   Euler:     x_{i+1} = x_i + d·(σ_{i+1} − σ_i)
 *   ancestral: σ_up = √(σ_{i+1}² (σ_i² − σ_{i+1}²)/σ_i²), σ_down = √(σ_{i+1}² − σ_up²),
 *              x_{i+1} = x_i + d·(σ_down − σ_i) + σ_up z,  z ~ N(0, I)
 */
import type { Ops } from '../ops/ops.js';
import {
  checkPrediction,
  checkStepIndex,
  requireNoise,
  sigmaGrid,
  sigmaSamplerBase,
  sigmaX0,
  type Sampler,
  type SamplerSetup,
} from './sampler.js';
import { f32 } from './tables.js';

/** Euler keeps no history. */
export type EulerState = null;

export interface EulerOptions {
  readonly karrasSigmas: boolean;
}

/** Euler (deterministic, no churn) over the config's schedule (diffusers' default spacing: linspace). */
export function eulerSampler<T>(setup: SamplerSetup, opts: EulerOptions): Sampler<T, EulerState> {
  const grid = sigmaGrid(setup, opts.karrasSigmas);
  const { sigmas } = grid;
  const prediction = setup.config.predictionType;
  checkPrediction('euler', prediction, ['epsilon', 'v_prediction', 'sample']);
  return {
    ...sigmaSamplerBase<T>('euler', grid),
    needsNoise: false,
    initialState: null,
    heldTensors: () => [],
    step(o: Ops<T>, state: EulerState, modelOutput: T, i: number, x: T) {
      checkStepIndex('euler', grid.timesteps, i);
      const sigma = sigmas[i]!;
      const x0 = sigmaX0(o, prediction, modelOutput, x, sigma);
      const slope = o.div(o.sub(x, x0), sigma);
      const prev = o.add(x, o.mul(slope, f32(sigmas[i + 1]! - sigma)));
      return { prev, state, x0 };
    },
  };
}

/** Euler ancestral over the config's schedule (diffusers' default spacing: linspace; no Karras σ). */
export function eulerAncestralSampler<T>(setup: SamplerSetup): Sampler<T, EulerState> {
  const grid = sigmaGrid(setup, false);
  const { sigmas } = grid;
  const prediction = setup.config.predictionType;
  checkPrediction('euler_a', prediction, ['epsilon', 'v_prediction']);
  return {
    ...sigmaSamplerBase<T>('euler_a', grid),
    needsNoise: true,
    initialState: null,
    heldTensors: () => [],
    step(o: Ops<T>, state: EulerState, modelOutput: T, i: number, x: T, noise?: T) {
      checkStepIndex('euler_a', grid.timesteps, i);
      const sigmaFrom = sigmas[i]!;
      const sigmaTo = sigmas[i + 1]!;
      // 1. Split the step into a deterministic part down to σ_down and fresh noise σ_up.
      const fromSq = f32(sigmaFrom * sigmaFrom);
      const toSq = f32(sigmaTo * sigmaTo);
      const sigmaUp = f32(Math.sqrt(f32(f32(toSq * f32(fromSq - toSq)) / fromSq)));
      const sigmaDown = f32(Math.sqrt(f32(toSq - f32(sigmaUp * sigmaUp))));
      // 2. Euler to σ_down, then add σ_up z.
      const x0 = sigmaX0(o, prediction, modelOutput, x, sigmaFrom);
      const slope = o.div(o.sub(x, x0), sigmaFrom);
      const deterministic = o.add(x, o.mul(slope, f32(sigmaDown - sigmaFrom)));
      const prev = o.add(deterministic, o.mul(requireNoise('euler_a', noise, i), sigmaUp));
      return { prev, state, x0 };
    },
  };
}
