/**
 * Registry of the kernels we supply to tfjs backends:
 *
 * - wasm lacks (tfjs-backend-wasm 4.22): Conv2DBackpropFilter (conv2d's filter gradient) and
 *   UnsortedSegmentSum (gather's gradient).
 * - cpu has wrong or unusably slow ones: ResizeNearestNeighborGrad (wrong for batch > 1) and
 *   UnsortedSegmentSum (one full pass per segment).
 * - both get StridedSlice wrong when a shrunk axis meets a non-unit stride.
 * - wasm runs BatchMatMul (transposed or batched) and Conv2DBackpropInput at a tenth of XNNPACK
 *   speed; these "fast paths" can be left out with `fastPaths: false`.
 */
import * as tf from '@tensorflow/tfjs';
import type { KernelFunc } from '@tensorflow/tfjs';

import { conv2dBackpropFilterWasm } from './conv-filter-grad.js';
import { nativeKernel, nativeWasmKernel } from './kernel-util.js';
import { resizeNearestNeighborGradCpu } from './resize-nn-grad.js';
import { unsortedSegmentSumCpu, unsortedSegmentSumWasm } from './segment-sum.js';
import { makeStridedSlice } from './strided-slice-fix.js';
import { batchMatMulWasm, conv2dBackpropInputWasm } from './wasm-fast-kernels.js';

export { setConvChunkElems } from './conv-filter-grad.js';

interface OwnKernel {
  kernelName: string;
  backendName: 'wasm' | 'cpu';
  kernelFunc: KernelFunc;
  /** true: replaces a kernel the backend already has. */
  replaces: boolean;
  /** A speed-up of a correct native kernel (optional), not a fix. */
  fastPath?: boolean;
}

const OWN_KERNELS: readonly OwnKernel[] = [
  { kernelName: tf.Conv2DBackpropFilter, backendName: 'wasm', kernelFunc: conv2dBackpropFilterWasm, replaces: false },
  { kernelName: tf.UnsortedSegmentSum, backendName: 'wasm', kernelFunc: unsortedSegmentSumWasm, replaces: false },
  { kernelName: tf.UnsortedSegmentSum, backendName: 'cpu', kernelFunc: unsortedSegmentSumCpu, replaces: true },
  { kernelName: tf.ResizeNearestNeighborGrad, backendName: 'cpu', kernelFunc: resizeNearestNeighborGradCpu, replaces: true },
  { kernelName: tf.StridedSlice, backendName: 'wasm', kernelFunc: makeStridedSlice('wasm'), replaces: true },
  { kernelName: tf.StridedSlice, backendName: 'cpu', kernelFunc: makeStridedSlice('cpu'), replaces: true },
  { kernelName: tf.BatchMatMul, backendName: 'wasm', kernelFunc: batchMatMulWasm, replaces: true, fastPath: true },
  {
    kernelName: tf.Conv2DBackpropInput,
    backendName: 'wasm',
    kernelFunc: conv2dBackpropInputWasm,
    replaces: true,
    fastPath: true,
  },
];

/** Kernel names the wasm backend lacks and we supply. */
export const WASM_MISSING_KERNELS: readonly string[] = OWN_KERNELS.filter(
  (k) => k.backendName === 'wasm' && !k.replaces,
).map((k) => k.kernelName);

/** `backend/kernel` keys of the existing kernels we replace. */
export const REPLACED_KERNELS: readonly string[] = OWN_KERNELS.filter((k) => k.replaces).map(
  (k) => `${k.backendName}/${k.kernelName}`,
);

const ownFuncs = new Set<KernelFunc>(OWN_KERNELS.map((k) => k.kernelFunc));

/** The kernelFunc a backend had before we replaced it (for differential tests). */
export function originalKernel(kernelName: string, backendName: 'wasm' | 'cpu'): KernelFunc | undefined {
  if (!REPLACED_KERNELS.includes(`${backendName}/${kernelName}`)) return undefined;
  return nativeKernel(kernelName, backendName);
}

/**
 * Registers our kernels. Idempotent; returns the `backend/kernel` keys newly registered.
 * Must run after the backend packages are imported (their kernels register at import time).
 */
export function registerGradKernels(
  opts: { backends?: readonly ('wasm' | 'cpu')[]; fastPaths?: boolean } = {},
): string[] {
  const backends = opts.backends ?? ['wasm', 'cpu'];
  const wanted = (k: OwnKernel): boolean => backends.includes(k.backendName) && (opts.fastPaths !== false || k.fastPath !== true);
  // Pin the native kernels our implementations call (or replace) before anything overrides them.
  if (backends.includes('wasm')) {
    nativeWasmKernel(tf.BatchMatMul);
    nativeWasmKernel(tf.Transpose);
    nativeWasmKernel(tf.Conv2DBackpropInput);
  }
  for (const k of OWN_KERNELS) {
    if (!wanted(k)) continue;
    nativeKernel(tf.Reshape, k.backendName);
    const existing = tf.getKernel(k.kernelName, k.backendName);
    if (k.replaces && existing !== undefined && !ownFuncs.has(existing.kernelFunc)) {
      nativeKernel(k.kernelName, k.backendName);
    }
  }
  const added: string[] = [];
  for (const k of OWN_KERNELS) {
    if (!wanted(k)) continue;
    const existing = tf.getKernel(k.kernelName, k.backendName);
    if (existing?.kernelFunc === k.kernelFunc) continue;
    if (existing !== undefined) {
      if (!k.replaces) continue; // the backend gained a native one: prefer it
      tf.unregisterKernel(k.kernelName, k.backendName); // avoids the "already registered" warning
    }
    // Keep the native setupFunc: wasm kernels bind their C entry points in it when the backend
    // initialises, and the native kernel we delegate to needs that binding.
    tf.registerKernel({ ...existing, kernelName: k.kernelName, backendName: k.backendName, kernelFunc: k.kernelFunc });
    added.push(`${k.backendName}/${k.kernelName}`);
  }
  return added;
}
