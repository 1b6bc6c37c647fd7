/**
 * The draws and latents of a standard diffusion-loss micro-batch, shared by every method that
 * trains on images (textual inversion, hypernetworks, DreamBooth, fine-tuning). The draw order is
 * diffusers' — posterior samples, training noise (+ offset), timesteps — so runs match its
 * scripts' randomness and resume reproduces every step exactly. Also the per-sample weighted loss
 * DreamBooth and fine-tuning share.
 */
import * as tf from '@tensorflow/tfjs';
import { nchwToNhwc } from '../io/layout.js';
import { clipTextEncoder } from '../models/clip/text-encoder.js';
import type { VaeConfig } from '../models/vae/config.js';
import { vaeEncode } from '../models/vae/vae.js';
import { tfOps } from '../ops/tfjs-ops.js';
import type { Scope } from '../ops/scope.js';
import type { StableDiffusion } from '../pipeline/load.js';
import type { PredictionType } from '../schedulers/config.js';
import { addNoise, alphaBarAt, signalNoiseScales, trainingTarget } from '../schedulers/ddpm.js';
import type { NoiseSchedule } from '../schedulers/tables.js';
import type { TrainRandom } from '../train/rng-state.js';
import type { ImageBatch } from './types.js';

/** Standard normal NHWC [n, h, w, c], drawn NCHW as torch draws it. */
export function randnNhwc(random: TrainRandom, n: number, h: number, w: number, c: number): tf.Tensor {
  return tf.tensor4d(nchwToNhwc(random.randn([n, c, h, w]), [n, c, h, w]).data, [n, h, w, c]);
}

export interface TrainingDraws {
  /** ε of the posterior samples z = μ + σ·ε, NHWC. */
  readonly posteriorEps: tf.Tensor;
  /** Training noise, NHWC (with diffusers' offset noise when asked). */
  readonly noise: tf.Tensor;
  /** One integer timestep per sample in [0, trainTimesteps). */
  readonly timesteps: number[];
}

/** The micro-batch's draws in diffusers' order for `n` latents of [h, w, c]. */
export function drawTrainingNoise(
  random: TrainRandom,
  n: number,
  [h, w, c]: readonly [number, number, number],
  opts: { readonly noiseOffset: number; readonly trainTimesteps: number },
): TrainingDraws {
  const posteriorEps = randnNhwc(random, n, h, w, c);
  let noise = randnNhwc(random, n, h, w, c);
  if (opts.noiseOffset > 0) {
    // diffusers: noise += offset · randn(B, C, 1, 1), one shift per sample and channel.
    const shift = tf.tensor4d(nchwToNhwc(random.randn([n, c, 1, 1]), [n, c, 1, 1]).data, [n, 1, 1, c]);
    noise = tf.add(noise, tf.mul(shift, opts.noiseOffset));
  }
  const timesteps = random.randint(opts.trainTimesteps, n);
  return { posteriorEps, noise, timesteps };
}

/**
 * Posterior moments of an image batch: the cached latents (`data.cache_latents`), or the frozen
 * VAE's encoding of its pixels. `what` names the method in errors.
 */
export function posteriorMoments(vae: Scope<tf.Tensor>, cfg: VaeConfig, images: ImageBatch, what: string): { mean: tf.Tensor; std: tf.Tensor } {
  const n = images.count;
  const [h, w, c] = [images.height / cfg.downscale, images.width / cfg.downscale, cfg.latentChannels];
  if (images.latents !== undefined) {
    return { mean: tf.tensor4d(images.latents.mean, [n, h, w, c]), std: tf.tensor4d(images.latents.std, [n, h, w, c]) };
  }
  if (images.pixels === undefined) throw new Error(`${what}: an image batch without pixels or latents`);
  const { mean, std } = vaeEncode(tfOps, vae, tf.tensor4d(images.pixels, [n, images.height, images.width, 3]), cfg);
  return { mean, std };
}

/** A prepared micro-batch of a per-sample weighted diffusion loss (DreamBooth, fine-tuning). */
export interface WeightedDiffusionBatch {
  /** x_t, NHWC [N, h, w, C]. */
  readonly noisy: tf.Tensor;
  /** float32 [N]. */
  readonly timesteps: tf.Tensor;
  /** ε or v, like `noisy`. */
  readonly target: tf.Tensor;
  /** Per-sample loss weights [N]: loss = Σ weights·mse (e.g. min-SNR-γ weight / B). */
  readonly weights: tf.Tensor;
  /** Text states [N, S, D] (frozen text encoder), or int32 ids [N, S] when the text encoder trains. */
  readonly text: tf.Tensor;
  readonly [key: string]: tf.Tensor;
}

/**
 * The weighted batch of latents `x0` with their noise and timesteps; captions become text states
 * now when the text encoder is frozen, or ids to encode inside the loss when it trains.
 */
export function weightedDiffusionBatch(
  model: Pick<StableDiffusion, 'tokenizer' | 'text'>,
  schedule: NoiseSchedule,
  prediction: PredictionType,
  d: { readonly x0: tf.Tensor; readonly noise: tf.Tensor; readonly timesteps: readonly number[]; readonly weights: readonly number[]; readonly captions: readonly string[]; readonly textTrains: boolean },
): WeightedDiffusionBatch {
  const rows = d.captions.map((caption) => model.tokenizer.encode(caption));
  const ids = tf.tensor2d(rows.flat(), [rows.length, rows[0]!.length], 'int32');
  const timesteps = [...d.timesteps];
  return {
    noisy: addNoise(tfOps, schedule, d.x0, d.noise, timesteps),
    timesteps: tf.tensor1d(timesteps, 'float32'),
    target: trainingTarget(tfOps, schedule, prediction, d.x0, d.noise, timesteps),
    weights: tf.tensor1d([...d.weights], 'float32'),
    text: d.textTrains ? ids : clipTextEncoder(tfOps, model.text.store.scope(), ids, model.text.cfg).lastHiddenState,
  };
}

/** Σ_i weights_i · mean((pred_i − target_i)²). */
export function weightedMse(pred: tf.Tensor, batch: Pick<WeightedDiffusionBatch, 'target' | 'weights'>): tf.Scalar {
  const mse = tf.mean(tf.square(tf.sub(pred, batch.target)), [1, 2, 3]); // [N]
  return tf.sum(tf.mul(mse, batch.weights));
}

/** The min-SNR-γ loss weight of timestep t, as diffusers computes it (float32). */
export function minSnrWeight(schedule: NoiseSchedule, t: number, gamma: number, prediction: PredictionType): number {
  const { signal, noise } = signalNoiseScales(alphaBarAt(schedule, t));
  const ratio = Math.fround(signal / noise);
  const snr = Math.fround(ratio * ratio);
  const base = Math.fround(Math.min(snr, Math.fround(gamma)) / snr);
  return prediction === 'v_prediction' ? Math.fround(base + 1) : base;
}
