/**
 * UnsortedSegmentSum (gather's gradient): one validated scatter-add pass.
 *
 * wasm lacks the kernel; cpu has one that loops once per segment over the whole input
 * (49,408 passes for CLIP's vocabulary), so both get this.
 */
import * as tf from '@tensorflow/tfjs';
import type { NamedAttrMap, TensorInfo } from '@tensorflow/tfjs';

import { isCpuLike, type KernelArgs, kernelInput } from './kernel-util.js';
import { alloc, asWasmBackend, ensureOnHeap, sizeOf, type WasmHeapBackend } from './wasm-heap.js';

interface SegmentPlan {
  numSegments: number;
  inner: number;
  outShape: number[];
}

function planSegmentSum(x: TensorInfo, ids: TensorInfo, attrs: NamedAttrMap | undefined): SegmentPlan {
  const numSegments = (attrs as unknown as tf.UnsortedSegmentSumAttrs | undefined)?.numSegments;
  if (typeof numSegments !== 'number' || !Number.isInteger(numSegments) || numSegments < 0) {
    throw new Error(`UnsortedSegmentSum: numSegments must be a non-negative integer, got ${String(numSegments)}`);
  }
  const r = ids.shape.length;
  if (r > x.shape.length || ids.shape.some((d, i) => d !== x.shape[i])) {
    throw new Error(`UnsortedSegmentSum: segmentIds shape [${ids.shape}] must be a prefix of x shape [${x.shape}]`);
  }
  const innerShape = x.shape.slice(r);
  return { numSegments, inner: sizeOf(innerShape), outShape: [numSegments, ...innerShape] };
}

type IdArray = Int32Array | Float32Array | Uint8Array;

function validateIds(ids: IdArray, numSegments: number): void {
  for (let i = 0; i < ids.length; i++) {
    const id = ids[i]!;
    // Out-of-range ids would silently drop (TF: negative) or corrupt memory; fail loudly instead.
    if (!(id >= 0 && id < numSegments) || !Number.isInteger(id)) {
      throw new Error(`UnsortedSegmentSum: segment id ${id} at position ${i} is out of range [0, ${numSegments})`);
    }
  }
}

function scatterAdd(
  xv: Float32Array | Int32Array,
  ids: IdArray,
  inner: number,
  out: Float32Array | Int32Array,
): void {
  if (inner === 1) {
    for (let i = 0; i < ids.length; i++) out[ids[i]!]! += xv[i]!;
    return;
  }
  for (let i = 0; i < ids.length; i++) {
    const dst = ids[i]! * inner;
    const src = i * inner;
    for (let j = 0; j < inner; j++) out[dst + j]! += xv[src + j]!;
  }
}

function checkSegmentDtype(x: TensorInfo): 'float32' | 'int32' {
  if (x.dtype !== 'float32' && x.dtype !== 'int32') {
    throw new Error(`UnsortedSegmentSum: unsupported dtype ${x.dtype}`);
  }
  return x.dtype;
}

function heapIds(backend: WasmHeapBackend, ids: TensorInfo): IdArray {
  const off = backend.getMemoryOffset(ids.dataId);
  const n = sizeOf(ids.shape);
  const buf = backend.wasm.HEAPU8.buffer;
  switch (ids.dtype) {
    case 'int32':
      return new Int32Array(buf, off, n);
    case 'float32':
      return new Float32Array(buf, off, n);
    case 'bool':
      return new Uint8Array(buf, off, n);
    default:
      throw new Error(`UnsortedSegmentSum: unsupported segmentIds dtype ${ids.dtype}`);
  }
}

export function unsortedSegmentSumWasm(args: KernelArgs): TensorInfo {
  const backend = asWasmBackend(args.backend, 'UnsortedSegmentSum');
  const x = kernelInput(args.inputs, 'x', 'UnsortedSegmentSum');
  const ids = kernelInput(args.inputs, 'segmentIds', 'UnsortedSegmentSum');
  const dtype = checkSegmentDtype(x);
  const plan = planSegmentSum(x, ids, args.attrs);
  ensureOnHeap(backend, x, ids);
  validateIds(heapIds(backend, ids), plan.numSegments);

  const out = alloc(backend, plan.outShape, dtype);
  const outOff = backend.getMemoryOffset(out.dataId);
  const outLen = sizeOf(plan.outShape);
  const buf = backend.wasm.HEAPU8.buffer; // after the allocation
  const xOff = backend.getMemoryOffset(x.dataId);
  const xLen = sizeOf(x.shape);
  const outView = dtype === 'float32' ? new Float32Array(buf, outOff, outLen) : new Int32Array(buf, outOff, outLen);
  const xView = dtype === 'float32' ? new Float32Array(buf, xOff, xLen) : new Int32Array(buf, xOff, xLen);
  outView.fill(0);
  scatterAdd(xView, heapIds(backend, ids), plan.inner, outView);
  return out;
}

function asIdArray(v: unknown): IdArray {
  if (v instanceof Int32Array || v instanceof Float32Array || v instanceof Uint8Array) return v;
  throw new Error('UnsortedSegmentSum: segmentIds are not numeric');
}

export function unsortedSegmentSumCpu(args: KernelArgs): TensorInfo {
  const backend = args.backend;
  if (!isCpuLike(backend)) throw new Error('UnsortedSegmentSum: incompatible cpu backend object');
  const x = kernelInput(args.inputs, 'x', 'UnsortedSegmentSum');
  const idsInfo = kernelInput(args.inputs, 'segmentIds', 'UnsortedSegmentSum');
  const dtype = checkSegmentDtype(x);
  const plan = planSegmentSum(x, idsInfo, args.attrs);
  const ids = asIdArray(backend.readSync(idsInfo.dataId));
  validateIds(ids, plan.numSegments);
  const xv = backend.readSync(x.dataId);
  if (!(xv instanceof Float32Array || xv instanceof Int32Array)) {
    throw new Error('UnsortedSegmentSum: x values are not numeric');
  }
  const out = dtype === 'float32' ? new Float32Array(sizeOf(plan.outShape)) : new Int32Array(sizeOf(plan.outShape));
  scatterAdd(xv, ids, plan.inner, out);
  return backend.makeTensorInfo(plan.outShape, dtype, out);
}
