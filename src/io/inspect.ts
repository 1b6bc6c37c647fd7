/**
 * `sdwb inspect`: what a model folder or weights file holds, checked against the architecture its
 * configs imply — from safetensors headers alone, never reading tensor data.
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { COMPONENT_KINDS } from '../models/components.js';
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
  readonly format: 'diffusers-folder' | 'safetensors-file';
  /** Human-readable architecture, e.g. `SD 1.x`, read from configs or tensor shapes. */
  readonly architecture: string;
  readonly pipelineClass?: string;
  readonly components: readonly ComponentReport[];
  /** A single file's `__metadata__`. */
  readonly metadata?: Readonly<Record<string, string>>;
  readonly stats?: TensorStats;
  readonly problems: readonly string[];
}

/** Inspect a diffusers model folder or a `.safetensors` file. */
export async function inspectModel(target: string): Promise<InspectReport> {
  const stat = await fs.stat(target).catch(() => undefined);
  if (stat === undefined) throw new Error(`${target}: no such file or folder`);
  if (stat.isDirectory()) return inspectFolder(target);
  if (target.endsWith('.safetensors')) return inspectFile(target);
  throw new Error(
    `${target}: not a diffusers folder or a .safetensors file (.ckpt/.pt pickles are not read yet; convert to safetensors)`,
  );
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
  return {
    path: file,
    format: 'safetensors-file',
    architecture: architectureFromKeys(infos),
    components: [],
    metadata,
    stats: statsOf(infos.values()),
    problems: [],
  };
}
