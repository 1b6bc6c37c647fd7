/**
 * On-disk cache of VAE latent distributions for training samples.
 *
 * The cache stores the encoder's mean and std rather than one sampled latent, so training still
 * draws z = mean + std·ε with fresh ε every step, as diffusers does with
 * `vae.encode(x).latent_dist.sample()`. An entry is keyed by everything that determines the
 * encoder's input and weights: the file's sha256, the training size, the resized size and crop
 * window, the flip, the alpha background, the pixel-pipeline version and a model key (typically
 * the sha256 of the VAE weights file). One safetensors file per entry, named by the key's
 * sha256, with the key itself in the metadata; a file that is unreadable, truncated, has another
 * key or non-finite values is ignored and rewritten. The VAE is injected as `encode`, so this
 * module does not depend on the model code.
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import path from 'node:path';

import { SafetensorsFile, writeSafetensors } from '../io/safetensors.js';
import type { BatchOptions, DataState, ImageFolderDataset, PlannedBatch, SamplePlan } from './image-folder.js';
import type { CropBox } from './transforms.js';

/** A diagonal Gaussian over latents, flattened in the order `encode` produced it. */
export interface LatentDistribution {
  readonly mean: Float32Array;
  readonly std: Float32Array;
}

/** The VAE encoder: float32 NHWC [height, width, 3] pixels in [−1, 1] → latent mean and std. */
export type EncodeFn = (pixels: Float32Array, height: number, width: number) => Promise<LatentDistribution>;

/** What a cached latent depends on, apart from the model. */
export interface LatentKey {
  /** sha256 of the image file, hex. */
  readonly fileSha256: string;
  /** Training (crop) size. */
  readonly width: number;
  readonly height: number;
  readonly crop: CropBox;
  readonly flip: boolean;
  /** Colour transparent pixels were flattened onto. */
  readonly background: string;
}

/** Counters of cache traffic since the cache was created. */
export interface LatentCacheStats {
  hits: number;
  misses: number;
  /** Entries that existed but were unreadable or did not match; each is also a miss. */
  corrupt: number;
  writes: number;
}

// Bump when decoding, resizing or normalisation changes, so old entries stop matching.
const PIXEL_PIPELINE = 'sharp-decode+pillow-bilinear+x/127.5-1:v1';
const KEY_METADATA = 'sd_workbench_latent_key';

/** sha256 of a file's bytes, hex, read as a stream (for multi-gigabyte weight files). */
export async function hashFile(file: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(file)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/** The cache key of a planned sample of a dataset. */
export function latentKeyOf(dataset: Pick<ImageFolderDataset, 'width' | 'height' | 'config'>, sample: SamplePlan): LatentKey {
  return {
    fileSha256: sample.image.sha256,
    width: dataset.width,
    height: dataset.height,
    crop: sample.crop,
    flip: sample.flip,
    background: dataset.config.background.toLowerCase(),
  };
}

function isFiniteArray(values: Float32Array): boolean {
  for (let i = 0; i < values.length; i++) if (!Number.isFinite(values[i]!)) return false;
  return true;
}

/** A folder of cached latent distributions for one model. */
export class LatentCache {
  readonly dir: string;
  readonly modelKey: string;
  readonly stats: LatentCacheStats = { hits: 0, misses: 0, corrupt: 0, writes: 0 };

  /** `modelKey` identifies the encoder, e.g. `await hashFile(vaeWeightsPath)`. */
  constructor(dir: string, modelKey: string) {
    if (modelKey === '') throw new Error('latent cache: expected a model key (e.g. the sha256 of the VAE weights), found an empty string');
    this.dir = path.resolve(dir);
    this.modelKey = modelKey;
  }

  /** The canonical text of a key: everything an entry depends on, in a fixed order. */
  describeKey(key: LatentKey): string {
    const c = key.crop;
    return JSON.stringify({
      pipeline: PIXEL_PIPELINE,
      model: this.modelKey,
      file: key.fileSha256,
      size: [key.width, key.height],
      resized: [c.resizedWidth, c.resizedHeight],
      crop: [c.left, c.top, c.width, c.height],
      flip: key.flip,
      background: key.background,
    });
  }

  /** Path of the entry for a key. */
  fileFor(key: LatentKey): string {
    const name = createHash('sha256').update(this.describeKey(key)).digest('hex');
    return path.join(this.dir, name.slice(0, 2), `${name}.safetensors`);
  }

  /** The cached distribution, or undefined when absent or unusable (counted in `stats.corrupt`). */
  async read(key: LatentKey): Promise<LatentDistribution | undefined> {
    const file = this.fileFor(key);
    let opened: SafetensorsFile;
    try {
      opened = await SafetensorsFile.open(file);
    } catch (cause) {
      if ((cause as { cause?: NodeJS.ErrnoException }).cause?.code !== 'ENOENT') this.stats.corrupt++;
      return undefined;
    }
    try {
      if (opened.metadata[KEY_METADATA] !== this.describeKey(key)) throw new Error('key mismatch');
      const meanInfo = opened.info('mean');
      const stdInfo = opened.info('std');
      if (meanInfo.dtype !== 'F32' || stdInfo.dtype !== 'F32') throw new Error('dtype');
      const mean = await opened.readFloat32('mean');
      const std = await opened.readFloat32('std');
      if (mean.length === 0 || mean.length !== std.length || !isFiniteArray(mean) || !isFiniteArray(std) || std.some((s) => s < 0)) {
        throw new Error('values');
      }
      return { mean, std };
    } catch {
      this.stats.corrupt++;
      return undefined;
    } finally {
      await opened.close();
    }
  }

  /** Stores a distribution (atomically: readers never see a half-written entry). */
  async write(key: LatentKey, latent: LatentDistribution): Promise<void> {
    checkLatent(latent, 'latent cache write');
    const file = this.fileFor(key);
    await mkdir(path.dirname(file), { recursive: true });
    const shape = [latent.mean.length];
    await writeSafetensors(
      file,
      { mean: { dtype: 'F32', shape, data: latent.mean }, std: { dtype: 'F32', shape, data: latent.std } },
      { [KEY_METADATA]: this.describeKey(key) },
    );
    this.stats.writes++;
  }

  /** The cached distribution, or `encode(await pixels())` stored for next time. */
  async getOrEncode(key: LatentKey, pixels: () => Promise<Float32Array>, encode: EncodeFn): Promise<LatentDistribution> {
    const cached = await this.read(key);
    if (cached !== undefined) {
      this.stats.hits++;
      return cached;
    }
    this.stats.misses++;
    const latent = await encode(await pixels(), key.height, key.width);
    checkLatent(latent, `encode of ${key.fileSha256.slice(0, 12)}…`);
    await this.write(key, latent);
    return latent;
  }
}

function checkLatent(latent: LatentDistribution, where: string): void {
  if (latent.mean.length === 0 || latent.mean.length !== latent.std.length) {
    throw new Error(`${where}: expected mean and std of equal, non-zero length, found ${latent.mean.length} and ${latent.std.length}`);
  }
}

/** A batch of latent distributions instead of pixels. */
export interface LatentBatch extends PlannedBatch {
  readonly captions: readonly string[];
  /** [batch × latentLength], sample-major. */
  readonly mean: Float32Array;
  readonly std: Float32Array;
  /** Values per sample. */
  readonly latentLength: number;
}

async function latentOf(dataset: ImageFolderDataset, cache: LatentCache, encode: EncodeFn, sample: SamplePlan): Promise<LatentDistribution> {
  return cache.getOrEncode(latentKeyOf(dataset, sample), () => dataset.loadPixels([sample]), encode);
}

/**
 * Batches of latent distributions, in the same order and with the same resume states as
 * `dataset.batches`; images are decoded only on cache misses.
 */
export async function* latentBatches(
  dataset: ImageFolderDataset,
  cache: LatentCache,
  encode: EncodeFn,
  batchSize: number,
  from?: DataState,
  options?: BatchOptions,
): AsyncGenerator<LatentBatch, void, undefined> {
  for (const planned of dataset.plannedBatches(batchSize, from, options)) {
    const latents: LatentDistribution[] = [];
    // One at a time: the encoder is the expensive part and usually runs on the same cores.
    for (const sample of planned.samples) latents.push(await latentOf(dataset, cache, encode, sample));
    const latentLength = latents[0]!.mean.length;
    const mean = new Float32Array(latents.length * latentLength);
    const std = new Float32Array(latents.length * latentLength);
    latents.forEach((l, i) => {
      if (l.mean.length !== latentLength) {
        throw new Error(`latent batch: expected ${latentLength} values per sample, found ${l.mean.length} for ${planned.samples[i]!.image.path}`);
      }
      mean.set(l.mean, i * latentLength);
      std.set(l.std, i * latentLength);
    });
    yield { ...planned, captions: planned.samples.map((s) => s.caption), mean, std, latentLength };
  }
}

/**
 * Encodes every (image, flip) variant a centre-cropped dataset can produce, so the first epoch
 * does not stall on the encoder; returns how many entries were encoded (the rest were cached).
 * Random crops have too many variants to enumerate and are cached as they are drawn instead.
 */
export async function precomputeLatents(dataset: ImageFolderDataset, cache: LatentCache, encode: EncodeFn): Promise<number> {
  if (!dataset.config.center_crop) return 0;
  const misses = cache.stats.misses;
  const flips = dataset.config.random_flip ? [false, true] : [false];
  // The plan of each image's first occurrence in epoch 0 gives its crop window; only the flip varies.
  const seen = new Set<number>();
  for (let index = 0; index < dataset.epochLength && seen.size < dataset.images.length; index++) {
    const plan = dataset.plan({ epoch: 0, index });
    if (seen.has(plan.imageIndex)) continue;
    seen.add(plan.imageIndex);
    for (const flip of flips) await latentOf(dataset, cache, encode, { ...plan, flip });
  }
  return cache.stats.misses - misses;
}
