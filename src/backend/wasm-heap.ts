/**
 * Typed, minimal view of the tfjs wasm backend internals our kernels need.
 *
 * The package's own `BackendWasm` declaration leans on emscripten ambient types we do not load,
 * so we describe just the members we touch and check them at runtime instead of importing it.
 */
import * as tf from '@tensorflow/tfjs';

export type DataId = object;

export interface WasmHeapBackend {
  wasm: { HEAPU8: Uint8Array; HEAPF32: Float32Array; HEAP32: Int32Array };
  makeOutput(shape: number[], dtype: tf.DataType, memoryOffset?: number): tf.TensorInfo;
  getMemoryOffset(dataId: DataId): number;
  disposeData(dataId: DataId, force?: boolean): boolean;
}

export function isWasmHeapBackend(b: unknown): b is WasmHeapBackend {
  if (typeof b !== 'object' || b === null) return false;
  const r = b as Record<string, unknown>;
  const wasm = r['wasm'];
  return (
    typeof r['makeOutput'] === 'function' &&
    typeof r['getMemoryOffset'] === 'function' &&
    typeof r['disposeData'] === 'function' &&
    typeof wasm === 'object' &&
    wasm !== null &&
    'HEAPF32' in wasm
  );
}

export function asWasmBackend(b: unknown, who: string): WasmHeapBackend {
  if (!isWasmHeapBackend(b)) {
    throw new Error(`${who}: expected the tfjs wasm backend, got an incompatible backend object`);
  }
  return b;
}

/**
 * Makes sure the inputs' data live on the wasm heap. tfjs moves a tensor created on another
 * backend lazily, on first lookup, and that move mallocs: done mid-kernel it could grow the heap
 * and detach views we already hold. Call first thing in a kernel.
 */
export function ensureOnHeap(backend: WasmHeapBackend, ...infos: tf.TensorInfo[]): void {
  for (const info of infos) backend.getMemoryOffset(info.dataId);
}

/** Allocates an uninitialised tensor on the wasm heap. */
export function alloc(backend: WasmHeapBackend, shape: number[], dtype: 'float32' | 'int32' = 'float32'): tf.TensorInfo {
  return backend.makeOutput(shape, dtype);
}

/**
 * Element offset of a 4-byte tensor inside HEAPF32 / HEAP32.
 * Re-read the heap view after every allocation: growing wasm memory detaches old views.
 */
export function elemOffset(backend: WasmHeapBackend, info: tf.TensorInfo): number {
  const bytes = backend.getMemoryOffset(info.dataId);
  if (bytes % 4 !== 0) throw new Error('wasm tensor is not 4-byte aligned');
  return bytes / 4;
}

export function f32View(backend: WasmHeapBackend, info: tf.TensorInfo): Float32Array {
  const off = elemOffset(backend, info);
  return backend.wasm.HEAPF32.subarray(off, off + sizeOf(info.shape));
}

export function i32View(backend: WasmHeapBackend, info: tf.TensorInfo): Int32Array {
  const off = elemOffset(backend, info);
  return backend.wasm.HEAP32.subarray(off, off + sizeOf(info.shape));
}

export function release(backend: WasmHeapBackend, ...infos: tf.TensorInfo[]): void {
  for (const info of infos) backend.disposeData(info.dataId);
}

export function sizeOf(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/**
 * dst[c * rows + r] = src[r * cols + c], over raw arrays with offsets so callers can pass the
 * whole heap. Tiled so both sides stay in cache; wasm's own Transpose kernel is ~10× slower.
 */
export function transpose2d(
  src: Float32Array,
  srcOff: number,
  rows: number,
  cols: number,
  dst: Float32Array,
  dstOff: number,
): void {
  const T = 32;
  for (let r0 = 0; r0 < rows; r0 += T) {
    const r1 = Math.min(rows, r0 + T);
    for (let c0 = 0; c0 < cols; c0 += T) {
      const c1 = Math.min(cols, c0 + T);
      for (let r = r0; r < r1; r++) {
        const s = srcOff + r * cols;
        for (let c = c0; c < c1; c++) dst[dstOff + c * rows + r] = src[s + c]!;
      }
    }
  }
}
