/**
 * The one interface a sampling loop drives, whichever sampler runs.
 *
 * Samplers are pure: the schedule (timesteps, ᾱ or σ per step) is precomputed at construction,
 * and whatever a multistep method remembers (PNDM's past ε, LMS's derivatives, DPM-Solver++'s last
 * x₀) lives in an explicit state value that `step` takes and returns — never inside the sampler.
 * Randomness is passed in as a tensor (see `rng.ts`), so steps are deterministic functions.
 *
 * The loop (diffusers' pipeline, for every sampler):
 *   x = x_T · initNoiseSigma; s = initialState
 *   for i in 0 … timesteps.length − 1:
 *     out = model(scaleModelInput(x, i), timesteps[i])
 *     { prev: x, state: s } = step(s, out, i, x, needsNoise ? noise_i : undefined)
 * A caller that frees tensors between steps keeps `prev` and `heldTensors(state)` alive.
 */
import type { Ops } from '../ops/ops.js';
import type { PredictionType, SchedulerConfig } from './config.js';
import { f32, interpTable, karrasSigmas, logSigmasOf, sigmasOf, sigmaTimesteps, sigmaToTimestep } from './tables.js';
import type { NoiseSchedule, TimestepSpacing } from './tables.js';

export const SAMPLER_KINDS = ['ddim', 'pndm', 'lms', 'euler', 'euler_a', 'dpmpp_2m'] as const;
export type SamplerKind = (typeof SAMPLER_KINDS)[number];

export interface StepResult<T, S> {
  /** The sample at the next (less noisy) step. */
  readonly prev: T;
  readonly state: S;
  /** The x₀ estimate this step used, where the method forms one (previews). */
  readonly x0?: T;
}

export interface Sampler<T, S = unknown> {
  readonly kind: SamplerKind;
  /** The model timestep of each step, in order; its length is the number of model evaluations. */
  readonly timesteps: readonly number[];
  /** The initial sample is x_T · initNoiseSigma (x_T ~ N(0, I)). */
  readonly initNoiseSigma: number;
  /** Whether `step` needs fresh N(0, I) noise shaped like the sample (ancestral, DDIM η > 0). */
  readonly needsNoise: boolean;
  readonly initialState: S;
  /** The model's input at step i (σ samplers divide by √(σ² + 1); VP samplers pass x through). */
  scaleModelInput(o: Ops<T>, x: T, i: number): T;
  /** One step from x at step i to the next step's sample, given the model's output. */
  step(o: Ops<T>, state: S, modelOutput: T, i: number, x: T, noise?: T): StepResult<T, S>;
  /** The tensors `state` holds, which must outlive the step that made them (memory management). */
  heldTensors(state: S): readonly T[];
}

/** What every sampler constructor receives. */
export interface SamplerSetup {
  readonly schedule: NoiseSchedule;
  readonly config: SchedulerConfig;
  /** Number of inference steps (PNDM evaluates the model once more: its first step is repeated). */
  readonly steps: number;
  /** Overrides the config's `timestep_spacing`. */
  readonly timestepSpacing?: TimestepSpacing;
}

export interface SamplerOptions {
  readonly steps: number;
  readonly timestepSpacing?: TimestepSpacing;
  /** DDIM's η (0: deterministic DDIM; 1: DDPM-like ancestral noise). */
  readonly eta?: number;
  /** LMS, Euler, DPM-Solver++: Karras noise levels (overrides the config's `use_karras_sigmas`). */
  readonly karrasSigmas?: boolean;
}

/** The noise a stochastic step was given, or a clear error if the caller forgot it. */
export function requireNoise<T>(kind: SamplerKind, noise: T | undefined, i: number): T {
  if (noise === undefined) throw new Error(`${kind} step ${i}: this sampler needs a noise tensor shaped like the sample`);
  return noise;
}

/** The step's timestep, or a clear error for an index outside the schedule. */
export function checkStepIndex(kind: SamplerKind, timesteps: readonly number[], i: number): number {
  const t = timesteps[i];
  if (t === undefined || !Number.isInteger(i)) {
    throw new Error(`${kind}: step index ${i} is outside the schedule of ${timesteps.length} steps`);
  }
  return t;
}

/** Rejects a prediction type a sampler cannot use (diffusers raises too). */
export function checkPrediction(kind: SamplerKind, prediction: PredictionType, supported: readonly PredictionType[]): void {
  if (!supported.includes(prediction)) {
    throw new Error(`${kind}: prediction_type '${prediction}' is not supported (only ${supported.join(', ')})`);
  }
}

// =============================================================================================
// σ-space (k-diffusion) samplers: x_σ = x₀ + σ ε with σ = √((1 − ᾱ)/ᾱ), model input x_σ/√(σ² + 1)

/** A σ sampler's schedule: the model timestep of each step and σ per step plus a final σ = 0. */
export interface SigmaGrid {
  readonly spacing: TimestepSpacing;
  readonly timesteps: readonly number[];
  /** Length steps + 1, float32, descending to 0. */
  readonly sigmas: Float32Array;
}

/** σ of every training timestep, float32. */
export function trainingSigmas(setup: SamplerSetup): Float32Array {
  let alphaBar = setup.schedule.alphasCumprod;
  if (setup.config.rescaleZeroTerminalSnr) {
    // ᾱ_T = 0 would make σ_T infinite: diffusers uses the smallest fp16 subnormal instead.
    alphaBar = Float32Array.from(alphaBar);
    alphaBar[alphaBar.length - 1] = 2 ** -24;
  }
  return sigmasOf(alphaBar);
}

/**
 * diffusers' Euler/LMS `set_timesteps`: σ interpolated linearly in t on the training σ table, or
 * Karras et al. (2022) levels between the grid's extremes mapped back to fractional timesteps.
 */
export function sigmaGrid(setup: SamplerSetup, karras: boolean): SigmaGrid {
  const { schedule, config, steps } = setup;
  const spacing = setup.timestepSpacing ?? config.timestepSpacing ?? 'linspace';
  let timesteps = sigmaTimesteps(spacing, steps, schedule.trainTimesteps, config.stepsOffset);
  const table = trainingSigmas(setup);
  let sigmas = timesteps.map((t) => interpTable(table, t));
  if (karras) {
    sigmas = karrasSigmas(sigmas[sigmas.length - 1]!, sigmas[0]!, steps);
    const logSigmas = logSigmasOf(table);
    timesteps = sigmas.map((s) => f32(sigmaToTimestep(s, logSigmas)));
  }
  return { spacing, timesteps, sigmas: Float32Array.from([...sigmas, 0]) };
}

/**
 * The σ samplers' initial noise scale: σ_max for linspace/trailing grids, √(σ_max² + 1) for leading
 * ones (whose first step is not the training grid's last), in float32 as diffusers.
 */
export function sigmaInitNoise(grid: SigmaGrid): number {
  const max = grid.sigmas.reduce((m, s) => Math.max(m, s), 0);
  return grid.spacing === 'leading' ? f32(Math.sqrt(f32(f32(max * max) + 1))) : max;
}

/** What every σ sampler (Euler, Euler a, LMS) shares: its grid, initial noise scale and input scaling. */
export function sigmaSamplerBase<T>(kind: SamplerKind, grid: SigmaGrid): Pick<Sampler<T>, 'kind' | 'timesteps' | 'initNoiseSigma' | 'scaleModelInput'> {
  return {
    kind,
    timesteps: grid.timesteps,
    initNoiseSigma: sigmaInitNoise(grid),
    scaleModelInput: (o, x, i) => sigmaScaleInput(o, x, grid.sigmas[i]!),
  };
}

/** The model input x_σ/√(σ² + 1), i.e. the VP sample x_t the UNet was trained on. */
export function sigmaScaleInput<T>(o: Ops<T>, x: T, sigma: number): T {
  return o.div(x, f32(Math.sqrt(f32(f32(sigma * sigma) + 1))));
}

/** x₀ from a model output at x_σ: ε → x_σ − σ ε; v → −σ/√(σ²+1)·v + x_σ/(σ²+1); x₀ as is. */
export function sigmaX0<T>(o: Ops<T>, prediction: PredictionType, modelOutput: T, x: T, sigma: number): T {
  switch (prediction) {
    case 'epsilon':
      return o.sub(x, o.mul(modelOutput, sigma));
    case 'v_prediction': {
      const variance = f32(f32(sigma * sigma) + 1);
      return o.add(o.mul(modelOutput, f32(-sigma / f32(Math.sqrt(variance)))), o.div(x, variance));
    }
    case 'sample':
      return modelOutput;
  }
}
