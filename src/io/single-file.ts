/**
 * Single-file (original CompVis/LDM layout) Stable Diffusion checkpoints: reading one into the
 * three components' diffusers-named tensors and configs, loading it for inference, writing one
 * from diffusers components, and converting between the two layouts.
 *
 * Everything goes through one abstraction, a {@link TensorSource}: names with dtype, shape and a
 * lazy read. Safetensors files and PyTorch `.ckpt` pickles (through the safe reader) both provide
 * it, so nothing below the source knows which format the weights came from. Renamed tensors stay lazy
 * ({@link TensorRef}): a reshape or a row block of the stored tensor, read only when needed, so a
 * conversion holds one tensor in memory at a time and copies bytes unchanged (bit-identical).
 */
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import type * as tf from '@tensorflow/tfjs';
import { parse as parseYaml } from 'yaml';
import { parseClipTextConfig } from '../models/clip/config.js';
import { isClipTextBuffer } from '../models/clip/text-encoder.js';
import { ClipTokenizer, defaultTokenizer, defaultTokenizerDir } from '../models/clip/tokenizer.js';
import { parseUnetConfig } from '../models/unet/config.js';
import { parseVaeConfig } from '../models/vae/config.js';
import { renameDeprecatedVaeAttentionKey } from '../models/vae/vae.js';
import type { StableDiffusion } from '../pipeline/load.js';
import { parseSchedulerConfig, PREDICTION_TYPES, type PredictionType } from '../schedulers/config.js';
import { findWeightFiles, readJsonFile, readModelIndex } from './diffusers.js';
import { checkProblems, detectCheckpoint, SD_SCHEDULE, SDWB_CONFIGS_METADATA_KEY, type ConfigHints, type Detection, type DiffusersConfigs } from './detect.js';
import { DTYPE_BYTES, isFloatDType, type DType } from './dtypes.js';
import { mappedShape, type Transform } from './keymaps/apply.js';
import { canonicalLdmKey, COMPONENT_NAMES, diffusersToLdm, emaKeyOf, ldmToDiffusers, type ComponentName, type LdmLayout, type TextEncoderLayout } from './ldm-keys.js';
import { isConvFilter, oihwToHwio } from './layout.js';
import { readTorchCheckpoint, stateDict } from './torch-pickle.js';
import { SafetensorsFile, writeSafetensorsStreaming, type TensorData, type TensorEntry, type WritableDType } from './safetensors.js';

// =============================================================================================
// Tensor sources

/** A stored tensor, read on demand. */
export interface TensorRef {
  readonly dtype: DType;
  readonly shape: readonly number[];
  /** The stored bytes (little-endian, row-major), unchanged. */
  readRaw(): Promise<Uint8Array>;
  /** The values as float32 (exact for F32/F16/BF16). */
  readFloat32(): Promise<Float32Array>;
}

/** The tensors of one checkpoint file: names with dtype, shape and a lazy read. */
export interface TensorSource {
  readonly path: string;
  readonly format: 'safetensors' | 'pickle';
  readonly tensors: ReadonlyMap<string, TensorRef>;
  readonly metadata: Readonly<Record<string, string>>;
  close(): Promise<void>;
}

function safetensorsRef(f: SafetensorsFile, name: string): TensorRef {
  const info = f.info(name);
  return {
    dtype: info.dtype,
    shape: info.shape,
    readRaw: () => f.readRaw(name),
    readFloat32: () => f.readFloat32(name),
  };
}

async function openSafetensorsSource(file: string): Promise<TensorSource> {
  const f = await SafetensorsFile.open(file);
  return {
    path: file,
    format: 'safetensors',
    tensors: new Map(f.keys().map((k) => [k, safetensorsRef(f, k)])),
    metadata: f.metadata,
    close: () => f.close(),
  };
}

const PICKLE_EXTENSIONS = ['.ckpt', '.pt', '.pth', '.bin'];

/**
 * A PyTorch checkpoint through the safe pickle reader (nothing in it is executed). Its
 * `global_step`, when saved, is passed on as metadata: diffusers uses it to tell SD 2.x 512-base
 * (step 875000) from 768-v.
 */
async function openPickleSource(file: string): Promise<TensorSource> {
  const ckpt = await readTorchCheckpoint(file);
  try {
    const tensors: ReadonlyMap<string, TensorRef> = stateDict(ckpt);
    const step = ckpt.root instanceof Map ? ckpt.root.get('global_step') : undefined;
    const metadata: Record<string, string> = typeof step === 'number' || typeof step === 'bigint' ? { global_step: String(step) } : {};
    return { path: file, format: 'pickle', tensors, metadata, close: () => ckpt.close() };
  } catch (e) {
    await ckpt.close();
    throw e;
  }
}

/** Open a checkpoint file as a {@link TensorSource}: `.safetensors`, or a PyTorch pickle (`.ckpt`, `.pt`, `.pth`, `.bin`) read safely. */
export async function openTensorSource(file: string): Promise<TensorSource> {
  const ext = path.extname(file).toLowerCase();
  if (PICKLE_EXTENSIONS.includes(ext)) return openPickleSource(file);
  return openSafetensorsSource(file);
}

/** The same tensor under another shape (same element count, same bytes). */
function reshapedRef(ref: TensorRef, shape: readonly number[]): TensorRef {
  // Not a spread: refs may be class instances whose methods live on the prototype.
  return { dtype: ref.dtype, shape, readRaw: () => ref.readRaw(), readFloat32: () => ref.readFloat32() };
}

/** Row block `index` of `count` equal blocks of the first dimension. */
function rowBlockRef(ref: TensorRef, index: number, count: number): TensorRef {
  const [rows, ...rest] = ref.shape;
  if (rows === undefined || rows % count !== 0) {
    throw new Error(`cannot split a tensor of shape [${ref.shape.join(', ')}] into ${count} equal row blocks`);
  }
  const shape = [rows / count, ...rest];
  const elements = shape.reduce((a, b) => a * b, 1);
  return {
    dtype: ref.dtype,
    shape,
    readRaw: async () => {
      const bytes = elements * DTYPE_BYTES[ref.dtype];
      return (await ref.readRaw()).slice(index * bytes, (index + 1) * bytes);
    },
    readFloat32: async () => (await ref.readFloat32()).slice(index * elements, (index + 1) * elements),
  };
}

/** The tensor of the other naming, through a keymap transform (`from` = the side `ref` is on). */
function transformedRef(ref: TensorRef, transform: Transform, from: 'diffusers' | 'foreign'): TensorRef {
  if (transform.kind === 'split') {
    if (from !== 'foreign') throw new Error('a split is fused from its parts, not derived from one of them');
    return rowBlockRef(ref, transform.index, transform.count);
  }
  return transform.kind === 'identity' ? ref : reshapedRef(ref, mappedShape(ref.shape, transform, from));
}

/** Row blocks concatenated along the first dimension (OpenCLIP's fused q/k/v from diffusers' three). */
function fusedRef(parts: readonly TensorRef[]): TensorRef {
  const first = parts[0]!;
  if (parts.some((p) => p.dtype !== first.dtype || p.shape.join() !== first.shape.join())) {
    throw new Error('cannot fuse tensors of different dtypes or shapes');
  }
  const concat = <A extends Uint8Array | Float32Array>(arrays: A[], make: (n: number) => A): A => {
    const out = make(arrays.reduce((n, a) => n + a.length, 0));
    let at = 0;
    for (const a of arrays) {
      out.set(a, at);
      at += a.length;
    }
    return out;
  };
  return {
    dtype: first.dtype,
    shape: [first.shape[0]! * parts.length, ...first.shape.slice(1)],
    readRaw: async () => concat(await Promise.all(parts.map((p) => p.readRaw())), (n) => new Uint8Array(n)),
    readFloat32: async () => concat(await Promise.all(parts.map((p) => p.readFloat32())), (n) => new Float32Array(n)),
  };
}

// =============================================================================================
// Config sources: --config, sidecar yaml, diffusers folders

/** Configs from outside the weights, plus the tokenizer folder and pipeline index when they come from a diffusers folder. */
export interface ConfigSource {
  readonly hints: ConfigHints;
  readonly tokenizerDir?: string;
  readonly modelIndex?: Record<string, unknown>;
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

async function readJsonIfExists(file: string): Promise<Record<string, unknown> | undefined> {
  if ((await fs.stat(file).catch(() => undefined)) === undefined) return undefined;
  const json = await readJsonFile(file);
  if (!isRecord(json)) throw new Error(`${file}: expected a JSON object`);
  return json;
}

/**
 * Read `--config`: a diffusers folder (its component configs are used whole), an original LDM
 * inference yaml (`model.params…`: heads rule, linear projections, parameterization, schedule,
 * VAE scale, OpenCLIP layer), or a yaml/json of partial diffusers configs
 * `{unet: {...}, vae: {...}, text_encoder: {...}, scheduler: {...}}` merged over what shapes imply.
 */
export async function readConfigSource(target: string): Promise<ConfigSource> {
  const stat = await fs.stat(target).catch(() => undefined);
  if (stat === undefined) throw new Error(`${target}: config not found`);
  const origin = target;
  if (stat.isDirectory()) {
    const index = await readJsonIfExists(path.join(target, 'model_index.json'));
    const hints: ConfigHints = {
      origin,
      complete: true,
      ...definedEntries({
        unet: await readJsonIfExists(path.join(target, 'unet', 'config.json')),
        vae: await readJsonIfExists(path.join(target, 'vae', 'config.json')),
        text_encoder: await readJsonIfExists(path.join(target, 'text_encoder', 'config.json')),
        scheduler: await readJsonIfExists(path.join(target, 'scheduler', 'scheduler_config.json')),
      }),
    };
    if (hints.unet === undefined && hints.vae === undefined && hints.text_encoder === undefined) {
      throw new Error(`${target}: not a diffusers model folder (no unet/, vae/ or text_encoder/ config.json)`);
    }
    const tokenizerDir = path.join(target, 'tokenizer');
    const hasTokenizer = (await fs.stat(path.join(tokenizerDir, 'vocab.json')).catch(() => undefined)) !== undefined;
    return { hints, ...(hasTokenizer ? { tokenizerDir } : {}), ...(index ? { modelIndex: index } : {}) };
  }
  let doc: unknown;
  try {
    doc = parseYaml(await fs.readFile(target, 'utf8'));
  } catch (e) {
    throw new Error(`${target}: not valid YAML/JSON (${(e as Error).message})`);
  }
  if (!isRecord(doc)) throw new Error(`${target}: expected a mapping at the top level`);
  if (isRecord(doc.model) && isRecord(doc.model.params)) return { hints: hintsFromLdmConfig(doc.model.params, origin) };
  const allowed = ['unet', 'vae', 'text_encoder', 'scheduler'];
  const unknown = Object.keys(doc).filter((k) => !allowed.includes(k));
  if (unknown.length > 0) {
    throw new Error(`${target}: unknown top-level key(s) ${unknown.join(', ')}: expected an LDM config (model.params) or any of ${allowed.join(', ')}`);
  }
  for (const k of allowed) {
    if (doc[k] !== undefined && !isRecord(doc[k])) throw new Error(`${target}: '${k}' must be a mapping of diffusers config keys`);
  }
  return { hints: { origin, ...(doc as Pick<ConfigHints, 'unet' | 'vae' | 'text_encoder' | 'scheduler'>) } };
}

function definedEntries<T extends Record<string, unknown>>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>;
}

/** The values of an original LDM inference config (`v1-inference.yaml`, `v2-inference-v.yaml`, …) that weights cannot show. */
export function hintsFromLdmConfig(params: Record<string, unknown>, origin: string): ConfigHints {
  const num = (v: unknown): number | undefined => (typeof v === 'number' && Number.isFinite(v) ? v : undefined);
  const unetParams = isRecord(params.unet_config) && isRecord(params.unet_config.params) ? params.unet_config.params : {};
  const condParams = isRecord(params.cond_stage_config) && isRecord(params.cond_stage_config.params) ? params.cond_stage_config.params : {};
  const scheduler: Record<string, unknown> = {};
  const parameterization = params.parameterization;
  if (parameterization !== undefined) {
    const map: Record<string, PredictionType> = { eps: 'epsilon', v: 'v_prediction', x0: 'sample' };
    const p = typeof parameterization === 'string' ? map[parameterization] : undefined;
    if (p === undefined) throw new Error(`${origin}: model.params.parameterization ${JSON.stringify(parameterization)} is not eps, v or x0`);
    scheduler.prediction_type = p;
  }
  // LDM's "linear" schedule is linear in √β, i.e. diffusers' scaled_linear.
  const start = num(params.linear_start);
  const end = num(params.linear_end);
  if (start !== undefined) scheduler.beta_start = start;
  if (end !== undefined) scheduler.beta_end = end;
  const timesteps = num(params.timesteps);
  if (timesteps !== undefined) scheduler.num_train_timesteps = timesteps;
  const unet: Record<string, unknown> = {};
  const heads = num(unetParams.num_heads);
  const headWidth = num(unetParams.num_head_channels);
  const imageSize = num(unetParams.image_size);
  if (imageSize !== undefined) unet.sample_size = imageSize;
  if (typeof unetParams.use_linear_in_transformer === 'boolean') unet.use_linear_projection = unetParams.use_linear_in_transformer;
  const vae: Record<string, unknown> = {};
  const scale = num(params.scale_factor);
  if (scale !== undefined) vae.scaling_factor = scale;
  if (imageSize !== undefined) vae.sample_size = imageSize * 8;
  const layer = condParams.layer;
  return {
    origin,
    unet,
    vae,
    scheduler,
    ...(headWidth !== undefined && headWidth > 0 ? { unetHeads: { width: headWidth } } : heads !== undefined && heads > 0 ? { unetHeads: { count: heads } } : {}),
    ...(layer === 'last' || layer === 'penultimate' ? { openClipLayer: layer } : {}),
  };
}

/** `<file stem>.yaml` / `.yml` next to a checkpoint (the convention of the original repos and A1111). */
async function sidecarConfig(file: string): Promise<string | undefined> {
  const stem = file.slice(0, file.length - path.extname(file).length);
  for (const ext of ['.yaml', '.yml']) {
    if ((await fs.stat(stem + ext).catch(() => undefined))?.isFile()) return stem + ext;
  }
  return undefined;
}

// =============================================================================================
// Reading a single file

export interface SingleFileOptions {
  /** Load the UNet from the EMA weights (`model_ema.*`) instead of `model.diffusion_model.*`. */
  readonly ema?: boolean;
  readonly predictionType?: PredictionType;
  /** A diffusers folder, an LDM yaml, or partial diffusers configs (see {@link readConfigSource}); default: a sidecar `<stem>.yaml`. */
  readonly config?: string;
}

/** A model's components as diffusers-named lazy tensors, with configs. */
export interface ComponentTensors {
  /** diffusers key → tensor, per component. */
  readonly components: Readonly<Record<ComponentName, ReadonlyMap<string, TensorRef>>>;
  readonly configs: DiffusersConfigs;
  /** A tokenizer folder to copy (diffusers folders, `--config` folders); else the bundled vocabulary. */
  readonly tokenizerDir?: string;
  /** `tokenizer_config.json` / `special_tokens_map.json` contents to reproduce, if known. */
  readonly tokenizerFiles?: Readonly<Record<string, Record<string, unknown>>>;
  readonly modelIndex?: Record<string, unknown>;
  /** SD 1.x: transformers CLIP; SD 2.x: OpenCLIP (decides single-file names). */
  readonly textEncoderLayout: TextEncoderLayout;
  close(): Promise<void>;
}

export interface SingleFile extends ComponentTensors {
  readonly path: string;
  readonly detection: Detection;
  /** Every assumption and everything skipped, for people. */
  readonly notes: readonly string[];
}

/** Open a single-file checkpoint as diffusers-named components (nothing is read but headers and, if present, the DDPM betas). */
export async function readSingleFile(file: string, opts: SingleFileOptions = {}): Promise<SingleFile> {
  const source = await openTensorSource(file);
  try {
    return await mapSingleFile(source, opts);
  } catch (e) {
    await source.close();
    throw e;
  }
}

async function mapSingleFile(source: TensorSource, opts: SingleFileOptions): Promise<SingleFile> {
  const file = source.path;
  const notes: string[] = [];
  // 1. Configs from elsewhere: --config, else a sidecar yaml, else sdwb's own metadata (in detect).
  const configPath = opts.config ?? (await sidecarConfig(file));
  const configSource = configPath === undefined ? undefined : await readConfigSource(configPath);
  if (configPath !== undefined && opts.config === undefined) notes.push(`using the sidecar config ${configPath}`);
  const metadataConfigs = parseSdwbMetadata(source.metadata);

  // 2. Architecture and configs from the headers; the file must match them exactly.
  const headers = new Map([...source.tensors].map(([k, t]) => [k, { dtype: t.dtype, shape: t.shape }]));
  const detection = detectCheckpoint(headers, {
    metadata: source.metadata,
    ...(opts.predictionType !== undefined ? { predictionType: opts.predictionType } : {}),
    ...(configSource !== undefined ? { hints: configSource.hints } : {}),
  });
  notes.push(...detection.notes);
  const problems = checkProblems(detection);
  if (problems.length > 0) {
    const hint = configSource ? ` (with configs from ${configSource.hints.origin})` : '';
    throw new Error(`${file}: the tensors do not match the ${detection.architecture} configs${hint}: ${problems.join('; ')}`);
  }
  if (detection.absent.length > 0) {
    throw new Error(`${file}: no ${detection.absent.join(' or ')} in this file (${detection.architecture}); a full checkpoint is needed here`);
  }
  if (detection.unmapped.length > 0) {
    notes.push(`${detection.unmapped.length} tensor(s) outside the three models were skipped (first: ${detection.unmapped[0]})`);
  }

  // 3. Diffusers names, lazily; the UNet optionally from the EMA copies.
  const layout = detection.layout;
  const components: Record<ComponentName, Map<string, TensorRef>> = { unet: new Map(), vae: new Map(), text_encoder: new Map() };
  const useEma = opts.ema === true;
  if (useEma && !detection.ema.present) throw new Error(`${file}: --ema: the file has no EMA weights (model_ema.*)`);
  if (!useEma && detection.ema.present) notes.push(`the file also holds EMA weights (${detection.ema.tensors} tensors); --ema loads the UNet from those`);
  const missingEma: string[] = [];
  for (const [fileKey, ref] of source.tensors) {
    const key = canonicalLdmKey(fileKey);
    const hit = ldmToDiffusers(layout, key);
    if (hit === undefined) continue;
    let stored = ref;
    if (useEma && hit.component === 'unet') {
      const ema = source.tensors.get(emaKeyOf(key));
      if (ema === undefined || ema.shape.join() !== ref.shape.join()) {
        missingEma.push(key);
        continue;
      }
      stored = ema;
    }
    for (const m of hit.mapped) components[hit.component].set(m.key, transformedRef(stored, m.transform, 'foreign'));
  }
  if (missingEma.length > 0) {
    throw new Error(`${file}: --ema: ${missingEma.length} UNet weight(s) have no EMA copy of the same shape (first: ${missingEma[0]} → ${emaKeyOf(missingEma[0]!)})`);
  }
  if (useEma) notes.push('UNet weights from the EMA copies (model_ema.*)');

  // 4. The schedule the file was trained with, when it carries LDM's buffers.
  const betas = source.tensors.get('betas');
  const scheduler = detection.configs.scheduler;
  if (betas !== undefined && scheduler.trained_betas == null) {
    const mismatch = scheduleMismatch(await betas.readFloat32(), scheduler);
    if (mismatch !== undefined) notes.push(mismatch);
  }

  const tokenizerDir = configSource?.tokenizerDir;
  const modelIndex = configSource?.modelIndex ?? metadataConfigs?.model_index;
  return {
    path: file,
    detection,
    components,
    configs: detection.configs,
    textEncoderLayout: detection.textEncoderLayout,
    ...(tokenizerDir !== undefined ? { tokenizerDir } : {}),
    ...(metadataConfigs?.tokenizer_files !== undefined && configSource === undefined ? { tokenizerFiles: metadataConfigs.tokenizer_files } : {}),
    ...(modelIndex !== undefined ? { modelIndex } : {}),
    notes,
    close: () => source.close(),
  };
}

/** A note if the file's DDPM betas are not the schedule the scheduler config describes. */
function scheduleMismatch(betas: Float32Array, scheduler: Record<string, unknown>): string | undefined {
  const T = betas.length;
  const start = typeof scheduler.beta_start === 'number' ? scheduler.beta_start : SD_SCHEDULE.beta_start;
  const end = typeof scheduler.beta_end === 'number' ? scheduler.beta_end : SD_SCHEDULE.beta_end;
  if (scheduler.beta_schedule !== 'scaled_linear' || T !== scheduler.num_train_timesteps) return undefined;
  // scaled_linear: β_t = (√β₀ + t/(T−1)·(√β_T − √β₀))², as LDM's register_schedule computes it.
  const a = Math.sqrt(start);
  const b = Math.sqrt(end);
  for (let t = 0; t < T; t++) {
    const expected = (a + ((b - a) * t) / (T - 1)) ** 2;
    if (Math.abs(betas[t]! - expected) > 1e-6 * expected + 1e-9) {
      return (
        `the file's DDPM betas are not scaled_linear ${start}–${end} (β[${t}] = ${betas[t]}, expected ${expected.toPrecision(7)}): ` +
        'the scheduler config still assumes it; pass --config with the schedule the model was trained with'
      );
    }
  }
  return undefined;
}

interface SdwbMetadata {
  readonly model_index?: Record<string, unknown>;
  readonly tokenizer_files?: Record<string, Record<string, unknown>>;
}

function parseSdwbMetadata(metadata: Readonly<Record<string, string>>): SdwbMetadata | undefined {
  const text = metadata[SDWB_CONFIGS_METADATA_KEY];
  if (text === undefined) return undefined;
  try {
    const parsed: unknown = JSON.parse(text);
    if (!isRecord(parsed)) return undefined;
    const files = isRecord(parsed.tokenizer_files) ? (parsed.tokenizer_files as Record<string, Record<string, unknown>>) : undefined;
    return {
      ...(isRecord(parsed.model_index) ? { model_index: parsed.model_index } : {}),
      ...(files !== undefined ? { tokenizer_files: files } : {}),
    };
  } catch {
    return undefined;
  }
}

// =============================================================================================
// Loading for inference

/**
 * Load a single-file checkpoint for tfjs inference: the same structure `loadStableDiffusion`
 * returns for a diffusers folder.
 */
export async function loadSingleFile(file: string, opts: SingleFileOptions = {}): Promise<StableDiffusion> {
  const model = await readSingleFile(file, opts);
  // The same cross-component checks loadStableDiffusion makes for folders.
  const { unet: unetCfg, vae: vaeCfg, textEncoder: textCfg } = model.detection.parsed;
  if (unetCfg.contextDim[0] !== textCfg.width) {
    await model.close();
    throw new Error(`${file}: the UNet's context width ${unetCfg.contextDim[0]} does not match the text encoder's width ${textCfg.width}`);
  }
  if (unetCfg.inChannels !== vaeCfg.latentChannels) {
    await model.close();
    throw new Error(
      `${file}: ${model.detection.architecture}: the UNet takes ${unetCfg.inChannels} input channels, the VAE gives ${vaeCfg.latentChannels} (inpainting UNets are not supported by txt2img/img2img)`,
    );
  }
  const tfjs = await import('@tensorflow/tfjs');
  const { paramStore } = await import('./weights.js');
  const { modelHashOf } = await import('../pipeline/load.js');
  const loaded: tf.Tensor[] = [];
  try {
    const hash = modelHashOf([file]);
    const toTensors = async (refs: ReadonlyMap<string, TensorRef>): Promise<Map<string, tf.Tensor>> => {
      const out = new Map<string, tf.Tensor>();
      for (const [key, ref] of refs) {
        const data = await ref.readFloat32();
        const internal = isConvFilter(ref.shape) ? oihwToHwio(data, ref.shape) : { data, shape: [...ref.shape] };
        const t = tfjs.tensor(internal.data, internal.shape, 'float32');
        loaded.push(t);
        out.set(key, t);
      }
      return out;
    };
    const cfg = {
      unet: model.detection.parsed.unet,
      vae: model.detection.parsed.vae,
      text: model.detection.parsed.textEncoder,
    };
    const unet = await toTensors(model.components.unet);
    const vae = await toTensors(model.components.vae);
    const text = await toTensors(model.components.text_encoder);
    const tokenizer = model.tokenizerDir !== undefined ? await ClipTokenizer.fromDir(model.tokenizerDir) : await defaultTokenizer(model.detection.tokenizer);
    const sample = model.configs.unet.sample_size;
    const side = typeof sample === 'number' ? sample : Array.isArray(sample) ? Number(sample[1]) : 64;
    const height = Array.isArray(sample) ? Number(sample[0]) : side;
    const files = [path.resolve(file)];
    return {
      source: path.resolve(file),
      name: path.basename(file, path.extname(file)),
      modelHash: await hash,
      tokenizer,
      text: { cfg: cfg.text, store: paramStore(text, file), files },
      unet: { cfg: cfg.unet, store: paramStore(unet, file), files },
      vae: { cfg: cfg.vae, store: paramStore(vae, file), files },
      scheduler: parseSchedulerConfig(model.configs.scheduler, `${file} (scheduler)`),
      defaultSize: { width: side * cfg.vae.downscale, height: height * cfg.vae.downscale },
      sizeMultiple: cfg.vae.downscale * 2 ** (cfg.unet.blockChannels.length - 1),
    };
  } catch (e) {
    for (const t of loaded) t.dispose();
    throw e;
  } finally {
    await model.close();
  }
}

// =============================================================================================
// Diffusers folders as lazy tensors

/** Open a diffusers folder's UNet, VAE and text encoder as lazy tensors with their configs. */
export async function readDiffusersFolder(dir: string, opts: { variant?: string } = {}): Promise<ComponentTensors> {
  const index = await readModelIndex(dir);
  const files: SafetensorsFile[] = [];
  const closeAll = async () => {
    for (const f of files) await f.close();
  };
  try {
    const components: Record<ComponentName, Map<string, TensorRef>> = { unet: new Map(), vae: new Map(), text_encoder: new Map() };
    const configs: Partial<Record<keyof DiffusersConfigs, Record<string, unknown>>> = {};
    for (const name of COMPONENT_NAMES) {
      const entry = index.components.find((c) => c.name === name);
      if (entry === undefined) throw new Error(`${index.file}: no '${name}' component`);
      const config = await readJsonIfExists(path.join(entry.dir, 'config.json'));
      if (config === undefined) throw new Error(`${path.join(entry.dir, 'config.json')}: file not found`);
      configs[name] = config;
      for (const file of (await findWeightFiles(entry.dir, opts.variant)).files) {
        const f = await SafetensorsFile.open(file);
        files.push(f);
        for (const key of f.keys()) {
          if (name === 'text_encoder' && isClipTextBuffer(key)) continue;
          const renamed = name === 'vae' ? renameDeprecatedVaeAttentionKey(key) : key;
          // Old diffusers VAEs stored the mid attention as 1×1 convs too; the Linear shape is canonical.
          const ref = safetensorsRef(f, key);
          const shape = name === 'vae' && /mid_block\.attentions\.0\.to_(q|k|v|out\.0)\.weight$/.test(renamed) && ref.shape.length === 4 ? ref.shape.slice(0, 2) : ref.shape;
          components[name].set(renamed, reshapedRef(ref, shape));
        }
      }
    }
    const scheduler = await readJsonIfExists(path.join(dir, 'scheduler', 'scheduler_config.json'));
    if (scheduler === undefined) throw new Error(`${path.join(dir, 'scheduler', 'scheduler_config.json')}: file not found`);
    configs.scheduler = scheduler;
    const tokenizerDir = path.join(dir, 'tokenizer');
    const hasTokenizer = (await fs.stat(path.join(tokenizerDir, 'vocab.json')).catch(() => undefined)) !== undefined;
    const text = parseClipTextConfig(configs.text_encoder, path.join(dir, 'text_encoder', 'config.json'));
    const modelIndex = await readJsonIfExists(path.join(dir, 'model_index.json'));
    const tokenizerFiles: Record<string, Record<string, unknown>> = {};
    if (hasTokenizer) {
      for (const f of ['tokenizer_config.json', 'special_tokens_map.json']) {
        const json = await readJsonIfExists(path.join(tokenizerDir, f));
        if (json !== undefined) tokenizerFiles[f] = json;
      }
    }
    return {
      components,
      configs: configs as DiffusersConfigs,
      textEncoderLayout: textLayoutOf(text.activation),
      ...(hasTokenizer ? { tokenizerDir, tokenizerFiles } : {}),
      ...(modelIndex !== undefined ? { modelIndex } : {}),
      close: closeAll,
    };
  } catch (e) {
    await closeAll();
    throw e;
  }
}

/**
 * Which text-encoder naming a single file uses: OpenCLIP towers (SD 2.x) use GELU, OpenAI's CLIP
 * (SD 1.x) uses quick-GELU — the one config value that tells the two apart at any size.
 */
function textLayoutOf(activation: string): TextEncoderLayout {
  return activation === 'gelu' ? 'openclip' : 'clip';
}

// =============================================================================================
// Writing

/** Output precision: keep what is stored (F32/F16/BF16; anything else becomes F32), or convert. */
export type OutputDType = 'fp16' | 'fp32' | 'keep';

function outputDtype(stored: DType, wanted: OutputDType): WritableDType {
  if (!isFloatDType(stored)) throw new Error(`a ${stored} tensor in a model component: only float weights are converted`);
  if (wanted === 'fp16') return 'F16';
  if (wanted === 'fp32') return 'F32';
  return stored === 'F32' || stored === 'F16' || stored === 'BF16' ? stored : 'F32';
}

/** The data to write for `ref` as `dtype`: the stored bytes when the dtype is unchanged (bit-identical), else float32 values. */
async function dataFor(ref: TensorRef, dtype: WritableDType): Promise<TensorData> {
  if (ref.dtype === dtype) {
    const raw = await ref.readRaw();
    // A fresh copy is aligned for any typed-array view.
    const buffer = raw.byteOffset === 0 && raw.byteLength === raw.buffer.byteLength ? raw.buffer : raw.slice().buffer;
    return dtype === 'F32' ? new Float32Array(buffer) : new Uint16Array(buffer);
  }
  return ref.readFloat32();
}

/** Write tensors to one safetensors file (atomic), converting dtype as asked. */
async function writeTensors(
  file: string,
  tensors: ReadonlyMap<string, TensorRef>,
  dtype: OutputDType,
  metadata: Record<string, string>,
): Promise<void> {
  const entries: TensorEntry[] = [...tensors].map(([name, ref]) => ({ name, dtype: outputDtype(ref.dtype, dtype), shape: ref.shape }));
  await writeSafetensorsStreaming(file, entries, metadata, (name, entry) => dataFor(tensors.get(name)!, entry.dtype));
}

export interface WriteOptions {
  readonly dtype?: OutputDType;
}

/** The single-file layout of diffusers components (configs parsed and checked against the tensors). */
function layoutOf(model: ComponentTensors): LdmLayout {
  const unet = parseUnetConfig(model.configs.unet, 'unet config');
  const vae = parseVaeConfig(model.configs.vae, 'vae config');
  const text = parseClipTextConfig(model.configs.text_encoder, 'text_encoder config');
  return { unet, vae, textEncoder: { layout: model.textEncoderLayout, numLayers: text.numLayers } };
}

/**
 * Write diffusers components as one original-layout single file (atomically). The diffusers
 * configs, pipeline index and tokenizer settings go into `__metadata__` so converting back gives
 * the same folder; other tools ignore them.
 */
export async function writeSingleFile(out: string, model: ComponentTensors, opts: WriteOptions = {}): Promise<void> {
  const layout = layoutOf(model);
  const tensors = new Map<string, TensorRef>();
  const fused = new Map<string, TensorRef[]>();
  for (const component of COMPONENT_NAMES) {
    for (const [key, ref] of model.components[component]) {
      const m = diffusersToLdm(layout, component, key);
      if (m === undefined) throw new Error(`${component}: '${key}' has no single-file name (not a ${component} parameter of this config?)`);
      if (m.transform.kind === 'split') {
        const parts = fused.get(m.key) ?? new Array<TensorRef>(m.transform.count);
        parts[m.transform.index] = ref;
        fused.set(m.key, parts);
      } else {
        tensors.set(m.key, transformedRef(ref, m.transform, 'diffusers'));
      }
    }
  }
  for (const [key, parts] of fused) {
    if (parts.some((p) => p === undefined) || parts.length === 0) throw new Error(`'${key}': not every part of the fused tensor is present`);
    tensors.set(key, fusedRef(parts));
  }
  const stored = {
    ...model.configs,
    ...(model.modelIndex !== undefined ? { model_index: model.modelIndex } : {}),
    ...(model.tokenizerFiles !== undefined ? { tokenizer_files: model.tokenizerFiles } : {}),
  };
  await writeTensors(out, tensors, opts.dtype ?? 'keep', { format: 'pt', [SDWB_CONFIGS_METADATA_KEY]: JSON.stringify(stored) });
}

const PIPELINE_INDEX_BASE = {
  feature_extractor: [null, null],
  image_encoder: [null, null],
  requires_safety_checker: false,
  safety_checker: [null, null],
  text_encoder: ['transformers', 'CLIPTextModel'],
  tokenizer: ['transformers', 'CLIPTokenizer'],
  unet: ['diffusers', 'UNet2DConditionModel'],
  vae: ['diffusers', 'AutoencoderKL'],
};

/** tokenizer_config.json / special_tokens_map.json as transformers writes them for SD's CLIP tokenizer. */
function tokenizerSettings(padToken: string): Record<string, Record<string, unknown>> {
  const special = (content: string) => ({ content, lstrip: false, normalized: true, rstrip: false, single_word: false });
  return {
    'tokenizer_config.json': {
      added_tokens_decoder: {
        ...(padToken === '!' ? { '0': { ...special('!'), special: true } } : {}),
        '49406': { ...special('<|startoftext|>'), special: true },
        '49407': { ...special('<|endoftext|>'), special: true },
      },
      bos_token: '<|startoftext|>',
      clean_up_tokenization_spaces: true,
      do_lower_case: true,
      eos_token: '<|endoftext|>',
      errors: 'replace',
      model_max_length: 77,
      pad_token: padToken,
      tokenizer_class: 'CLIPTokenizer',
      unk_token: '<|endoftext|>',
    },
    'special_tokens_map.json': {
      bos_token: special('<|startoftext|>'),
      eos_token: special('<|endoftext|>'),
      pad_token: padToken === '!' ? special('!') : padToken,
      unk_token: special('<|endoftext|>'),
    },
  };
}

/** JSON as diffusers/transformers write it: two-space indent, sorted keys, trailing newline. */
function jsonText(value: Record<string, unknown>): string {
  const sort = (v: unknown): unknown =>
    Array.isArray(v) ? v.map(sort) : isRecord(v) ? Object.fromEntries(Object.keys(v).sort().map((k) => [k, sort(v[k])])) : v;
  return `${JSON.stringify(sort(value), null, 2)}\n`;
}

/** Write components as a diffusers folder at `out` (built in a temporary folder beside it, then renamed into place). */
export async function writeDiffusersFolder(out: string, model: ComponentTensors, opts: WriteOptions & { family?: 'sd1' | 'sd2'; overwrite?: boolean } = {}): Promise<void> {
  const target = path.resolve(out);
  const existing = await fs.stat(target).catch(() => undefined);
  if (existing !== undefined && !opts.overwrite) throw new Error(`${out}: already exists (choose another --out, or --overwrite)`);
  layoutOf(model); // validates the configs before anything is written
  const temporary = path.join(path.dirname(target), `.${path.basename(target)}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`);
  await fs.mkdir(temporary);
  try {
    const tensorsMetadata = { format: 'pt' };
    const write = async (rel: string, text: string) => {
      await fs.mkdir(path.dirname(path.join(temporary, rel)), { recursive: true });
      await fs.writeFile(path.join(temporary, rel), text);
    };
    for (const [component, configName, weights] of [
      ['unet', 'config.json', 'diffusion_pytorch_model.safetensors'],
      ['vae', 'config.json', 'diffusion_pytorch_model.safetensors'],
      ['text_encoder', 'config.json', 'model.safetensors'],
    ] as const) {
      await write(path.join(component, configName), jsonText(model.configs[component]));
      await writeTensors(path.join(temporary, component, weights), model.components[component], opts.dtype ?? 'keep', tensorsMetadata);
    }
    await write(path.join('scheduler', 'scheduler_config.json'), jsonText(model.configs.scheduler));
    const schedulerClass = typeof model.configs.scheduler._class_name === 'string' ? model.configs.scheduler._class_name : 'PNDMScheduler';
    const inpainting = model.configs.unet.in_channels === 9;
    const index = model.modelIndex ?? {
      _class_name: inpainting ? 'StableDiffusionInpaintPipeline' : 'StableDiffusionPipeline',
      ...PIPELINE_INDEX_BASE,
      scheduler: ['diffusers', schedulerClass],
    };
    await write('model_index.json', jsonText(index));
    // Tokenizer: the model's own folder, else the bundled vocabulary with SD 1.x/2.x padding.
    await fs.mkdir(path.join(temporary, 'tokenizer'));
    const sourceDir = model.tokenizerDir ?? (await defaultTokenizerDir());
    for (const f of ['vocab.json', 'merges.txt']) await fs.copyFile(path.join(sourceDir, f), path.join(temporary, 'tokenizer', f));
    const settings =
      model.tokenizerDir !== undefined
        ? undefined
        : (model.tokenizerFiles ?? tokenizerSettings((opts.family ?? (model.textEncoderLayout === 'openclip' ? 'sd2' : 'sd1')) === 'sd2' ? '!' : '<|endoftext|>'));
    if (settings !== undefined) {
      for (const [name, json] of Object.entries(settings)) await write(path.join('tokenizer', name), jsonText(json));
    } else {
      for (const f of ['tokenizer_config.json', 'special_tokens_map.json', 'added_tokens.json']) {
        const from = path.join(model.tokenizerDir!, f);
        if ((await fs.stat(from).catch(() => undefined)) !== undefined) await fs.copyFile(from, path.join(temporary, 'tokenizer', f));
      }
    }
    if (existing !== undefined) {
      const old = `${temporary}.old`;
      await fs.rename(target, old);
      await fs.rename(temporary, target);
      await fs.rm(old, { recursive: true, force: true });
    } else {
      await fs.rename(temporary, target);
    }
  } catch (e) {
    await fs.rm(temporary, { recursive: true, force: true }).catch(() => undefined);
    throw e;
  }
}

// =============================================================================================
// Conversions

export interface ConvertOptions extends SingleFileOptions, WriteOptions {
  readonly overwrite?: boolean;
}

/** Single file → diffusers folder. Returns the notes (assumptions made, tensors skipped). */
export async function convertSingleFileToDiffusers(input: string, out: string, opts: ConvertOptions = {}): Promise<readonly string[]> {
  const model = await readSingleFile(input, opts);
  try {
    await writeDiffusersFolder(out, model, { ...opts, family: model.detection.family });
    return model.notes;
  } finally {
    await model.close();
  }
}

/** Diffusers folder → single file. */
export async function convertDiffusersToSingleFile(input: string, out: string, opts: WriteOptions & { overwrite?: boolean } = {}): Promise<readonly string[]> {
  if (!opts.overwrite && (await fs.stat(out).catch(() => undefined)) !== undefined) {
    throw new Error(`${out}: already exists (choose another --out, or --overwrite)`);
  }
  const model = await readDiffusersFolder(input);
  try {
    await writeSingleFile(out, model, opts);
    const notes = [`text encoder written as ${model.textEncoderLayout === 'openclip' ? 'OpenCLIP (SD 2.x: cond_stage_model.model.*)' : 'CLIP (SD 1.x: cond_stage_model.transformer.*)'}`];
    if (model.textEncoderLayout === 'openclip') {
      notes.push('as diffusers does, only the layers the text encoder runs are written (no text_projection, no unused last resblock)');
    }
    return notes;
  } finally {
    await model.close();
  }
}

/** Whether `s` names a prediction type (for CLI parsing). */
export function isPredictionType(s: string): s is PredictionType {
  return (PREDICTION_TYPES as readonly string[]).includes(s);
}

