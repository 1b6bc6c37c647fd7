/**
 * Text-to-image and image-to-image on tfjs, as diffusers' StableDiffusionPipeline and
 * StableDiffusionImg2ImgPipeline compute them on CPU: same prompt batching, same seeded noise
 * (torch's CPU generator, drawn NCHW in the same order), same sampler maths, same VAE decode.
 *
 * Phases of a run (`common.ts` orders them, for this engine and the onnxruntime one alike):
 *   1. prompts → text states, [uncond × B, cond × B] when guidance > 1
 *   2. initial latents: x_T ~ N(0, I) from the seed (or given) × initNoiseSigma;
 *      img2img: VAE posterior sample × scaling factor, noised to the first kept step
 *   3. the sampling loop (`denoise.ts`)
 *   4. VAE decode, one image at a time (peak memory), to 8-bit RGB
 */
import * as tf from '@tensorflow/tfjs';
import type { ModelPatch, ParamOverride } from '../methods/types.js';
import { clipTextEncoder, isClipTextBuffer, textStatesForUnet } from '../models/clip/text-encoder.js';
import { encodeText } from '../models/clip/text-encoder-tfjs.js';
import { imageToTensor, vaeDecode, vaeDecodeTiled, vaeEncode, type Image8 } from '../models/vae/vae.js';
import { tfOps } from '../ops/tfjs-ops.js';
import type { TorchGenerator } from '../schedulers/rng.js';
import type { Sampler, SamplerKind } from '../schedulers/sampler.js';
import { decodeEach, drawImg2ImgNoise, noisedPosterior, runImg2Img, runTxt2Img, statesPerRow, tokenizePrompts, type DecodedImages, type RunEngine } from './common.js';
import { denoise, type LoopOptions, type SamplerSpec } from './denoise.js';
import { assertWeightsUsed, type StableDiffusion } from './load.js';

// Engine-independent pieces, exported here as before (their home is common.ts).
export { checkImageSize, drawInitialLatents, randomSeed } from './common.js';

/** A torch generator seed: any integer in [−2⁶³, 2⁶⁴) (bigint beyond 2⁵³). */
export type Seed = number | bigint;

/** Options shared by txt2img and img2img; `onStart`, `onStep` and `signal` go to the sampling loop. */
export interface CommonOptions extends Pick<LoopOptions, 'onStart' | 'onStep' | 'signal'> {
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
  const { ids, rows, warnings } = tokenizePrompts(model.tokenizer, prompts, negatives, guidance, patch.rewritePrompt ?? ((text: string) => text));
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
  return { context: statesPerRow(states, rows), warnings };
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

/** Text-to-image: `opts.prompts` → final latents and decoded images. */
export function generate(model: StableDiffusion, opts: GenerateOptions): Promise<GenerateResult> {
  return patchedRun(model, opts, runTxt2Img);
}

/** Image-to-image: noise the encoded images to the step `strength` selects, then denoise from there. */
export function img2img(model: StableDiffusion, opts: Img2ImgOptions): Promise<GenerateResult> {
  return patchedRun(model, opts, runImg2Img);
}

// A run on the tfjs networks with the patch's parameter overrides in place from the text encoder
// to the last decode (the VAE encoder may be among them), restored whatever happens.
async function patchedRun<O extends CommonOptions>(
  model: StableDiffusion,
  opts: O,
  run: (model: StableDiffusion, opts: O, engine: RunEngine<tf.Tensor>) => Promise<GenerateResult>,
): Promise<GenerateResult> {
  const restore = overrideParams(model, opts.patch?.params);
  try {
    return await run(model, opts, tfjsEngine(model, opts));
  } finally {
    restore();
  }
}

/** The tfjs networks of a run, with the patch's prompt rewrite, token embeddings and UNet hooks. */
function tfjsEngine(model: StableDiffusion, opts: CommonOptions): RunEngine<tf.Tensor> {
  return {
    encodePrompts: (batch, run) => encodePrompts(model, batch.prompts, batch.negatives, run.guidance, run.clipSkip, opts.patch),
    denoise: (start, context, guidance, loop) =>
      denoise(model, start, {
        ...loop,
        context,
        guidance,
        ...(opts.patch?.unetHooks === undefined ? {} : { unetHooks: opts.patch.unetHooks }),
      }),
    img2imgStart: (images, s) => img2imgLatents(model, images, s),
    decode: (latents) => decodeLatents(model, latents, opts.tiledDecode ?? false),
  };
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
  const first = images[0];
  if (first === undefined) throw new Error('img2img: no init image given');
  const pixels = imageToTensor(images);
  const draws = drawImg2ImgNoise(model.vae.cfg, s.generator, images.length, s.batch, first.width, first.height);
  const start = tf.tidy(() => {
    const posterior = vaeEncode(tfOps, model.vae.store.scope(), tf.tensor4d(pixels.data, pixels.shape), model.vae.cfg);
    return noisedPosterior(model, posterior, draws, s);
  });
  assertWeightsUsed(model.vae.store, 'VAE encoder', (k) => k.startsWith('encoder.') || k.startsWith('quant_conv.'));
  return start;
}

/** Decode NHWC latents (the UNet's scale) to raw images, one at a time. Returns NHWC [B, H, W, 3]. */
export async function decodeLatents(model: StableDiffusion, latents: tf.Tensor, tiled = false): Promise<DecodedImages> {
  return decodeEach(latents, model.vae.cfg, async (z) => {
    const image = tf.tidy(() => {
      const scope = model.vae.store.scope();
      return tiled ? vaeDecodeTiled(tfOps, scope, z, model.vae.cfg) : vaeDecode(tfOps, scope, z, model.vae.cfg);
    });
    const data = await image.data<'float32'>();
    image.dispose();
    assertWeightsUsed(model.vae.store, 'VAE decoder', (k) => k.startsWith('decoder.') || k.startsWith('post_quant_conv.'));
    return data;
  });
}
