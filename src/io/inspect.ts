/**
 * `sdwb inspect`: what a model folder or weights file holds, checked against the architecture its
 * configs imply — from safetensors headers alone, never reading tensor data.
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { COMPONENT_KINDS } from '../models/components.js';
import { checkProblems, detectCheckpoint, UnsupportedModelError, type Detection } from './detect.js';
import { DTYPE_BYTES } from './dtypes.js';
import { COMPONENT_NAMES } from './ldm-keys.js';
import { openTensorSource } from './single-file.js';
import { findWeightFiles, readComponentConfig, readModelIndex } from './diffusers.js';
import { SafetensorsFile, type TensorInfo } from './safetensors.js';

export interface TensorStats {
  readonly tensors: number;
  readonly parameters: number;
  readonly bytes: number;
  /** dtype → number of tensors stored in it. */
  readonly dtypes: Record<string, number>;
}

export interface ShapeMismatch {
  readonly key: string;
  readonly expected: readonly number[];
  readonly found: readonly number[];
}

export interface ComponentReport {
  readonly name: string;
  readonly className: string;
  readonly library: string;
  readonly weightFiles: readonly string[];
  readonly variant?: string;
  /** The validated config, as the workbench reads it (absent when it failed validation). */
  readonly config?: unknown;
  readonly stats?: TensorStats;
  /** Parameters the config implies that the weights lack. */
  readonly missingKeys: readonly string[];
  /** Tensors in the weights that the architecture does not use (buffers excluded). */
  readonly unexpectedKeys: readonly string[];
  readonly shapeMismatches: readonly ShapeMismatch[];
  readonly problems: readonly string[];
}

export interface InspectReport {
  readonly path: string;
  readonly format: 'diffusers-folder' | 'safetensors-file' | 'pickle-file';
  /** Human-readable architecture, e.g. `SD 1.x`, read from configs or tensor shapes. */
  readonly architecture: string;
  readonly pipelineClass?: string;
  readonly components: readonly ComponentReport[];
  /** A single file's `__metadata__`. */
  readonly metadata?: Readonly<Record<string, string>>;
  /** Single files: assumptions made reading the configs from shapes, EMA presence, skipped keys. */
  readonly notes?: readonly string[];
  readonly stats?: TensorStats;
  readonly problems: readonly string[];
}

/** Inspect a diffusers model folder or a `.safetensors` file. */
export async function inspectModel(target: string): Promise<InspectReport> {
  const stat = await fs.stat(target).catch(() => undefined);
  if (stat === undefined) throw new Error(`${target}: no such file or folder`);
  if (stat.isDirectory()) return inspectFolder(target);
  if (target.endsWith('.safetensors')) return inspectFile(target);
  if (/\.(ckpt|pt|pth)$/i.test(target)) return inspectPickle(target);
  throw new Error(`${target}: not a diffusers folder, a .safetensors file or a .ckpt/.pt/.pth checkpoint`);
}

async function headersOf(files: readonly string[]): Promise<{ infos: Map<string, TensorInfo>; metadata: Record<string, string> }> {
  const infos = new Map<string, TensorInfo>();
  let metadata: Record<string, string> = {};
  for (const file of files) {
    const f = await SafetensorsFile.open(file);
    try {
      metadata = { ...metadata, ...f.metadata };
      for (const [k, info] of f.tensors) {
        if (infos.has(k)) throw new Error(`${file}: tensor '${k}' also appears in another shard`);
        infos.set(k, info);
      }
    } finally {
      await f.close();
    }
  }
  return { infos, metadata };
}

function statsOf(infos: Iterable<TensorInfo>): TensorStats {
  let tensors = 0;
  let parameters = 0;
  let bytes = 0;
  const dtypes: Record<string, number> = {};
  for (const info of infos) {
    tensors++;
    parameters += info.shape.reduce((a, b) => a * b, 1);
    bytes += info.end - info.start;
    dtypes[info.dtype] = (dtypes[info.dtype] ?? 0) + 1;
  }
  return { tensors, parameters, bytes, dtypes };
}

async function inspectFolder(dir: string): Promise<InspectReport> {
  const index = await readModelIndex(dir);
  const components: ComponentReport[] = [];
  for (const c of index.components) components.push(await inspectComponent(c.name, c.library, c.className, c.dir));
  const problems = components.flatMap((c) => c.problems.map((p) => `${c.name}: ${p}`));
  const unet = components.find((c) => c.className === 'UNet2DConditionModel');
  return {
    path: dir,
    format: 'diffusers-folder',
    architecture: architectureFromUnetConfig(unet?.config),
    pipelineClass: index.pipelineClass,
    components,
    problems,
  };
}

async function inspectComponent(name: string, library: string, className: string, dir: string): Promise<ComponentReport> {
  const base = { name, className, library };
  const problems: string[] = [];
  const kind = COMPONENT_KINDS.get(className);
  // Tokenizers and schedulers have no weights; they are described by their configs elsewhere.
  if (name === 'tokenizer' || name === 'scheduler' || name === 'feature_extractor') {
    return { ...base, weightFiles: [], missingKeys: [], unexpectedKeys: [], shapeMismatches: [], problems };
  }
  let weights: Awaited<ReturnType<typeof findWeightFiles>>;
  let infos: Map<string, TensorInfo>;
  try {
    weights = await findWeightFiles(dir);
    infos = (await headersOf(weights.files)).infos;
  } catch (e) {
    problems.push((e as Error).message);
    return { ...base, weightFiles: [], missingKeys: [], unexpectedKeys: [], shapeMismatches: [], problems };
  }
  const report = {
    ...base,
    weightFiles: weights.files.map((f) => path.relative(path.dirname(dir), f)),
    ...(weights.variant ? { variant: weights.variant } : {}),
    stats: statsOf(infos.values()),
  };
  if (kind === undefined) {
    problems.push(`component class '${className}' is not supported by the workbench (weights listed, not checked)`);
    return { ...report, missingKeys: [], unexpectedKeys: [], shapeMismatches: [], problems };
  }
  let parsed;
  try {
    const configFile = path.join(dir, 'config.json');
    parsed = kind.parse(await readComponentConfig(dir), configFile);
  } catch (e) {
    problems.push((e as Error).message.replace(/\n\s*/g, '; '));
    return { ...report, missingKeys: [], unexpectedKeys: [], shapeMismatches: [], problems };
  }
  const manifest = parsed.manifest();
  const missingKeys = [...manifest.keys()].filter((k) => !infos.has(k));
  const unexpectedKeys = [...infos.keys()].filter((k) => !manifest.has(k) && !kind.isBuffer(k));
  const shapeMismatches: ShapeMismatch[] = [];
  for (const [key, expected] of manifest) {
    const found = infos.get(key)?.shape;
    if (found && (found.length !== expected.length || found.some((d, i) => d !== expected[i]))) {
      shapeMismatches.push({ key, expected, found });
    }
  }
  if (missingKeys.length > 0) problems.push(`${missingKeys.length} parameters missing (first: ${missingKeys[0]})`);
  if (unexpectedKeys.length > 0) problems.push(`${unexpectedKeys.length} unexpected tensors (first: ${unexpectedKeys[0]})`);
  for (const m of shapeMismatches.slice(0, 3)) {
    problems.push(`'${m.key}' has shape [${m.found.join(', ')}], config implies [${m.expected.join(', ')}]`);
  }
  return { ...report, config: parsed.config, missingKeys, unexpectedKeys, shapeMismatches, problems };
}

/** Family of a diffusers UNet from its validated config (cross-attention width is the tell). */
function architectureFromUnetConfig(cfg: unknown): string {
  if (typeof cfg !== 'object' || cfg === null) return 'unknown (no readable UNet config)';
  const c = cfg as { contextDim?: readonly number[]; inChannels?: number; blockChannels?: readonly number[] };
  const width = c.contextDim?.[0];
  const inpaint = c.inChannels === 9 ? ' inpainting' : '';
  if (width === 768 && c.blockChannels?.[0] === 320) return `SD 1.x${inpaint}`;
  if (width === 1024 && c.blockChannels?.[0] === 320) return `SD 2.x${inpaint}`;
  return `SD-style UNet (custom size: block channels [${c.blockChannels?.join(', ') ?? '?'}], context width ${width ?? '?'})${inpaint}`;
}

/** Family of a single file from its tensor names and shapes. */
function architectureFromKeys(infos: ReadonlyMap<string, TensorInfo>): string {
  const ldmKV = infos.get('model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight');
  if (ldmKV) {
    const width = ldmKV.shape[1];
    if (width === 768) return 'SD 1.x (original single-file layout)';
    if (width === 1024) return 'SD 2.x (original single-file layout)';
    return `SD-style (original single-file layout, context width ${width})`;
  }
  if (infos.has('conv_in.weight') && [...infos.keys()].some((k) => k.startsWith('down_blocks.'))) {
    return 'diffusers component weights (UNet or VAE)';
  }
  if (infos.has('text_model.embeddings.token_embedding.weight')) return 'CLIP text encoder weights (transformers layout)';
  return 'unknown';
}

async function inspectFile(file: string): Promise<InspectReport> {
  const { infos, metadata } = await headersOf([file]);
  return describeSingleFile(file, 'safetensors-file', infos, metadata);
}

/** A PyTorch checkpoint through the safe pickle reader: the same report from its tensor list. */
async function inspectPickle(file: string): Promise<InspectReport> {
  const source = await openTensorSource(file);
  try {
    const infos = new Map<string, TensorInfo>();
    for (const [name, t] of source.tensors) {
      infos.set(name, { name, dtype: t.dtype, shape: t.shape, start: 0, end: t.shape.reduce((a, b) => a * b, 1) * DTYPE_BYTES[t.dtype] });
    }
    return describeSingleFile(file, 'pickle-file', infos, source.metadata);
  } finally {
    await source.close();
  }
}

/** Architecture, per-component counts and dtypes, EMA and skipped keys of a single-file checkpoint, from its tensor list. */
function describeSingleFile(
  file: string,
  format: 'safetensors-file' | 'pickle-file',
  infos: ReadonlyMap<string, TensorInfo>,
  metadata: Readonly<Record<string, string>>,
): InspectReport {
  const base = { path: file, format, metadata, stats: statsOf(infos.values()) };
  let detection: Detection;
  try {
    detection = detectCheckpoint(infos, { metadata });
  } catch (e) {
    if (!(e instanceof Error)) throw e;
    const what = e instanceof UnsupportedModelError ? e.architecture : 'unknown';
    // Files that are not single-file checkpoints at all (component weights, …) keep the plain key-based description.
    const isCheckpoint = [...infos.keys()].some((k) => k.startsWith('model.diffusion_model.'));
    if (!isCheckpoint && ['diffusers component', 'CLIP text encoder', 'VAE', 'unknown'].includes(what)) {
      return { ...base, architecture: architectureFromKeys(infos), components: [], problems: [] };
    }
    const architecture = what === 'unknown' ? architectureFromKeys(infos) : `${what} (not supported yet)`;
    return { ...base, architecture, components: [], problems: [e.message.replace(/\n\s*/g, '; ')] };
  }
  const classes = { unet: ['diffusers', 'UNet2DConditionModel'], vae: ['diffusers', 'AutoencoderKL'], text_encoder: ['transformers', 'CLIPTextModel'] } as const;
  const parsed = { unet: detection.parsed.unet, vae: detection.parsed.vae, text_encoder: detection.parsed.textEncoder };
  const components: ComponentReport[] = COMPONENT_NAMES.map((name) => {
    const c = detection.checks[name];
    return {
      name,
      library: classes[name][0],
      className: classes[name][1],
      weightFiles: [path.basename(file)],
      config: parsed[name],
      stats: { tensors: c.tensors, parameters: c.parameters, bytes: c.bytes, dtypes: c.dtypes },
      missingKeys: c.missing,
      unexpectedKeys: c.unexpected,
      shapeMismatches: c.wrongShape.map((w) => ({ key: w.key, expected: w.expected, found: w.found })),
      problems: detection.absent.includes(name) ? [`not in this file`] : [],
    };
  });
  const notes = [...detection.notes];
  notes.push(detection.ema.present ? `EMA weights present (${detection.ema.tensors} tensors; load them with --ema)` : 'no EMA weights');
  if (detection.ignored.length > 0) notes.push(`${detection.ignored.length} non-weight key(s) ignored (first: ${detection.ignored[0]!.key}: ${detection.ignored[0]!.reason})`);
  if (detection.unmapped.length > 0) notes.push(`${detection.unmapped.length} key(s) belong to no component (first: ${detection.unmapped[0]})`);
  return {
    ...base,
    architecture: `${detection.architecture} (original single-file layout)`,
    components,
    notes,
    problems: [...checkProblems(detection), ...detection.absent.map((c) => `${c}: not in this file`)],
  };
}
