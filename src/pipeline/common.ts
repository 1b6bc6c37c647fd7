/**
 * The engine-independent half of txt2img and img2img, shared by the tfjs pipeline (`txt2img.ts`)
 * and the onnxruntime one (`onnx.ts`): option defaults and checks, prompt batching and
 * tokenizing, the seeded draws (x_T, img2img's posterior ε and noise), the order of the phases
 * and the result. An engine supplies only its networks, as a {@link RunEngine}; keeping the rest
 * in one place is what makes a seed give the same image on either engine.
 */
import { randomInt } from 'node:crypto';
import * as tf from '@tensorflow/tfjs';
import { nchwToNhwc, nhwcToNchw } from '../io/layout.js';
import type { ClipTextConfig } from '../models/clip/config.js';
import type { ClipTokenizer } from '../models/clip/tokenizer.js';
import type { UnetConfig } from '../models/unet/config.js';
import type { VaeConfig } from '../models/vae/config.js';
import { samplePosterior, scaleLatents, tensorToImage, unscaleLatents, type Image8, type Posterior } from '../models/vae/vae.js';
import { tfOps } from '../ops/tfjs-ops.js';
import type { SchedulerConfig } from '../schedulers/config.js';
import { TorchGenerator } from '../schedulers/rng.js';
import type { Sampler } from '../schedulers/sampler.js';
import { defaultSamplerKind, img2imgStartStep, makeSampler, noiseToStep, type LoopOptions, type SamplerSpec } from './denoise.js';
import type { CommonOptions, GenerateOptions, GenerateResult, Img2ImgOptions, Img2ImgStart, RunSettings, Seed } from './txt2img.js';

/** What the shared steps read of a loaded pipeline; `StableDiffusion` and `OnnxStableDiffusion` both have it. */
export interface PipelineModel {
  readonly tokenizer: ClipTokenizer;
  readonly text: { readonly cfg: ClipTextConfig };
  readonly unet: { readonly cfg: UnetConfig };
  readonly vae: { readonly cfg: VaeConfig };
  readonly scheduler: SchedulerConfig;
  /** Image size the UNet was trained at. */
  readonly defaultSize: { readonly width: number; readonly height: number };
  /** Image sides must be multiples of this (VAE factor × 2^(UNet levels − 1)). */
  readonly sizeMultiple: number;
}

/** Decoded images, NHWC [B, H, W, 3] ≈ [−1, 1] (the VAE output before clamping). */
export interface DecodedImages {
  readonly data: Float32Array;
  readonly shape: [number, number, number, number];
}

/**
 * The networks of one engine, as a run drives them. `Context` is the engine's form of the text
 * states (a tfjs or an ORT tensor); the run disposes it after the loop.
 */
export interface RunEngine<Context extends { dispose(): void }> {
  /** Text states [negative × B, prompt × B] with guidance > 1, else [prompt × B] (see {@link tokenizePrompts}). */
  encodePrompts(batch: Batch, run: ResolvedRun): { context: Context; warnings: string[] } | Promise<{ context: Context; warnings: string[] }>;
  /** The sampling loop with classifier-free guidance from NHWC `start`; returns new latents (`start` and `context` stay the caller's). */
  denoise(start: tf.Tensor, context: Context, guidance: number, loop: LoopOptions): Promise<tf.Tensor>;
  /** img2img's starting latents, NHWC (see `img2imgLatents`). */
  img2imgStart(images: readonly Image8[], s: Img2ImgStart): tf.Tensor | Promise<tf.Tensor>;
  /** NHWC latents (UNet scale) → images; `latents` stays the caller's. */
  decode(latents: tf.Tensor): Promise<DecodedImages>;
}

/** A random seed in [0, 2³²), as A1111 draws them. */
export function randomSeed(): number {
  return randomInt(0, 2 ** 32);
}

/** x_T for `seed` exactly as diffusers draws it on CPU: `torch.randn([B, C, h, w], generator)`, NCHW. */
export function drawInitialLatents(generator: TorchGenerator, shape: readonly [number, number, number, number]): Float32Array {
  return generator.randn(shape);
}

/** Prompts and negative prompts per image. */
export interface Batch {
  readonly prompts: string[];
  readonly negatives: string[];
}

/** Prompts and negative prompts per image, in diffusers' order (each prompt repeated imagesPerPrompt times). */
export function expandBatch(opts: Pick<CommonOptions, 'prompts' | 'negativePrompt' | 'imagesPerPrompt'>): Batch {
  const n = opts.imagesPerPrompt ?? 1;
  if (!Number.isInteger(n) || n < 1) throw new Error(`imagesPerPrompt must be a positive integer, got ${n}`);
  if (opts.prompts.length === 0) throw new Error('no prompt given');
  const neg = opts.negativePrompt ?? '';
  const negatives = typeof neg === 'string' ? opts.prompts.map(() => neg) : [...neg];
  if (negatives.length !== opts.prompts.length) {
    throw new Error(`${negatives.length} negative prompts for ${opts.prompts.length} prompts (give one, or one per prompt)`);
  }
  const repeat = (xs: readonly string[]) => xs.flatMap((x) => new Array<string>(n).fill(x));
  return { prompts: repeat(opts.prompts), negatives: repeat(negatives) };
}

/** A run's options with the defaults filled in. */
export interface ResolvedRun {
  readonly spec: SamplerSpec & { readonly karras: boolean; readonly eta: number };
  readonly guidance: number;
  readonly clipSkip: number;
  readonly seed: Seed;
}

/** The samplers that take Karras noise levels. */
const SIGMA_KINDS: readonly string[] = ['lms', 'euler', 'dpmpp_2m'];

/** Defaults and checks of a run's sampler, guidance, clip skip and seed. */
export function resolveRun(model: Pick<PipelineModel, 'scheduler' | 'text'>, opts: CommonOptions): ResolvedRun {
  const kind = opts.sampler ?? defaultSamplerKind(model.scheduler);
  const steps = opts.steps ?? 50;
  const guidance = opts.guidance ?? 7.5;
  const eta = opts.eta ?? 0;
  if (!Number.isFinite(guidance)) throw new Error(`guidance must be a finite number, got ${guidance}`);
  if (opts.karras === true && !SIGMA_KINDS.includes(kind)) {
    throw new Error(`Karras noise levels apply to the lms, euler and dpmpp_2m samplers, not ${kind}`);
  }
  if (eta !== 0 && kind !== 'ddim') throw new Error(`eta applies to the ddim sampler only, not ${kind}`);
  const karras = SIGMA_KINDS.includes(kind) && (opts.karras ?? model.scheduler.karrasSigmas ?? false);
  const clipSkip = opts.clipSkip ?? 0;
  if (!Number.isInteger(clipSkip) || clipSkip < 0 || clipSkip >= model.text.cfg.numLayers) {
    throw new Error(`clipSkip must be an integer in [0, ${model.text.cfg.numLayers - 1}], got ${clipSkip}`);
  }
  return { spec: { kind, steps, karras, eta }, guidance, clipSkip, seed: opts.seed ?? randomSeed() };
}

/** Rejects an image size the VAE and UNet cannot divide, naming the multiple required. */
export function checkImageSize(model: Pick<PipelineModel, 'sizeMultiple' | 'unet' | 'vae'>, width: number, height: number): void {
  const m = model.sizeMultiple;
  for (const [name, v] of [['width', width], ['height', height]] as const) {
    if (!Number.isInteger(v) || v <= 0 || v % m !== 0) {
      const levels = model.unet.cfg.blockChannels.length - 1;
      throw new Error(
        `${name} ${v} is not a positive multiple of ${m} (VAE factor ${model.vae.cfg.downscale} × 2^${levels} UNet downsamplings); try ${Math.max(m, Math.round(v / m) * m)}`,
      );
    }
  }
}

/** A batch's texts tokenized for the text encoder. */
export interface PromptIds {
  /** Token ids of each distinct text (after the rewrite), one row each. */
  readonly ids: number[][];
  /** Per row of the text states, the index of its text in `ids`. */
  readonly rows: number[];
  /** One per text the tokenizer truncates. */
  readonly warnings: string[];
}

/**
 * The texts of a batch's text states — [negative × B, prompt × B] with guidance > 1, else
 * [prompt × B], each passed through `rewrite` — with every distinct text tokenized once.
 */
export function tokenizePrompts(
  tokenizer: ClipTokenizer,
  prompts: readonly string[],
  negatives: readonly string[],
  guidance: number,
  rewrite: (text: string) => string,
): PromptIds {
  const texts = (guidance > 1 ? [...negatives, ...prompts] : [...prompts]).map(rewrite);
  const distinct = [...new Set(texts)];
  const warnings: string[] = [];
  const window = tokenizer.encode('').length - 2;
  for (const text of distinct) {
    const count = tokenizer.contentIds(text).length;
    if (count > window) warnings.push(`prompt truncated to ${window} of its ${count} tokens: "${text.slice(0, 60)}${text.length > 60 ? '…' : ''}"`);
  }
  return { ids: distinct.map((t) => tokenizer.encode(t)), rows: texts.map((t) => distinct.indexOf(t)), warnings };
}

/** Text states per batch row (`rows` of {@link tokenizePrompts}) from those of the distinct texts, which it disposes. */
export function statesPerRow(distinctStates: tf.Tensor, rows: readonly number[]): tf.Tensor {
  const states = tf.tidy(() => tf.gather(distinctStates, tf.tensor1d([...rows], 'int32'), 0));
  distinctStates.dispose();
  return states;
}

/** The settings a run used, for its result. */
function runSettings(run: ResolvedRun, width: number, height: number, timesteps: readonly number[], strength?: number): RunSettings {
  return {
    sampler: run.spec.kind,
    karras: run.spec.karras,
    steps: run.spec.steps,
    guidance: run.guidance,
    eta: run.spec.eta,
    clipSkip: run.clipSkip,
    width,
    height,
    timesteps,
    ...(strength === undefined ? {} : { strength }),
  };
}

/** The loop options of a run: its sampler and generator, the caller's callbacks. */
function loopOptions(opts: CommonOptions, sampler: Sampler<tf.Tensor>, generator: TorchGenerator, fromStep?: number): LoopOptions {
  return { sampler, generator, ...(fromStep === undefined ? {} : { fromStep }), onStart: opts.onStart, onStep: opts.onStep, signal: opts.signal };
}

/** Text-to-image on `engine`: x_T from the seed (or `initLatents`), the loop, the decode. */
export async function runTxt2Img<C extends { dispose(): void }>(model: PipelineModel, opts: GenerateOptions, engine: RunEngine<C>): Promise<GenerateResult> {
  const run = resolveRun(model, opts);
  const batch = expandBatch(opts);
  const width = opts.width ?? model.defaultSize.width;
  const height = opts.height ?? model.defaultSize.height;
  checkImageSize(model, width, height);
  const f = model.vae.cfg.downscale;
  const shape = [batch.prompts.length, model.unet.cfg.inChannels, height / f, width / f] as const;
  const count = shape.reduce((a, b) => a * b, 1);
  if (opts.initLatents !== undefined && opts.initLatents.length !== count) {
    throw new Error(`initLatents has ${opts.initLatents.length} values, expected ${count} = [${shape.join(', ')}] (NCHW)`);
  }
  const sampler = makeSampler(model.scheduler, run.spec);
  const generator = new TorchGenerator(run.seed);
  // diffusers draws x_T only when no latents are given; the generator then serves the steps.
  const xT = opts.initLatents ?? drawInitialLatents(generator, shape);

  const { context, warnings } = await engine.encodePrompts(batch, run);
  const start = tf.tidy(() => tf.mul(tf.tensor4d(nchwToNhwc(xT, shape).data, [shape[0], shape[2], shape[3], shape[1]]), sampler.initNoiseSigma));
  let final: tf.Tensor;
  try {
    final = await engine.denoise(start, context, run.guidance, loopOptions(opts, sampler, generator));
  } finally {
    start.dispose();
    context.dispose();
  }
  return finishRun(final, opts, engine, run.seed, batch, runSettings(run, width, height, sampler.timesteps), warnings);
}

/** Image-to-image on `engine`: the encoded images noised to the step `strength` selects, the loop from there, the decode. */
export async function runImg2Img<C extends { dispose(): void }>(model: PipelineModel, opts: Img2ImgOptions, engine: RunEngine<C>): Promise<GenerateResult> {
  const run = resolveRun(model, opts);
  const batch = expandBatch(opts);
  const first = opts.initImages[0];
  if (first === undefined) throw new Error('img2img: no init image given');
  const { width, height } = first;
  checkImageSize(model, width, height);
  for (const [i, img] of opts.initImages.entries()) {
    if (img.channels !== 3) throw new Error(`img2img: init image ${i} has ${img.channels} channels, expected RGB (3)`);
  }
  const n = opts.initImages.length;
  const b = batch.prompts.length;
  if (n !== 1 && n !== b) throw new Error(`img2img: ${n} init images for a batch of ${b} (give one, or one per image)`);
  const strength = opts.strength ?? 0.8;
  const fromStep = img2imgStartStep(run.spec.steps, strength);
  const sampler = makeSampler(model.scheduler, run.spec);
  const generator = new TorchGenerator(run.seed);

  // 1. Encoded images noised to the first kept step.
  const start = await engine.img2imgStart(opts.initImages, { batch: b, spec: run.spec, sampler, fromStep, generator });

  // 2. Text states and the loop from the first kept step.
  let final: tf.Tensor;
  let warnings: string[] = [];
  try {
    const encoded = await engine.encodePrompts(batch, run);
    warnings = encoded.warnings;
    try {
      final = await engine.denoise(start, encoded.context, run.guidance, loopOptions(opts, sampler, generator, fromStep));
    } finally {
      encoded.context.dispose();
    }
  } finally {
    start.dispose();
  }
  return finishRun(final, opts, engine, run.seed, batch, runSettings(run, width, height, sampler.timesteps.slice(fromStep), strength), warnings);
}

/** img2img's seeded draws for one run, NHWC. */
export interface Img2ImgNoise {
  /** ε of each init image's posterior sample, [images, h, w, C]. */
  readonly posteriorEps: Float32Array;
  /** The noise that takes x₀ to the first kept step, [batch, h, w, C]. */
  readonly noise: Float32Array;
  readonly images: number;
  readonly batch: number;
  /** Latent height, width and channels. */
  readonly h: number;
  readonly w: number;
  readonly c: number;
}

/**
 * img2img's draws from the run's generator in diffusers' prepare_latents order: the posterior's ε
 * for each of `images` init images of `width` × `height` pixels first, then the noise per batch entry.
 */
export function drawImg2ImgNoise(vae: VaeConfig, generator: TorchGenerator, images: number, batch: number, width: number, height: number): Img2ImgNoise {
  const f = vae.downscale;
  const c = vae.latentChannels;
  const [h, w] = [height / f, width / f];
  const posteriorEps = nchwToNhwc(generator.randn([images, c, h, w]), [images, c, h, w]).data;
  const noise = nchwToNhwc(generator.randn([batch, c, h, w]), [batch, c, h, w]).data;
  return { posteriorEps, noise, images, batch, h, w, c };
}

/**
 * img2img's starting latents, NHWC [batch, h, w, C], from the init images' VAE posterior:
 * x₀ = (mean + σ·ε)·scaling factor, one image repeated over the batch when one is given, noised to
 * the level of step `s.fromStep` (diffusers' prepare_latents). `posterior` stays the caller's.
 */
export function noisedPosterior(
  model: Pick<PipelineModel, 'scheduler' | 'vae'>,
  posterior: Posterior<tf.Tensor>,
  d: Img2ImgNoise,
  s: Pick<Img2ImgStart, 'spec' | 'sampler' | 'fromStep'>,
): tf.Tensor {
  return tf.tidy(() => {
    let x0 = scaleLatents(tfOps, samplePosterior(tfOps, posterior, tf.tensor4d(d.posteriorEps, [d.images, d.h, d.w, d.c])), model.vae.cfg);
    if (d.images < d.batch) x0 = tf.tile(x0, [d.batch / d.images, 1, 1, 1]); // one image for the whole batch
    return noiseToStep(model.scheduler, s.spec, s.sampler, x0, tf.tensor4d(d.noise, [d.batch, d.h, d.w, d.c]), s.fromStep);
  });
}

/**
 * Decodes NHWC latents (UNet scale) one image at a time, to bound peak memory: `decodeOne` gets
 * image i's unscaled latents [1, h, w, C] (disposed after it returns) and returns its NHWC pixels.
 */
export async function decodeEach(latents: tf.Tensor, vae: VaeConfig, decodeOne: (z: tf.Tensor) => Promise<Float32Array>): Promise<DecodedImages> {
  const [b, h, w] = latents.shape as [number, number, number, number];
  const f = vae.downscale;
  const shape: [number, number, number, number] = [b, h * f, w * f, vae.outputChannels];
  const out = new Float32Array(shape.reduce((x, y) => x * y, 1));
  const per = out.length / b;
  for (let i = 0; i < b; i++) {
    const z = tf.tidy(() => unscaleLatents(tfOps, tf.slice(latents, [i, 0, 0, 0], [1, -1, -1, -1]), vae));
    try {
      out.set(await decodeOne(z), i * per);
    } finally {
      z.dispose();
    }
  }
  return { data: out, shape };
}

/** A run's result from its final NHWC latents, which it disposes: NCHW latents and, unless `opts.decode` is false, the images. */
async function finishRun(
  final: tf.Tensor,
  opts: Pick<CommonOptions, 'decode'>,
  engine: { decode(latents: tf.Tensor): Promise<DecodedImages> },
  seed: Seed,
  batch: Batch,
  settings: RunSettings,
  warnings: string[],
): Promise<GenerateResult> {
  try {
    const [b, h, w, c] = final.shape as [number, number, number, number];
    const latents = nhwcToNchw((await final.data()) as Float32Array, [b, h, w, c]).data;
    const base = { seed, latents, latentShape: [b, c, h, w] as const, prompts: batch.prompts, negativePrompts: batch.negatives, settings, warnings };
    if (opts.decode === false) return { ...base, images: [] };
    const decoded = await engine.decode(final);
    return { ...base, images: tensorToImage(decoded.data, decoded.shape), decoded };
  } finally {
    final.dispose();
  }
}
