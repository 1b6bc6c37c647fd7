/**
 * The text encoder bound to tfjs, for callers that just want states from token ids: load a
 * model folder's `text_encoder/` and encode. Kept apart from `text-encoder.ts` so the model
 * definition itself imports no tfjs value (the ONNX recorder runs it without tfjs).
 *
 * Only the plain layout (`config.json` + `model.safetensors`) is read here; sharded and fp16
 * variant folders go through the general diffusers-folder loader.
 */
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { readJsonFile } from '../../io/diffusers.js';
import { loadSafetensorsParams, paramStore } from '../../io/weights.js';
import type { ParamStore } from '../../ops/scope.js';
import { tfOps } from '../../ops/tfjs-ops.js';
import { parseClipTextConfig, type ClipTextConfig } from './config.js';
import { clipTextEncoder, isClipTextBuffer, textStatesForUnet, type TextStatesOptions } from './text-encoder.js';

export interface LoadedTextEncoder {
  readonly cfg: ClipTextConfig;
  readonly store: ParamStore<tf.Tensor>;
}

/** Read `<dir>/text_encoder/config.json` and `model.safetensors` (buffers such as position_ids dropped). */
export async function loadTextEncoder(dir: string): Promise<LoadedTextEncoder> {
  const componentDir = path.join(dir, 'text_encoder');
  const configFile = path.join(componentDir, 'config.json');
  const cfg = parseClipTextConfig(await readJsonFile(configFile), configFile);
  const weightsFile = path.join(componentDir, 'model.safetensors');
  const tensors = await loadSafetensorsParams([weightsFile], {
    rename: (key) => (isClipTextBuffer(key) ? undefined : key),
  });
  return { cfg, store: paramStore(tensors, weightsFile) };
}

/**
 * Token ids (rows of equal length ≤ maxPositions, e.g. the tokenizer's 77) → the text states
 * the UNet uses, [B, S, width] float32. `clipSkip` as in {@link textStatesForUnet}.
 */
export function encodeText(
  store: ParamStore<tf.Tensor>,
  cfg: ClipTextConfig,
  ids: readonly (readonly number[])[],
  opts: TextStatesOptions = {},
): tf.Tensor {
  const seqLen = ids[0]?.length ?? 0;
  if (ids.length === 0 || seqLen === 0) throw new Error('encodeText: no token ids');
  const flat = new Int32Array(ids.length * seqLen);
  ids.forEach((row, b) => {
    if (row.length !== seqLen) {
      throw new Error(`encodeText: row ${b} has ${row.length} tokens, row 0 has ${seqLen} (pad to one length)`);
    }
    row.forEach((id, s) => {
      if (!Number.isInteger(id) || id < 0 || id >= cfg.vocabSize) {
        throw new Error(`encodeText: token id ${id} at row ${b}, position ${s} is outside the vocabulary [0, ${cfg.vocabSize})`);
      }
      flat[b * seqLen + s] = id;
    });
  });
  return tf.tidy(() => {
    const inputIds = tf.tensor2d(flat, [ids.length, seqLen], 'int32');
    const p = store.scope();
    const out = clipTextEncoder(tfOps, p, inputIds, cfg, { hiddenStates: (opts.clipSkip ?? 0) > 0 });
    return textStatesForUnet(tfOps, p, cfg, out, opts);
  });
}
