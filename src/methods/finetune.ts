/**
 * Full fine-tuning on captioned images: every UNet parameter (and by default every text-encoder
 * parameter) trains on the denoising loss, each image with its own caption — diffusers'
 * `examples/text_to_image/train_text_to_image.py` without EMA, plus the text encoder. Started
 * from a from-scratch folder (`src/toy/model.ts`) this trains a model from nothing (the toy world).
 *
 * Loss for a micro-batch of B images with captions c_i:
 *   z ~ q(z|x) (VAE, frozen), x₀ = z × scaling factor, ε ~ N(0, I) (+ noise_offset·N(0, I) per
 *   channel), t ~ U{0, …, T−1}, x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε (DDPM eq. 4), target ε or v;
 *   loss = (1/B) Σ_i w_i · mean over pixels of (UNet(x_t, t, TextEncoder(c_i)) − target_i)²
 * with w_i = 1, or min-SNR-γ weights (Hang et al. 2023) as DreamBooth computes them. Classifier-
 * free guidance needs unconditional training: `data.caption_dropout_rate` empties captions.
 *
 * It is DreamBooth's `adapter: full` without the fixed instance prompt and prior preservation,
 * and reuses its pieces (noise draws, variables over the stores, min-SNR weights, saved refs).
 */
import { stat } from 'node:fs/promises';

import * as tf from '@tensorflow/tfjs';
import { z } from 'zod';

import { readDiffusersFolder, readSingleFile, writeDiffusersFolder, writeSingleFile, type ComponentTensors } from '../io/single-file.js';
import { clipTextEncoder } from '../models/clip/text-encoder.js';
import { unet } from '../models/unet/unet.js';
import { scaleLatents } from '../models/vae/vae.js';
import type { Scope } from '../ops/scope.js';
import { tfOps } from '../ops/tfjs-ops.js';
import type { StableDiffusion } from '../pipeline/load.js';
import type { PredictionType } from '../schedulers/config.js';
import { noiseSchedule, type NoiseSchedule } from '../schedulers/tables.js';
import { checkCommonFields, commonFields, dataField } from '../train/config.js';
import { copyAsVariables, variableRefs } from './dreambooth.js';
import { patchedScope } from './lora.js';
import type { Artifact, ModelPatch, ParamOverride, StepCtx, TrainingMethod } from './types.js';
import { drawTrainingNoise, minSnrWeight, posteriorMoments, weightedDiffusionBatch, weightedMse, type WeightedDiffusionBatch } from './diffusion-batch.js';
import { samplePosterior } from '../models/vae/vae.js';

const stem = z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]*$/, 'expected a file-name-safe word (letters, digits, . _ -)');

/** Config of a fine-tuning run. */
export const finetuneConfigSchema = z
  .strictObject({
    method: z.literal('finetune').describe('Full fine-tune (or from-scratch training) of the UNet and text encoder on captioned images.'),
    ...commonFields({ learning_rate: 1e-4, save_every: 1000 }),
    max_grad_norm: z
      .number()
      .positive()
      .nullable()
      .default(1)
      .describe("Clip the global gradient norm to this value (diffusers' train_text_to_image default 1.0); null: no clipping. Default 1."),
    data: dataField.describe('Captioned images (the data section of src/data); data.dir is required. Set data.caption_dropout_rate for classifier-free guidance.'),
    train_text_encoder: z.boolean().default(true).describe('Also train every text-encoder parameter. Default true.'),
    snr_gamma: z
      .number()
      .positive()
      .nullable()
      .default(null)
      .describe('Min-SNR-γ loss weighting (Hang et al. 2023; 5.0 recommended); null: plain mean. Default null.'),
    save_formats: z
      .array(z.enum(['diffusers', 'single_file']))
      .min(1)
      .default(['diffusers'])
      .describe('diffusers (folder <output_name>/) and/or single_file (<output_name>.safetensors). Default [diffusers].'),
    save_dtype: z
      .enum(['fp32', 'fp16'])
      .default('fp32')
      .describe('Precision of the saved weights (fp16 halves the size; training stays fp32). Default fp32.'),
    output_name: stem.default('model').describe('Name of the saved model folder / file. Default model.'),
  })
  .superRefine((c, ctx) => checkCommonFields(c, ctx));

export type FinetuneConfig = z.infer<typeof finetuneConfigSchema>;

/** State after setup. */
export interface FinetuneState {
  readonly cfg: FinetuneConfig;
  readonly model: StableDiffusion;
  /** Trained parameters by component key (internal layout, conv filters HWIO). */
  readonly unet: ReadonlyMap<string, tf.Variable>;
  readonly text: ReadonlyMap<string, tf.Variable>;
  readonly schedule: NoiseSchedule;
  readonly prediction: PredictionType;
}

/** A prepared micro-batch. */
export type FinetuneBatch = WeightedDiffusionBatch;

function unetScope(s: FinetuneState): Scope<tf.Tensor> {
  return patchedScope(s.model.unet.store.scope(), (key) => s.unet.get(key));
}

function textScope(s: FinetuneState): Scope<tf.Tensor> {
  return patchedScope(s.model.text.store.scope(), (key) => s.text.get(key));
}

/** The base model's components with the trained UNet and text encoder in place. */
async function trainedComponents(s: FinetuneState): Promise<ComponentTensors> {
  const source = s.model.source;
  const base = (await stat(source)).isDirectory() ? await readDiffusersFolder(source) : await readSingleFile(source);
  const textRefs = new Map(base.components.text_encoder);
  for (const [k, ref] of await variableRefs(s.text)) textRefs.set(k, ref);
  return { ...base, components: { ...base.components, unet: await variableRefs(s.unet), text_encoder: textRefs }, close: () => base.close() };
}

/** Full fine-tuning as a training method. */
export const finetune: TrainingMethod<FinetuneConfig, FinetuneState, FinetuneBatch> = {
  id: 'finetune',
  description: 'Full fine-tune of the UNet (+ text encoder) on captioned images; trains a from-scratch model too (the toy world). Saves a diffusers folder / single file.',
  configSchema: finetuneConfigSchema,

  async setup(ctx, cfg) {
    const model = await ctx.model();
    const prediction = cfg.prediction_type ?? model.scheduler.predictionType;
    const unetVars = copyAsVariables(model.unet.store);
    const textVars = cfg.train_text_encoder ? copyAsVariables(model.text.store) : new Map<string, tf.Variable>();
    const count = (m: ReadonlyMap<string, tf.Variable>) => [...m.values()].reduce((a, v) => a + v.size, 0);
    ctx.log(`finetune: ${count(unetVars)} UNet${cfg.train_text_encoder ? ` and ${count(textVars)} text-encoder` : ''} values train; ${prediction} target`);
    return { cfg, model, unet: unetVars, text: textVars, schedule: noiseSchedule(model.scheduler), prediction };
  },

  trainable(s) {
    const out: Record<string, tf.Variable> = {};
    for (const [k, v] of s.unet) out[`unet.${k}`] = v;
    for (const [k, v] of s.text) out[`text_encoder.${k}`] = v;
    return out;
  },

  async prepare(ctx, s, raw) {
    const images = raw.images;
    if (images === undefined) throw new Error('finetune needs captioned images (a data: section)');
    const { model, cfg } = s;
    const vae = model.vae.cfg;
    const b = images.count;
    const latentShape = [images.height / vae.downscale, images.width / vae.downscale, vae.latentChannels] as const;

    // 1. Draws in diffusers' order, then latents: cached posteriors or the frozen VAE's encoding.
    const { posteriorEps, noise, timesteps } = drawTrainingNoise(ctx.random, b, latentShape, {
      noiseOffset: cfg.noise_offset,
      trainTimesteps: s.schedule.trainTimesteps,
    });
    const posterior = posteriorMoments(model.vae.store.scope(), vae, images, 'finetune');
    const x0 = scaleLatents(tfOps, samplePosterior(tfOps, posterior, posteriorEps), vae);

    // 3. Weights, then text: ids when the text encoder trains (encoded in the loss), else states now.
    const weights = timesteps.map((t) => (cfg.snr_gamma === null ? 1 : minSnrWeight(s.schedule, t, cfg.snr_gamma, s.prediction)) / b);
    return weightedDiffusionBatch(model, s.schedule, s.prediction, { x0, noise, timesteps, weights, captions: images.captions, textTrains: s.text.size > 0 });
  },

  loss(_ctx: StepCtx, s, batch) {
    const context = s.text.size > 0 ? clipTextEncoder(tfOps, textScope(s), batch.text, s.model.text.cfg).lastHiddenState : batch.text;
    const pred = unet(tfOps, unetScope(s), batch.noisy, batch.timesteps, context, s.model.unet.cfg);
    return weightedMse(pred, batch);
  },

  async artifacts(s) {
    const { cfg } = s;
    const what = `diffusers model folder (trained UNet${s.text.size > 0 ? ' and text encoder' : ''})`;
    return cfg.save_formats.map((format): Artifact => {
      const single = format === 'single_file';
      return {
        file: single ? `${cfg.output_name}.safetensors` : cfg.output_name,
        format: single ? 'single-file checkpoint (original LDM layout); use it as a model' : `${what}; use it as a model`,
        write: async (target) => {
          const components = await trainedComponents(s);
          try {
            await (single ? writeSingleFile(target, components, { dtype: cfg.save_dtype }) : writeDiffusersFolder(target, components, { dtype: cfg.save_dtype }));
          } finally {
            await components.close();
          }
        },
      };
    });
  },

  generationPatch(s): ModelPatch {
    const params: ParamOverride[] = [
      ...[...s.unet].map(([key, value]) => ({ component: 'unet' as const, key, value })),
      ...[...s.text].map(([key, value]) => ({ component: 'text' as const, key, value })),
    ];
    return { params };
  },

  async applyArtifact(_model, file) {
    throw new Error(`${file}: a fine-tuned model is a model of its own: use it as the model (sdwb generate --model ${file})`);
  },

  dispose(s) {
    tf.dispose([...s.unet.values(), ...s.text.values()]);
  },
};
