/**
 * Text-to-image and image-to-image on onnxruntime-node, from an exported folder (Optimum's ONNX
 * layout, see `src/export`). The heavy parts — text encoder, UNet, VAE — run in ORT sessions;
 * everything between them is the tfjs pipeline's own code: the same samplers (`src/schedulers`,
 * built by `makeSampler`), the same seeded noise (`TorchGenerator`, drawn NCHW in diffusers'
 * order), the same CFG combination and latent arithmetic on tfjs tensors, the same image
 * post-processing. So a seed gives the same image on either engine, up to float rounding.
 *
 * The run itself (option checks, batching, seeded draws, the order of the phases, the result) is
 * `common.ts`'s, shared with the tfjs pipeline; this file supplies the ORT networks as a `RunEngine`.
 * The sampling loop is `denoise.ts`'s {@link sampleLoop}, which takes the model as an async
 * function (an ORT run cannot sit inside a `tf.tidy`), so both engines share it.
 */
import { existsSync, promises as fs } from 'node:fs';
import { createRequire } from 'node:module';
import { availableParallelism } from 'node:os';
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import * as ort from 'onnxruntime-node';
import { readJsonFile, readModelIndex, ModelFolderError } from '../io/diffusers.js';
import { nchwToNhwc, nhwcToNchw } from '../io/layout.js';
import { parseClipTextConfig, type ClipTextConfig } from '../models/clip/config.js';
import { finalLayerNorm } from '../models/clip/text-encoder.js';
import { ClipTokenizer } from '../models/clip/tokenizer.js';
import { parseUnetConfig, type UnetConfig } from '../models/unet/config.js';
import { imageToTensor, type Posterior } from '../models/vae/vae.js';
import { parseVaeConfig, type VaeConfig } from '../models/vae/config.js';
import { ParamStore } from '../ops/scope.js';
import { tfOps } from '../ops/tfjs-ops.js';
import { readSchedulerConfig, type SchedulerConfig } from '../schedulers/config.js';
import { readInitializers } from '../export/read.js';
import { decodeEach, drawImg2ImgNoise, noisedPosterior, runImg2Img, runTxt2Img, statesPerRow, tokenizePrompts, type Batch, type DecodedImages, type ResolvedRun, type RunEngine } from './common.js';
import { applyGuidance, sampleLoop, type LoopOptions } from './denoise.js';
import { modelHashOf } from './load.js';
import type { CommonOptions, GenerateOptions, GenerateResult, Img2ImgOptions } from './txt2img.js';

/** Which ORT execution provider runs the graphs: CPU, CUDA, or CUDA when it loads and CPU otherwise. */
export type ExecutionProviderChoice = 'cpu' | 'cuda' | 'auto';

export interface OnnxLoadOptions {
  /** Threads inside one op (default: the machine's available parallelism). */
  readonly intraOpNumThreads?: number;
  /** Default 'auto': CUDA when onnxruntime-node's CUDA provider is installed and loads, else CPU. */
  readonly executionProvider?: ExecutionProviderChoice;
  /** ORT graph optimizations (default 'all'). */
  readonly graphOptimizationLevel?: 'disabled' | 'basic' | 'extended' | 'all';
}

/** A multi-vector embedding's token and the tokens it expands to in prompts. */
interface EmbeddingTokens {
  readonly token: string;
  readonly tokens: readonly string[];
}

const ONNX_COMPONENTS = ['text_encoder', 'unet', 'vae_decoder'] as const;

function runOptionsOf(opts: OnnxLoadOptions, provider: 'cpu' | 'cuda'): ort.InferenceSession.SessionOptions {
  return {
    executionProviders: provider === 'cuda' ? ['cuda', 'cpu'] : ['cpu'],
    intraOpNumThreads: opts.intraOpNumThreads ?? availableParallelism(),
    interOpNumThreads: 1,
    graphOptimizationLevel: opts.graphOptimizationLevel ?? 'all',
  };
}

/** An ORT session for `file` on `provider` with the pipeline's thread and optimization settings. */
export async function openSession(file: string, opts: OnnxLoadOptions, provider: 'cpu' | 'cuda'): Promise<ort.InferenceSession> {
  try {
    return await ort.InferenceSession.create(file, runOptionsOf(opts, provider));
  } catch (e) {
    throw new Error(`${file}: onnxruntime cannot load the model${provider === 'cuda' ? ' on CUDA' : ''}: ${e instanceof Error ? e.message : String(e)}`);
  }
}

/**
 * Whether onnxruntime-node ships its CUDA provider library here (the npm package installs it only
 * on Linux x64 with CUDA binaries downloaded). Checked before trying, because a failed attempt is
 * logged by ORT's process-wide logger whatever the session's log level.
 */
function cudaProviderPresent(): boolean {
  try {
    const main = createRequire(import.meta.url).resolve('onnxruntime-node');
    const dir = path.join(path.dirname(main), '..', 'bin', 'napi-v6', process.platform, process.arch);
    return existsSync(path.join(dir, 'libonnxruntime_providers_cuda.so'));
  } catch {
    return false;
  }
}

async function chooseProvider(file: string, opts: OnnxLoadOptions): Promise<{ provider: 'cpu' | 'cuda'; session: ort.InferenceSession }> {
  const choice = opts.executionProvider ?? 'auto';
  if (choice === 'cpu' || (choice === 'auto' && !cudaProviderPresent())) return { provider: 'cpu', session: await openSession(file, opts, 'cpu') };
  try {
    const session = await ort.InferenceSession.create(file, runOptionsOf(opts, 'cuda'));
    return { provider: 'cuda', session };
  } catch (e) {
    if (choice === 'cuda') {
      throw new Error(`--execution-provider cuda: onnxruntime's CUDA provider did not load (${e instanceof Error ? e.message.split('\n')[0] : String(e)}); install onnxruntime-node's CUDA binaries or use cpu`);
    }
    return { provider: 'cpu', session: await openSession(file, opts, 'cpu') };
  }
}

function inputType(session: ort.InferenceSession, name: string): string | undefined {
  const meta = session.inputMetadata.find((m) => m.name === name);
  return meta !== undefined && meta.isTensor ? meta.type : undefined;
}

function inputRank(session: ort.InferenceSession, name: string): number | undefined {
  const meta = session.inputMetadata.find((m) => m.name === name);
  return meta !== undefined && meta.isTensor ? meta.shape.length : undefined;
}

/** A Stable Diffusion pipeline whose networks run in onnxruntime sessions. */
export class OnnxStableDiffusion {
  private vaeEncoderSession: Promise<ort.InferenceSession> | undefined;
  private finalNorm: Promise<ParamStore<tf.Tensor>> | undefined;

  private constructor(
    /** The exported folder (absolute). */
    readonly source: string,
    /** What A1111 records as `Model`: the folder's base name. */
    readonly name: string,
    /** The export's model hash (base + add-ons), as `model_index.json` records it. */
    readonly modelHash: string,
    readonly tokenizer: ClipTokenizer,
    readonly text: { readonly cfg: ClipTextConfig; readonly session: ort.InferenceSession },
    readonly unet: { readonly cfg: UnetConfig; readonly session: ort.InferenceSession },
    readonly vae: { readonly cfg: VaeConfig; readonly decoder: ort.InferenceSession },
    readonly scheduler: SchedulerConfig,
    readonly defaultSize: { readonly width: number; readonly height: number },
    /** Image sides must be multiples of this (VAE factor × 2^(UNet levels − 1)). */
    readonly sizeMultiple: number,
    readonly executionProvider: 'cpu' | 'cuda',
    private readonly loadOptions: OnnxLoadOptions,
    /** Embeddings baked in at export, for expanding multi-vector tokens in prompts. */
    readonly embeddings: readonly EmbeddingTokens[],
  ) {}

  /** Load an exported folder: configs, tokenizer, scheduler and sessions for the text encoder, UNet and VAE decoder. */
  static async load(dir: string, opts: OnnxLoadOptions = {}): Promise<OnnxStableDiffusion> {
    const source = path.resolve(dir);
    if (!(await fs.stat(source).catch(() => undefined))?.isDirectory()) throw new ModelFolderError(`${dir}: no such model folder`, dir);
    const index = await readModelIndex(source).catch((e: unknown) => {
      throw new ModelFolderError(`${dir}: not an exported ONNX model folder (${e instanceof Error ? e.message : String(e)})`, dir);
    });
    for (const c of ONNX_COMPONENTS) {
      const file = path.join(source, c, 'model.onnx');
      if ((await fs.stat(file).catch(() => undefined)) === undefined) {
        throw new ModelFolderError(`${dir}: no ${c}/model.onnx — not an ONNX export (make one with sdwb export; --engine onnx needs one)`, file);
      }
    }
    const textCfg = parseClipTextConfig(await readJsonFile(path.join(source, 'text_encoder', 'config.json')), path.join(source, 'text_encoder', 'config.json'));
    const unetJson = await readJsonFile(path.join(source, 'unet', 'config.json'));
    const unetCfg = parseUnetConfig(unetJson, path.join(source, 'unet', 'config.json'));
    const vaeCfg = parseVaeConfig(await readJsonFile(path.join(source, 'vae_decoder', 'config.json')), path.join(source, 'vae_decoder', 'config.json'));
    const scheduler = await readSchedulerConfig(path.join(source, 'scheduler'));
    const tokenizer = await ClipTokenizer.fromDir(path.join(source, 'tokenizer'));
    const raw = (await readJsonFile(index.file)) as Record<string, unknown>;
    const provenance = (raw._sdwb_export ?? {}) as { model_hash?: unknown; embeddings?: unknown };
    const embeddings = Array.isArray(provenance.embeddings)
      ? (provenance.embeddings as { token?: unknown; tokens?: unknown }[])
          .filter((e) => typeof e.token === 'string' && Array.isArray(e.tokens))
          .map((e) => ({ token: e.token as string, tokens: (e.tokens as unknown[]).map(String) }))
      : [];
    const modelHash = typeof provenance.model_hash === 'string' ? provenance.model_hash : await modelHashOf([path.join(source, 'unet', 'model.onnx')]);

    const { provider, session: unetSession } = await chooseProvider(path.join(source, 'unet', 'model.onnx'), opts);
    const textSession = await openSession(path.join(source, 'text_encoder', 'model.onnx'), opts, provider);
    const decoder = await openSession(path.join(source, 'vae_decoder', 'model.onnx'), opts, provider);
    const sampleSize = typeof (unetJson as Record<string, unknown>).sample_size === 'number' ? ((unetJson as Record<string, unknown>).sample_size as number) : 64;
    return new OnnxStableDiffusion(
      source,
      path.basename(source),
      modelHash,
      tokenizer,
      { cfg: textCfg, session: textSession },
      { cfg: unetCfg, session: unetSession },
      { cfg: vaeCfg, decoder },
      scheduler,
      { width: sampleSize * vaeCfg.downscale, height: sampleSize * vaeCfg.downscale },
      vaeCfg.downscale * 2 ** (unetCfg.blockChannels.length - 1),
      provider,
      opts,
      embeddings,
    );
  }

  /** Free the sessions and the few tfjs tensors held. */
  async release(): Promise<void> {
    const sessions = [this.text.session, this.unet.session, this.vae.decoder];
    if (this.vaeEncoderSession !== undefined) sessions.push(await this.vaeEncoderSession);
    for (const s of sessions) await s.release();
    if (this.finalNorm !== undefined) for (const k of (await this.finalNorm).keys()) (await this.finalNorm).get(k)?.dispose();
  }

  /** A prompt with multi-vector embedding tokens expanded (`<t>` → `<t> <t>_1 …`), as diffusers' loader does. */
  rewritePrompt(prompt: string): string {
    return this.embeddings.reduce((text, e) => (e.tokens.length <= 1 ? text : text.split(e.token).join(e.tokens.join(' '))), prompt);
  }

  /** Text states [N, S, D] for token-id rows (each of the tokenizer's length); `clipSkip` as the tfjs pipeline. */
  async encodeIds(ids: readonly (readonly number[])[], clipSkip = 0): Promise<tf.Tensor> {
    const cfg = this.text.cfg;
    const seqLen = ids[0]?.length ?? 0;
    if (ids.length === 0 || ids.some((r) => r.length !== seqLen)) throw new Error('encodeIds: rows of equal, non-zero length expected');
    const flat = ids.flat();
    const int64 = inputType(this.text.session, 'input_ids') === 'int64';
    const feed = int64 ? new ort.Tensor('int64', BigInt64Array.from(flat.map((v) => BigInt(v))), [ids.length, seqLen]) : new ort.Tensor('int32', Int32Array.from(flat), [ids.length, seqLen]);
    const output = clipSkip === 0 ? 'last_hidden_state' : `hidden_states.${cfg.numLayers - clipSkip}`;
    if (!this.text.session.outputNames.includes(output)) {
      throw new Error(`${this.source}: the text encoder has no '${output}' output (clip skip needs an export with hidden_states outputs)`);
    }
    const result = await this.text.session.run({ input_ids: feed }, [output]);
    const t = result[output]!;
    const states = tf.tensor(t.data as Float32Array, [...t.dims]);
    if (clipSkip === 0) return states;
    const store = await this.finalLayerNormParams();
    const out = tf.tidy(() => finalLayerNorm(tfOps, store.scope(), states, cfg));
    states.dispose();
    return out;
  }

  /** The UNet on NHWC latents at one timestep for the whole batch → NHWC output. */
  predict(x: tf.Tensor, timestep: number, context: ort.Tensor): Promise<tf.Tensor> {
    return runUnet(this.unet.session, x, timestep, context);
  }

  /** Decode NHWC latents (UNet scale) one image at a time → NHWC [B, H, W, 3] ≈ [-1, 1]. */
  async decode(latents: tf.Tensor): Promise<DecodedImages> {
    return decodeEach(latents, this.vae.cfg, async (z) => {
      const zc = nhwcToNchw((await z.data()) as Float32Array, z.shape);
      const result = await this.vae.decoder.run({ latent_sample: new ort.Tensor('float32', zc.data, zc.shape) });
      const image = result.sample!;
      return nchwToNhwc(image.data as Float32Array, [...image.dims]).data;
    });
  }

  /** The VAE posterior of NHWC images in [-1, 1] (the encoder session opens on first use). */
  async encodeImages(pixels: { data: Float32Array; shape: readonly [number, number, number, number] }): Promise<Posterior<tf.Tensor>> {
    this.vaeEncoderSession ??= openSession(path.join(this.source, 'vae_encoder', 'model.onnx'), this.loadOptions, this.executionProvider);
    const session = await this.vaeEncoderSession;
    const nchw = nhwcToNchw(pixels.data, pixels.shape);
    const result = await session.run({ sample: new ort.Tensor('float32', nchw.data, nchw.shape) });
    const m = result.latent_parameters!;
    const moments = nchwToNhwc(m.data as Float32Array, [...m.dims]);
    const t = tf.tensor4d(moments.data, moments.shape as [number, number, number, number]);
    const p = tf.tidy(() => {
      const { mean, logvar, std } = posteriorOf(t, this.vae.cfg.latentChannels);
      return { mean, logvar, std };
    });
    return { moments: t, ...p };
  }

  private async finalLayerNormParams(): Promise<ParamStore<tf.Tensor>> {
    this.finalNorm ??= (async () => {
      const prefix = 'text_model.final_layer_norm.';
      const stored = await readInitializers(path.join(this.source, 'text_encoder', 'model.onnx'), (n) => n.startsWith(prefix));
      const tensors = new Map<string, tf.Tensor>();
      for (const [k, v] of stored) tensors.set(k, tf.tensor(v.data as Float32Array, [...v.dims]));
      if (tensors.size !== 2) throw new Error(`${this.source}: text_encoder/model.onnx lacks ${prefix}weight/bias (needed for clip skip)`);
      return new ParamStore(tensors, (t) => t.shape, 'text_encoder/model.onnx');
    })();
    return this.finalNorm;
  }
}

/**
 * One UNet evaluation in an ORT session: NHWC latents, one timestep for the batch, text states
 * [B, S, D] → NHWC output. The timestep is fed as the session declares it (our exports take any
 * shape; Optimum's older ones want int64 or one value per sample).
 */
export async function runUnet(session: ort.InferenceSession, x: tf.Tensor, timestep: number, context: ort.Tensor): Promise<tf.Tensor> {
  const [b, h, w, c] = x.shape as [number, number, number, number];
  const sample = nhwcToNchw((await x.data()) as Float32Array, [b, h, w, c]);
  const rank = inputRank(session, 'timestep') ?? 0;
  const count = rank === 0 ? 1 : b;
  const dims = rank === 0 ? [] : [count];
  const tFeed =
    inputType(session, 'timestep') === 'int64'
      ? new ort.Tensor('int64', new BigInt64Array(count).fill(BigInt(Math.round(timestep))), dims)
      : new ort.Tensor('float32', new Float32Array(count).fill(timestep), dims);
  const result = await session.run({ sample: new ort.Tensor('float32', sample.data, sample.shape), timestep: tFeed, encoder_hidden_states: context });
  const out = result.out_sample!;
  const nhwc = nchwToNhwc(out.data as Float32Array, [...out.dims]);
  return tf.tensor4d(nhwc.data, nhwc.shape as [number, number, number, number]);
}

/**
 * vaeEncode's posterior from its moments [mean | log σ²] (NHWC): log σ² clamped to [-30, 20] and
 * σ = exp(log σ² / 2), as `vaeEncode` forms it after quant_conv.
 */
function posteriorOf(moments: tf.Tensor, latentChannels: number): Posterior<tf.Tensor> {
  const mean = tfOps.slice(moments, [0, 0, 0, 0], [-1, -1, -1, latentChannels]);
  const logvar = tfOps.clip(tfOps.slice(moments, [0, 0, 0, latentChannels], [-1, -1, -1, latentChannels]), -30, 20);
  return { moments, mean, logvar, std: tfOps.exp(tfOps.mul(logvar, 0.5)) };
}

// =============================================================================================
// txt2img / img2img

/** Text-to-image on onnxruntime: the tfjs `generate` with the networks in ORT sessions. */
export async function generateOnnx(model: OnnxStableDiffusion, opts: GenerateOptions): Promise<GenerateResult> {
  checkOnnxOptions(opts);
  return runTxt2Img(model, opts, onnxEngine(model));
}

/** Image-to-image on onnxruntime: encode, noise to the step `strength` selects, denoise from there. */
export async function img2imgOnnx(model: OnnxStableDiffusion, opts: Img2ImgOptions): Promise<GenerateResult> {
  checkOnnxOptions(opts);
  return runImg2Img(model, opts, onnxEngine(model));
}

/** Rejects what the tfjs pipeline offers and an export cannot do. */
function checkOnnxOptions(opts: CommonOptions): void {
  if (opts.tiledDecode === true) throw new Error('tiled VAE decoding is not available on the onnx engine (use --engine tfjs)');
}

/** The ORT networks of a run. */
function onnxEngine(model: OnnxStableDiffusion): RunEngine<ort.Tensor> {
  return {
    encodePrompts: (batch, run) => encodePromptsOnnx(model, batch, run),
    denoise: (start, context, guidance, loop) => denoiseOnnx(model, start, context, guidance, loop),
    img2imgStart: async (images, s) => {
      // The generator's draws come before the encoder runs, in diffusers' prepare_latents order.
      const draws = drawImg2ImgNoise(model.vae.cfg, s.generator, images.length, s.batch, images[0]!.width, images[0]!.height);
      const posterior = await model.encodeImages(imageToTensor(images));
      try {
        return noisedPosterior(model, posterior, draws, s);
      } finally {
        for (const t of new Set([posterior.moments, posterior.mean, posterior.logvar, posterior.std])) t.dispose();
      }
    },
    decode: (latents) => model.decode(latents),
  };
}

/** Text states [uncond × B, cond × B] (or cond only without guidance) as an ORT tensor, each distinct text encoded once. */
async function encodePromptsOnnx(model: OnnxStableDiffusion, batch: Batch, run: ResolvedRun): Promise<{ context: ort.Tensor; warnings: string[] }> {
  const { ids, rows, warnings } = tokenizePrompts(model.tokenizer, batch.prompts, batch.negatives, run.guidance, (t) => model.rewritePrompt(t));
  const gathered = statesPerRow(await model.encodeIds(ids, run.clipSkip), rows);
  const context = new ort.Tensor('float32', (await gathered.data()) as Float32Array, gathered.shape);
  gathered.dispose();
  return { context, warnings };
}

/** Runs the loop with classifier-free guidance through the ORT UNet. */
async function denoiseOnnx(model: OnnxStableDiffusion, start: tf.Tensor, context: ort.Tensor, guidance: number, loop: LoopOptions): Promise<tf.Tensor> {
  const guided = guidance > 1;
  const batch = start.shape[0]!;
  if (context.dims[0] !== (guided ? 2 * batch : batch)) throw new Error(`denoise: ${context.dims[0]} text states for ${batch} latents`);
  return sampleLoop(
    start,
    async (xIn, i) => {
      const modelIn = guided ? tf.concat([xIn, xIn], 0) : xIn; // [2B,h,w,C]: uncond half, cond half
      let out: tf.Tensor;
      try {
        out = await model.predict(modelIn, loop.sampler.timesteps[i]!, context);
      } finally {
        if (modelIn !== xIn) modelIn.dispose();
      }
      if (!guided) return out;
      const eps = applyGuidance(out, guidance);
      out.dispose();
      return eps;
    },
    loop,
  );
}
