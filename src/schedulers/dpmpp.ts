/**
 * DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
 * Probabilistic Models"), as diffusers' DPMSolverMultistepScheduler with its defaults:
 * algorithm_type dpmsolver++, solver_order 2, solver_type midpoint, lower_order_final, final σ 0.
 *
 * It works on the VP sample x_t = α_t x₀ + σ_t ε with α_t = 1/√(σ² + 1), σ_t = σ α_t for the
 * k-diffusion level σ, and half-log-SNR λ = log α_t − log σ_t. With h = λ_next − λ_cur,
 * the model's data prediction x̂₀ (m₀ now, m₁ at the previous step) and r = h_prev/h:
 *   first order (DDIM):  x_next = (σ_next/σ_cur) x − α_next (e^{−h} − 1) m₀          (eq. 5 with k = 1)
 *   2M (midpoint):       D = m₀ + (1/2r)(m₀ − m₁),  x_next = (σ_next/σ_cur) x − α_next (e^{−h} − 1) D   (Alg. 2)
 * The first step and the last (to σ = 0) are first order.
 */
import type { Ops } from '../ops/ops.js';
import { checkPrediction, checkStepIndex, trainingSigmas, type Sampler, type SamplerSetup } from './sampler.js';
import {
  checkSteps,
  f32,
  interpTable,
  karrasSigmas,
  logSigmasOf,
  npArange,
  npLinspace,
  roundHalfEven,
  sigmaToTimestep,
  type TimestepSpacing,
} from './tables.js';

export interface DpmppState<T> {
  /** The previous step's x̂₀ (m₁), once a step has run. */
  readonly previousX0?: T;
}

export interface DpmppOptions {
  readonly karrasSigmas: boolean;
}

/**
 * DPM-Solver's own grid: n of n + 1 evenly spaced points, the last (t = 0) dropped (diffusers'
 * `DPMSolverMultistepScheduler.set_timesteps` with no λ clipping).
 */
function dpmTimesteps(spacing: TimestepSpacing, steps: number, trainTimesteps: number, stepsOffset: number): number[] {
  checkSteps(steps, trainTimesteps);
  switch (spacing) {
    case 'linspace':
      return npLinspace(0, trainTimesteps - 1, steps + 1)
        .map(roundHalfEven)
        .reverse()
        .slice(0, steps);
    case 'leading': {
      const ratio = Math.floor(trainTimesteps / (steps + 1));
      return Array.from({ length: steps }, (_, i) => (steps - i) * ratio + stepsOffset);
    }
    case 'trailing':
      return npArange(trainTimesteps, 0, -(trainTimesteps / steps)).map((t) => roundHalfEven(t) - 1);
  }
}

/** (α_t, σ_t, λ) of the VP process at k-diffusion level σ, in float32 as diffusers. */
function vpLevel(sigma: number): { alpha: number; sigma: number; lambda: number } {
  const alpha = f32(1 / f32(Math.sqrt(f32(f32(sigma * sigma) + 1))));
  const sigmaT = f32(sigma * alpha);
  return { alpha, sigma: sigmaT, lambda: f32(f32(Math.log(alpha)) - f32(Math.log(sigmaT))) };
}

/** DPM-Solver++(2M) over the config's schedule (diffusers' default spacing: linspace). */
export function dpmppSampler<T>(setup: SamplerSetup, opts: DpmppOptions): Sampler<T, DpmppState<T>> {
  const { schedule, config, steps } = setup;
  const prediction = config.predictionType;
  checkPrediction('dpmpp_2m', prediction, ['epsilon', 'v_prediction', 'sample']);
  const spacing = setup.timestepSpacing ?? config.timestepSpacing ?? 'linspace';
  const table = trainingSigmas(setup);
  let timesteps = dpmTimesteps(spacing, steps, schedule.trainTimesteps, config.stepsOffset);
  let levels: number[];
  if (opts.karrasSigmas) {
    levels = karrasSigmas(table[0]!, table[table.length - 1]!, steps);
    const logSigmas = logSigmasOf(table);
    timesteps = levels.map((s) => roundHalfEven(sigmaToTimestep(s, logSigmas)));
  } else {
    levels = timesteps.map((t) => interpTable(table, t));
  }
  const sigmas = Float32Array.from([...levels, 0]);
  const last = timesteps.length - 1;

  /** The data prediction x̂₀ at step i (diffusers' `convert_model_output`). */
  const dataPrediction = (o: Ops<T>, modelOutput: T, x: T, i: number): T => {
    const { alpha, sigma } = vpLevel(sigmas[i]!);
    switch (prediction) {
      case 'epsilon':
        return o.div(o.sub(x, o.mul(modelOutput, sigma)), alpha);
      case 'v_prediction':
        return o.sub(o.mul(x, alpha), o.mul(modelOutput, sigma));
      case 'sample':
        return modelOutput;
    }
  };

  return {
    kind: 'dpmpp_2m',
    timesteps,
    initNoiseSigma: 1,
    needsNoise: false,
    initialState: {},
    scaleModelInput: (_o, x) => x,
    heldTensors: (s) => (s.previousX0 === undefined ? [] : [s.previousX0]),
    step(o: Ops<T>, state: DpmppState<T>, modelOutput: T, i: number, x: T) {
      checkStepIndex('dpmpp_2m', timesteps, i);
      const x0 = dataPrediction(o, modelOutput, x, i);
      const next = vpLevel(sigmas[i + 1]!);
      const cur = vpLevel(sigmas[i]!);
      const h = f32(next.lambda - cur.lambda);
      const sampleCoeff = f32(next.sigma / cur.sigma);
      const dataCoeff = f32(next.alpha * f32(f32(Math.exp(-h)) - 1));
      let prev: T;
      if (state.previousX0 === undefined || i === last) {
        prev = o.sub(o.mul(x, sampleCoeff), o.mul(x0, dataCoeff));
      } else {
        const before = vpLevel(sigmas[i - 1]!);
        const r = f32(f32(cur.lambda - before.lambda) / h);
        const d1 = o.mul(o.sub(x0, state.previousX0), f32(1 / r));
        prev = o.sub(o.sub(o.mul(x, sampleCoeff), o.mul(x0, dataCoeff)), o.mul(d1, f32(0.5 * dataCoeff)));
      }
      return { prev, state: { previousX0: x0 }, x0 };
    },
  };
}
