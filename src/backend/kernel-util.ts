/** Small helpers shared by our kernel implementations. */
import * as tf from '@tensorflow/tfjs';
import type { KernelFunc, NamedTensorInfoMap, TensorInfo } from '@tensorflow/tfjs';

import type { WasmHeapBackend } from './wasm-heap.js';

export type KernelArgs = Parameters<KernelFunc>[0];

// Captured on first use, before anyone (including us) could override them, so our kernels
// always reach the backend's own implementation.
const nativeKernels = new Map<string, KernelFunc>();

/** The backend's own kernelFunc for `name` (as registered before any override of ours). */
export function nativeKernel(name: string, backendName: 'wasm' | 'cpu'): KernelFunc {
  const key = `${backendName}/${name}`;
  let f = nativeKernels.get(key);
  if (f === undefined) {
    const k = tf.getKernel(name, backendName);
    if (k === undefined) {
      throw new Error(`${backendName} kernel '${name}' is not registered (is the backend package loaded?)`);
    }
    f = k.kernelFunc;
    nativeKernels.set(key, f);
  }
  return f;
}

/** The wasm backend's own kernelFunc for `name`. */
export function nativeWasmKernel(name: string): KernelFunc {
  return nativeKernel(name, 'wasm');
}

export function singleOutput(out: TensorInfo | TensorInfo[]): TensorInfo {
  if (Array.isArray(out)) {
    const [first] = out;
    if (first === undefined || out.length !== 1) throw new Error('expected a single kernel output');
    return first;
  }
  return out;
}

export function kernelInput(inputs: NamedTensorInfoMap, name: string, kernel: string): TensorInfo {
  const t = inputs[name];
  if (t === undefined) throw new Error(`${kernel}: missing input '${name}'`);
  return t;
}

/** Plain 2-D GEMM on the wasm backend, a[m,k] · b[k,n]: the one XNNPACK-fast matmul form. */
export function wasmMatMul2d(backend: WasmHeapBackend, a: TensorInfo, b: TensorInfo): TensorInfo {
  return singleOutput(
    nativeWasmKernel(tf.BatchMatMul)({
      inputs: { a, b },
      backend,
      attrs: { transposeA: false, transposeB: false },
    }),
  );
}

export function wasmTranspose(backend: WasmHeapBackend, x: TensorInfo, perm: number[]): TensorInfo {
  return singleOutput(nativeWasmKernel(tf.Transpose)({ inputs: { x }, backend, attrs: { perm } }));
}

/** The members of MathBackendCPU our cpu kernels use. */
export interface CpuLikeBackend {
  readSync(dataId: object): unknown;
  makeTensorInfo(shape: number[], dtype: tf.DataType, values?: Float32Array | Int32Array): TensorInfo;
}

export function isCpuLike(b: unknown): b is CpuLikeBackend {
  if (typeof b !== 'object' || b === null) return false;
  const r = b as Record<string, unknown>;
  return typeof r['readSync'] === 'function' && typeof r['makeTensorInfo'] === 'function';
}

/** What both the cpu and wasm backends offer for releasing an intermediate. */
export interface DisposingBackend {
  disposeData(dataId: object, force?: boolean): boolean;
}

export function isDisposingBackend(b: unknown): b is DisposingBackend {
  return typeof b === 'object' && b !== null && typeof (b as Record<string, unknown>)['disposeData'] === 'function';
}
