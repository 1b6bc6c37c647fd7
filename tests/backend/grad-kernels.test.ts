/**
 * The kernels we register for wasm (and the gradients we add for all backends) against the cpu
 * backend, through the public gradient path, plus a probe that every op our models
 * differentiate through has a working gradient on wasm that matches cpu.
 */
import * as tf from '@tensorflow/tfjs';
import fc from 'fast-check';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';

import { initBackend } from '../../src/backend.js';
import {
  ADDED_GRADIENTS,
  originalGradient,
  registerGradientGaps,
  REPLACED_GRADIENTS,
} from '../../src/backend/gradient-gaps.js';
import {
  originalKernel,
  registerGradKernels,
  setConvChunkElems,
  WASM_MISSING_KERNELS,
} from '../../src/backend/wasm-grad-kernels.js';

type Backend = 'wasm' | 'cpu';

function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function randn(n: number, seed: number): Float32Array {
  const r = rng(seed);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const u = Math.max(r(), 1e-12);
    out[i] = Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * r());
  }
  return out;
}

const size = (s: readonly number[]): number => s.reduce((a, b) => a * b, 1);

/** Runs `f` with `backend` active and returns plain arrays; leaves no tensors behind. */
async function on<T extends tf.Tensor | tf.Tensor[]>(backend: Backend, f: () => T): Promise<Float32Array[]> {
  await tf.setBackend(backend);
  const before = tf.memory().numTensors;
  const out = tf.tidy(f);
  const list = Array.isArray(out) ? out : [out];
  const arrays = list.map((t) => Float32Array.from(t.dataSync()));
  tf.dispose(list);
  expect(tf.memory().numTensors).toBe(before);
  return arrays;
}

function expectClose(got: Float32Array[], want: Float32Array[], tol = 1e-4): void {
  expect(got.length).toBe(want.length);
  want.forEach((w, i) => {
    const g = got[i]!;
    expect(g.length).toBe(w.length);
    let scale = 1;
    for (const v of w) scale = Math.max(scale, Math.abs(v));
    let err = 0;
    for (let j = 0; j < w.length; j++) err = Math.max(err, Math.abs(g[j]! - w[j]!));
    expect(err, `output ${i}: max-abs error ${err} (scale ${scale})`).toBeLessThanOrEqual(tol * scale);
    expect(Number.isFinite(err)).toBe(true);
  });
}

async function wasmVsCpu<T extends tf.Tensor | tf.Tensor[]>(f: () => T, tol?: number): Promise<void> {
  const want = await on('cpu', f);
  const got = await on('wasm', f);
  expectClose(got, want, tol);
}

beforeAll(async () => {
  await initBackend({ backend: 'wasm', log: () => {} });
});

afterEach(async () => {
  await tf.setBackend('wasm');
});

// ---------------------------------------------------------------------------------------------

type Pad = 'same' | 'valid' | [[0, 0], [number, number], [number, number], [0, 0]];

interface ConvCase {
  b: number;
  h: number;
  w: number;
  ci: number;
  co: number;
  kh: number;
  kw: number;
  sh: number;
  sw: number;
  pad: Pad;
}

function outDim(n: number, k: number, s: number, pad: Pad, lo: number, hi: number): number {
  if (pad === 'same') return Math.ceil(n / s);
  if (pad === 'valid') return Math.ceil((n - k + 1) / s);
  return Math.floor((n + lo + hi - k) / s) + 1;
}

function convValid(c: ConvCase): boolean {
  const [t, bt, l, r] = Array.isArray(c.pad) ? [c.pad[1][0], c.pad[1][1], c.pad[2][0], c.pad[2][1]] : [0, 0, 0, 0];
  return outDim(c.h, c.kh, c.sh, c.pad, t, bt) > 0 && outDim(c.w, c.kw, c.sw, c.pad, l, r) > 0;
}

function convFilterGrad(c: ConvCase, seed: number): () => tf.Tensor[] {
  const xs = [c.b, c.h, c.w, c.ci];
  const fs = [c.kh, c.kw, c.ci, c.co];
  const xData = randn(size(xs), seed);
  const fData = randn(size(fs), seed + 1);
  return () => {
    const x = tf.tensor4d(xData, xs as [number, number, number, number]);
    const f = tf.tensor4d(fData, fs as [number, number, number, number]);
    const y = tf.conv2d(x, f, [c.sh, c.sw], c.pad);
    const w = tf.tensor(randn(y.size, seed + 2), y.shape);
    const [gx, gf] = tf.grads((a: tf.Tensor, b: tf.Tensor) =>
      tf.sum(tf.mul(tf.conv2d(a as tf.Tensor4D, b as tf.Tensor4D, [c.sh, c.sw], c.pad), w)),
    )([x, f]);
    return [gf!, gx!];
  };
}

const convCase = fc
  .record({
    b: fc.integer({ min: 1, max: 3 }),
    h: fc.integer({ min: 1, max: 9 }),
    w: fc.integer({ min: 1, max: 9 }),
    ci: fc.integer({ min: 1, max: 6 }),
    co: fc.integer({ min: 1, max: 5 }),
    kh: fc.integer({ min: 1, max: 3 }),
    kw: fc.integer({ min: 1, max: 3 }),
    sh: fc.constantFrom(1, 2),
    sw: fc.constantFrom(1, 2),
    pad: fc.oneof(
      fc.constant<Pad>('same'),
      fc.constant<Pad>('valid'),
      fc
        .tuple(fc.nat(2), fc.nat(2), fc.nat(2), fc.nat(2))
        .map(([t, b, l, r]): Pad => [[0, 0], [t, b], [l, r], [0, 0]]),
    ),
  })
  .filter(convValid);

describe('Conv2DBackpropFilter (wasm)', () => {
  it('is one of the kernels we supply', () => {
    expect(WASM_MISSING_KERNELS).toContain('Conv2DBackpropFilter');
    expect(tf.getKernel('Conv2DBackpropFilter', 'wasm')).toBeDefined();
  });

  it('matches cpu on random shapes, strides 1/2, same/valid/explicit padding', async () => {
    await fc.assert(
      fc.asyncProperty(convCase, fc.nat(1000), async (c, seed) => {
        await wasmVsCpu(convFilterGrad(c, seed));
      }),
      { numRuns: 60 },
    );
  });

  it('matches cpu when the im2col buffer is split into many chunks', async () => {
    const prev = setConvChunkElems(50);
    try {
      await fc.assert(
        fc.asyncProperty(convCase, fc.nat(1000), async (c, seed) => {
          await wasmVsCpu(convFilterGrad(c, seed));
        }),
        { numRuns: 25 },
      );
    } finally {
      setConvChunkElems(prev);
    }
  });

  it.each([
    { sh: 1, sw: 1, pad: 'same' as Pad },
    { sh: 2, sw: 2, pad: 'same' as Pad },
    { sh: 2, sw: 2, pad: [[0, 0], [0, 1], [0, 1], [0, 0]] as Pad },
    { sh: 1, sw: 1, pad: 'valid' as Pad },
  ])('matches cpu on a UNet-like block (16×16×32 → 32, %o)', async ({ sh, sw, pad }) => {
    await wasmVsCpu(convFilterGrad({ b: 2, h: 16, w: 16, ci: 32, co: 32, kh: 3, kw: 3, sh, sw, pad }, 7));
  });

  it('handles NCHW via the raw kernel', async () => {
    const xs = [2, 3, 7, 6];
    const dys = [2, 4, 4, 3];
    const xd = randn(size(xs), 11);
    const dyd = randn(size(dys), 12);
    const run = (): tf.Tensor => {
      const x = tf.tensor(xd, xs);
      const dy = tf.tensor(dyd, dys);
      const attrs = { strides: [2, 2], pad: 'same', dataFormat: 'NCHW', filterShape: [3, 3, 3, 4] };
      return tf.engine().runKernel('Conv2DBackpropFilter', { x, dy }, attrs) as tf.Tensor;
    };
    await wasmVsCpu(run);
  });

  it('rejects a dy that does not match the conv output', async () => {
    await tf.setBackend('wasm');
    const x = tf.zeros([1, 5, 5, 2]);
    const dy = tf.zeros([1, 4, 5, 3]);
    const attrs = { strides: [1, 1], pad: 'same', dataFormat: 'NHWC', filterShape: [3, 3, 2, 3] };
    expect(() => tf.engine().runKernel('Conv2DBackpropFilter', { x, dy }, attrs)).toThrow(/dy shape/);
    tf.dispose([x, dy]);
  });

  it('accepts inputs still living on the cpu backend (moved mid-kernel)', async () => {
    await tf.setBackend('cpu');
    const xd = randn(2 * 9 * 9 * 4, 21);
    const dyd = randn(2 * 5 * 5 * 3, 22);
    const x = tf.tensor4d(xd, [2, 9, 9, 4]);
    const dy = tf.tensor4d(dyd, [2, 5, 5, 3]);
    const ids = tf.tensor1d([3, 0, 3], 'int32');
    const rows = tf.tensor2d(randn(3 * 6, 23), [3, 6]);
    const attrs = { strides: [2, 2], pad: 'same', dataFormat: 'NHWC', filterShape: [3, 3, 4, 3] };
    const want = tf.engine().runKernel('Conv2DBackpropFilter', { x, dy }, attrs) as tf.Tensor;
    const wantSeg = tf.unsortedSegmentSum(rows, ids, 5);
    await tf.setBackend('wasm');
    const got = tf.engine().runKernel('Conv2DBackpropFilter', { x, dy }, attrs) as tf.Tensor;
    const gotSeg = tf.unsortedSegmentSum(rows, ids, 5);
    expectClose([Float32Array.from(got.dataSync()), Float32Array.from(gotSeg.dataSync())], [
      Float32Array.from(want.dataSync()),
      Float32Array.from(wantSeg.dataSync()),
    ]);
    tf.dispose([x, dy, ids, rows, want, wantSeg, got, gotSeg]);
  });

  it('leaks neither tensors nor wasm heap buffers', async () => {
    await tf.setBackend('wasm');
    const f = convFilterGrad({ b: 2, h: 9, w: 8, ci: 5, co: 4, kh: 3, kw: 3, sh: 2, sw: 1, pad: 'same' }, 3);
    tf.dispose(tf.tidy(f)); // warm-up
    const backend = tf.engine().backend;
    const tensors = tf.memory().numTensors;
    const dataIds = backend.numDataIds();
    const prev = setConvChunkElems(100);
    try {
      for (let i = 0; i < 3; i++) tf.dispose(tf.tidy(f));
    } finally {
      setConvChunkElems(prev);
    }
    expect(tf.memory().numTensors).toBe(tensors);
    expect(backend.numDataIds()).toBe(dataIds);
  });
});

// ---------------------------------------------------------------------------------------------

describe('UnsortedSegmentSum (wasm, and the faster cpu replacement)', () => {
  function gatherGrad(vocab: number, dim: number, ids: Int32Array, idsShape: number[], seed: number): () => tf.Tensor {
    const table = randn(vocab * dim, seed);
    return () => {
      const t = tf.tensor2d(table, [vocab, dim]);
      const idx = tf.tensor(ids, idsShape, 'int32');
      const y = tf.gather(t, idx, 0);
      const w = tf.tensor(randn(y.size, seed + 1), y.shape);
      return tf.grad((a: tf.Tensor) => tf.sum(tf.mul(tf.gather(a, idx, 0), w)))(t);
    };
  }

  it('gather gradient w.r.t. the table matches cpu (repeats, 1-D and 2-D ids)', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 1, max: 40 }),
        fc.integer({ min: 1, max: 12 }),
        fc.integer({ min: 1, max: 3 }),
        fc.integer({ min: 1, max: 9 }),
        fc.nat(1000),
        async (vocab, dim, rows, cols, seed) => {
          const r = rng(seed);
          const ids = Int32Array.from({ length: rows * cols }, () => Math.floor(r() * vocab));
          await wasmVsCpu(gatherGrad(vocab, dim, ids, rows === 1 ? [cols] : [rows, cols], seed));
        },
      ),
      { numRuns: 40 },
    );
  });

  it('agrees with the original (per-segment) cpu kernel and with a JS reference, incl. int32 and N-D ids', async () => {
    const cases: { xShape: number[]; idShape: number[]; n: number; dtype: 'float32' | 'int32' }[] = [
      { xShape: [7], idShape: [7], n: 4, dtype: 'float32' },
      { xShape: [6, 5], idShape: [6], n: 9, dtype: 'float32' },
      { xShape: [2, 3, 4], idShape: [2, 3], n: 5, dtype: 'float32' },
      { xShape: [5, 3], idShape: [5], n: 3, dtype: 'int32' },
    ];
    const orig = originalKernel('UnsortedSegmentSum', 'cpu');
    expect(orig).toBeDefined();
    for (const [ci, c] of cases.entries()) {
      const r = rng(100 + ci);
      const xd = c.dtype === 'int32'
        ? Int32Array.from({ length: size(c.xShape) }, () => Math.floor(r() * 20) - 10)
        : randn(size(c.xShape), 200 + ci);
      const ids = Int32Array.from({ length: size(c.idShape) }, () => Math.floor(r() * c.n));
      const inner = size(c.xShape.slice(c.idShape.length));
      const ref = new Float64Array(c.n * inner);
      ids.forEach((id, i) => {
        for (let j = 0; j < inner; j++) ref[id * inner + j]! += xd[i * inner + j]!;
      });
      const run = (): tf.Tensor => {
        const segIds: tf.Tensor = tf.tensor(ids, c.idShape, 'int32');
        return tf.unsortedSegmentSum(tf.tensor(xd, c.xShape, c.dtype), segIds as tf.Tensor1D, c.n);
      };
      const wasm = await on('wasm', run);
      const cpu = await on('cpu', run);
      expectClose(wasm, [Float32Array.from(ref)]);
      expectClose(cpu, [Float32Array.from(ref)]);

      if (c.idShape.length > 1) continue; // the original cpu kernel mishandles N-D ids
      await tf.setBackend('cpu');
      const backend = tf.engine().backend;
      const x = tf.tensor(xd, c.xShape, c.dtype);
      const sid = tf.tensor(ids, c.idShape, 'int32');
      const info = orig!({ inputs: { x, segmentIds: sid }, backend, attrs: { numSegments: c.n } });
      const infos = Array.isArray(info) ? info : [info];
      const vals = Float32Array.from(backend.readSync(infos[0]!.dataId) as Float32Array | Int32Array);
      infos.forEach((t) => backend.disposeData(t.dataId));
      tf.dispose([x, sid]);
      expectClose([vals], [Float32Array.from(ref)]);
    }
  });

  it.each(['wasm', 'cpu'] as const)('rejects out-of-range segment ids on %s', async (backend) => {
    await tf.setBackend(backend);
    const x = tf.ones([3, 2]);
    for (const bad of [[0, 1, 4], [0, -1, 1]]) {
      const ids = tf.tensor1d(bad, 'int32');
      expect(() => tf.unsortedSegmentSum(x, ids, 4)).toThrow(/out of range/);
      ids.dispose();
    }
    x.dispose();
  });

  it.each(['wasm', 'cpu'] as const)('handles a CLIP-sized table (49,408 × 768) quickly on %s', async (backend) => {
    await tf.setBackend(backend);
    const vocab = 49408;
    const dim = 768;
    const n = 2 * 77;
    const r = rng(5);
    const ids = Int32Array.from({ length: n }, () => Math.floor(r() * vocab));
    ids[1] = ids[0]!; // a repeated token
    const xd = randn(n * dim, 6);
    const before = tf.memory().numTensors;
    const x = tf.tensor2d(xd, [n, dim]);
    const segIds = tf.tensor1d(ids, 'int32');
    const t0 = performance.now();
    const out = tf.unsortedSegmentSum(x, segIds, vocab);
    const ms = performance.now() - t0; // cpu and wasm kernels run synchronously
    expect(out.shape).toEqual([vocab, dim]);
    // Spot checks without reading the whole 150 MB back.
    const row = tf.tidy(() => tf.gather(out, tf.tensor1d([ids[0]!], 'int32')).dataSync());
    for (let j = 0; j < dim; j += 97) expect(row[j]).toBeCloseTo(xd[j]! + xd[dim + j]!, 5);
    let total = 0;
    for (const v of xd) total += v;
    expect(tf.tidy(() => tf.sum(out).dataSync()[0])).toBeCloseTo(total, 0);
    tf.dispose([x, segIds, out]);
    expect(tf.memory().numTensors).toBe(before);
    expect(ms).toBeLessThan(2000); // the per-segment cpu original makes 49,408 passes over x
  });
});

// ---------------------------------------------------------------------------------------------
// Probe: every op the models differentiate through.

interface OpSpec {
  name: string;
  /** Shapes of the differentiable inputs. */
  shapes: number[][];
  /** positive inputs (log, sqrt, rsqrt) */
  positive?: boolean;
  f: (...xs: tf.Tensor[]) => tf.Tensor;
}

const ids = (v: number[]): tf.Tensor => tf.tensor1d(v, 'int32');
const t4 = (x: tf.Tensor): tf.Tensor4D => x as tf.Tensor4D;

const OPS: OpSpec[] = [
  { name: 'conv2d same s1', shapes: [[2, 5, 6, 3], [3, 3, 3, 4]], f: (x, w) => tf.conv2d(t4(x), t4(w), 1, 'same') },
  { name: 'conv2d same s2', shapes: [[2, 7, 6, 3], [3, 3, 3, 4]], f: (x, w) => tf.conv2d(t4(x), t4(w), 2, 'same') },
  {
    name: 'conv2d explicit s2',
    shapes: [[2, 7, 8, 3], [3, 3, 3, 4]],
    f: (x, w) => tf.conv2d(t4(x), t4(w), 2, [[0, 0], [0, 1], [0, 1], [0, 0]]),
  },
  { name: 'conv2d valid 1x1', shapes: [[2, 4, 4, 5], [1, 1, 5, 3]], f: (x, w) => tf.conv2d(t4(x), t4(w), 1, 'valid') },
  { name: 'matMul 2D', shapes: [[4, 6], [6, 5]], f: (a, b) => tf.matMul(a, b) },
  { name: 'matMul 2D tA tB', shapes: [[6, 4], [5, 6]], f: (a, b) => tf.matMul(a, b, true, true) },
  { name: 'matMul 3D tB', shapes: [[2, 4, 6], [2, 5, 6]], f: (a, b) => tf.matMul(a, b, false, true) },
  { name: 'matMul 4D tA', shapes: [[2, 3, 6, 4], [2, 3, 6, 5]], f: (a, b) => tf.matMul(a, b, true, false) },
  { name: 'add/sub/mul/div broadcast', shapes: [[2, 3, 4], [4], [3, 1]], f: (a, b, c) => tf.div(tf.mul(tf.sub(tf.add(a, b), c), a), tf.add(tf.square(c), 1)) },
  { name: 'neg', shapes: [[5]], f: (a) => tf.neg(a) },
  { name: 'exp', shapes: [[5]], f: (a) => tf.exp(a) },
  { name: 'log', shapes: [[5]], positive: true, f: (a) => tf.log(a) },
  { name: 'sqrt', shapes: [[5]], positive: true, f: (a) => tf.sqrt(a) },
  { name: 'rsqrt', shapes: [[5]], positive: true, f: (a) => tf.rsqrt(a) },
  { name: 'square', shapes: [[5]], f: (a) => tf.square(a) },
  { name: 'tanh', shapes: [[5]], f: (a) => tf.tanh(a) },
  { name: 'sigmoid', shapes: [[5]], f: (a) => tf.sigmoid(a) },
  { name: 'erf', shapes: [[5]], f: (a) => tf.erf(a) },
  { name: 'cos', shapes: [[5]], f: (a) => tf.cos(a) },
  { name: 'sin', shapes: [[5]], f: (a) => tf.sin(a) },
  { name: 'abs', shapes: [[5]], f: (a) => tf.abs(a) },
  { name: 'mean axes', shapes: [[2, 3, 4]], f: (a) => tf.mean(a, [1, 2], true) },
  { name: 'sum axis', shapes: [[2, 3, 4]], f: (a) => tf.sum(a, -1) },
  { name: 'max axis', shapes: [[2, 3, 4]], f: (a) => tf.max(a, 1) },
  { name: 'reshape', shapes: [[2, 3, 4]], f: (a) => tf.reshape(a, [6, 4]) },
  { name: 'transpose', shapes: [[2, 3, 4]], f: (a) => tf.transpose(a, [0, 2, 1]) },
  { name: 'concat', shapes: [[2, 3, 4], [2, 1, 4]], f: (a, b) => tf.concat([a, b, a], 1) },
  { name: 'slice', shapes: [[2, 3, 4]], f: (a) => tf.slice(a, [0, 1, 1], [2, 2, 3]) },
  { name: 'stridedSlice strided', shapes: [[2, 5, 6]], f: (a) => tf.stridedSlice(a, [0, 1, 0], [2, 5, 6], [1, 2, 2]) },
  { name: 'stridedSlice plain', shapes: [[2, 5, 6]], f: (a) => tf.stridedSlice(a, [0, 1, 2], [2, 4, 5]) },
  { name: 'stridedSlice negative', shapes: [[4, 6]], f: (a) => tf.stridedSlice(a, [3, 5], [0, 0], [-1, -2]) },
  // x[1, :, ::2] via begin/end masks and a shrunk axis. (Ellipsis masks are avoided: tfjs 4.22's
  // *forward* StridedSlice is wrong with them, on cpu and wasm alike.)
  { name: 'stridedSlice shrink+masks', shapes: [[3, 4, 5]], f: (a) => tf.stridedSlice(a, [1, 0, 0], [2, 0, 0], [1, 1, 2], 6, 6, 0, 0, 1) },
  // x[:, None, 1::2] via a new axis.
  { name: 'stridedSlice newAxis', shapes: [[3, 4, 5]], f: (a) => tf.stridedSlice(a, [0, 0, 1], [0, 0, 5], [1, 1, 2], 3, 3, 0, 2, 0) },
  { name: 'pad', shapes: [[2, 3, 4]], f: (a) => tf.pad(a, [[0, 0], [1, 2], [0, 1]]) },
  { name: 'softmax', shapes: [[2, 3, 4]], f: (a) => tf.softmax(a) },
  { name: 'logSoftmax', shapes: [[2, 3, 4]], f: (a) => tf.logSoftmax(a) },
  { name: 'gather (embedding)', shapes: [[7, 5]], f: (a) => tf.gather(a, ids([1, 0, 1, 6, 3]), 0) },
  { name: 'resizeNearestNeighbor 2x', shapes: [[2, 3, 4, 3]], f: (a) => tf.image.resizeNearestNeighbor(t4(a), [6, 8]) },
  {
    name: 'tile/broadcast upsampling',
    shapes: [[2, 3, 4, 3]],
    f: (a) => tf.reshape(tf.broadcastTo(tf.reshape(a, [2, 3, 1, 4, 1, 3]), [2, 3, 2, 4, 2, 3]), [2, 6, 8, 3]),
  },
  { name: 'tile', shapes: [[2, 3, 4]], f: (a) => tf.tile(a, [1, 2, 2]) },
  { name: 'cast', shapes: [[5]], f: (a) => tf.cast(a, 'float32') },
  { name: 'where/greater', shapes: [[6], [6]], f: (a, b) => tf.where(tf.greater(a, 0), a, tf.mul(b, 2)) },
  { name: 'where/less/equal', shapes: [[6]], f: (a) => tf.where(tf.logicalOr(tf.less(a, -0.5), tf.equal(a, 0)), tf.neg(a), a) },
  { name: 'minimum/maximum', shapes: [[6], [6]], f: (a, b) => tf.add(tf.minimum(a, b), tf.maximum(a, 0.1)) },
  { name: 'clipByValue', shapes: [[6]], f: (a) => tf.clipByValue(a, -0.5, 0.5) },
  { name: 'squaredDifference broadcast', shapes: [[2, 3], [3]], f: (a, b) => tf.squaredDifference(a, b) },
  { name: 'maximum/minimum broadcast', shapes: [[2, 3, 4], [3, 1]], f: (a, b) => tf.add(tf.maximum(a, b), tf.minimum(b, a)) },
  {
    name: 'where broadcast rank 5 (GroupNorm-shaped)',
    shapes: [[2, 3, 3, 2, 4], [2, 1, 1, 2, 1]],
    f: (x, m) => tf.where(tf.greater(m, 0), tf.squaredDifference(x, m), tf.mul(x, m)),
  },
];

function opGrads(spec: OpSpec, seed: number): () => tf.Tensor[] {
  const data = spec.shapes.map((s, i) => {
    const d = randn(size(s), seed + i * 17);
    if (spec.positive === true) for (let j = 0; j < d.length; j++) d[j] = Math.abs(d[j]!) + 0.5;
    return d;
  });
  return () => {
    const xs = spec.shapes.map((s, i) => tf.tensor(data[i]!, s));
    const y = spec.f(...xs);
    const w = tf.tensor(randn(y.size, seed + 99), y.shape);
    return tf.grads((...args: tf.Tensor[]) => tf.sum(tf.mul(spec.f(...args), w)))(xs);
  };
}

describe('gradient probe on wasm', () => {
  it.each(OPS.map((o) => [o.name, o] as const))('%s: gradient exists and matches cpu', async (_name, spec) => {
    await wasmVsCpu(opGrads(spec, 42));
  });

  it('without our registrations, exactly the known kernels/gradients are missing or broken', async () => {
    await tf.setBackend('wasm');
    const kernels = WASM_MISSING_KERNELS.map((k) => [k, tf.getKernel(k, 'wasm')] as const);
    const added = ADDED_GRADIENTS.map((k) => [k, tf.getGradient(k)] as const);
    const replaced = REPLACED_GRADIENTS.map((k) => [k, tf.getGradient(k), originalGradient(k)] as const);
    const missing = new Set<string>();
    const broken: string[] = [];
    try {
      for (const [k] of kernels) tf.unregisterKernel(k, 'wasm');
      for (const [k] of added) tf.unregisterGradient(k);
      for (const [, , orig] of replaced) if (orig !== undefined) tf.registerGradient(orig);
      for (const spec of OPS) {
        try {
          tf.dispose(tf.tidy(opGrads(spec, 1)));
        } catch (e) {
          const msg = e instanceof Error ? e.message : String(e);
          const m = /Kernel '(\w+)' not registered for backend 'wasm'/.exec(msg) ?? /gradient function not found for (\w+)/.exec(msg);
          if (m === null) broken.push(spec.name);
          else missing.add(m[1]!);
        }
      }
    } finally {
      for (const [, cfg] of kernels) if (cfg !== undefined) tf.registerKernel(cfg);
      for (const [, g] of added) if (g !== undefined) tf.registerGradient(g);
      for (const [, g] of replaced) if (g !== undefined) tf.registerGradient(g);
    }
    // If tfjs ever fixes one of these, this tells us to drop our version.
    expect([...missing].sort()).toEqual(['Conv2DBackpropFilter', 'Greater', 'LogicalOr', 'StridedSlice', 'UnsortedSegmentSum']);
    expect(broken.sort()).toEqual([
      'maximum/minimum broadcast',
      'squaredDifference broadcast',
      'tile/broadcast upsampling',
      'where broadcast rank 5 (GroupNorm-shaped)',
    ]);
    expect(registerGradKernels()).toEqual([]);
    expect(registerGradientGaps()).toEqual([]);
  });
});
