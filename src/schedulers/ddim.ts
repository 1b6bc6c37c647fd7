/**
 * DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models"), as diffusers' DDIMScheduler.
 *
 * Symbols: ᾱ_t = alphas_cumprod[t], ᾱ_prev at t − T/n (or the final ᾱ past the last step),
 * x̂₀ the clean-sample estimate, ε̂ the noise estimate, η the stochasticity.
 *   σ_t = η √((1 − ᾱ_prev)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev)                         (eq. 16)
 *   x_prev = √ᾱ_prev x̂₀ + √(1 − ᾱ_prev − σ_t²) ε̂ + σ_t z,  z ~ N(0, I)          (eq. 12)
 */
import type { Ops } from '../ops/ops.js';
import { alphaBarAt, denoise } from './ddpm.js';
import { checkStepIndex, requireNoise, type Sampler, type SamplerSetup } from './sampler.js';
import { f32, integerTimesteps } from './tables.js';

/** DDIM keeps no history. */
export type DdimState = null;

export interface DdimOptions {
  /** η ≥ 0: 0 is deterministic DDIM, 1 matches DDPM's posterior variance. */
  readonly eta: number;
}

/** DDIM over the config's schedule (diffusers' defaults: set_alpha_to_one and clip_sample true, leading spacing). */
export function ddimSampler<T>(setup: SamplerSetup, opts: DdimOptions): Sampler<T, DdimState> {
  const { schedule, config, steps } = setup;
  const eta = opts.eta;
  if (!(eta >= 0)) throw new Error(`ddim: eta must be ≥ 0, got ${eta}`);
  const spacing = setup.timestepSpacing ?? config.timestepSpacing ?? 'leading';
  const timesteps = integerTimesteps(spacing, steps, schedule.trainTimesteps, config.stepsOffset);
  const stride = Math.floor(schedule.trainTimesteps / steps);
  const finalAlphaBar = (config.finalAlphaIsOne ?? true) ? 1 : schedule.alphasCumprod[0]!;
  const clip = (config.clipSample ?? true) ? config.clipSampleRange : undefined;
  const prediction = config.predictionType;

  return {
    kind: 'ddim',
    timesteps,
    initNoiseSigma: 1,
    needsNoise: eta > 0,
    initialState: null,
    scaleModelInput: (_o, x) => x,
    heldTensors: () => [],
    step(o: Ops<T>, state: DdimState, modelOutput: T, i: number, x: T, noise?: T) {
      // 1. ᾱ_t and ᾱ_prev; diffusers steps back by T/n whatever the spacing.
      const t = checkStepIndex('ddim', timesteps, i);
      const prevT = t - stride;
      const alphaBar = alphaBarAt(schedule, t);
      const alphaBarPrev = prevT >= 0 ? alphaBarAt(schedule, prevT) : finalAlphaBar;
      // 2. x̂₀ and ε̂ from the prediction (eq. 9), x̂₀ optionally clipped.
      const predicted = denoise(o, prediction, modelOutput, x, alphaBar);
      const x0 = clip === undefined ? predicted.x0 : o.clip(predicted.x0, -clip, clip);
      // 3. σ_t (eq. 16), all scalars in float32 as diffusers' 0-dim tensors.
      const variance = f32(f32(f32(1 - alphaBarPrev) / f32(1 - alphaBar)) * f32(1 - f32(alphaBar / alphaBarPrev)));
      const sigma = f32(eta * f32(Math.sqrt(variance)));
      // 4. x_prev (eq. 12).
      const direction = o.mul(predicted.eps, f32(Math.sqrt(f32(f32(1 - alphaBarPrev) - f32(sigma * sigma)))));
      let prev = o.add(o.mul(x0, f32(Math.sqrt(alphaBarPrev))), direction);
      if (eta > 0) prev = o.add(prev, o.mul(requireNoise('ddim', noise, i), sigma));
      return { prev, state, x0 };
    },
  };
}
