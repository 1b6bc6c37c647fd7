/**
 * diffusers' `scheduler/scheduler_config.json` → the noise-schedule settings every sampler reads.
 *
 * One file configures every sampler (diffusers' `Scheduler.from_config`): the saved class is only
 * provenance. Keys the file omits take the default of the sampler that runs, as `from_config`
 * does, so those stay `undefined` here and each sampler applies its own default (e.g. DDIM sets
 * ᾱ_prev = 1 at the last step unless told otherwise, PNDM does not).
 */
import path from 'node:path';
import { z } from 'zod';
import { parseWithSchema, readJsonFile } from '../io/diffusers.js';
import { ddimSampler } from './ddim.js';
import { dpmppSampler } from './dpmpp.js';
import { eulerAncestralSampler, eulerSampler } from './euler.js';
import { lmsSampler } from './lms.js';
import { pndmSampler } from './pndm.js';
import type { Sampler, SamplerKind, SamplerOptions, SamplerSetup } from './sampler.js';
import { noiseSchedule } from './tables.js';

/** What the UNet predicts: ε (noise), v = √ᾱ ε − √(1−ᾱ) x₀ (Salimans & Ho 2022), or x₀ itself. */
export const PREDICTION_TYPES = ['epsilon', 'v_prediction', 'sample'] as const;
export type PredictionType = (typeof PREDICTION_TYPES)[number];

/** A key whose only supported value is `value` (anything else would silently change the maths). */
function only<V extends string | boolean>(value: V, why: string) {
  return z
    .unknown()
    .optional()
    .superRefine((v, ctx) => {
      if (v !== undefined && v !== null && v !== value) {
        ctx.addIssue({ code: 'custom', message: `${JSON.stringify(v)} is not supported (only ${JSON.stringify(value)}): ${why}` });
      }
    });
}

const rawSchedulerConfig = z.looseObject({
  _class_name: z.string().optional(),
  num_train_timesteps: z.number().int().positive(),
  beta_start: z.number().positive(),
  beta_end: z.number().positive(),
  beta_schedule: z.enum(['linear', 'scaled_linear', 'squaredcos_cap_v2'], {
    error: (issue) =>
      `${issue.input === undefined ? 'required key is missing' : `${JSON.stringify(issue.input)} is not supported`}: expected "linear", "scaled_linear" or "squaredcos_cap_v2"`,
  }),
  trained_betas: z.array(z.number()).nullable().optional().default(null),
  prediction_type: z.enum(PREDICTION_TYPES).optional().default('epsilon'),
  steps_offset: z.number().int().nonnegative().optional().default(0),
  set_alpha_to_one: z.boolean().optional(),
  timestep_spacing: z.enum(['leading', 'trailing', 'linspace']).optional(),
  clip_sample: z.boolean().optional(),
  clip_sample_range: z.number().positive().optional().default(1),
  skip_prk_steps: z.boolean().optional(),
  use_karras_sigmas: z.boolean().nullable().optional(),
  rescale_betas_zero_snr: z.boolean().optional().default(false),
  thresholding: only(false, 'dynamic thresholding (Imagen) is not implemented'),
  timestep_type: only('discrete', 'continuous (EDM) timesteps are not implemented'),
  interpolation_type: only('linear', 'only linear σ interpolation is implemented'),
  final_sigmas_type: only('zero', 'only a final σ of 0 is implemented'),
});

/** scheduler_config.json as the samplers read it (parse with {@link parseSchedulerConfig}). */
export const schedulerConfigSchema = rawSchedulerConfig.transform((raw) => ({
  /** The class that saved the file (provenance only: any sampler can run from it). */
  savedClass: raw._class_name,
  /** T, the number of training noise levels. */
  trainTimesteps: raw.num_train_timesteps,
  betaSchedule: raw.beta_schedule,
  betaStart: raw.beta_start,
  betaEnd: raw.beta_end,
  trainedBetas: raw.trained_betas,
  rescaleZeroTerminalSnr: raw.rescale_betas_zero_snr,
  predictionType: raw.prediction_type,
  /** Added to every "leading" timestep (SD 1.x: 1, so the grid ends at t = 1, not 0). */
  stepsOffset: raw.steps_offset,
  /** DDIM/PNDM: ᾱ used past the last step, 1 (true) or ᾱ₀ (false). Absent: the sampler's default. */
  finalAlphaIsOne: raw.set_alpha_to_one,
  timestepSpacing: raw.timestep_spacing,
  /** DDIM: clamp the x₀ estimate to ±clipSampleRange. Absent: DDIM's default (true). */
  clipSample: raw.clip_sample,
  clipSampleRange: raw.clip_sample_range,
  /** PNDM: run PLMS only (no Runge–Kutta warm-up), as every SD config says. */
  skipPrkSteps: raw.skip_prk_steps,
  /** σ samplers: Karras et al. (2022) noise levels instead of the training grid's. */
  karrasSigmas: raw.use_karras_sigmas ?? undefined,
}));

export type SchedulerConfig = z.infer<typeof schedulerConfigSchema>;

/** Validate a parsed scheduler_config.json; errors name `file` and each offending key. */
export function parseSchedulerConfig(json: unknown, file = 'scheduler_config.json'): SchedulerConfig {
  return parseWithSchema(schedulerConfigSchema, json, file);
}

/** Read `<dir>/scheduler_config.json` of a diffusers `scheduler` folder. */
export async function readSchedulerConfig(dir: string): Promise<SchedulerConfig> {
  const file = path.join(dir, 'scheduler_config.json');
  return parseSchedulerConfig(await readJsonFile(file), file);
}

/** A sampler of the given kind for a scheduler config, as diffusers' `<Scheduler>.from_config(config)`. */
export function samplerFromConfig<T>(kind: SamplerKind, config: SchedulerConfig, opts: SamplerOptions): Sampler<T> {
  const setup: SamplerSetup = {
    schedule: noiseSchedule(config),
    config,
    steps: opts.steps,
    ...(opts.timestepSpacing === undefined ? {} : { timestepSpacing: opts.timestepSpacing }),
  };
  const karrasSigmas = opts.karrasSigmas ?? config.karrasSigmas ?? false;
  switch (kind) {
    case 'ddim':
      return ddimSampler<T>(setup, { eta: opts.eta ?? 0 });
    case 'pndm':
      return pndmSampler<T>(setup);
    case 'lms':
      return lmsSampler<T>(setup, { karrasSigmas });
    case 'euler':
      return eulerSampler<T>(setup, { karrasSigmas });
    case 'euler_a':
      return eulerAncestralSampler<T>(setup);
    case 'dpmpp_2m':
      return dpmppSampler<T>(setup, { karrasSigmas });
  }
}
