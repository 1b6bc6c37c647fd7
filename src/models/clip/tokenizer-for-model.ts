import { promises as fs } from 'node:fs';
import path from 'node:path';
import { ModelFolderError } from '../../io/diffusers.js';
import { ClipTokenizer, defaultTokenizer } from './tokenizer.js';

async function isFile(p: string): Promise<boolean> {
  return (await fs.stat(p).catch(() => undefined))?.isFile() ?? false;
}

/**
 * The tokenizer that goes with a model: a diffusers folder's `tokenizer/`, a tokenizer folder
 * itself, or — for a single-file checkpoint or no model at all — the CLIP vocabulary shipped with
 * the package (SD 1.x padding).
 */
export async function tokenizerForModel(model?: string): Promise<ClipTokenizer> {
  if (model === undefined) return defaultTokenizer('sd1');
  const stat = await fs.stat(model).catch(() => undefined);
  if (stat === undefined) throw new ModelFolderError(`${model}: no such file or folder`, model);
  if (stat.isFile()) return defaultTokenizer('sd1');
  if (await isFile(path.join(model, 'tokenizer', 'vocab.json'))) return ClipTokenizer.fromDir(path.join(model, 'tokenizer'));
  if (await isFile(path.join(model, 'vocab.json'))) return ClipTokenizer.fromDir(model);
  throw new ModelFolderError(`${model}: no tokenizer/vocab.json (not a diffusers model folder?)`, model);
}
