/**
 * PLMS, the pseudo linear multistep method of Liu et al. (2022), "Pseudo Numerical Methods for
 * Diffusion Models on Manifolds", as diffusers' PNDMScheduler with `skip_prk_steps` (SD 1.x's
 * default scheduler).
 *
 * Symbols: ε_k the model outputs so far (newest first: ε₁ = current), ᾱ_t, ᾱ_prev at t − T/n.
 *   ε' = ε₁                                    (first step: also re-run at the same t, see below)
 *      = (ε₁ + ε₁⁻)/2                          (second evaluation, averaged with the first)
 *      = (3ε₁ − ε₂)/2, (23ε₁ − 16ε₂ + 5ε₃)/12, (55ε₁ − 59ε₂ + 37ε₃ − 9ε₄)/24   (Adams–Bashforth)
 *   x_prev = √(ᾱ_prev/ᾱ_t) x_t − (ᾱ_prev − ᾱ_t) ε' / (ᾱ_t √(1 − ᾱ_prev) + √(ᾱ_t (1 − ᾱ_t) ᾱ_prev))  (eq. 11, the "transfer" φ)
 * The grid repeats its second timestep: the first step goes t₀ → t₁, the second evaluates the
 * model at t₁ but redoes t₀ → t₁ from the saved x_{t₀} with the averaged ε (a second-order start).
 */
import type { Ops } from '../ops/ops.js';
import { alphaBarAt, signalNoiseScales } from './ddpm.js';
import { checkPrediction, checkStepIndex, type Sampler, type SamplerSetup } from './sampler.js';
import { f32, integerTimesteps } from './tables.js';

export interface PndmState<T> {
  /** Past model outputs, oldest first (at most 4). */
  readonly eps: readonly T[];
  /** Model evaluations so far. */
  readonly counter: number;
  /** x at the first timestep, kept for the repeated second evaluation. */
  readonly firstSample?: T;
}

/** PLMS over the config's schedule (diffusers' defaults: set_alpha_to_one false, leading spacing). */
export function pndmSampler<T>(setup: SamplerSetup): Sampler<T, PndmState<T>> {
  const { schedule, config, steps } = setup;
  if (config.skipPrkSteps === false) {
    throw new Error('pndm: skip_prk_steps=false (Runge–Kutta warm-up steps) is not implemented; SD configs set it to true');
  }
  checkPrediction('pndm', config.predictionType, ['epsilon', 'v_prediction']);
  const spacing = setup.timestepSpacing ?? config.timestepSpacing ?? 'leading';
  const grid = integerTimesteps(spacing, steps, schedule.trainTimesteps, config.stepsOffset); // descending
  // diffusers: concat(ts[:-1], ts[-2:-1], ts[-1:]) reversed, on the ascending grid.
  const timesteps = grid.length > 1 ? [grid[0]!, ...grid.slice(1, 2), ...grid.slice(1)] : grid;
  const stride = Math.floor(schedule.trainTimesteps / steps);
  const finalAlphaBar = (config.finalAlphaIsOne ?? false) ? 1 : schedule.alphasCumprod[0]!;
  const prediction = config.predictionType;

  /** The transfer x_t → x_prev (eq. 11) with combined noise estimate ε'. */
  const transfer = (o: Ops<T>, x: T, eps: T, t: number, prevT: number): T => {
    const alphaBar = alphaBarAt(schedule, t);
    const alphaBarPrev = prevT >= 0 ? alphaBarAt(schedule, prevT) : finalAlphaBar;
    const beta = f32(1 - alphaBar);
    if (prediction === 'v_prediction') {
      // v → ε = √ᾱ v + √(1 − ᾱ) x_t
      const { signal, noise } = signalNoiseScales(alphaBar);
      eps = o.add(o.mul(eps, signal), o.mul(x, noise));
    }
    const sampleCoeff = f32(Math.sqrt(f32(alphaBarPrev / alphaBar)));
    const denominator = f32(
      f32(alphaBar * f32(Math.sqrt(f32(1 - alphaBarPrev)))) + f32(Math.sqrt(f32(f32(alphaBar * beta) * alphaBarPrev))),
    );
    const epsTerm = o.div(o.mul(eps, f32(alphaBarPrev - alphaBar)), denominator);
    return o.sub(o.mul(x, sampleCoeff), epsTerm);
  };

  return {
    kind: 'pndm',
    timesteps,
    initNoiseSigma: 1,
    needsNoise: false,
    initialState: { eps: [], counter: 0 },
    scaleModelInput: (_o, x) => x,
    heldTensors: (s) => (s.firstSample === undefined ? s.eps : [...s.eps, s.firstSample]),
    step(o: Ops<T>, state: PndmState<T>, modelOutput: T, i: number, x: T) {
      let t = checkStepIndex('pndm', timesteps, i);
      let prevT = t - stride;
      let history = state.eps;
      if (state.counter === 1) {
        // The repeated evaluation redoes the first step t₀ → t₁.
        prevT = t;
        t = t + stride;
      } else {
        history = [...history.slice(-3), modelOutput];
      }
      const [e1, e2, e3, e4] = [...history].reverse() as [T, T | undefined, T | undefined, T | undefined];
      let sample = x;
      let firstSample = state.firstSample;
      let eps: T;
      if (history.length === 1 && state.counter === 0) {
        eps = modelOutput;
        firstSample = x;
      } else if (history.length === 1 && state.counter === 1) {
        eps = o.div(o.add(modelOutput, e1), 2);
        sample = firstSample!;
        firstSample = undefined;
      } else if (history.length === 2) {
        eps = o.div(o.sub(o.mul(e1, 3), e2!), 2);
      } else if (history.length === 3) {
        eps = o.div(o.add(o.sub(o.mul(e1, 23), o.mul(e2!, 16)), o.mul(e3!, 5)), 12);
      } else {
        const sum = o.sub(o.add(o.sub(o.mul(e1, 55), o.mul(e2!, 59)), o.mul(e3!, 37)), o.mul(e4!, 9));
        eps = o.mul(sum, 1 / 24);
      }
      const prev = transfer(o, sample, eps, t, prevT);
      const next: PndmState<T> = {
        eps: history,
        counter: state.counter + 1,
        ...(firstSample === undefined ? {} : { firstSample }),
      };
      return { prev, state: next };
    },
  };
}
