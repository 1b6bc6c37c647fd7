/**
 * The draws and latents of a standard diffusion-loss micro-batch, shared by every method that
 * trains on images (textual inversion, hypernetworks, DreamBooth, fine-tuning). The draw order is
 * diffusers' — posterior samples, training noise (+ offset), timesteps — so runs match its
 * scripts' randomness and resume reproduces every step exactly.
 */
import * as tf from '@tensorflow/tfjs';
import { nchwToNhwc } from '../io/layout.js';
import type { VaeConfig } from '../models/vae/config.js';
import { vaeEncode } from '../models/vae/vae.js';
import { tfOps } from '../ops/tfjs-ops.js';
import type { Scope } from '../ops/scope.js';
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
