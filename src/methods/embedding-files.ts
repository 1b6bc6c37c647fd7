/**
 * Textual-inversion embedding files: the formats AUTOMATIC1111 and diffusers write and read.
 *
 * - A1111 `.pt` (its own trainer, `modules/textual_inversion/textual_inversion.py` `Embedding.save`):
 *   a torch pickle of `{string_to_token: {'*': 265}, string_to_param: {'*': FloatTensor[n, width]},
 *   name, step, sd_checkpoint, sd_checkpoint_name}`. A1111 invokes it by the file's stem.
 * - A1111 `.safetensors` (as kohya's sd-scripts and other trainers write it, and A1111 loads):
 *   one tensor `emb_params` [n, width]; invoked by the file's stem.
 * - diffusers `learned_embeds.safetensors` / `.bin` (`examples/textual_inversion`): one tensor
 *   keyed by the placeholder token, [n, width] since multi-vector support (older files, like the
 *   sd-concepts-library ones, hold a 1-D [width]); invoked by that token. A multi-vector one is
 *   used as the tokens `<t> <t>_1 … <t>_{n−1}`, as diffusers' loader expands it.
 * Both A1111 and diffusers load all of these; `loadEmbedding` reads them all back.
 */
import path from 'node:path';

import { SafetensorsFile, writeSafetensors } from '../io/safetensors.js';
import { PickleObject, readTorchCheckpoint, TorchTensorRef, type PickleValue } from '../io/torch-pickle.js';
import { writeTorchCheckpoint } from '../io/torch-save.js';

/** Where an embedding came from. */
export type EmbeddingFormat = 'a1111-pt' | 'a1111-safetensors' | 'diffusers-safetensors' | 'diffusers-bin';

/** An embedding read from a file. */
export interface Embedding {
  /** The word that invokes it: the stored token (diffusers) or the file's stem (A1111). */
  readonly token: string;
  /** Row-major [numVectors, width] float32. */
  readonly vectors: Float32Array;
  readonly numVectors: number;
  readonly width: number;
  readonly format: EmbeddingFormat;
  readonly file: string;
  /** Training steps, when the file records them (A1111). */
  readonly step?: number;
}

/** The tokens a multi-vector embedding occupies, diffusers' convention: `<t>`, `<t>_1`, … */
export function multiVectorTokens(token: string, numVectors: number): string[] {
  return Array.from({ length: numVectors }, (_, i) => (i === 0 ? token : `${token}_${i}`));
}

/** The A1111 trigger for a file: its name without the extension. */
export function fileStem(file: string): string {
  const base = path.basename(file);
  const dot = base.lastIndexOf('.');
  return dot > 0 ? base.slice(0, dot) : base;
}

/** What the writers need. */
export interface EmbeddingToSave {
  /** Row-major [numVectors, width]. */
  readonly vectors: Float32Array;
  readonly numVectors: number;
  readonly width: number;
}

function checkShape(e: EmbeddingToSave, file: string): void {
  if (!(e.numVectors >= 1 && e.width >= 1 && e.vectors.length === e.numVectors * e.width)) {
    throw new Error(`${file}: ${e.vectors.length} values for an embedding of ${e.numVectors} × ${e.width}`);
  }
}

/** Writes A1111's safetensors form: `emb_params` [n, width] (atomic), with provenance metadata. */
export async function saveA1111Safetensors(file: string, e: EmbeddingToSave, metadata: Readonly<Record<string, string>> = {}): Promise<void> {
  checkShape(e, file);
  await writeSafetensors(file, { emb_params: { dtype: 'F32', shape: [e.numVectors, e.width], data: e.vectors } }, metadata);
}

/** What A1111's `.pt` records besides the vectors. */
export interface A1111Info {
  /** The embedding's name (A1111 stores the file stem). */
  readonly name: string;
  readonly step: number;
  /** Short hash of the base checkpoint, or null. */
  readonly sdCheckpoint: string | null;
  /** Name of the base checkpoint, or null. */
  readonly sdCheckpointName: string | null;
}

/** Writes A1111's `.pt` (a torch pickle, atomic). */
export async function saveA1111Pt(file: string, e: EmbeddingToSave, info: A1111Info): Promise<void> {
  checkShape(e, file);
  await writeTorchCheckpoint(file, {
    string_to_token: { '*': 265 },
    // A1111 saves the trained tensor itself, which has requires_grad set.
    string_to_param: { '*': { dtype: 'float32', shape: [e.numVectors, e.width], data: e.vectors, requiresGrad: true } },
    name: info.name,
    step: info.step,
    sd_checkpoint: info.sdCheckpoint,
    sd_checkpoint_name: info.sdCheckpointName,
  });
}

/** Writes diffusers' `learned_embeds.safetensors`: `{token: [n, width]}` with `format: pt` metadata. */
export async function saveDiffusersEmbedding(file: string, token: string, e: EmbeddingToSave): Promise<void> {
  checkShape(e, file);
  await writeSafetensors(file, { [token]: { dtype: 'F32', shape: [e.numVectors, e.width], data: e.vectors } }, { format: 'pt' });
}

/**
 * Reads an embedding in any of the formats above (by content, not by name). `token` overrides the
 * trigger word.
 */
export async function loadEmbedding(file: string, opts: { readonly token?: string } = {}): Promise<Embedding> {
  const ext = path.extname(file).toLowerCase();
  const loaded = ext === '.safetensors' ? await readSafetensorsEmbedding(file) : await readPickledEmbedding(file);
  return opts.token === undefined ? loaded : { ...loaded, token: opts.token };
}

async function readSafetensorsEmbedding(file: string): Promise<Embedding> {
  const f = await SafetensorsFile.open(file);
  try {
    const keys = [...f.keys()];
    if (keys.includes('clip_l') || keys.includes('clip_g')) {
      throw new Error(`${file}: an SDXL embedding (clip_l/clip_g); only SD 1.x/2.x embeddings (one text encoder) are supported`);
    }
    if (keys.length !== 1) {
      throw new Error(`${file}: expected one embedding tensor ('emb_params' or the placeholder token), found ${keys.length}: ${keys.slice(0, 5).join(', ')}`);
    }
    const key = keys[0]!;
    const info = f.info(key);
    const { numVectors, width } = rowsOf(info.shape, `${file}: tensor '${key}'`);
    const vectors = await f.readFloat32(key);
    const a1111 = key === 'emb_params';
    return {
      token: a1111 ? fileStem(file) : key,
      vectors,
      numVectors,
      width,
      format: a1111 ? 'a1111-safetensors' : 'diffusers-safetensors',
      file,
    };
  } finally {
    await f.close();
  }
}

function rowsOf(shape: readonly number[], where: string): { numVectors: number; width: number } {
  if (shape.length === 1 && shape[0]! > 0) return { numVectors: 1, width: shape[0]! };
  if (shape.length === 2 && shape[0]! > 0 && shape[1]! > 0) return { numVectors: shape[0]!, width: shape[1]! };
  throw new Error(`${where} has shape [${shape.join(', ')}], expected [width] or [vectors, width]`);
}

function asRecord(v: PickleValue | undefined): ReadonlyMap<PickleValue, PickleValue> | undefined {
  if (v instanceof Map) return v;
  // torch 1.11 saved string_to_param as an nn.ParameterDict (A1111 reads its `_parameters`).
  if (v instanceof PickleObject && v.state instanceof Map) {
    const inner = v.state.get('_parameters');
    if (inner instanceof Map) return inner;
  }
  return undefined;
}

async function readPickledEmbedding(file: string): Promise<Embedding> {
  const ckpt = await readTorchCheckpoint(file);
  try {
    const root = asRecord(ckpt.root);
    if (root === undefined) throw new Error(`${file}: expected a dictionary of embeddings at the top level`);
    const params = root.get('string_to_param');
    if (params !== undefined) {
      const entries = [...(asRecord(params) ?? new Map<PickleValue, PickleValue>())];
      if (entries.length !== 1) {
        throw new Error(`${file}: string_to_param has ${entries.length} entries, expected 1 (A1111 embeddings hold one term)`);
      }
      const [key, value] = entries[0]!;
      if (!(value instanceof TorchTensorRef)) throw new Error(`${file}: string_to_param['${String(key)}'] is not a tensor`);
      const { numVectors, width } = rowsOf(value.shape, `${file}: string_to_param['${String(key)}']`);
      const step = root.get('step');
      return {
        token: fileStem(file),
        vectors: await value.readFloat32(),
        numVectors,
        width,
        format: 'a1111-pt',
        file,
        ...(typeof step === 'number' ? { step } : typeof step === 'bigint' ? { step: Number(step) } : {}),
      };
    }
    const entries = [...root];
    const [key, value] = entries[0] ?? [];
    if (entries.length !== 1 || typeof key !== 'string' || !(value instanceof TorchTensorRef)) {
      const keys = entries.map(([k]) => String(k)).slice(0, 5).join(', ');
      throw new Error(`${file}: neither an A1111 embedding (string_to_param) nor a diffusers one (one token → tensor); found keys ${keys}`);
    }
    const { numVectors, width } = rowsOf(value.shape, `${file}: '${key}'`);
    return {
      token: key === 'emb_params' ? fileStem(file) : key,
      vectors: await value.readFloat32(),
      numVectors,
      width,
      format: 'diffusers-bin',
      file,
    };
  } finally {
    await ckpt.close();
  }
}
