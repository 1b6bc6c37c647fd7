/**
 * An image-folder training dataset: scan, decode (sharp), resize/crop/flip, captions, and a
 * seeded, resumable sample order.
 *
 * Phases:
 * 1. Scan: list image files (sorted by relative path), read and hash each, decode it fully (so
 *    corrupt files are found before training, not at step 40 000), check its size, resize it to
 *    cover the training size and keep the result in memory while a byte budget allows.
 * 2. Plan: sample `index` of epoch `epoch` is a pure function of (seed, epoch, index): which
 *    image, crop window, flip and caption. Nothing depends on earlier samples, so a run resumed
 *    from `{epoch, index}` continues with exactly the samples an uninterrupted run would have seen.
 * 3. Load: pixels for a plan come from the memory cache or are decoded again, then cropped,
 *    flipped and scaled to [−1, 1] as float32 NHWC.
 */
import { createHash } from 'node:crypto';
import { readdir, readFile, stat } from 'node:fs/promises';
import { availableParallelism } from 'node:os';
import path from 'node:path';

import sharp from 'sharp';

import { fillTemplate, readSidecarCaption, shuffleCaption, sidecarPath, templatesFor } from './captions.js';
import { IMAGE_EXTENSIONS, parseDataConfig, targetSize, type DataConfig, type DataConfigInput } from './config.js';
import { SeededRandom, STREAM } from './rng.js';
import {
  centerCropBox,
  coverSize,
  cropFlipToUnit,
  needsUpscale,
  randomCropBox,
  resizeBilinear,
  type CropBox,
  type RgbImage,
} from './transforms.js';

/** An image that passed the scan. */
export interface ImageRecord {
  /** Absolute path. */
  readonly path: string;
  /** Path relative to the dataset folder with "/" separators; the sort key. */
  readonly relativePath: string;
  /** Size after applying the EXIF orientation. */
  readonly width: number;
  readonly height: number;
  /** sha256 of the file bytes, hex. */
  readonly sha256: string;
  /** The sidecar caption, or undefined when captions do not come from sidecars or it is missing. */
  readonly caption: string | undefined;
}

/** An image that was left out, with the reason. */
export interface BadImage {
  readonly path: string;
  readonly relativePath: string;
  readonly reason: string;
}

/** Position in the sample stream: the next sample to draw is `index` of `epoch`. */
export interface DataState {
  readonly epoch: number;
  readonly index: number;
}

/** Everything decided about one sample before any pixel is touched. */
export interface SamplePlan {
  readonly epoch: number;
  /** Position within the epoch. */
  readonly index: number;
  /** Index into `dataset.images`. */
  readonly imageIndex: number;
  readonly image: ImageRecord;
  readonly crop: CropBox;
  readonly flip: boolean;
  readonly caption: string;
}

/** A batch of samples without pixels, and the state to resume from after it. */
export interface PlannedBatch {
  readonly samples: readonly SamplePlan[];
  /** The state after this batch: save it with a checkpoint taken after training on the batch. */
  readonly next: DataState;
}

/** A batch with pixels. */
export interface Batch extends PlannedBatch {
  readonly captions: readonly string[];
  /** float32 NHWC [batch, height, width, 3] in [−1, 1]. */
  readonly pixels: Float32Array;
  readonly height: number;
  readonly width: number;
}

/** Options that come from the run rather than from the `data:` section. */
export interface DatasetOptions {
  /** Seed of every random choice (order, crops, flips, templates, caption augmentation). */
  readonly seed: number;
  /** Replaces `{}` in templates; required when `template` is 'object' or 'style'. */
  readonly placeholderToken?: string;
  /** Bytes of resized images kept in memory between epochs. Default 512 MiB. */
  readonly pixelCacheBytes?: number;
  /** Images decoded at once. Default: min(4, CPU count). */
  readonly concurrency?: number;
}

/** Options of the batch iterators. */
export interface BatchOptions {
  /** Skip an epoch's last batch when it is smaller than `batchSize` (PyTorch `drop_last`). Default false. */
  readonly dropLast?: boolean;
  /** Stop before this epoch; default: never stop (the trainer stops by step count). */
  readonly endEpoch?: number;
}

/** An image that cannot be used when `on_bad_image: 'fail'`, or every image being bad. */
export class BadImageError extends Error {
  readonly bad: readonly BadImage[];

  constructor(message: string, bad: readonly BadImage[]) {
    super(message);
    this.name = 'BadImageError';
    this.bad = bad;
  }
}

/** The scan of a folder: usable images in order, and the ones left out. */
export interface ScanResult {
  readonly dir: string;
  readonly images: readonly ImageRecord[];
  readonly bad: readonly BadImage[];
  /** Images without a sidecar caption when captions come from sidecars (they train with ""). */
  readonly missingCaptions: readonly string[];
}

const DEFAULT_PIXEL_CACHE_BYTES = 512 * 1024 * 1024;

/** One line per bad image: "relative/path: reason". */
export function formatBadImages(bad: readonly BadImage[], limit = 20): string {
  const lines = bad.slice(0, limit).map((b) => `  ${b.relativePath}: ${b.reason}`);
  if (bad.length > limit) lines.push(`  … and ${bad.length - limit} more`);
  return lines.join('\n');
}

function errorText(cause: unknown): string {
  const text = cause instanceof Error ? cause.message : String(cause);
  // sharp repeats libjpeg's messages line after line; the first names the problem.
  return text.split('\n')[0]!.trim();
}

function hasImageExtension(name: string): boolean {
  const ext = path.extname(name).toLowerCase();
  return (IMAGE_EXTENSIONS as readonly string[]).includes(ext);
}

/**
 * Image files under `dir` as "/"-separated relative paths, sorted by UTF-16 code units (the same
 * order on every machine and locale). Hidden files are skipped; symlinked files are followed,
 * symlinked folders are not (no cycles).
 */
export async function listImageFiles(dir: string, recursive: boolean): Promise<string[]> {
  const found: string[] = [];
  async function walk(relative: string): Promise<void> {
    const folder = relative === '' ? dir : path.join(dir, relative);
    const entries = await readdir(folder, { withFileTypes: true });
    for (const entry of entries) {
      if (entry.name.startsWith('.')) continue;
      const rel = relative === '' ? entry.name : `${relative}/${entry.name}`;
      if (entry.isDirectory()) {
        if (recursive) await walk(rel);
        continue;
      }
      if (!hasImageExtension(entry.name)) continue;
      if (entry.isFile()) found.push(rel);
      else if (entry.isSymbolicLink()) {
        const target = await stat(path.join(folder, entry.name)).catch(() => undefined);
        if (target?.isFile()) found.push(rel);
      }
    }
  }
  let info;
  try {
    info = await stat(dir);
  } catch (cause) {
    throw new Error(`data.dir ${dir}: cannot open the image folder (${errorText(cause)})`, { cause });
  }
  if (!info.isDirectory()) throw new Error(`data.dir ${dir}: expected a folder of images, found a file`);
  await walk('');
  return found.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
}

/**
 * Decodes an encoded image to 8-bit sRGB: EXIF orientation applied, first frame of animations,
 * transparency flattened onto `background`, any colour space (grey, CMYK, 16-bit, embedded ICC
 * profile) converted to 3-channel sRGB.
 */
export async function decodeImage(bytes: Uint8Array, background = '#ffffff'): Promise<RgbImage> {
  // failOn 'error': corrupt and truncated data are rejected, but recoverable warnings (such as
  // stray bytes between JPEG markers, common in scraped data) are accepted, as Pillow does.
  const { data, info } = await sharp(bytes, { pages: 1, failOn: 'error' })
    .rotate()
    .flatten({ background })
    .toColourspace('srgb')
    .removeAlpha()
    .raw({ depth: 'uchar' })
    .toBuffer({ resolveWithObject: true });
  if (info.channels !== 3 || data.length !== info.width * info.height * 3) {
    throw new Error(`decoded to ${info.channels} channels of ${info.width}×${info.height}, expected 3-channel RGB`);
  }
  return { width: info.width, height: info.height, data: new Uint8Array(data.buffer, data.byteOffset, data.length) };
}

function sha256Hex(bytes: Uint8Array): string {
  return createHash('sha256').update(bytes).digest('hex');
}

async function mapPool<T, R>(items: readonly T[], limit: number, fn: (item: T, i: number) => Promise<R>): Promise<R[]> {
  const results = new Array<R>(items.length);
  let next = 0;
  async function worker(): Promise<void> {
    while (next < items.length) {
      const i = next++;
      results[i] = await fn(items[i]!, i);
    }
  }
  await Promise.all(Array.from({ length: Math.max(1, Math.min(limit, items.length)) }, worker));
  return results;
}

type ScanOutcome = { readonly ok: true; readonly record: ImageRecord } | { readonly ok: false; readonly bad: BadImage };

/** Receives each usable image's resized pixels as soon as they exist (to keep or drop). */
type KeepPixels = (relativePath: string, resized: RgbImage) => void;

interface ScanSettings {
  readonly dir: string;
  readonly width: number;
  readonly height: number;
  readonly upscaleSmall: boolean;
  readonly background: string;
  readonly captionExtension: string | undefined;
}

async function scanOne(relativePath: string, s: ScanSettings, keep: KeepPixels): Promise<ScanOutcome> {
  const file = path.join(s.dir, ...relativePath.split('/'));
  const bad = (reason: string): ScanOutcome => ({ ok: false, bad: { path: file, relativePath, reason } });
  let bytes: Uint8Array;
  try {
    bytes = await readFile(file);
  } catch (cause) {
    return bad(`cannot read: ${errorText(cause)}`);
  }
  let decoded: RgbImage;
  try {
    decoded = await decodeImage(bytes, s.background);
  } catch (cause) {
    return bad(`cannot decode: ${errorText(cause)}`);
  }
  if (!s.upscaleSmall && needsUpscale(decoded.width, decoded.height, s.width, s.height)) {
    return bad(
      `too small: ${decoded.width}×${decoded.height} cannot cover the ${s.width}×${s.height} training size without enlarging` +
        ' (set upscale_small: true to allow it)',
    );
  }
  const resizedSize = coverSize(decoded.width, decoded.height, s.width, s.height);
  const resized = resizeBilinear(decoded, resizedSize.width, resizedSize.height);
  const caption = s.captionExtension === undefined ? undefined : await readSidecarCaption(sidecarPath(file, s.captionExtension));
  const record: ImageRecord = {
    path: file,
    relativePath,
    width: decoded.width,
    height: decoded.height,
    sha256: sha256Hex(bytes),
    caption,
  };
  keep(relativePath, resized);
  return { ok: true, record };
}

function captionsFromSidecars(config: DataConfig): boolean {
  return config.instance_prompt === undefined && config.template === 'none';
}

async function scanWithPixels(config: DataConfig, concurrency: number, keep: KeepPixels): Promise<ScanResult> {
  const dir = path.resolve(config.dir);
  const files = await listImageFiles(dir, config.recursive);
  if (files.length === 0) {
    throw new Error(
      `data.dir ${dir}: no images found${config.recursive ? ' (searched subfolders too)' : ''}; looked for ${IMAGE_EXTENSIONS.join(', ')} (any letter case)`,
    );
  }
  const { width, height } = targetSize(config);
  const settings: ScanSettings = {
    dir,
    width,
    height,
    upscaleSmall: config.upscale_small,
    background: config.background,
    captionExtension: captionsFromSidecars(config) ? config.caption_extension : undefined,
  };
  const images: ImageRecord[] = [];
  const bad: BadImage[] = [];
  const outcomes = await mapPool(files, concurrency, (rel) => scanOne(rel, settings, keep));
  for (const outcome of outcomes) {
    if (outcome.ok) images.push(outcome.record);
    else bad.push(outcome.bad);
  }
  if (bad.length > 0 && config.on_bad_image === 'fail') {
    throw new BadImageError(`data.dir ${dir}: ${bad.length} unusable image(s) (on_bad_image: 'fail'):\n${formatBadImages(bad)}`, bad);
  }
  if (images.length === 0) {
    throw new BadImageError(`data.dir ${dir}: none of the ${files.length} image(s) is usable:\n${formatBadImages(bad)}`, bad);
  }
  const missingCaptions = settings.captionExtension === undefined ? [] : images.filter((i) => i.caption === undefined).map((i) => i.relativePath);
  return { dir, images, bad, missingCaptions };
}

/** Scans a data folder without keeping pixels: which images are usable, which are not and why. */
export async function scanImageFolder(config: DataConfigInput, concurrency = defaultConcurrency()): Promise<ScanResult> {
  return scanWithPixels(parseDataConfig(config), concurrency, () => undefined);
}

function defaultConcurrency(): number {
  return Math.max(1, Math.min(4, availableParallelism()));
}

function checkState(state: DataState, epochLength: number): DataState {
  const { epoch, index } = state;
  if (!Number.isSafeInteger(epoch) || epoch < 0 || !Number.isSafeInteger(index) || index < 0 || index > epochLength) {
    throw new Error(`data state: expected {epoch ≥ 0, 0 ≤ index ≤ ${epochLength}} as integers, found ${JSON.stringify(state)}`);
  }
  return index === epochLength ? { epoch: epoch + 1, index: 0 } : { epoch, index };
}

/** A scanned image folder that plans and loads training samples. */
export class ImageFolderDataset {
  readonly config: DataConfig;
  readonly dir: string;
  readonly images: readonly ImageRecord[];
  readonly bad: readonly BadImage[];
  /** Human-readable notes for the run log (missing captions, settings that defeat the latent cache). */
  readonly warnings: readonly string[];
  /** Training size. */
  readonly width: number;
  readonly height: number;
  readonly seed: number;
  readonly #templates: readonly string[];
  readonly #placeholder: string;
  readonly #pixels = new Map<number, RgbImage>();
  readonly #pixelBudget: number;
  readonly #concurrency: number;
  #pixelBytes = 0;
  #orderEpoch = -1;
  #order: Uint32Array = new Uint32Array(0);

  private constructor(config: DataConfig, scan: ScanResult, options: DatasetOptions, budget: number, concurrency: number) {
    this.config = config;
    this.dir = scan.dir;
    this.images = scan.images;
    this.bad = scan.bad;
    this.seed = options.seed;
    const { width, height } = targetSize(config);
    this.width = width;
    this.height = height;
    this.#templates = templatesFor(config.template);
    this.#placeholder = options.placeholderToken ?? '';
    this.#pixelBudget = budget;
    this.#concurrency = concurrency;
    const warnings: string[] = [];
    if (scan.bad.length > 0) warnings.push(`skipped ${scan.bad.length} unusable image(s):\n${formatBadImages(scan.bad)}`);
    if (scan.missingCaptions.length > 0) {
      const shown = scan.missingCaptions.slice(0, 10).join(', ');
      const more = scan.missingCaptions.length > 10 ? `, … (${scan.missingCaptions.length} in all)` : '';
      warnings.push(`no ${config.caption_extension} caption for ${shown}${more}: these train with an empty caption`);
    }
    if (config.cache_latents && (!config.center_crop || config.random_flip)) {
      warnings.push('cache_latents with random crops or flips: each new crop/flip is a cache miss, so the cache mostly adds encoding work');
    }
    this.warnings = warnings;
  }

  /** Validates the config, scans the folder (decoding every image) and returns the dataset. */
  static async open(config: DataConfigInput, options: DatasetOptions): Promise<ImageFolderDataset> {
    const parsed = parseDataConfig(config);
    if (!Number.isSafeInteger(options.seed)) throw new Error(`seed: expected a safe integer, found ${options.seed}`);
    if (parsed.template !== 'none' && (options.placeholderToken === undefined || options.placeholderToken === '')) {
      throw new Error(`data.template '${parsed.template}': expected a placeholder token to fill the templates' {}, found none`);
    }
    const budget = options.pixelCacheBytes ?? DEFAULT_PIXEL_CACHE_BYTES;
    const concurrency = options.concurrency ?? defaultConcurrency();
    const kept = new Map<string, RgbImage>();
    let keptBytes = 0;
    // First come, first kept, no eviction: samples arrive in random order, where any eviction
    // policy would thrash; a fixed resident subset gives a steady hit rate instead.
    const scan = await scanWithPixels(parsed, concurrency, (relativePath, resized) => {
      if (keptBytes + resized.data.length <= budget) {
        kept.set(relativePath, resized);
        keptBytes += resized.data.length;
      }
    });
    const dataset = new ImageFolderDataset(parsed, scan, options, budget, concurrency);
    scan.images.forEach((image, index) => {
      const resized = kept.get(image.relativePath);
      if (resized !== undefined) dataset.#remember(index, resized);
    });
    return dataset;
  }

  /** Samples per epoch: images × repeats. */
  get epochLength(): number {
    return this.images.length * this.config.repeats;
  }

  /** Batches per epoch for a batch size. */
  batchesPerEpoch(batchSize: number, dropLast = false): number {
    return dropLast ? Math.floor(this.epochLength / batchSize) : Math.ceil(this.epochLength / batchSize);
  }

  /**
   * The epoch's order: entry k is the item drawn at position k, where item i is image
   * i mod images (repeat ⌊i / images⌋). A seeded Fisher–Yates shuffle of all items, so repeats
   * of an image are spread over the epoch as with PyTorch's `shuffle=True`.
   */
  epochOrder(epoch: number): Uint32Array {
    return this.#orderOf(epoch).slice();
  }

  // The order of the epoch being read is kept: planning a batch asks for it once per sample.
  #orderOf(epoch: number): Uint32Array {
    if (epoch !== this.#orderEpoch) {
      const order = new Uint32Array(this.epochLength);
      for (let i = 0; i < order.length; i++) order[i] = i;
      new SeededRandom(this.seed, STREAM.order, epoch).shuffle(order);
      this.#order = order;
      this.#orderEpoch = epoch;
    }
    return this.#order;
  }

  /** What sample `state.index` of epoch `state.epoch` is: image, crop, flip and caption. */
  plan(state: DataState): SamplePlan {
    const { epoch, index } = checkState(state, this.epochLength);
    const item = this.#orderOf(epoch)[index]!;
    const imageIndex = item % this.images.length;
    const image = this.images[imageIndex]!;
    const config = this.config;
    const random = (stream: number): SeededRandom => new SeededRandom(this.seed, stream, epoch, index);

    const resized = coverSize(image.width, image.height, this.width, this.height);
    const cropRandom = random(STREAM.crop);
    const crop = config.center_crop
      ? centerCropBox(resized.width, resized.height, this.width, this.height)
      : randomCropBox(resized.width, resized.height, this.width, this.height, (n) => cropRandom.uniformInt(n));
    const flip = config.random_flip && random(STREAM.flip).nextFloat() < 0.5;

    let caption: string;
    if (config.instance_prompt !== undefined) caption = config.instance_prompt;
    else if (this.#templates.length > 0) {
      const template = this.#templates[random(STREAM.template).uniformInt(this.#templates.length)]!;
      caption = fillTemplate(template, this.#placeholder);
    } else caption = image.caption ?? '';
    if (config.caption_dropout_rate > 0 && random(STREAM.captionDropout).nextFloat() < config.caption_dropout_rate) caption = '';
    else if (config.shuffle_caption) caption = shuffleCaption(caption, config.keep_tokens, random(STREAM.captionShuffle));

    return { epoch, index, imageIndex, image, crop, flip, caption };
  }

  /**
   * Plans batches from `from` (default: the start): batches never span epochs, so an epoch's
   * last batch may be smaller unless `dropLast`.
   */
  *plannedBatches(batchSize: number, from: DataState = { epoch: 0, index: 0 }, options: BatchOptions = {}): Generator<PlannedBatch, void, undefined> {
    if (!Number.isSafeInteger(batchSize) || batchSize < 1) throw new Error(`batch size: expected a positive integer, found ${batchSize}`);
    let state = checkState(from, this.epochLength);
    const length = this.epochLength;
    while (options.endEpoch === undefined || state.epoch < options.endEpoch) {
      const count = Math.min(batchSize, length - state.index);
      if (options.dropLast && count < batchSize) {
        state = { epoch: state.epoch + 1, index: 0 };
        continue;
      }
      const samples: SamplePlan[] = [];
      for (let k = 0; k < count; k++) samples.push(this.plan({ epoch: state.epoch, index: state.index + k }));
      const next = checkState({ epoch: state.epoch, index: state.index + count }, length);
      yield { samples, next };
      state = next;
    }
  }

  /**
   * Batches with pixels from `from` (default: the start). The next batch is decoded while the
   * current one is in use. Resuming from a batch's `next` state continues the same sequence.
   */
  async *batches(batchSize: number, from: DataState = { epoch: 0, index: 0 }, options: BatchOptions = {}): AsyncGenerator<Batch, void, undefined> {
    const planned = this.plannedBatches(batchSize, from, options);
    const start = (): Promise<Batch> | undefined => {
      const step = planned.next();
      if (step.done) return undefined;
      const promise = this.#loadBatch(step.value);
      // Marked as handled so an abandoned prefetch cannot crash the process; awaiting it below
      // still rethrows the error to the consumer.
      promise.catch(() => undefined);
      return promise;
    };
    let pending = start();
    while (pending !== undefined) {
      const current = pending;
      pending = start();
      yield await current;
    }
  }

  async #loadBatch(planned: PlannedBatch): Promise<Batch> {
    const pixels = await this.loadPixels(planned.samples);
    return { ...planned, captions: planned.samples.map((s) => s.caption), pixels, height: this.height, width: this.width };
  }

  /** Pixels of the samples as float32 NHWC [samples, height, width, 3] in [−1, 1]. */
  async loadPixels(samples: readonly SamplePlan[]): Promise<Float32Array> {
    const sampleSize = this.height * this.width * 3;
    const out = new Float32Array(samples.length * sampleSize);
    await mapPool(samples, this.#concurrency, async (sample, i) => {
      const resized = await this.resizedImage(sample.imageIndex);
      cropFlipToUnit(resized, sample.crop, sample.flip, out, i * sampleSize);
    });
    return out;
  }

  /** An image resized to cover the training size, from memory or decoded again from its file. */
  async resizedImage(imageIndex: number): Promise<RgbImage> {
    const cached = this.#pixels.get(imageIndex);
    if (cached !== undefined) return cached;
    const record = this.images[imageIndex];
    if (record === undefined) throw new Error(`image index ${imageIndex}: expected 0 ≤ index < ${this.images.length}`);
    let bytes: Uint8Array;
    try {
      bytes = await readFile(record.path);
    } catch (cause) {
      throw new Error(`${record.path}: cannot read the image during training (${errorText(cause)})`, { cause });
    }
    // The crop windows and latent-cache keys were derived from the scanned file: a changed file
    // would silently train on something else.
    const hash = sha256Hex(bytes);
    if (hash !== record.sha256) {
      throw new Error(`${record.path}: the file changed since the dataset was scanned (sha256 ${record.sha256.slice(0, 12)}… → ${hash.slice(0, 12)}…); restart the run`);
    }
    const decoded = await decodeImage(bytes, this.config.background);
    const size = coverSize(decoded.width, decoded.height, this.width, this.height);
    const resized = resizeBilinear(decoded, size.width, size.height);
    this.#remember(imageIndex, resized);
    return resized;
  }

  #remember(index: number, image: RgbImage): void {
    if (this.#pixels.has(index) || this.#pixelBytes + image.data.length > this.#pixelBudget) return;
    this.#pixels.set(index, image);
    this.#pixelBytes += image.data.length;
  }
}
