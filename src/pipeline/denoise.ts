/**
 * The sampling loop shared by txt2img, img2img and the training methods that need partially
 * denoised latents (ESD's x_t, DreamBooth's class images): diffusers' pipeline loop over any of
 * our samplers, with classifier-free guidance and tfjs memory handled per step.
 *
 * Per step i (diffusers' `StableDiffusionPipeline.__call__`, phase 7):
 *   x_in = scaleModelInput(x, i);  out = UNet([x_in, x_in], t_i, [uncond, cond])   (one batched call)
 *   ε̂ = out_uncond + w·(out_cond − out_uncond)                                      (CFG, Ho & Salimans 2022)
 *   x = step(ε̂, i, x, noise_i)   with noise_i ~ N(0, I) from the run's generator when the sampler needs it
 */
import * as tf from '@tensorflow/tfjs';
import { nchwToNhwc } from '../io/layout.js';
import { unet, type UnetHooks } from '../models/unet/unet.js';
import type { Scope } from '../ops/scope.js';
import { tfOps } from '../ops/tfjs-ops.js';
import { samplerFromConfig, type SchedulerConfig } from '../schedulers/config.js';
import { addNoise } from '../schedulers/ddpm.js';
import type { TorchGenerator } from '../schedulers/rng.js';
import { sigmaGrid, trainingSigmas, type Sampler, type SamplerKind, type SamplerSetup } from '../schedulers/sampler.js';
import { f32, interpTable, karrasSigmas, noiseSchedule } from '../schedulers/tables.js';
import { assertWeightsUsed, type UnetModel } from './load.js';

/** How to build a sampler for a run. */
export interface SamplerSpec {
  readonly kind: SamplerKind;
  readonly steps: number;
  /** LMS, Euler, DPM++ 2M: Karras noise levels (default: the scheduler config's `use_karras_sigmas`). */
  readonly karras?: boolean;
  /** DDIM's η (default 0). */
  readonly eta?: number;
}

/** A sampler of `spec` over the model folder's scheduler config (prediction type, betas, offsets). */
export function makeSampler(scheduler: SchedulerConfig, spec: SamplerSpec): Sampler<tf.Tensor> {
  return samplerFromConfig<tf.Tensor>(spec.kind, scheduler, {
    steps: spec.steps,
    ...(spec.eta === undefined ? {} : { eta: spec.eta }),
    ...(spec.karras === undefined ? {} : { karrasSigmas: spec.karras }),
  });
}

const SAMPLER_OF_CLASS: Readonly<Record<string, SamplerKind>> = {
  DDIMScheduler: 'ddim',
  PNDMScheduler: 'pndm',
  LMSDiscreteScheduler: 'lms',
  EulerDiscreteScheduler: 'euler',
  EulerAncestralDiscreteScheduler: 'euler_a',
  DPMSolverMultistepScheduler: 'dpmpp_2m',
};

/** The sampler diffusers would run for this config (its saved class), PNDM (SD's default) for others. */
export function defaultSamplerKind(scheduler: SchedulerConfig): SamplerKind {
  return SAMPLER_OF_CLASS[scheduler.savedClass ?? ''] ?? 'pndm';
}

/**
 * img2img's first step for `strength` (diffusers' `get_timesteps`): the last ⌊steps·strength⌋
 * steps run, so denoising starts at index steps − ⌊steps·strength⌋ (every sampler here has order 1).
 * Float multiplication as in Python: ⌊100 × 0.29⌋ = 28.
 */
export function img2imgStartStep(steps: number, strength: number): number {
  if (!(strength > 0 && strength <= 1)) throw new Error(`strength must be in (0, 1], got ${strength}`);
  const kept = Math.min(Math.trunc(steps * strength), steps);
  if (kept < 1) {
    throw new Error(`strength ${strength} × ${steps} steps leaves no denoising step: raise the strength or the steps (at least ${Math.ceil(1 / strength)} steps)`);
  }
  return steps - kept;
}

/**
 * Noise clean latents x₀ to the level step `i` of the sampler starts from (diffusers'
 * `scheduler.add_noise` with `begin_index = i`), NHWC tensors:
 *   DDIM, PNDM:  √ᾱ_t x₀ + √(1 − ᾱ_t) ε   at t = timesteps[i]                (DDPM eq. 4)
 *   LMS, Euler:  x₀ + σ_i ε                                                  (σ-space: x_σ = x₀ + σ ε)
 *   DPM++ 2M:    α x₀ + σ_t ε,  α = 1/√(σ_i² + 1), σ_t = σ_i α               (its VP form)
 */
export function noiseToStep(scheduler: SchedulerConfig, spec: SamplerSpec, sampler: Sampler<tf.Tensor>, x0: tf.Tensor, eps: tf.Tensor, i: number): tf.Tensor {
  const t = sampler.timesteps[i];
  if (t === undefined) throw new Error(`step ${i} is outside the ${sampler.timesteps.length}-step schedule`);
  const setup: SamplerSetup = { schedule: noiseSchedule(scheduler), config: scheduler, steps: spec.steps };
  const karras = spec.karras ?? scheduler.karrasSigmas ?? false;
  return tf.tidy(() => {
    switch (spec.kind) {
      case 'ddim':
      case 'pndm':
        return addNoise(tfOps, setup.schedule, x0, eps, new Array<number>(x0.shape[0]!).fill(t));
      case 'lms':
      case 'euler':
      case 'euler_a': {
        const sigma = sigmaGrid(setup, spec.kind !== 'euler_a' && karras).sigmas[i]!;
        return tf.add(x0, tf.mul(eps, sigma));
      }
      case 'dpmpp_2m': {
        // The DPM-Solver grid: Karras levels between the table's extremes, or the table at t.
        const table = trainingSigmas(setup);
        const level = f32(karras ? karrasSigmas(table[0]!, table[table.length - 1]!, spec.steps)[i]! : interpTable(table, t));
        const alpha = f32(1 / f32(Math.sqrt(f32(f32(level * level) + 1))));
        return tf.add(tf.mul(x0, alpha), tf.mul(eps, f32(level * alpha)));
      }
    }
  });
}

/** What a step callback sees. */
export interface StepInfo {
  /** Index into the sampler's timesteps of the step just taken. */
  readonly index: number;
  readonly timestep: number;
  /** The latents after the step, NHWC; valid only during the callback (copy what you keep). */
  readonly latents: tf.Tensor;
}

export interface LoopOptions {
  readonly sampler: Sampler<tf.Tensor>;
  /** First step index (img2img: {@link img2imgStartStep}); default 0. */
  readonly fromStep?: number;
  /** Stop before this step index (partial denoising); default the end of the schedule. */
  readonly toStep?: number;
  /** Source of the samplers' per-step noise (Euler a, DDIM η > 0), drawn NCHW as diffusers does. */
  readonly generator?: TorchGenerator;
  /** Called once before the first step with the number of steps this run takes. */
  readonly onStart?: (total: number) => void;
  /** Called after each step with steps done and steps in this run. */
  readonly onStep?: (done: number, total: number, info: StepInfo) => void;
  /** Stops the loop between steps. */
  readonly signal?: AbortSignal;
}

export interface DenoiseOptions extends LoopOptions {
  /** Text states [B, S, D]; with guidance > 1, [2B, S, D] ordered [uncond × B, cond × B]. */
  readonly context: tf.Tensor;
  /** Classifier-free guidance scale w; ≤ 1 means the UNet runs on the cond states only. */
  readonly guidance: number;
  /** UNet parameters (default: the model's own); e.g. frozen weights while others are trained. */
  readonly unetScope?: Scope<tf.Tensor>;
  readonly unetHooks?: UnetHooks<tf.Tensor>;
}

/** Classifier-free guidance on a model output [2B, …] ordered [uncond, cond]: ε̂ = uncond + w·(cond − uncond); `out` stays the caller's. */
export function applyGuidance(out: tf.Tensor, guidance: number): tf.Tensor {
  return tf.tidy(() => {
    const [uncond, cond] = tf.split(out, 2, 0) as [tf.Tensor, tf.Tensor];
    return tf.add(uncond, tf.mul(tf.sub(cond, uncond), guidance));
  });
}

/**
 * The sampling loop of every engine: `predict(xIn, i)` returns the (guided) model output for the
 * scaled NHWC input at step i, as a tensor the loop then owns. Starts from `latents` (already at
 * the noise level of step `fromStep`) and returns new latents the caller owns; `latents` is left
 * alone. Between steps only the latents and the sampler state's tensors stay alive.
 */
export async function sampleLoop(latents: tf.Tensor, predict: (xIn: tf.Tensor, i: number) => Promise<tf.Tensor>, opts: LoopOptions): Promise<tf.Tensor> {
  const { sampler } = opts;
  const from = opts.fromStep ?? 0;
  const to = opts.toStep ?? sampler.timesteps.length;
  if (!(Number.isInteger(from) && Number.isInteger(to) && from >= 0 && from <= to && to <= sampler.timesteps.length)) {
    throw new Error(`denoise: steps [${from}, ${to}) are outside the ${sampler.timesteps.length}-step schedule`);
  }
  if (sampler.needsNoise && opts.generator === undefined) {
    throw new Error(`denoise: the ${sampler.kind} sampler${sampler.kind === 'ddim' ? ' with eta > 0' : ''} needs a generator for its per-step noise`);
  }
  const [batch, h, w, channels] = latents.shape as [number, number, number, number];
  let x = latents;
  let state = sampler.initialState;
  const release = () => {
    for (const held of sampler.heldTensors(state)) if (held !== x && held !== latents) held.dispose();
  };
  const total = to - from;
  opts.onStart?.(total);
  try {
    for (let i = from; i < to; i++) {
      opts.signal?.throwIfAborted();
      // Drawn before the model call, one draw per step: the generator's stream order of diffusers.
      const noise = sampler.needsNoise ? nchwToNhwc(opts.generator!.randn([batch, channels, h, w]), [batch, channels, h, w]).data : undefined;
      const xIn = tf.tidy(() => sampler.scaleModelInput(tfOps, x, i));
      let eps: tf.Tensor;
      try {
        eps = await predict(xIn, i);
      } finally {
        if (xIn !== x) xIn.dispose();
      }
      let next: { prev: tf.Tensor; state: unknown } | undefined;
      tf.tidy(() => {
        const noiseTensor = noise === undefined ? undefined : tf.tensor4d(noise, [batch, h, w, channels]);
        const r = sampler.step(tfOps, state, eps, i, x, noiseTensor);
        for (const held of [r.prev, ...sampler.heldTensors(r.state)]) tf.keep(held);
        next = { prev: r.prev, state: r.state };
      });
      // Free the model output, the previous latents and history the new state no longer holds
      // (never the caller's input).
      const alive = new Set<tf.Tensor>([next!.prev, ...sampler.heldTensors(next!.state)]);
      if (!alive.has(eps)) eps.dispose();
      for (const old of [x, ...sampler.heldTensors(state)]) {
        if (old !== latents && !alive.has(old)) old.dispose();
      }
      x = next!.prev;
      state = next!.state;
      opts.onStep?.(i - from + 1, total, { index: i, timestep: sampler.timesteps[i]!, latents: x });
      // Let I/O (progress output, signals) through between steps.
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
  } catch (e) {
    release();
    if (x !== latents) x.dispose();
    throw e;
  }
  release();
  return x === latents ? tf.clone(latents) : x;
}

/**
 * Run the sampler with the tfjs UNet and classifier-free guidance from NHWC latents `latents`
 * (already at the noise level of step `fromStep`, i.e. scaled by initNoiseSigma or noised with
 * {@link noiseToStep}). Returns new NHWC latents the caller owns; `latents` and `context` are left
 * to the caller.
 */
export async function denoise(model: UnetModel, latents: tf.Tensor, opts: DenoiseOptions): Promise<tf.Tensor> {
  const { context, guidance } = opts;
  const batch = latents.shape[0]!;
  const guided = guidance > 1;
  const expectedContext = guided ? 2 * batch : batch;
  if (context.shape[0] !== expectedContext) {
    throw new Error(
      `denoise: ${context.shape[0]} text states for ${batch} latents (expected ${expectedContext}${guided ? ': [uncond, cond] per sample' : ''})`,
    );
  }
  const scope = opts.unetScope ?? model.unet.store.scope();
  const checkWeights = opts.unetScope === undefined;
  const cfg = model.unet.cfg;
  const predict = async (xIn: tf.Tensor, i: number): Promise<tf.Tensor> => {
    const eps = tf.tidy(() => {
      const modelIn = guided ? tf.concat([xIn, xIn], 0) : xIn; // [2B,h,w,C]: uncond half, cond half
      const timesteps = tf.fill([modelIn.shape[0]!], opts.sampler.timesteps[i]!, 'float32');
      const out = unet(tfOps, scope, modelIn, timesteps, context, cfg, opts.unetHooks);
      return guided ? applyGuidance(out, guidance) : out;
    });
    if (checkWeights) assertWeightsUsed(model.unet.store, 'UNet');
    return eps;
  };
  return sampleLoop(latents, predict, opts);
}
