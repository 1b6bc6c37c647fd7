/**
 * Loading checkpoint tensors into tfjs parameters in the internal layout.
 */
import * as tf from '@tensorflow/tfjs';
import { ParamStore } from '../ops/scope.js';
import { isConvFilter, oihwToHwio } from './layout.js';
import { SafetensorsFile } from './safetensors.js';

export interface LoadOptions {
  /** Keep only keys starting with this prefix, and strip it (e.g. `model.diffusion_model.`). */
  readonly stripPrefix?: string;
  /** Rename keys after prefix stripping (a keymap from src/io/keymaps). */
  readonly rename?: (key: string) => string | undefined;
}

/**
 * Read every tensor of the given safetensors files, one tensor at a time, as float32 tfjs tensors
 * in the internal layout (conv filters HWIO). Keys are verbatim unless `opts` says otherwise.
 */
export async function loadSafetensorsParams(
  files: readonly string[],
  opts: LoadOptions = {},
): Promise<Map<string, tf.Tensor>> {
  const out = new Map<string, tf.Tensor>();
  for (const path of files) {
    const f = await SafetensorsFile.open(path);
    try {
      for (const key of f.keys()) {
        let name: string | undefined = key;
        if (opts.stripPrefix !== undefined) {
          if (!key.startsWith(opts.stripPrefix)) continue;
          name = key.slice(opts.stripPrefix.length);
        }
        if (opts.rename) name = opts.rename(name);
        if (name === undefined) continue;
        const info = f.info(key);
        const data = await f.readFloat32(key);
        const internal = isConvFilter(info.shape) ? oihwToHwio(data, info.shape) : { data, shape: [...info.shape] };
        out.set(name, tf.tensor(internal.data, internal.shape, 'float32'));
      }
    } finally {
      await f.close();
    }
  }
  return out;
}

/** A parameter store over loaded tensors, naming `source` in errors. */
export function paramStore(tensors: ReadonlyMap<string, tf.Tensor>, source: string): ParamStore<tf.Tensor> {
  return new ParamStore<tf.Tensor>(tensors, (t) => t.shape, source);
}
