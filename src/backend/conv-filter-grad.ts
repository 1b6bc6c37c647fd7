/**
 * Conv2DBackpropFilter (conv2d's filter gradient) for the wasm backend, which lacks it.
 *
 * A transposed im2col written straight into the wasm heap, then one XNNPACK GEMM through the
 * backend's own BatchMatMul kernel:
 *   cols[Kh·Kw·Ci, n] · dy[n, Co] = dW[Kh·Kw·Ci, Co]  (already HWIO),
 * with n = B·Ho·Wo, chunked over output rows so the column buffer stays bounded.
 * Why this layout: only the plain (no transpose, batch 1) form of that kernel is fast
 * (~25–35 GFLOP/s; transposed operands fall to ~1–2 GFLOP/s), and XNNPACK re-packs its right
 * operand on every call, so the right operand should be the small one (dy, not the columns).
 */
import * as tf from '@tensorflow/tfjs';
import type { TensorInfo } from '@tensorflow/tfjs';

import { type KernelArgs, kernelInput, wasmMatMul2d, wasmTranspose } from './kernel-util.js';
import { alloc, asWasmBackend, elemOffset, ensureOnHeap, f32View, release, type WasmHeapBackend } from './wasm-heap.js';

/**
 * Upper bound on the column buffer per GEMM, in floats (4 MB). Bounds memory on large maps; in
 * scripts/bench-kernels.ts sizes from 1 MB to 64 MB were within noise of each other.
 */
let maxPatchElems = 1 << 20;

export function getConvChunkElems(): number {
  return maxPatchElems;
}

/**
 * Test/bench hook for the column-buffer bound shared by the conv gradient kernels: smaller
 * values force the chunked path on small shapes. Returns the previous value.
 */
export function setConvChunkElems(n: number): number {
  const prev = maxPatchElems;
  maxPatchElems = Math.max(1, Math.floor(n));
  return prev;
}

export function conv2dBackpropFilterWasm(args: KernelArgs): TensorInfo {
  const backend = asWasmBackend(args.backend, 'Conv2DBackpropFilter');
  const x0 = kernelInput(args.inputs, 'x', 'Conv2DBackpropFilter');
  const dy0 = kernelInput(args.inputs, 'dy', 'Conv2DBackpropFilter');
  const attrs = args.attrs as unknown as tf.Conv2DBackpropFilterAttrs;
  if (x0.dtype !== 'float32' || dy0.dtype !== 'float32') {
    throw new Error(`Conv2DBackpropFilter: only float32 is supported, got x ${x0.dtype}, dy ${dy0.dtype}`);
  }
  ensureOnHeap(backend, x0, dy0);

  // The GEMM formulation below is written for NHWC; NCHW callers pay two transposes.
  const channelsFirst = tf.backend_util.convertConv2DDataFormat(attrs.dataFormat) === 'channelsFirst';
  const temps: TensorInfo[] = [];
  let x = x0;
  let dy = dy0;
  if (channelsFirst) {
    x = wasmTranspose(backend, x0, [0, 2, 3, 1]);
    dy = wasmTranspose(backend, dy0, [0, 2, 3, 1]);
    temps.push(x, dy);
  }
  try {
    return filterGradNHWC(backend, x, dy, attrs);
  } finally {
    release(backend, ...temps);
  }
}

function filterGradNHWC(
  backend: WasmHeapBackend,
  x: TensorInfo,
  dy: TensorInfo,
  attrs: tf.Conv2DBackpropFilterAttrs,
): TensorInfo {
  const [B, H, W, Ci] = x.shape as [number, number, number, number];
  const info = tf.backend_util.computeConv2DInfo(
    [B, H, W, Ci],
    attrs.filterShape,
    attrs.strides,
    1,
    attrs.pad,
    attrs.dimRoundingMode,
    false,
    'channelsLast',
  );
  const { outHeight: Ho, outWidth: Wo, outChannels: Co, filterHeight: Kh, filterWidth: Kw } = info;
  const { strideHeight: sh, strideWidth: sw } = info;
  const top = info.padInfo.top;
  const left = info.padInfo.left;
  if (info.filterShape[2] !== Ci) {
    throw new Error(`Conv2DBackpropFilter: filter in-channels ${info.filterShape[2]} != input channels ${Ci}`);
  }
  const want = [B, Ho, Wo, Co];
  if (dy.shape.length !== 4 || dy.shape.some((d, i) => d !== want[i])) {
    throw new Error(`Conv2DBackpropFilter: dy shape [${dy.shape}] does not match conv output [${want}]`);
  }

  const K = Kh * Kw * Ci;
  const units = B * Ho; // one unit = one output row (b, ho) = Wo GEMM columns
  if (units === 0 || Wo === 0 || K === 0 || Co === 0) {
    const zeros = alloc(backend, [Kh, Kw, Ci, Co]);
    f32View(backend, zeros).fill(0);
    return zeros;
  }
  const unitsPerChunk = Math.max(1, Math.floor(maxPatchElems / (Wo * K)));
  let result: TensorInfo | undefined; // [K, Co], summed over chunks

  try {
    for (let u0 = 0; u0 < units; u0 += unitsPerChunk) {
      const u1 = Math.min(units, u0 + unitsPerChunk);
      const n = (u1 - u0) * Wo;
      const cols = alloc(backend, [K, n]); // transposed im2col
      // One chunk (the usual case) multiplies dy in place; otherwise its rows are copied out.
      const whole = u0 === 0 && u1 === units;
      const dyPart: TensorInfo = whole ? { dataId: dy.dataId, shape: [n, Co], dtype: 'float32' } : alloc(backend, [n, Co]);
      let part: TensorInfo | undefined;
      try {
        // Views only after the allocations: malloc may grow (and detach) the heap.
        const heap = backend.wasm.HEAPF32;
        if (!whole) {
          const src = elemOffset(backend, dy) + u0 * Wo * Co;
          heap.copyWithin(elemOffset(backend, dyPart), src, src + n * Co);
        }
        fillColumns(heap, elemOffset(backend, x), elemOffset(backend, cols), n, u0, u1);
        // XNNPACK packs its right operand on every call; dy is the small one.
        part = wasmMatMul2d(backend, cols, dyPart);
      } finally {
        release(backend, cols);
        if (!whole) release(backend, dyPart);
      }
      if (result === undefined) {
        result = part;
      } else {
        const acc = f32View(backend, result);
        const add = f32View(backend, part);
        for (let i = 0; i < acc.length; i++) acc[i]! += add[i]!;
        release(backend, part);
      }
    }
  } catch (e) {
    if (result !== undefined) release(backend, result);
    throw e;
  }
  // The GEMM output is ours alone, so relabelling its shape is the reshape.
  return { dataId: result!.dataId, shape: [Kh, Kw, Ci, Co], dtype: 'float32' };

  /**
   * cols[k, j] for k = (kh, kw, ci) and j = output pixel (u - u0, wo): the input value that
   * filter tap k meets at that pixel, or 0 in the padding. Loops run so each x row (W·Ci floats)
   * stays in L1 while it is read, and writes are runs of Wo.
   */
  function fillColumns(heap: Float32Array, xOff: number, cOff: number, n: number, u0: number, u1: number): void {
    const step = sw * Ci;
    for (let u = u0; u < u1; u++) {
      const b = Math.floor(u / Ho);
      const ho = u - b * Ho;
      const col0 = cOff + (u - u0) * Wo;
      for (let kh = 0; kh < Kh; kh++) {
        const ih = ho * sh + kh - top;
        const rowValid = ih >= 0 && ih < H;
        const xRow = xOff + (b * H + ih) * W * Ci;
        for (let kw = 0; kw < Kw; kw++) {
          // Output columns whose input column wo*sw + kw - left lies inside the image.
          const lo = rowValid ? Math.min(Wo, Math.max(0, Math.ceil((left - kw) / sw))) : Wo;
          const hi = rowValid ? Math.max(lo, Math.min(Wo, Math.floor((W - 1 + left - kw) / sw) + 1)) : Wo;
          const kBase = (kh * Kw + kw) * Ci;
          let s0 = xRow + (lo * sw + kw - left) * Ci;
          for (let ci = 0; ci < Ci; ci++, s0++) {
            const d = col0 + (kBase + ci) * n;
            if (lo > 0) heap.fill(0, d, d + lo);
            for (let wo = lo, s = s0; wo < hi; wo++, s += step) heap[d + wo] = heap[s]!;
            if (hi < Wo) heap.fill(0, d + hi, d + Wo);
          }
        }
      }
    }
  }
}
