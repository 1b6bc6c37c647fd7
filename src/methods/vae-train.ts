/**
 * AutoencoderKL training on images (method id `vae`): every VAE parameter trains on
 * reconstruction with a small KL term, as LDM's first stage (Rombach et al. 2022, §3 and
 * appendix G) without the perceptual and adversarial losses (not needed for flat toy images):
 *   q(z|x) = N(μ, σ²) = encode(x), z = μ + σ·ε, x̂ = decode(z)
 *   loss = (1/P) Σ (x̂ − x)² + kl_weight · (1/P) Σ_latent ½(μ² + σ² − 1 − log σ²)
 * where P = pixel values per batch (B·H·W·3): both sums are normalised by the same P so that
 * kl_weight means what LDM's `kl_weight` means (1e-6 in SD's autoencoder config).
 *
 * When saving, the latent scaling factor is set as LDM §4.3.2 does: 1/std of latent samples z of
 * the most recent training images, so the diffusion model sees unit-variance latents.
 */
import { stat } from 'node:fs/promises';

import * as tf from '@tensorflow/tfjs';
import { z } from 'zod';

import { readDiffusersFolder, readSingleFile, writeDiffusersFolder, writeSingleFile, type ComponentTensors } from '../io/single-file.js';
import { vaeDecode, vaeEncode } from '../models/vae/vae.js';
import type { Scope } from '../ops/scope.js';
import { tfOps } from '../ops/tfjs-ops.js';
import type { StableDiffusion } from '../pipeline/load.js';
import { checkCommonFields, commonFields, dataField } from '../train/config.js';
import { TrainRandom } from '../train/rng-state.js';
import { copyAsVariables, variableRefs } from './dreambooth.js';
import { randnNhwc } from './diffusion-batch.js';
import { patchedScope } from './lora.js';
import type { Artifact, ModelPatch, StepCtx, TrainingMethod } from './types.js';

const stem = z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]*$/, 'expected a file-name-safe word (letters, digits, . _ -)');

// Seed stream of the latent samples that measure the scaling factor.
const SCALE_STREAM = 501;

/** Config of a VAE training run. */
export const vaeTrainConfigSchema = z
  .strictObject({
    method: z.literal('vae').describe('Train the AutoencoderKL (encoder and decoder) on image reconstruction.'),
    ...commonFields({ learning_rate: 1e-3, save_every: 1000 }),
    data: dataField.describe('Training images (the data section of src/data); captions are ignored.'),
    kl_weight: z.number().min(0).default(1e-6).describe("Weight of the KL term, normalised as LDM's kl_weight (SD's autoencoder: 1e-6). Default 1e-6."),
    scale_samples: z
      .number()
      .int()
      .min(1)
      .default(256)
      .describe('Most recent training images whose latents set scaling_factor = 1/std(z) when saving (LDM §4.3.2). Default 256.'),
    save_formats: z
      .array(z.enum(['diffusers', 'single_file']))
      .min(1)
      .default(['diffusers'])
      .describe('diffusers (folder <output_name>/, the base model with this VAE) and/or single_file. Default [diffusers].'),
    output_name: stem.default('model').describe('Name of the saved model folder / file. Default model.'),
    train_part: z
      .enum(['all', 'decoder'])
      .default('all')
      .describe(
        "all: encoder and decoder; decoder: the decoder and post_quant_conv only (as SD's ft-MSE VAE), so the latent space a diffusion model was trained on stays exactly as it was (scaling_factor kept). Default all.",
      ),
  })
  .superRefine((c, ctx) => checkCommonFields(c, ctx));

/** Whether a VAE parameter trains under `train_part`. */
export function vaeParamTrains(key: string, part: 'all' | 'decoder'): boolean {
  return part === 'all' || key.startsWith('decoder.') || key.startsWith('post_quant_conv.');
}

export type VaeTrainConfig = z.infer<typeof vaeTrainConfigSchema>;

/** State after setup. */
export interface VaeTrainState {
  readonly cfg: VaeTrainConfig;
  readonly model: StableDiffusion;
  /** Trained VAE parameters by key (internal layout). */
  readonly vae: ReadonlyMap<string, tf.Variable>;
  /** The newest training images (NHWC rows in [−1, 1]), for the scaling factor. */
  recent: Float32Array[];
}

/** A prepared micro-batch. */
export interface VaeBatch {
  /** Images NHWC [B, H, W, 3] in [−1, 1]. */
  readonly pixels: tf.Tensor;
  /** Posterior noise ε, NHWC [B, h, w, C]. */
  readonly eps: tf.Tensor;
  readonly [key: string]: tf.Tensor;
}

function vaeScope(s: VaeTrainState): Scope<tf.Tensor> {
  return patchedScope(s.model.vae.store.scope(), (key) => s.vae.get(key));
}

/** The reconstruction + KL loss terms of a batch (both normalised by the pixel-value count). */
export function vaeLossTerms(p: Scope<tf.Tensor>, cfg: StableDiffusion['vae']['cfg'], pixels: tf.Tensor, eps: tf.Tensor): { mse: tf.Scalar; kl: tf.Scalar } {
  const posterior = vaeEncode(tfOps, p, pixels, cfg);
  const z = tf.add(posterior.mean, tf.mul(posterior.std, eps));
  const recon = vaeDecode(tfOps, p, z, cfg);
  const mse = tf.mean(tf.square(tf.sub(recon, pixels))) as tf.Scalar;
  // KL(N(μ, σ²) ‖ N(0, 1)) per latent value, summed, over the pixel-value count.
  const klElems = tf.mul(tf.sub(tf.add(tf.square(posterior.mean), tf.exp(posterior.logvar)), tf.add(posterior.logvar, 1)), 0.5);
  const kl = tf.div(tf.sum(klElems), pixels.size) as tf.Scalar;
  return { mse, kl };
}

/** 1/std of posterior samples of `images` (the LDM scaling factor), float32. */
export async function measureScalingFactor(p: Scope<tf.Tensor>, cfg: StableDiffusion['vae']['cfg'], images: readonly Float32Array[], height: number, width: number, seed: number): Promise<number> {
  let sum = 0;
  let sumSq = 0;
  let n = 0;
  const chunk = 32;
  for (let from = 0; from < images.length; from += chunk) {
    const part = images.slice(from, from + chunk);
    const values = tf.tidy(() => {
      const x = tf.tensor4d(concatRows(part), [part.length, height, width, 3]);
      const posterior = vaeEncode(tfOps, p, x, cfg);
      const [, h, w, c] = posterior.mean.shape as [number, number, number, number];
      const eps = randnNhwc(new TrainRandom(seed, SCALE_STREAM, from), part.length, h, w, c);
      return tf.add(posterior.mean, tf.mul(posterior.std, eps));
    });
    for (const v of await values.data<'float32'>()) {
      sum += v;
      sumSq += v * v;
      n++;
    }
    values.dispose();
  }
  const mean = sum / n;
  const std = Math.sqrt(Math.max(sumSq / n - mean * mean, 1e-12));
  return Math.fround(1 / std);
}

function concatRows(rows: readonly Float32Array[]): Float32Array {
  const out = new Float32Array(rows.reduce((a, r) => a + r.length, 0));
  let at = 0;
  for (const r of rows) {
    out.set(r, at);
    at += r.length;
  }
  return out;
}

/** The base model with the trained VAE (and its measured scaling factor) in place. */
async function trainedComponents(s: VaeTrainState): Promise<ComponentTensors> {
  const source = s.model.source;
  const base = (await stat(source)).isDirectory() ? await readDiffusersFolder(source) : await readSingleFile(source);
  const size = s.model.vae.cfg.sampleSize;
  const [height, width] = s.recent.length > 0 ? imageSide(s.recent[0]!) : [size, size];
  const scaling = s.cfg.train_part === 'decoder' ? s.model.vae.cfg.scalingFactor : s.recent.length > 0 ? await measureScalingFactor(vaeScope(s), s.model.vae.cfg, s.recent, height, width, s.cfg.seed) : s.model.vae.cfg.scalingFactor;
  return {
    ...base,
    components: { ...base.components, vae: await variableRefs(s.vae) },
    configs: { ...base.configs, vae: { ...base.configs.vae, scaling_factor: scaling } },
    close: () => base.close(),
  };
}

// Training images are square unless the data config says otherwise; the row length tells the side.
function imageSide(row: Float32Array): [number, number] {
  const side = Math.round(Math.sqrt(row.length / 3));
  if (side * side * 3 !== row.length) throw new Error('vae: scaling factor from non-square images is not supported');
  return [side, side];
}

/** VAE training as a method. */
export const vaeTrain: TrainingMethod<VaeTrainConfig, VaeTrainState, VaeBatch> = {
  id: 'vae',
  description: 'AutoencoderKL training (reconstruction MSE + KL); saves the model with the new VAE and its measured latent scaling factor.',
  configSchema: vaeTrainConfigSchema,

  async setup(ctx, cfg) {
    const model = await ctx.model();
    const vae = copyAsVariables(model.vae.store);
    const trained = [...vae].filter(([k]) => vaeParamTrains(k, cfg.train_part));
    if (trained.length === 0) throw new Error(`vae: no VAE parameter matches train_part ${cfg.train_part}`);
    ctx.log(`vae: ${trained.reduce((a, [, v]) => a + v.size, 0)} VAE values train (${cfg.train_part === 'all' ? 'encoder and decoder' : 'decoder only'}, factor ${model.vae.cfg.downscale}, ${model.vae.cfg.latentChannels} latent channels)`);
    return { cfg, model, vae, recent: [] };
  },

  trainable(s) {
    return Object.fromEntries([...s.vae].filter(([k]) => vaeParamTrains(k, s.cfg.train_part)).map(([k, v]) => [`vae.${k}`, v]));
  },

  async prepare(ctx, s, raw) {
    const images = raw.images;
    if (images?.pixels === undefined) throw new Error('vae needs images as pixels (a data: section without cache_latents)');
    const { count: b, height, width } = images;
    const f = s.model.vae.cfg.downscale;
    const rowSize = height * width * 3;
    for (let i = 0; i < b; i++) s.recent.push(images.pixels.slice(i * rowSize, (i + 1) * rowSize));
    if (s.recent.length > s.cfg.scale_samples) s.recent = s.recent.slice(s.recent.length - s.cfg.scale_samples);
    return {
      pixels: tf.tensor4d(images.pixels, [b, height, width, 3]),
      eps: randnNhwc(ctx.random, b, height / f, width / f, s.model.vae.cfg.latentChannels),
    };
  },

  loss(_ctx: StepCtx, s, batch) {
    const { mse, kl } = vaeLossTerms(vaeScope(s), s.model.vae.cfg, batch.pixels, batch.eps);
    return tf.add(mse, tf.mul(kl, s.cfg.kl_weight)) as tf.Scalar;
  },

  async artifacts(s) {
    const { cfg } = s;
    return cfg.save_formats.map((format): Artifact => {
      const single = format === 'single_file';
      return {
        file: single ? `${cfg.output_name}.safetensors` : cfg.output_name,
        format: `${single ? 'single-file checkpoint' : 'diffusers model folder'} with the trained VAE (scaling_factor measured on the latest images)`,
        write: async (target) => {
          const components = await trainedComponents(s);
          try {
            await (single ? writeSingleFile(target, components) : writeDiffusersFolder(target, components));
          } finally {
            await components.close();
          }
        },
      };
    });
  },

  generationPatch(s): ModelPatch {
    return { params: [...s.vae].map(([key, value]) => ({ component: 'vae' as const, key, value })) };
  },

  async applyArtifact(_model, file) {
    throw new Error(`${file}: a model with a trained VAE is a model of its own: use it as the model (sdwb generate --model ${file})`);
  },

  dispose(s) {
    tf.dispose([...s.vae.values()]);
    s.recent = [];
  },
};
