/**
 * Loading a whole Stable Diffusion pipeline from a diffusers folder for tfjs inference: tokenizer,
 * CLIP text encoder, UNet, VAE (weights in the internal layout, fp16 and sharded files included)
 * and the scheduler config.
 *
 * Every component's checkpoint is checked against the parameters its config implies (from the
 * safetensors headers, before any tensor data is read): missing, unexpected and wrong-shaped keys
 * are reported together in one error naming the file. After the first forward the pipeline also
 * checks that the model code read every weight (see `assertWeightsUsed`).
 */
import { createHash } from 'node:crypto';
import { createReadStream, promises as fs } from 'node:fs';
import path from 'node:path';
import type * as tf from '@tensorflow/tfjs';
import { findWeightFiles, ModelFolderError, readComponentConfig, readModelIndex, type ComponentEntry } from '../io/diffusers.js';
import { SafetensorsFile } from '../io/safetensors.js';
import { loadSafetensorsParams, paramStore } from '../io/weights.js';
import { clipTextManifest, vaeManifest } from '../models/components.js';
import { parseClipTextConfig, type ClipTextConfig } from '../models/clip/config.js';
import { isClipTextBuffer } from '../models/clip/text-encoder.js';
import { ClipTokenizer } from '../models/clip/tokenizer.js';
import { parseUnetConfig, type UnetConfig } from '../models/unet/config.js';
import { unetManifest } from '../models/unet/unet.js';
import { parseVaeConfig, type VaeConfig } from '../models/vae/config.js';
import { renameDeprecatedVaeAttentionKey } from '../models/vae/vae.js';
import { ParamError, type ParamStore } from '../ops/scope.js';
import { readSchedulerConfig, type SchedulerConfig } from '../schedulers/config.js';
import type { SingleFileOptions } from '../io/single-file.js';

/** One loaded model component: its translated config, its parameters and where they came from. */
export interface ModelPart<C> {
  readonly cfg: C;
  readonly store: ParamStore<tf.Tensor>;
  /** The safetensors files read, in shard order. */
  readonly files: readonly string[];
}

/** A Stable Diffusion 1.x/2.x pipeline ready for tfjs inference. */
export interface StableDiffusion {
  /** The model folder (absolute). */
  readonly source: string;
  /** The name A1111 records as `Model`: the folder's base name. */
  readonly name: string;
  /** A1111-style short hash (10 hex digits); see {@link modelHashOf}. */
  readonly modelHash: string;
  readonly tokenizer: ClipTokenizer;
  readonly text: ModelPart<ClipTextConfig>;
  readonly unet: ModelPart<UnetConfig>;
  readonly vae: ModelPart<VaeConfig>;
  readonly scheduler: SchedulerConfig;
  /** Image size the UNet was trained at: its `sample_size` × the VAE factor. */
  readonly defaultSize: { readonly width: number; readonly height: number };
  /**
   * Image width and height must be multiples of this: the VAE factor × 2^(UNet levels − 1), so
   * every UNet downsampling halves an even latent size.
   */
  readonly sizeMultiple: number;
}

/** What the sampling loop needs of a model: its UNet (a whole pipeline, or a bare UNet in benchmarks and methods). */
export type UnetModel = Pick<StableDiffusion, 'unet'>;

export interface LoadOptions {
  /** Weight variant to read (`fp16`); default: the plain weights, else an fp16 variant if it is the only one. */
  readonly variant?: string;
  /** For a single-file checkpoint: EMA weights, prediction type, config source (see `SingleFileOptions`). */
  readonly singleFile?: SingleFileOptions;
}

/** The components txt2img/img2img need, with the model class each must be. */
const REQUIRED: ReadonlyArray<readonly [string, string | undefined]> = [
  ['unet', 'UNet2DConditionModel'],
  ['vae', 'AutoencoderKL'],
  ['text_encoder', 'CLIPTextModel'],
  ['tokenizer', undefined],
  ['scheduler', undefined],
];

/** Load a diffusers Stable Diffusion folder (`save_pretrained` layout) for tfjs inference. */
export async function loadStableDiffusion(dir: string, opts: LoadOptions = {}): Promise<StableDiffusion> {
  const source = path.resolve(dir);
  // 1. The folder and its components.
  const stat = await fs.stat(source).catch(() => undefined);
  if (stat === undefined) throw new ModelFolderError(`${dir}: no such model folder`, dir);
  if (!stat.isDirectory()) {
    // A single-file checkpoint (original LDM layout, .safetensors or .ckpt): src/io/single-file.ts maps it.
    const { loadSingleFile } = await import('../io/single-file.js');
    return loadSingleFile(source, opts.singleFile ?? {});
  }
  const indexFile = path.join(source, 'model_index.json');
  if ((await fs.stat(indexFile).catch(() => undefined)) === undefined) {
    throw new ModelFolderError(`${dir}: not a diffusers model folder (no model_index.json)`, indexFile);
  }
  const index = await readModelIndex(source);
  const components = new Map<string, ComponentEntry>();
  for (const [name, className] of REQUIRED) {
    const entry = index.components.find((c) => c.name === name);
    if (entry === undefined) {
      throw new ModelFolderError(`${index.file}: no '${name}' component (txt2img needs ${REQUIRED.map(([n]) => n).join(', ')})`, index.file);
    }
    if (className !== undefined && entry.className !== className) {
      throw new ModelFolderError(`${index.file}: '${name}' is a ${entry.className}, expected ${className}`, index.file);
    }
    components.set(name, entry);
  }
  const dirOf = (name: string) => components.get(name)!.dir;

  // 2. Configs, then weight files checked against the architecture before any data is read.
  const unetConfigFile = path.join(dirOf('unet'), 'config.json');
  const unetJson = await readComponentConfig(dirOf('unet'));
  const unetCfg = parseUnetConfig(unetJson, unetConfigFile);
  const vaeCfg = parseVaeConfig(await readComponentConfig(dirOf('vae')), path.join(dirOf('vae'), 'config.json'));
  const textCfg = parseClipTextConfig(await readComponentConfig(dirOf('text_encoder')), path.join(dirOf('text_encoder'), 'config.json'));
  const scheduler = await readSchedulerConfig(dirOf('scheduler'));
  const tokenizer = await ClipTokenizer.fromDir(dirOf('tokenizer'));
  if (unetCfg.contextDim[0] !== textCfg.width) {
    throw new ModelFolderError(
      `${unetConfigFile}: cross_attention_dim ${unetCfg.contextDim[0]} does not match the text encoder's hidden_size ${textCfg.width}`,
      unetConfigFile,
    );
  }
  if (unetCfg.inChannels !== vaeCfg.latentChannels) {
    throw new ModelFolderError(
      `${unetConfigFile}: in_channels ${unetCfg.inChannels} does not match the VAE's latent_channels ${vaeCfg.latentChannels} (inpainting UNets are not supported by txt2img/img2img)`,
      unetConfigFile,
    );
  }

  const unetFiles = (await findWeightFiles(dirOf('unet'), opts.variant)).files;
  const vaeFiles = (await findWeightFiles(dirOf('vae'), opts.variant)).files;
  const textFiles = (await findWeightFiles(dirOf('text_encoder'), opts.variant)).files;
  const keepText = (key: string) => (isClipTextBuffer(key) ? undefined : key);
  await checkAgainstManifest(unetFiles, unetManifest(unetCfg));
  await checkAgainstManifest(vaeFiles, vaeManifest(vaeCfg), renameDeprecatedVaeAttentionKey);
  await checkAgainstManifest(textFiles, clipTextManifest(textCfg), keepText);

  // 3. Tensors (the hash streams the UNet file alongside).
  const hash = modelHashOf(unetFiles);
  const loaded: tf.Tensor[] = [];
  try {
    const unetTensors = await loadSafetensorsParams(unetFiles);
    loaded.push(...unetTensors.values());
    const vaeTensors = await loadSafetensorsParams(vaeFiles, { rename: renameDeprecatedVaeAttentionKey });
    loaded.push(...vaeTensors.values());
    const textTensors = await loadSafetensorsParams(textFiles, { rename: keepText });
    loaded.push(...textTensors.values());
    const modelHash = await hash;
    const sampleSize = readSampleSize(unetJson);
    return {
      source,
      name: path.basename(source),
      modelHash,
      tokenizer,
      text: { cfg: textCfg, store: paramStore(textTensors, textFiles.join(', ')), files: textFiles },
      unet: { cfg: unetCfg, store: paramStore(unetTensors, unetFiles.join(', ')), files: unetFiles },
      vae: { cfg: vaeCfg, store: paramStore(vaeTensors, vaeFiles.join(', ')), files: vaeFiles },
      scheduler,
      defaultSize: { width: sampleSize.width * vaeCfg.downscale, height: sampleSize.height * vaeCfg.downscale },
      sizeMultiple: vaeCfg.downscale * 2 ** (unetCfg.blockChannels.length - 1),
    };
  } catch (e) {
    for (const t of loaded) t.dispose();
    await hash.catch(() => undefined);
    throw e;
  }
}

/** Free every weight tensor of a loaded pipeline. */
export function disposeStableDiffusion(model: StableDiffusion): void {
  for (const part of [model.text, model.unet, model.vae]) {
    for (const key of part.store.keys()) part.store.get(key)?.dispose();
  }
}

/**
 * The short model hash: the first 10 hex digits of the sha256 of the weight bytes, streamed.
 * For a single-file checkpoint this is A1111's (new-style) "Model hash"; a diffusers folder has no
 * such file, so we hash the UNet's weight file(s) — the component fine-tunes change — with shards
 * concatenated in shard order. Different from A1111's value for the same weights as one file.
 */
export async function modelHashOf(files: readonly string[]): Promise<string> {
  const hash = createHash('sha256');
  for (const file of files) {
    for await (const chunk of createReadStream(file, { highWaterMark: 1 << 22 })) hash.update(chunk as Buffer);
  }
  return hash.digest('hex').slice(0, 10);
}

/**
 * Checks that the checkpoint `files` hold exactly the parameters `manifest` (PyTorch-layout
 * shapes) lists, reading headers only. Keys go through `rename` first (undefined: skip the key).
 */
export async function checkAgainstManifest(
  files: readonly string[],
  manifest: ReadonlyMap<string, readonly number[]>,
  rename: (key: string) => string | undefined = (k) => k,
): Promise<void> {
  const found = new Map<string, readonly number[]>();
  for (const file of files) {
    const f = await SafetensorsFile.open(file);
    try {
      for (const key of f.keys()) {
        const name = rename(key);
        if (name !== undefined) found.set(name, f.info(key).shape);
      }
    } finally {
      await f.close();
    }
  }
  const missing = [...manifest.keys()].filter((k) => !found.has(k));
  const unexpected = [...found.keys()].filter((k) => !manifest.has(k));
  const wrongShape = [...manifest].filter(([k, s]) => {
    const got = found.get(k);
    return got !== undefined && !(got.length === s.length && got.every((d, i) => d === s[i]));
  });
  if (missing.length + unexpected.length + wrongShape.length === 0) return;
  const list = (keys: readonly string[]) => (keys.length > 8 ? `${keys.slice(0, 8).join(', ')}, … (${keys.length} in all)` : keys.join(', '));
  const parts: string[] = [];
  if (missing.length > 0) parts.push(`${missing.length} missing: ${list(missing)}`);
  if (unexpected.length > 0) parts.push(`${unexpected.length} unexpected: ${list(unexpected)}`);
  if (wrongShape.length > 0) {
    const shown = wrongShape.map(([k, s]) => `${k} expected [${s.join(', ')}] found [${found.get(k)!.join(', ')}]`);
    parts.push(`${wrongShape.length} with the wrong shape: ${list(shown)}`);
  }
  throw new ParamError(`${files.join(', ')}: weights do not match the config: ${parts.join('; ')}`);
}

/** Checks already passed, per store: the check runs once per store and part (`what`). */
const verified = new WeakMap<ParamStore<tf.Tensor>, Set<string>>();

/**
 * The strict check after a component's first forward: every weight `isChecked` selects was read.
 * Throws a {@link ParamError} listing the unused keys.
 */
export function assertWeightsUsed(store: ParamStore<tf.Tensor>, what: string, isChecked: (key: string) => boolean = () => true): void {
  const done = verified.get(store) ?? new Set<string>();
  if (done.has(what)) return;
  const unused = store.unusedKeys().filter(isChecked);
  if (unused.length > 0) {
    throw new ParamError(`${store.source}: ${unused.length} ${what} weight(s) never used by the model: ${unused.join(', ')}`);
  }
  done.add(what);
  verified.set(store, done);
}

/** The UNet's `sample_size` (an int, or [height, width]) from its raw config; SD 1.x's 64 if absent. */
function readSampleSize(json: unknown): { width: number; height: number } {
  const raw = typeof json === 'object' && json !== null ? (json as Record<string, unknown>)['sample_size'] : undefined;
  if (typeof raw === 'number' && Number.isInteger(raw) && raw > 0) return { width: raw, height: raw };
  if (Array.isArray(raw) && raw.length === 2 && raw.every((v) => typeof v === 'number' && Number.isInteger(v) && v > 0)) {
    return { height: raw[0] as number, width: raw[1] as number };
  }
  return { width: 64, height: 64 };
}
