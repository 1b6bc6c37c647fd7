import { promises as fs } from 'node:fs';
import path from 'node:path';
import { detectCheckpoint } from '../../io/detect.js';
import { ModelFolderError } from '../../io/diffusers.js';
import { openTensorSource } from '../../io/single-file.js';
import { ClipTokenizer, defaultTokenizer } from './tokenizer.js';

async function isFile(p: string): Promise<boolean> {
  return (await fs.stat(p).catch(() => undefined))?.isFile() ?? false;
}

/**
 * The tokenizer that goes with a model: a diffusers folder's `tokenizer/`, a tokenizer folder
 * itself, or — for a single-file checkpoint or no model at all — the CLIP vocabulary shipped with
 * the package, padded as the checkpoint's family expects (SD 2.x pads with `!`).
 */
export async function tokenizerForModel(model?: string): Promise<ClipTokenizer> {
  if (model === undefined) return defaultTokenizer('sd1');
  const stat = await fs.stat(model).catch(() => undefined);
  if (stat === undefined) throw new ModelFolderError(`${model}: no such file or folder`, model);
  if (stat.isFile()) return defaultTokenizer(await familyOfFile(model));
  if (await isFile(path.join(model, 'tokenizer', 'vocab.json'))) return ClipTokenizer.fromDir(path.join(model, 'tokenizer'));
  if (await isFile(path.join(model, 'vocab.json'))) return ClipTokenizer.fromDir(model);
  throw new ModelFolderError(`${model}: no tokenizer/vocab.json (not a diffusers model folder?)`, model);
}

/** The tokenizer family of a single-file checkpoint, read from its tensor headers only. */
async function familyOfFile(file: string): Promise<'sd1' | 'sd2'> {
  const source = await openTensorSource(file);
  try {
    const headers = new Map([...source.tensors].map(([k, t]) => [k, { dtype: t.dtype, shape: t.shape }]));
    return detectCheckpoint(headers, { metadata: source.metadata }).tokenizer;
  } finally {
    await source.close();
  }
}
