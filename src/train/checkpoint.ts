/**
 * Training checkpoints: everything a run needs to continue bit for bit, in one folder
 * `checkpoint-<step>/` of the output folder.
 *
 *   trainable.safetensors   the trained variables (float32), by the method's names
 *   optimizer.safetensors   AdamW moments `m.<name>` / `v.<name>`; step counts in the metadata
 *   state.json              step, data position {epoch, index}, RNG state, skipped-step counters
 *   config.json             the resolved config the run used
 *   …                       the method's artifacts at that step (embeddings, LoRA files, …)
 *
 * Crash safety: the folder is assembled under a hidden temporary name and renamed into place
 * only when complete (files fsynced first), so a `checkpoint-<step>/` folder is always whole;
 * `kill -9` at any moment loses at most the steps since the previous checkpoint. Leftover
 * temporary folders are removed by the next run.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, open, readdir, readFile, rename, rm, stat, type FileHandle } from 'node:fs/promises';
import path from 'node:path';

import type { DataState } from '../data/image-folder.js';
import { writeFileAtomic } from '../io/atomic.js';
import { SafetensorsFile, writeSafetensors, type TensorToWrite } from '../io/safetensors.js';
import type { Artifact } from '../methods/types.js';
import type { OptimizerState } from './optimizer.js';
import type { RngState } from './rng-state.js';

/** Identifies the layout of state.json. */
export const CHECKPOINT_FORMAT = 'sd-workbench-checkpoint-v1';

const PREFIX = 'checkpoint-';
const TEMP_PREFIX = '.checkpoint-';

/** A float32 tensor as plain data. */
export interface SavedTensor {
  readonly shape: readonly number[];
  readonly data: Float32Array;
}

/** Counters of the non-finite guard, so a resumed run stops where the uninterrupted one would. */
export interface NonFiniteCounters {
  readonly skipped: number;
  readonly consecutive: number;
}

/** state.json. */
export interface CheckpointState {
  readonly format: typeof CHECKPOINT_FORMAT;
  /** Optimizer steps completed. */
  readonly step: number;
  readonly method: string;
  /** The next sample to draw (absent for methods without a dataset). */
  readonly data: DataState | null;
  readonly rng: RngState;
  readonly nonfinite: NonFiniteCounters;
  /** Wall-clock time of writing, ISO 8601 (informational). */
  readonly written: string;
}

/** What {@link writeCheckpoint} stores. */
export interface CheckpointContent {
  readonly state: Omit<CheckpointState, 'format' | 'written'>;
  readonly config: unknown;
  readonly trainable: ReadonlyMap<string, SavedTensor>;
  /** Optimizer state keyed by the same names as `trainable`. */
  readonly optimizer: OptimizerState;
  readonly artifacts: readonly Artifact[];
}

/** A checkpoint read back. */
export interface LoadedCheckpoint {
  readonly dir: string;
  readonly state: CheckpointState;
  readonly config: unknown;
  readonly trainable: ReadonlyMap<string, SavedTensor>;
  readonly optimizer: OptimizerState;
}

/** `checkpoint-<step>` (no padding, as diffusers/accelerate name them). */
export function checkpointName(step: number): string {
  return `${PREFIX}${step}`;
}

/** The step of a `checkpoint-<step>` folder name, or undefined for other names. */
export function checkpointStep(name: string): number | undefined {
  const m = /^checkpoint-(\d+)$/.exec(name);
  return m === null ? undefined : Number(m[1]);
}

/** Writes `checkpoint-<step>/` in `outputDir` atomically and returns its path. */
export async function writeCheckpoint(outputDir: string, content: CheckpointContent): Promise<string> {
  const step = content.state.step;
  const final = path.join(outputDir, checkpointName(step));
  const temp = path.join(outputDir, `${TEMP_PREFIX}${step}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`);
  await mkdir(temp, { recursive: true });
  try {
    // 1. Weights and optimizer moments.
    const metadata = { format: CHECKPOINT_FORMAT, method: content.state.method, step: String(step) };
    await writeSafetensors(path.join(temp, 'trainable.safetensors'), tensorsToWrite(content.trainable), metadata);
    const moments = new Map<string, SavedTensor>();
    for (const [name, t] of content.trainable) {
      const m = content.optimizer.m[name];
      const v = content.optimizer.v[name];
      if (m !== undefined) moments.set(`m.${name}`, { shape: t.shape, data: m });
      if (v !== undefined) moments.set(`v.${name}`, { shape: t.shape, data: v });
    }
    await writeSafetensors(path.join(temp, 'optimizer.safetensors'), tensorsToWrite(moments), {
      ...metadata,
      optimizer_step: String(content.optimizer.step),
      param_steps: JSON.stringify(content.optimizer.paramSteps),
    });
    // 2. The method's files at this step.
    for (const artifact of content.artifacts) await artifact.write(path.join(temp, artifact.file));
    // 3. Config and state last: their presence marks a complete folder even before the rename.
    await writeJson(path.join(temp, 'config.json'), content.config);
    const state: CheckpointState = { format: CHECKPOINT_FORMAT, ...content.state, written: new Date().toISOString() };
    await writeJson(path.join(temp, 'state.json'), state);
    await syncFolder(temp);
    // 4. Into place. A folder of the same step (a re-run from an earlier checkpoint) is replaced.
    if (await exists(final)) {
      const old = `${temp}.old`;
      await rename(final, old);
      await rename(temp, final);
      await rm(old, { recursive: true, force: true });
    } else {
      await rename(temp, final);
    }
    await syncFolder(outputDir);
    return final;
  } catch (e) {
    await rm(temp, { recursive: true, force: true }).catch(() => undefined);
    throw e;
  }
}

function tensorsToWrite(tensors: ReadonlyMap<string, SavedTensor>): Map<string, TensorToWrite> {
  return new Map([...tensors].map(([name, t]) => [name, { dtype: 'F32', shape: t.shape, data: t.data }]));
}

async function writeJson(file: string, value: unknown): Promise<void> {
  const bytes = Buffer.from(`${JSON.stringify(value, null, 2)}\n`, 'utf8');
  await writeFileAtomic(file, async (h: FileHandle) => {
    await h.writeFile(bytes);
  });
}

async function exists(p: string): Promise<boolean> {
  return (await stat(p).catch(() => undefined)) !== undefined;
}

// Makes renames inside `dir` durable. Best effort: not every platform can fsync a folder.
async function syncFolder(dir: string): Promise<void> {
  let h: FileHandle | undefined;
  try {
    h = await open(dir, 'r');
    await h.sync();
  } catch {
    // folders cannot be fsynced on some platforms; the data files themselves are synced
  } finally {
    await h?.close().catch(() => undefined);
  }
}

/** Steps of the complete checkpoints in `outputDir`, ascending. */
export async function listCheckpoints(outputDir: string): Promise<number[]> {
  const names = await readdir(outputDir).catch(() => [] as string[]);
  const steps: number[] = [];
  for (const name of names) {
    const step = checkpointStep(name);
    if (step !== undefined && (await exists(path.join(outputDir, name, 'state.json')))) steps.push(step);
  }
  return steps.sort((a, b) => a - b);
}

/** The newest complete checkpoint folder in `outputDir`, or undefined. */
export async function latestCheckpoint(outputDir: string): Promise<string | undefined> {
  const steps = await listCheckpoints(outputDir);
  const last = steps[steps.length - 1];
  return last === undefined ? undefined : path.join(outputDir, checkpointName(last));
}

/** Removes all but the newest `keep` checkpoints; returns the removed folders. */
export async function pruneCheckpoints(outputDir: string, keep: number): Promise<string[]> {
  const steps = await listCheckpoints(outputDir);
  const removed = steps.slice(0, Math.max(0, steps.length - keep)).map((s) => path.join(outputDir, checkpointName(s)));
  for (const dir of removed) await rm(dir, { recursive: true, force: true });
  return removed;
}

/**
 * Removes what a killed run left half-written in `outputDir`: temporary checkpoint folders and
 * the hidden `.<name>….tmp` files of atomic writes (call before a new run writes anything).
 */
export async function removeStaleTemporaries(outputDir: string): Promise<void> {
  const names = await readdir(outputDir).catch(() => [] as string[]);
  for (const name of names) {
    const tempFolder = name.startsWith(TEMP_PREFIX) && name.includes('.tmp-');
    const tempFile = name.startsWith('.') && name.endsWith('.tmp');
    if (tempFolder || tempFile) await rm(path.join(outputDir, name), { recursive: true, force: true });
  }
}

/** Reads a checkpoint folder written by {@link writeCheckpoint}. */
export async function readCheckpoint(dir: string): Promise<LoadedCheckpoint> {
  const stateFile = path.join(dir, 'state.json');
  const state = (await readJson(stateFile)) as CheckpointState;
  if (state === null || typeof state !== 'object' || state.format !== CHECKPOINT_FORMAT) {
    throw new Error(`${stateFile}: not an sd-workbench checkpoint (expected format '${CHECKPOINT_FORMAT}')`);
  }
  if (!Number.isSafeInteger(state.step) || state.step < 0) throw new Error(`${stateFile}: step must be a non-negative integer, found ${String(state.step)}`);
  const config = await readJson(path.join(dir, 'config.json'));
  const trainable = await readTensors(path.join(dir, 'trainable.safetensors'));
  const optimizerFile = path.join(dir, 'optimizer.safetensors');
  const moments = await readTensors(optimizerFile);
  const meta = await readMetadata(optimizerFile);
  const m: Record<string, Float32Array> = {};
  const v: Record<string, Float32Array> = {};
  for (const [key, t] of moments) {
    if (key.startsWith('m.')) m[key.slice(2)] = t.data;
    else if (key.startsWith('v.')) v[key.slice(2)] = t.data;
    else throw new Error(`${optimizerFile}: unexpected tensor '${key}' (expected m.<name> and v.<name>)`);
  }
  let paramSteps: Record<string, number>;
  let optimizerStep: number;
  try {
    paramSteps = JSON.parse(meta['param_steps'] ?? '') as Record<string, number>;
    optimizerStep = Number(meta['optimizer_step']);
  } catch {
    throw new Error(`${optimizerFile}: metadata lacks valid 'param_steps' / 'optimizer_step'`);
  }
  return { dir, state, config, trainable, optimizer: { step: optimizerStep, paramSteps, m, v } };
}

async function readJson(file: string): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    throw new Error(`${file}: cannot read (${(e as NodeJS.ErrnoException).code ?? String(e)}); is this a complete checkpoint folder?`);
  }
  try {
    return JSON.parse(text) as unknown;
  } catch (e) {
    throw new Error(`${file}: invalid JSON (${(e as Error).message})`);
  }
}

async function readTensors(file: string): Promise<Map<string, SavedTensor>> {
  const f = await SafetensorsFile.open(file);
  try {
    const out = new Map<string, SavedTensor>();
    for (const key of f.keys()) {
      const info = f.info(key);
      if (info.dtype !== 'F32') throw new Error(`${file}: tensor '${key}' is ${info.dtype}, expected F32`);
      out.set(key, { shape: [...info.shape], data: await f.readFloat32(key) });
    }
    return out;
  } finally {
    await f.close();
  }
}

async function readMetadata(file: string): Promise<Readonly<Record<string, string>>> {
  const f = await SafetensorsFile.open(file);
  try {
    return { ...f.metadata };
  } finally {
    await f.close();
  }
}
