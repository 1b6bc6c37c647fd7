/**
 * Text-to-image and image-to-image on tfjs, as diffusers' StableDiffusionPipeline and
 * StableDiffusionImg2ImgPipeline compute them on CPU: same prompt batching, same seeded noise
 * (torch's CPU generator, drawn NCHW in the same order), same sampler maths, same VAE decode.
 *
 * Phases of a run:
 *   1. prompts → text states, [uncond × B, cond × B] when guidance > 1
 *   2. initial latents: x_T ~ N(0, I) from the seed (or given) × initNoiseSigma;
 *      img2img: VAE posterior sample × scaling factor, noised to the first kept step
 *   3. the sampling loop (`denoise.ts`)
 *   4. VAE decode, one image at a time (peak memory), to 8-bit RGB
 */
import { randomInt } from 'node:crypto';
import * as tf from '@tensorflow/tfjs';
import { nchwToNhwc, nhwcToNchw } from '../io/layout.js';
import type { ModelPatch, ParamOverride } from '../methods/types.js';
import { clipTextEncoder, isClipTextBuffer, textStatesForUnet } from '../models/clip/text-encoder.js';
import { encodeText } from '../models/clip/text-encoder-tfjs.js';
import {
  imageToTensor,
  samplePosterior,
  scaleLatents,
  tensorToImage,
  unscaleLatents,
  vaeDecode,
  vaeDecodeTiled,
  vaeEncode,
  type Image8,
} from '../models/vae/vae.js';
import { tfOps } from '../ops/tfjs-ops.js';
import { TorchGenerator } from '../schedulers/rng.js';
import type { Sampler, SamplerKind } from '../schedulers/sampler.js';
import { defaultSamplerKind, denoise, img2imgStartStep, makeSampler, noiseToStep, type SamplerSpec, type StepInfo } from './denoise.js';
import { assertWeightsUsed, type StableDiffusion } from './load.js';

/** A torch generator seed: any integer in [−2⁶³, 2⁶⁴) (bigint beyond 2⁵³). */
export type Seed = number | bigint;

/** Options shared by txt2img and img2img. */
export interface CommonOptions {
  /** One prompt per batch entry (before `imagesPerPrompt`). */
  readonly prompts: readonly string[];
  /** One for all prompts, or one per prompt; default '' (the empty-prompt uncond, as diffusers). */
  readonly negativePrompt?: string | readonly string[];
  /** Images per prompt (diffusers' num_images_per_prompt), default 1. */
  readonly imagesPerPrompt?: number;
  /** Inference steps, default 50 (diffusers' default). */
  readonly steps?: number;
  /** Classifier-free guidance scale, default 7.5; ≤ 1 runs no uncond pass. */
  readonly guidance?: number;
  /** Generator seed for the initial noise and any per-step noise; default random (see the result). */
  readonly seed?: Seed;
  /** Default: the sampler of the folder's scheduler class. */
  readonly sampler?: SamplerKind;
  /** Karras noise levels (LMS, Euler, DPM++ 2M only). */
  readonly karras?: boolean;
  /** DDIM's η, default 0. */
  readonly eta?: number;
  /**
   * Text-encoder layers to skip from the end, diffusers' convention (0: last layer, 1: penultimate
   * = A1111's "Clip skip: 2"). Applied to prompt and negative prompt alike, as A1111 does;
   * diffusers' encode_prompt applies it to the prompt only.
   */
  readonly clipSkip?: number;
  /** Decode to images (default true); false returns latents only. */
  readonly decode?: boolean;
  /** Decode large latents in overlapping tiles (less memory, not exact at tile level). */
  readonly tiledDecode?: boolean;
  /** Called once before the loop with the number of steps it runs. */
  readonly onStart?: (total: number) => void;
  readonly onStep?: (done: number, total: number, info: StepInfo) => void;
  readonly signal?: AbortSignal;
  /**
   * Trained add-ons for this run (textual inversion, hypernetworks, LoRA, deltas; see
   * `src/pipeline/addons.ts`): prompts are rewritten and token embeddings replaced while encoding,
   * the UNet hooks run in every step, and parameter overrides hold from the text encoder to the
   * last VAE decode, after which the parameters the patch touched get their previous values back.
   */
  readonly patch?: ModelPatch;
}

export interface GenerateOptions extends CommonOptions {
  /** Image size; default the model's (UNet sample_size × VAE factor). */
  readonly width?: number;
  readonly height?: number;
  /**
   * x_T as diffusers' `latents=` argument: NCHW [batch, latent channels, height/f, width/f],
   * float32; scaled by the sampler's initNoiseSigma. Replaces the seeded draw.
   */
  readonly initLatents?: Float32Array;
}

export interface Img2ImgOptions extends CommonOptions {
  /** One RGB image per batch entry, or one for all; all the same size (a multiple of the model's). */
  readonly initImages: readonly Image8[];
  /** Fraction of the schedule re-run, in (0, 1]; default 0.8 (diffusers' default). */
  readonly strength?: number;
}

/** Settings a run actually used (defaults resolved). */
export interface RunSettings {
  readonly sampler: SamplerKind;
  readonly karras: boolean;
  readonly steps: number;
  readonly guidance: number;
  readonly eta: number;
  readonly clipSkip: number;
  readonly width: number;
  readonly height: number;
  /** The model timesteps evaluated, in order. */
  readonly timesteps: readonly number[];
  /** img2img only. */
  readonly strength?: number;
}

export interface GenerateResult {
  readonly seed: Seed;
  /** Final latents before decoding, NCHW [batch, C, h, w] (diffusers' output_type='latent'). */
  readonly latents: Float32Array;
  readonly latentShape: readonly [number, number, number, number];
  /** 8-bit RGB images (empty when decode is false). */
  readonly images: readonly Image8[];
  /** The VAE output before clamping, NHWC [batch, H, W, 3] ≈ [−1, 1] (absent when decode is false). */
  readonly decoded?: { readonly data: Float32Array; readonly shape: readonly [number, number, number, number] };
  /** Prompt per image and negative prompt per image, after batching. */
  readonly prompts: readonly string[];
  readonly negativePrompts: readonly string[];
  readonly settings: RunSettings;
  /** Non-fatal notes (truncated prompts). */
  readonly warnings: readonly string[];
}

/** A random seed in [0, 2³²), as A1111 draws them. */
export function randomSeed(): number {
  return randomInt(0, 2 ** 32);
}

/** x_T for `seed` exactly as diffusers draws it on CPU: `torch.randn([B, C, h, w], generator)`, NCHW. */
export function drawInitialLatents(generator: TorchGenerator, shape: readonly [number, number, number, number]): Float32Array {
  return generator.randn(shape);
}

interface Batch {
  readonly prompts: string[];
  readonly negatives: string[];
}

/** Prompts and negative prompts per image, in diffusers' order (each prompt repeated imagesPerPrompt times). */
function expandBatch(opts: CommonOptions): Batch {
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

/**
 * Text states for a batch: [B, S, D] of the prompts, or with guidance > 1 [2B, S, D] ordered
 * [negative × B, prompt × B] as diffusers concatenates them. Each distinct text is encoded once.
 * A `patch` rewrites every text before tokenizing and may replace the token-embedding lookup
 * (textual inversion's added tokens).
 */
export function encodePrompts(
  model: StableDiffusion,
  prompts: readonly string[],
  negatives: readonly string[],
  guidance: number,
  clipSkip = 0,
  patch: Pick<ModelPatch, 'rewritePrompt' | 'tokenEmbeddings'> = {},
): { context: tf.Tensor; warnings: string[] } {
  const rewrite = patch.rewritePrompt ?? ((text: string) => text);
  const texts = (guidance > 1 ? [...negatives, ...prompts] : [...prompts]).map(rewrite);
  const distinct = [...new Set(texts)];
  const warnings: string[] = [];
  const window = model.tokenizer.encode('').length - 2;
  for (const text of distinct) {
    const count = model.tokenizer.contentIds(text).length;
    if (count > window) warnings.push(`prompt truncated to ${window} of its ${count} tokens: "${text.slice(0, 60)}${text.length > 60 ? '…' : ''}"`);
  }
  const ids = distinct.map((t) => model.tokenizer.encode(t));
  let states: tf.Tensor;
  const tokenEmbeddings = patch.tokenEmbeddings;
  if (tokenEmbeddings === undefined) {
    states = encodeText(model.text.store, model.text.cfg, ids, { clipSkip });
    if (clipSkip === 0) assertWeightsUsed(model.text.store, 'text encoder', (k) => !isClipTextBuffer(k));
  } else {
    // Ids of added tokens lie past the table, which encodeText rejects: the lookup is the patch's.
    states = tf.tidy(() => {
      const inputIds = tf.tensor2d(ids.flat(), [ids.length, ids[0]!.length], 'int32');
      const p = model.text.store.scope();
      const out = clipTextEncoder(tfOps, p, inputIds, model.text.cfg, { hiddenStates: clipSkip > 0, tokenEmbeddings });
      return textStatesForUnet(tfOps, p, model.text.cfg, out, { clipSkip });
    });
  }
  const context = tf.tidy(() => tf.gather(states, tf.tensor1d(texts.map((t) => distinct.indexOf(t)), 'int32'), 0));
  states.dispose();
  return { context, warnings };
}

/**
 * Sets a patch's parameter overrides (`ParamStore.override`) for one run; the returned function
 * gives every touched key its previous value back. Keys must exist in the model.
 */
export function overrideParams(model: StableDiffusion, params: readonly ParamOverride[] = []): () => void {
  const previous = params.map((o) => {
    const store = model[o.component].store;
    const before = store.get(o.key);
    if (before === undefined) throw new Error(`${store.source}: the patch overrides '${o.key}', which is not a parameter of this model's ${o.component}`);
    return { store, key: o.key, before };
  });
  params.forEach((o, i) => previous[i]!.store.override(o.key, o.value));
  return () => {
    for (const p of [...previous].reverse()) p.store.override(p.key, p.before);
  };
}

interface ResolvedRun {
  readonly spec: SamplerSpec & { readonly karras: boolean; readonly eta: number };
  readonly guidance: number;
  readonly clipSkip: number;
  readonly seed: Seed;
}

function resolveCommon(model: StableDiffusion, opts: CommonOptions): ResolvedRun {
  const kind = opts.sampler ?? defaultSamplerKind(model.scheduler);
  const steps = opts.steps ?? 50;
  const guidance = opts.guidance ?? 7.5;
  const eta = opts.eta ?? 0;
  if (!Number.isFinite(guidance)) throw new Error(`guidance must be a finite number, got ${guidance}`);
  if (opts.karras === true && !['lms', 'euler', 'dpmpp_2m'].includes(kind)) {
    throw new Error(`Karras noise levels apply to the lms, euler and dpmpp_2m samplers, not ${kind}`);
  }
  if (eta !== 0 && kind !== 'ddim') throw new Error(`eta applies to the ddim sampler only, not ${kind}`);
  const karras = ['lms', 'euler', 'dpmpp_2m'].includes(kind) && (opts.karras ?? model.scheduler.karrasSigmas ?? false);
  const clipSkip = opts.clipSkip ?? 0;
  if (!Number.isInteger(clipSkip) || clipSkip < 0 || clipSkip >= model.text.cfg.numLayers) {
    throw new Error(`clipSkip must be an integer in [0, ${model.text.cfg.numLayers - 1}], got ${clipSkip}`);
  }
  return { spec: { kind, steps, karras, eta }, guidance, clipSkip, seed: opts.seed ?? randomSeed() };
}

/** Rejects an image size the VAE and UNet cannot divide, naming the multiple required. */
export function checkImageSize(model: StableDiffusion, width: number, height: number): void {
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

/** Text-to-image: `opts.prompts` → final latents and decoded images. */
export async function generate(model: StableDiffusion, opts: GenerateOptions): Promise<GenerateResult> {
  const restore = overrideParams(model, opts.patch?.params);
  try {
    return await generatePatched(model, opts);
  } finally {
    restore();
  }
}

// txt2img with the patch's overrides in place.
async function generatePatched(model: StableDiffusion, opts: GenerateOptions): Promise<GenerateResult> {
  const run = resolveCommon(model, opts);
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

  const { context, warnings } = encodePrompts(model, batch.prompts, batch.negatives, run.guidance, run.clipSkip, opts.patch);
  const start = tf.tidy(() => tf.mul(tf.tensor4d(nchwToNhwc(xT, shape).data, [shape[0], shape[2], shape[3], shape[1]]), sampler.initNoiseSigma));
  let final: tf.Tensor;
  try {
    final = await denoise(model, start, {
      sampler,
      context,
      guidance: run.guidance,
      generator,
      onStart: opts.onStart,
      onStep: opts.onStep,
      signal: opts.signal,
      ...(opts.patch?.unetHooks === undefined ? {} : { unetHooks: opts.patch.unetHooks }),
    });
  } finally {
    start.dispose();
    context.dispose();
  }
  const settings: RunSettings = {
    sampler: run.spec.kind,
    karras: run.spec.karras,
    steps: run.spec.steps,
    guidance: run.guidance,
    eta: run.spec.eta,
    clipSkip: run.clipSkip,
    width,
    height,
    timesteps: sampler.timesteps,
  };
  return finish(model, final, opts, run.seed, batch, settings, warnings);
}

/** Image-to-image: noise the encoded images to the step `strength` selects, then denoise from there. */
export async function img2img(model: StableDiffusion, opts: Img2ImgOptions): Promise<GenerateResult> {
  const restore = overrideParams(model, opts.patch?.params);
  try {
    return await img2imgPatched(model, opts);
  } finally {
    restore();
  }
}

// img2img with the patch's overrides in place (the VAE encoder may be among them).
async function img2imgPatched(model: StableDiffusion, opts: Img2ImgOptions): Promise<GenerateResult> {
  const run = resolveCommon(model, opts);
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
  const start = img2imgLatents(model, opts.initImages, { batch: b, spec: run.spec, sampler, fromStep, generator });

  // 2. Text states and the loop from the first kept step.
  let final: tf.Tensor;
  let warnings: string[] = [];
  try {
    const encoded = encodePrompts(model, batch.prompts, batch.negatives, run.guidance, run.clipSkip, opts.patch);
    warnings = encoded.warnings;
    try {
      final = await denoise(model, start, {
        sampler,
        context: encoded.context,
        guidance: run.guidance,
        fromStep,
        generator,
        onStart: opts.onStart,
        onStep: opts.onStep,
        signal: opts.signal,
        ...(opts.patch?.unetHooks === undefined ? {} : { unetHooks: opts.patch.unetHooks }),
      });
    } finally {
      encoded.context.dispose();
    }
  } finally {
    start.dispose();
  }
  const settings: RunSettings = {
    sampler: run.spec.kind,
    karras: run.spec.karras,
    steps: run.spec.steps,
    guidance: run.guidance,
    eta: run.spec.eta,
    clipSkip: run.clipSkip,
    width,
    height,
    timesteps: sampler.timesteps.slice(fromStep),
    strength,
  };
  return finish(model, final, opts, run.seed, batch, settings, warnings);
}

/** What {@link img2imgLatents} needs besides the images. */
export interface Img2ImgStart {
  /** Batch size (one image is repeated over it). */
  readonly batch: number;
  readonly spec: SamplerSpec;
  readonly sampler: Sampler<tf.Tensor>;
  /** The first step that will run ({@link img2imgStartStep}). */
  readonly fromStep: number;
  /** Draws the posterior's ε first, then the noise (diffusers' prepare_latents order). */
  readonly generator: TorchGenerator;
}

/**
 * img2img's starting latents, NHWC [batch, h, w, C]: x₀ = (mean + σ·ε)·scaling factor of the VAE
 * posterior of each image, noised to the level of step `fromStep` (diffusers' prepare_latents).
 */
export function img2imgLatents(model: StableDiffusion, images: readonly Image8[], s: Img2ImgStart): tf.Tensor {
  const n = images.length;
  const first = images[0];
  if (first === undefined) throw new Error('img2img: no init image given');
  const f = model.vae.cfg.downscale;
  const c = model.vae.cfg.latentChannels;
  const [h, w] = [first.height / f, first.width / f];
  const pixels = imageToTensor(images);
  const posteriorEps = nchwToNhwc(s.generator.randn([n, c, h, w]), [n, c, h, w]).data;
  const noise = nchwToNhwc(s.generator.randn([s.batch, c, h, w]), [s.batch, c, h, w]).data;
  const start = tf.tidy(() => {
    const posterior = vaeEncode(tfOps, model.vae.store.scope(), tf.tensor4d(pixels.data, pixels.shape), model.vae.cfg);
    let x0 = scaleLatents(tfOps, samplePosterior(tfOps, posterior, tf.tensor4d(posteriorEps, [n, h, w, c])), model.vae.cfg);
    if (n < s.batch) x0 = tf.tile(x0, [s.batch / n, 1, 1, 1]); // one image for the whole batch
    return noiseToStep(model.scheduler, s.spec, s.sampler, x0, tf.tensor4d(noise, [s.batch, h, w, c]), s.fromStep);
  });
  assertWeightsUsed(model.vae.store, 'VAE encoder', (k) => k.startsWith('encoder.') || k.startsWith('quant_conv.'));
  return start;
}

/** Decode NHWC latents (the UNet's scale) to raw images, one at a time. Returns NHWC [B, H, W, 3]. */
export async function decodeLatents(model: StableDiffusion, latents: tf.Tensor, tiled = false): Promise<{ data: Float32Array; shape: [number, number, number, number] }> {
  const [b, h, w] = latents.shape as [number, number, number, number];
  const f = model.vae.cfg.downscale;
  const ch = model.vae.cfg.outputChannels;
  const shape: [number, number, number, number] = [b, h * f, w * f, ch];
  const out = new Float32Array(shape.reduce((x, y) => x * y, 1));
  const per = out.length / b;
  for (let i = 0; i < b; i++) {
    const image = tf.tidy(() => {
      const z = unscaleLatents(tfOps, tf.slice(latents, [i, 0, 0, 0], [1, -1, -1, -1]), model.vae.cfg);
      const scope = model.vae.store.scope();
      return tiled ? vaeDecodeTiled(tfOps, scope, z, model.vae.cfg) : vaeDecode(tfOps, scope, z, model.vae.cfg);
    });
    out.set(await image.data<'float32'>(), i * per);
    image.dispose();
    assertWeightsUsed(model.vae.store, 'VAE decoder', (k) => k.startsWith('decoder.') || k.startsWith('post_quant_conv.'));
  }
  return { data: out, shape };
}

async function finish(
  model: StableDiffusion,
  final: tf.Tensor,
  opts: CommonOptions,
  seed: Seed,
  batch: Batch,
  settings: RunSettings,
  warnings: string[],
): Promise<GenerateResult> {
  try {
    const [b, h, w, c] = final.shape as [number, number, number, number];
    const latents = nhwcToNchw(await final.data<'float32'>(), [b, h, w, c]).data;
    const base = { seed, latents, latentShape: [b, c, h, w] as const, prompts: batch.prompts, negativePrompts: batch.negatives, settings, warnings };
    if (opts.decode === false) return { ...base, images: [] };
    const decoded = await decodeLatents(model, final, opts.tiledDecode ?? false);
    return { ...base, images: tensorToImage(decoded.data, decoded.shape), decoded };
  } finally {
    final.dispose();
  }
}
