/** Paths to the shared reference fixtures and comparison helpers for parity tests. */
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import { SafetensorsFile } from '../../src/io/safetensors.js';
import { nchwToNhwc } from '../../src/io/layout.js';

const here = path.dirname(fileURLToPath(import.meta.url));
export const SHARED = path.resolve(here, '../../../shared');
export const TINY_SD = path.join(SHARED, 'fixtures/tiny-sd');
export const TINY_REF = path.join(SHARED, 'fixtures/tiny-sd-reference');
export const ERASURE_REF = path.join(SHARED, 'fixtures/erasure-reference');

export interface RefTensor {
  readonly data: Float32Array;
  readonly shape: number[];
}

/** Every float tensor of a reference file, in its stored (PyTorch) layout. */
export async function readRef(file: string): Promise<Map<string, RefTensor>> {
  const f = await SafetensorsFile.open(path.isAbsolute(file) ? file : path.join(TINY_REF, file));
  try {
    const out = new Map<string, RefTensor>();
    for (const k of f.keys()) {
      const info = f.info(k);
      out.set(k, { data: await f.readFloat32(k), shape: [...info.shape] });
    }
    return out;
  } finally {
    await f.close();
  }
}

export function get(m: ReadonlyMap<string, RefTensor>, key: string): RefTensor {
  const t = m.get(key);
  if (!t) throw new Error(`reference tensor '${key}' not found`);
  return t;
}

/** An NCHW reference tensor converted to NHWC. */
export function toNhwc(t: RefTensor): RefTensor {
  return nchwToNhwc(t.data, t.shape);
}

export interface Diff {
  readonly maxAbs: number;
  readonly scale: number;
  /** maxAbs / scale, where scale = max |expected| (at least 1e-12). */
  readonly rel: number;
}

/** Max-abs error of `actual` vs `expected`, also relative to the expected tensor's scale. */
export function diff(actual: ArrayLike<number>, expected: ArrayLike<number>): Diff {
  if (actual.length !== expected.length) {
    throw new Error(`length mismatch: actual ${actual.length}, expected ${expected.length}`);
  }
  let maxAbs = 0;
  let scale = 0;
  for (let i = 0; i < expected.length; i++) {
    const e = expected[i]!;
    const d = Math.abs(actual[i]! - e);
    if (!(d <= maxAbs)) maxAbs = Number.isNaN(d) ? Infinity : d;
    scale = Math.max(scale, Math.abs(e));
  }
  return { maxAbs, scale, rel: maxAbs / Math.max(scale, 1e-12) };
}
