/**
 * The partially denoised latents x_t of ESD's 2023 code (Gandikota et al. 2023, `train-esd.py` of
 * rohitgandikota/erasing): CompVis latent-diffusion's `DDIMSampler` (`ldm/models/diffusion/ddim.py`
 * as vendored there) run by `quick_sample_till_t`, with that code's behaviour kept exactly:
 *
 * - ᾱ: β = linspace(√β_start, √β_end, T)², ᾱ = cumprod(1 − β), all in float64, stored float32
 *   (`DDPM.register_schedule`); diffusers computes the same table in float32.
 * - DDIM grid (`make_ddim_timesteps`, "uniform"): c = T // S, τ = range(0, T, c) + 1 = [1, 21, …, 981]
 *   for S = 50; ᾱ_τ = ᾱ[τ], ᾱ_prev = [ᾱ[0]] + ᾱ[τ[:-1]] (`make_ddim_sampling_parameters`).
 * - `ddim_sampling(t_start=-1)` slices `timesteps[:-1]`: the step at the noisiest τ (981) is
 *   dropped and sampling starts at 961 from the initial noise as given.
 * - loop `for i, step in enumerate(flip(τ)): index = N − 1 − i; x = p_sample_ddim(x, step, index);
 *   if index + 1 == till: break` — the stop check comes after the step, so `till = t_enc` stops
 *   one step later than its name says, and t_enc = 0 never stops (all N steps, as t_enc = 1).
 * - each step (η = 0, `p_sample_ddim`): ε̂ = ε_u + s·(ε_c − ε_u) (classifier-free guidance unless
 *   s = 1); x̂₀ = (x − √(1 − ᾱ_t) ε̂)/√ᾱ_t; x ← √ᾱ_prev x̂₀ + √(1 − ᾱ_prev) ε̂  (DDIM eq. 12, σ = 0).
 * - the loss timestep is drawn in [round(1000·t_enc/S), round(1000·(t_enc + 1)/S)) — the t_enc-th
 *   interval of 1000/S DDPM steps, not the noise level the sampler stopped at.
 */
import * as tf from '@tensorflow/tfjs';

import type { UnetConfig } from '../models/unet/config.js';
import { unet } from '../models/unet/unet.js';
import type { Scope } from '../ops/scope.js';
import { tfOps } from '../ops/tfjs-ops.js';
import type { SchedulerConfig } from '../schedulers/config.js';
import { f32, roundHalfEven } from '../schedulers/tables.js';

/** The CompVis DDIM grid: DDPM timesteps τ (ascending) with ᾱ_τ and ᾱ_prev as float32. */
export interface CompvisDdimGrid {
  readonly timesteps: readonly number[];
  readonly alphas: Float32Array;
  readonly alphasPrev: Float32Array;
}

/** `torch.linspace(start, end, n, dtype=float64)`: from the start for the first half, from the end for the rest. */
function linspace64(start: number, end: number, n: number): Float64Array {
  const out = new Float64Array(n);
  if (n === 1) {
    out[0] = start;
    return out;
  }
  const step = (end - start) / (n - 1);
  const half = Math.floor(n / 2);
  for (let i = 0; i < n; i++) out[i] = i < half ? start + step * i : end - step * (n - 1 - i);
  return out;
}

/** ᾱ as CompVis' `DDPM.register_schedule` holds it: computed in float64, stored float32. */
export function compvisAlphasCumprod(scheduler: SchedulerConfig): Float32Array {
  const n = scheduler.trainTimesteps;
  let betas: Float64Array;
  if (scheduler.trainedBetas != null) betas = Float64Array.from(scheduler.trainedBetas);
  else if (scheduler.betaSchedule === 'scaled_linear') {
    // CompVis' "linear" schedule (`make_beta_schedule`): linear in √β.
    betas = linspace64(Math.sqrt(scheduler.betaStart), Math.sqrt(scheduler.betaEnd), n).map((b) => b * b);
  } else if (scheduler.betaSchedule === 'linear') {
    betas = linspace64(scheduler.betaStart, scheduler.betaEnd, n);
  } else {
    throw new Error(`esd-2023: the CompVis DDIM sampler is defined here for scaled_linear and linear β schedules, not ${scheduler.betaSchedule}`);
  }
  const out = new Float32Array(n);
  let acc = 1;
  for (let i = 0; i < n; i++) {
    acc *= 1 - betas[i]!;
    out[i] = acc;
  }
  return out;
}

/** The DDIM grid of `ddimSteps` steps over the model's schedule (`make_schedule(ddim_discretize="uniform")`). */
export function compvisDdimGrid(scheduler: SchedulerConfig, ddimSteps: number): CompvisDdimGrid {
  const T = scheduler.trainTimesteps;
  const c = Math.floor(T / ddimSteps);
  if (!Number.isInteger(ddimSteps) || ddimSteps < 2 || c < 1) throw new Error(`ddim_steps must be an integer in [2, ${T}], got ${ddimSteps}`);
  const timesteps: number[] = [];
  for (let t = 0; t < T; t += c) timesteps.push(t + 1);
  if (timesteps[timesteps.length - 1]! >= T) {
    throw new Error(`ddim_steps ${ddimSteps}: the CompVis grid would reach timestep ${timesteps[timesteps.length - 1]}, past the last of ${T} (use at most ${Math.floor(T / 2)} steps)`);
  }
  const acp = compvisAlphasCumprod(scheduler);
  const alphas = Float32Array.from(timesteps, (t) => acp[t]!);
  const alphasPrev = Float32Array.from(timesteps, (_, i) => (i === 0 ? acp[0]! : acp[timesteps[i - 1]!]!));
  return { timesteps, alphas, alphasPrev };
}

/** The grid indices `quick_sample_till_t(…, t_enc)` steps through, in order (noisiest first). */
export function tillTIndices(grid: CompvisDdimGrid, tEnc: number): number[] {
  const total = grid.timesteps.length - 1; // t_start = −1 drops the last grid entry
  const out: number[] = [];
  for (let i = 0; i < total; i++) {
    const index = total - 1 - i;
    out.push(index);
    if (index + 1 === tEnc) break;
  }
  return out;
}

/** The loss timestep's range [lo, hi) for `t_enc` (train-esd.py: `round(t_enc/S·1000)` … `round((t_enc+1)/S·1000)`). */
export function lossTimestepRange(tEnc: number, ddimSteps: number): readonly [number, number] {
  // Python's round (half to even) of the float64 quotient; the 1000 is the script's constant.
  return [roundHalfEven((tEnc / ddimSteps) * 1000), roundHalfEven(((tEnc + 1) / ddimSteps) * 1000)];
}

/** What {@link quickSampleTillT} needs. */
export interface TillTOptions {
  /** UNet parameters (ESD 2023: the model being trained). */
  readonly scope: Scope<tf.Tensor>;
  readonly cfg: UnetConfig;
  readonly grid: CompvisDdimGrid;
  /** The initial noise x_T, NHWC [1, h, w, C], used as given (no scaling). */
  readonly startCode: tf.Tensor;
  /** Text states [1, S, D] of the unconditional prompt and of the concept. */
  readonly uncond: tf.Tensor;
  readonly cond: tf.Tensor;
  /** Guidance scale s (`start_guidance`). */
  readonly guidance: number;
  readonly tEnc: number;
}

/** `quick_sample_till_t(emb, s, start_code, t_enc)` of train-esd.py: x after the DDIM steps of {@link tillTIndices}, NHWC (caller owns). */
export async function quickSampleTillT(o: TillTOptions): Promise<tf.Tensor> {
  const { grid, guidance } = o;
  // p_sample_ddim: no guidance when the scale is exactly 1 (not "≤ 1" as diffusers).
  const guided = guidance !== 1;
  const context = guided ? tf.concat([o.uncond, o.cond], 0) : tf.clone(o.cond); // [2,S,D]: uncond, cond
  let x = o.startCode;
  try {
    for (const index of tillTIndices(grid, o.tEnc)) {
      const aT = grid.alphas[index]!;
      const aPrev = grid.alphasPrev[index]!;
      // float32 coefficients as torch.full(…, value) holds them.
      const sqrtOneMinusAT = f32(Math.sqrt(f32(1 - aT)));
      const sqrtAT = f32(Math.sqrt(aT));
      const sqrtAPrev = f32(Math.sqrt(aPrev));
      const dirCoeff = f32(Math.sqrt(f32(1 - aPrev)));
      const next = tf.tidy(() => {
        const xIn = guided ? tf.concat([x, x], 0) : x; // [2,h,w,C]
        const t = tf.fill([xIn.shape[0]!], grid.timesteps[index]!, 'float32');
        const out = unet(tfOps, o.scope, xIn, t, context, o.cfg);
        let eps = out;
        if (guided) {
          const [uncond, cond] = tf.split(out, 2, 0) as [tf.Tensor, tf.Tensor];
          eps = tf.add(uncond, tf.mul(tf.sub(cond, uncond), guidance));
        }
        const x0 = tf.div(tf.sub(x, tf.mul(eps, sqrtOneMinusAT)), sqrtAT); // DDIM eq. 12, "predicted x₀"
        return tf.add(tf.mul(x0, sqrtAPrev), tf.mul(eps, dirCoeff)); // + "direction pointing to x_t", σ = 0
      });
      if (x !== o.startCode) x.dispose();
      x = next;
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
  } catch (e) {
    if (x !== o.startCode) x.dispose();
    throw e;
  } finally {
    context.dispose();
  }
  return x === o.startCode ? tf.clone(x) : x;
}
