/**
 * The forward (noising) process and the conversions between what a UNet predicts and the clean
 * sample, as diffusers' DDPMScheduler computes them (float32, same operation order).
 *
 * Symbols (Ho et al. 2020): x₀ clean latents, ε noise, ᾱ_t = alphas_cumprod[t],
 * x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε (eq. 4); v = √ᾱ_t ε − √(1−ᾱ_t) x₀ (Salimans & Ho 2022, §4).
 */
import type { Ops } from '../ops/ops.js';
import type { PredictionType } from './config.js';
import { f32, type NoiseSchedule } from './tables.js';

/** ᾱ_t, checking that t is a training timestep. */
export function alphaBarAt(schedule: NoiseSchedule, t: number): number {
  const a = schedule.alphasCumprod[t];
  if (!Number.isInteger(t) || a === undefined) {
    throw new Error(`timestep ${t} is not an integer in [0, ${schedule.trainTimesteps})`);
  }
  return a;
}

/** √ᾱ_t and √(1−ᾱ_t) in float32, as diffusers' `alphas_cumprod[t] ** 0.5`, `(1 - alphas_cumprod[t]) ** 0.5`. */
export function signalNoiseScales(alphaBar: number): { readonly signal: number; readonly noise: number } {
  return { signal: f32(Math.sqrt(alphaBar)), noise: f32(Math.sqrt(f32(1 - alphaBar))) };
}

/** Per-sample coefficients [B, 1, …, 1] broadcasting over a batch shaped like `x`. */
function perSample<T>(o: Ops<T>, x: T, values: readonly number[]): T {
  const shape = o.shape(x);
  if (shape[0] !== values.length) {
    throw new Error(`${values.length} timesteps for a batch of ${shape[0]}`);
  }
  return o.constant(values, [values.length, ...shape.slice(1).map(() => 1)]);
}

function scalesFor<T>(o: Ops<T>, schedule: NoiseSchedule, x: T, timesteps: readonly number[]): { signal: T; noise: T } {
  const scales = timesteps.map((t) => signalNoiseScales(alphaBarAt(schedule, t)));
  return {
    signal: perSample(o, x, scales.map((s) => s.signal)),
    noise: perSample(o, x, scales.map((s) => s.noise)),
  };
}

/** x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε (DDPM eq. 4), one timestep per batch element. */
export function addNoise<T>(o: Ops<T>, schedule: NoiseSchedule, x0: T, eps: T, timesteps: readonly number[]): T {
  const { signal, noise } = scalesFor(o, schedule, x0, timesteps);
  return o.add(o.mul(signal, x0), o.mul(noise, eps));
}

/** The v target v = √ᾱ_t ε − √(1−ᾱ_t) x₀ (diffusers' `get_velocity`). */
export function getVelocity<T>(o: Ops<T>, schedule: NoiseSchedule, x0: T, eps: T, timesteps: readonly number[]): T {
  const { signal, noise } = scalesFor(o, schedule, x0, timesteps);
  return o.sub(o.mul(signal, eps), o.mul(noise, x0));
}

/** What a model trained for `prediction` should output for (x₀, ε, t): ε, v or x₀. */
export function trainingTarget<T>(
  o: Ops<T>,
  schedule: NoiseSchedule,
  prediction: PredictionType,
  x0: T,
  eps: T,
  timesteps: readonly number[],
): T {
  switch (prediction) {
    case 'epsilon':
      return eps;
    case 'v_prediction':
      return getVelocity(o, schedule, x0, eps, timesteps);
    case 'sample':
      return x0;
  }
}

/** The x₀ and ε a model output implies at x_t. */
export interface Denoised<T> {
  readonly x0: T;
  readonly eps: T;
}

/**
 * x₀ and ε from a prediction at one noise level ᾱ (all samples at the same t), in DDIM's
 * operation order: ε → x₀ = (x_t − √(1−ᾱ) ε)/√ᾱ (DDIM eq. 9); x₀ → ε = (x_t − √ᾱ x₀)/√(1−ᾱ);
 * v → x₀ = √ᾱ x_t − √(1−ᾱ) v, ε = √ᾱ v + √(1−ᾱ) x_t.
 */
export function denoise<T>(o: Ops<T>, prediction: PredictionType, modelOutput: T, xt: T, alphaBar: number): Denoised<T> {
  const { signal, noise } = signalNoiseScales(alphaBar);
  switch (prediction) {
    case 'epsilon':
      return { x0: o.div(o.sub(xt, o.mul(modelOutput, noise)), signal), eps: modelOutput };
    case 'sample':
      return { x0: modelOutput, eps: o.div(o.sub(xt, o.mul(modelOutput, signal)), noise) };
    case 'v_prediction':
      return {
        x0: o.sub(o.mul(xt, signal), o.mul(modelOutput, noise)),
        eps: o.add(o.mul(modelOutput, signal), o.mul(xt, noise)),
      };
  }
}

/** The x₀ estimate from a model output at x_t, one timestep per batch element. */
export function predictX0<T>(
  o: Ops<T>,
  schedule: NoiseSchedule,
  prediction: PredictionType,
  modelOutput: T,
  xt: T,
  timesteps: readonly number[],
): T {
  if (prediction === 'sample') return modelOutput;
  const { signal, noise } = scalesFor(o, schedule, xt, timesteps);
  if (prediction === 'epsilon') return o.div(o.sub(xt, o.mul(noise, modelOutput)), signal);
  return o.sub(o.mul(signal, xt), o.mul(noise, modelOutput));
}
