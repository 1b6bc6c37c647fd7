/**
 * User-supplied ONNX detector models: where they are looked for, what is said when one is missing,
 * and opening them in onnxruntime with their identity (file name and sha256) for the result files.
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import { homedir } from 'node:os';
import path from 'node:path';

import * as ort from 'onnxruntime-node';

import { DetectorModelMissingError } from './types.js';

/** Folder searched for detector models given without a path: `$SDWB_NUDENET_DIR`, else `~/.cache/sd-workbench/nudenet`. */
export function nudenetModelDir(): string {
  const env = process.env['SDWB_NUDENET_DIR'];
  return env !== undefined && env !== '' ? path.resolve(env) : path.join(homedir(), '.cache', 'sd-workbench', 'nudenet');
}

/** A configured model path resolved: absolute paths as given, bare file names inside {@link nudenetModelDir}. */
export function resolveDetectorModel(model: string): string {
  return path.isAbsolute(model) || model.includes('/') || model.includes('\\') ? path.resolve(model) : path.join(nudenetModelDir(), model);
}

/** An opened detector model: the session and what identifies the file. */
export interface OpenedModel {
  readonly file: string;
  readonly sha256: string;
  readonly session: ort.InferenceSession;
}

/**
 * Opens a detector's ONNX file; a missing file is a {@link DetectorModelMissingError} saying
 * what it is, why it is not bundled and where to put it.
 */
export async function openDetectorModel(file: string, what: { readonly name: string; readonly howToGet: string }, threads?: number): Promise<OpenedModel> {
  const info = await stat(file).catch(() => undefined);
  if (info === undefined || !info.isFile()) {
    throw new DetectorModelMissingError(
      `${what.name}: model file not found at ${file}. ${what.howToGet} Put it there (bare file names are looked up in ${nudenetModelDir()}, or set SDWB_NUDENET_DIR), or point the detector's \`model:\` at your copy.`,
    );
  }
  const sha256 = await new Promise<string>((resolve, reject) => {
    const h = createHash('sha256');
    createReadStream(file)
      .on('data', (chunk) => h.update(chunk))
      .on('end', () => resolve(h.digest('hex')))
      .on('error', reject);
  });
  let session: ort.InferenceSession;
  try {
    session = await ort.InferenceSession.create(file, {
      executionProviders: ['cpu'],
      intraOpNumThreads: threads ?? 1,
      interOpNumThreads: 1,
      graphOptimizationLevel: 'all',
    });
  } catch (e) {
    throw new Error(`${file}: onnxruntime cannot load this ${what.name} model (${e instanceof Error ? e.message.split('\n')[0] : String(e)})`);
  }
  return { file, sha256, session };
}

/** The declared shape of a session input or output (numbers, or names for symbolic dimensions). */
export function declaredShape(session: ort.InferenceSession, name: string, kind: 'input' | 'output'): readonly (number | string)[] | undefined {
  const list = kind === 'input' ? session.inputMetadata : session.outputMetadata;
  const meta = list.find((m) => m.name === name);
  return meta !== undefined && meta.isTensor ? meta.shape : undefined;
}

/** `<basename> sha256:<first 16 hex>` for version strings. */
export function modelIdentity(m: OpenedModel): string {
  return `${path.basename(m.file)} sha256:${m.sha256.slice(0, 16)}`;
}
