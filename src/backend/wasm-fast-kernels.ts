/**
 * Faster replacements for two wasm kernels that training leans on but that tfjs-backend-wasm 4.22
 * runs far below XNNPACK speed (measured, 1 thread):
 *
 * - BatchMatMul: only the plain 2-D form (no transpose, batch 1) reaches XNNPACK (~25–35 GFLOP/s);
 *   a transposed operand drops to ~0.7–2 GFLOP/s and any batch > 1 to ~2 GFLOP/s. Every matMul
 *   gradient has a transposed operand, and attention is batched. We reduce each product to the
 *   fast form: transposes become explicit copies, a shared right operand lets the batch fold
 *   into rows, otherwise one GEMM per batch entry. Tiny products stay native (call overhead).
 * - Conv2DBackpropInput (conv2d's input gradient): ~2–4 GFLOP/s against ~40 for the forward.
 *   Ours is one GEMM, cols[n, K] = dy[n, Co] · Wᵀ[Co, K], then a col2im scatter-add.
 *
 * Both produce the same values as the native kernels up to float rounding.
 */
import * as tf from '@tensorflow/tfjs';
import type { TensorInfo } from '@tensorflow/tfjs';

import { getConvChunkElems } from './conv-filter-grad.js';
import { type KernelArgs, kernelInput, nativeWasmKernel, wasmMatMul2d, wasmTranspose } from './kernel-util.js';
import {
  alloc,
  asWasmBackend,
  elemOffset,
  ensureOnHeap,
  f32View,
  release,
  sizeOf,
  transpose2d,
  type WasmHeapBackend,
} from './wasm-heap.js';

/** Below this many multiply-adds per batch entry, the native batched loop wins. */
const SMALL_GEMM = 16 * 16 * 16;

function view(t: TensorInfo, shape: number[]): TensorInfo {
  return { dataId: t.dataId, shape, dtype: t.dtype };
}

/** A fresh [cols, rows] tensor holding the transpose of the [rows, cols] block at `srcOff`. */
function transposedCopy(backend: WasmHeapBackend, src: TensorInfo, srcElem: number, rows: number, cols: number): TensorInfo {
  const out = alloc(backend, [cols, rows]);
  const heap = backend.wasm.HEAPF32; // after the allocation
  transpose2d(heap, elemOffset(backend, src) + srcElem, rows, cols, heap, elemOffset(backend, out));
  return out;
}

function plainCopy(backend: WasmHeapBackend, src: TensorInfo, srcElem: number, shape: number[]): TensorInfo {
  const out = alloc(backend, shape);
  const heap = backend.wasm.HEAPF32;
  const s = elemOffset(backend, src) + srcElem;
  heap.copyWithin(elemOffset(backend, out), s, s + sizeOf(shape));
  return out;
}

/** Flat batch index into an operand whose batch dims broadcast against `outBatch`. */
function batchIndexer(batch: number[], outBatch: number[]): (o: number) => number {
  const pad = outBatch.length - batch.length;
  const dims = outBatch.map((_, i) => (i < pad ? 1 : batch[i - pad]!));
  const strides = dims.map((_, i) => sizeOf(dims.slice(i + 1)));
  const outStrides = outBatch.map((_, i) => sizeOf(outBatch.slice(i + 1)));
  return (o: number) => {
    let idx = 0;
    for (let d = 0; d < outBatch.length; d++) {
      const c = Math.floor(o / outStrides[d]!) % outBatch[d]!;
      if (dims[d] !== 1) idx += c * strides[d]!;
    }
    return idx;
  };
}

export function batchMatMulWasm(args: KernelArgs): TensorInfo | TensorInfo[] {
  const native = nativeWasmKernel(tf.BatchMatMul);
  const a = kernelInput(args.inputs, 'a', 'BatchMatMul');
  const b = kernelInput(args.inputs, 'b', 'BatchMatMul');
  const { transposeA, transposeB } = args.attrs as unknown as tf.BatchMatMulAttrs;
  const ra = a.shape.length;
  const rb = b.shape.length;
  if (a.dtype !== 'float32' || b.dtype !== 'float32' || ra < 2 || rb < 2) return native(args);
  const M = transposeA ? a.shape[ra - 1]! : a.shape[ra - 2]!;
  const K = transposeA ? a.shape[ra - 2]! : a.shape[ra - 1]!;
  const Kb = transposeB ? b.shape[rb - 1]! : b.shape[rb - 2]!;
  const N = transposeB ? b.shape[rb - 2]! : b.shape[rb - 1]!;
  const aBatch = a.shape.slice(0, -2);
  const bBatch = b.shape.slice(0, -2);
  const nA = sizeOf(aBatch);
  const nB = sizeOf(bBatch);
  if (K !== Kb) return native(args); // let it raise tfjs's usual error
  const outBatch = tf.broadcast_util.assertAndGetBroadcastShape(aBatch, bBatch);
  const nOut = sizeOf(outBatch);
  const nativeBroadcastOk = nA === nB || nA === 1 || nB === 1;
  if (nOut === 0 || M * N * K === 0) return native(args);
  if (!transposeA && !transposeB && nOut === 1) return native(args); // already the fast form
  if (M * N * K < SMALL_GEMM && nativeBroadcastOk) return native(args);

  const backend = asWasmBackend(args.backend, 'BatchMatMul');
  ensureOnHeap(backend, a, b);
  const outShape = [...outBatch, M, N];
  const temps: TensorInfo[] = [];
  try {
    // Shared right operand and row-major left: fold the batch into GEMM rows.
    if (!transposeA && nB === 1 && tf.util.arraysEqual(outBatch, aBatch)) {
      const bm = transposeB ? transposedCopy(backend, b, 0, N, K) : view(b, [K, N]);
      if (transposeB) temps.push(bm);
      const out = wasmMatMul2d(backend, view(a, [nA * M, K]), bm);
      return { dataId: out.dataId, shape: outShape, dtype: 'float32' };
    }

    const aAt = batchIndexer(aBatch, outBatch);
    const bAt = batchIndexer(bBatch, outBatch);
    const aSlices = new Map<number, TensorInfo>();
    const bSlices = new Map<number, TensorInfo>();
    const sliceA = (i: number): TensorInfo => {
      let t = aSlices.get(i);
      if (t === undefined) {
        if (transposeA) t = transposedCopy(backend, a, i * M * K, K, M);
        else if (nA === 1) t = view(a, [M, K]);
        else t = plainCopy(backend, a, i * M * K, [M, K]);
        if (t.dataId !== a.dataId) temps.push(t);
        aSlices.set(i, t);
      }
      return t;
    };
    const sliceB = (i: number): TensorInfo => {
      let t = bSlices.get(i);
      if (t === undefined) {
        if (transposeB) t = transposedCopy(backend, b, i * K * N, N, K);
        else if (nB === 1) t = view(b, [K, N]);
        else t = plainCopy(backend, b, i * K * N, [K, N]);
        if (t.dataId !== b.dataId) temps.push(t);
        bSlices.set(i, t);
      }
      return t;
    };

    const out = alloc(backend, outShape);
    try {
      for (let o = 0; o < nOut; o++) {
        const part = wasmMatMul2d(backend, sliceA(aAt(o)), sliceB(bAt(o)));
        const heap = backend.wasm.HEAPF32;
        const p = elemOffset(backend, part);
        heap.copyWithin(elemOffset(backend, out) + o * M * N, p, p + M * N);
        release(backend, part);
      }
    } catch (e) {
      release(backend, out);
      throw e;
    }
    return out;
  } finally {
    release(backend, ...temps);
  }
}

// ---------------------------------------------------------------------------------------------

export function conv2dBackpropInputWasm(args: KernelArgs): TensorInfo | TensorInfo[] {
  const dy0 = kernelInput(args.inputs, 'dy', 'Conv2DBackpropInput');
  const filter = kernelInput(args.inputs, 'filter', 'Conv2DBackpropInput');
  if (dy0.dtype !== 'float32' || filter.dtype !== 'float32') return nativeWasmKernel(tf.Conv2DBackpropInput)(args);
  const backend = asWasmBackend(args.backend, 'Conv2DBackpropInput');
  ensureOnHeap(backend, dy0, filter);
  const attrs = args.attrs as unknown as tf.Conv2DBackpropInputAttrs;
  const channelsFirst = tf.backend_util.convertConv2DDataFormat(attrs.dataFormat) === 'channelsFirst';
  if (!channelsFirst) return inputGradNHWC(backend, dy0, filter, attrs, attrs.inputShape);

  // The GEMM formulation is written for NHWC; NCHW callers pay three transposes.
  const [b, c, h, w] = attrs.inputShape;
  const dy = wasmTranspose(backend, dy0, [0, 2, 3, 1]);
  let dxNHWC: TensorInfo | undefined;
  try {
    dxNHWC = inputGradNHWC(backend, dy, filter, attrs, [b, h, w, c]);
    return wasmTranspose(backend, dxNHWC, [0, 3, 1, 2]);
  } finally {
    release(backend, dy);
    if (dxNHWC !== undefined) release(backend, dxNHWC);
  }
}

function inputGradNHWC(
  backend: WasmHeapBackend,
  dy: TensorInfo,
  filter: TensorInfo,
  attrs: tf.Conv2DBackpropInputAttrs,
  inputShape: [number, number, number, number],
): TensorInfo {
  const info = tf.backend_util.computeConv2DInfo(
    inputShape,
    filter.shape as [number, number, number, number],
    attrs.strides,
    1,
    attrs.pad,
    attrs.dimRoundingMode,
    false,
    'channelsLast',
  );
  const [B, H, W, Ci] = inputShape;
  const { outHeight: Ho, outWidth: Wo, outChannels: Co, filterHeight: Kh, filterWidth: Kw } = info;
  const { strideHeight: sh, strideWidth: sw } = info;
  const top = info.padInfo.top;
  const left = info.padInfo.left;
  const want = [B, Ho, Wo, Co];
  if (dy.shape.length !== 4 || dy.shape.some((d, i) => d !== want[i])) {
    throw new Error(`Conv2DBackpropInput: dy shape [${dy.shape}] does not match conv output [${want}]`);
  }
  const K = Kh * Kw * Ci;
  const units = B * Ho;

  const dx = alloc(backend, [B, H, W, Ci]);
  f32View(backend, dx).fill(0);
  if (units === 0 || Wo === 0 || K === 0 || Co === 0) return dx;

  const temps: TensorInfo[] = [];
  try {
    const wT = transposedCopy(backend, filter, 0, K, Co); // [Co, K]
    temps.push(wT);
    const unitsPerChunk = Math.max(1, Math.floor(getConvChunkElems() / (Wo * K)));
    for (let u0 = 0; u0 < units; u0 += unitsPerChunk) {
      const u1 = Math.min(units, u0 + unitsPerChunk);
      const n = (u1 - u0) * Wo;
      const whole = u0 === 0 && u1 === units;
      const dyRows = whole ? view(dy, [n, Co]) : plainCopy(backend, dy, u0 * Wo * Co, [n, Co]);
      let cols: TensorInfo | undefined;
      try {
        cols = wasmMatMul2d(backend, dyRows, wT); // [n, K]
        const heap = backend.wasm.HEAPF32;
        scatterColumns(heap, elemOffset(backend, cols), elemOffset(backend, dx), u0, u1);
      } finally {
        if (!whole) release(backend, dyRows);
        if (cols !== undefined) release(backend, cols);
      }
    }
  } catch (e) {
    release(backend, dx);
    throw e;
  } finally {
    release(backend, ...temps);
  }
  return dx;

  /** dx[b, ih, iw, :] += cols[j, (kh, kw, :)] for every tap that lands inside the image. */
  function scatterColumns(heap: Float32Array, cOff: number, dxOff: number, u0: number, u1: number): void {
    for (let u = u0; u < u1; u++) {
      const b = Math.floor(u / Ho);
      const ho = u - b * Ho;
      for (let wo = 0; wo < Wo; wo++) {
        const row = cOff + ((u - u0) * Wo + wo) * K;
        const iw0 = wo * sw - left;
        // Consecutive kw hit consecutive input columns: one contiguous run per (pixel, kh).
        const kwLo = Math.max(0, -iw0);
        const kwHi = Math.min(Kw, W - iw0);
        if (kwLo >= kwHi) continue;
        const len = (kwHi - kwLo) * Ci;
        for (let kh = 0; kh < Kh; kh++) {
          const ih = ho * sh + kh - top;
          if (ih < 0 || ih >= H) continue;
          const s = row + (kh * Kw + kwLo) * Ci;
          const d = dxOff + ((b * H + ih) * W + iw0 + kwLo) * Ci;
          for (let i = 0; i < len; i++) heap[d + i]! += heap[s + i]!;
        }
      }
    }
  }
}
