/**
 * The tfjs bugs we work around, checked against independent references rather than against
 * another tfjs backend (both backends share them):
 * StridedSlice forward with shrink + stride, StridedSlice/Tile/ResizeNearestNeighbor gradients
 * (adjoint identity ⟨A x, w⟩ = ⟨x, Aᵀ w⟩), and broadcasting in Maximum/Minimum/SquaredDifference
 * gradients (central differences).
 */
import * as tf from '@tensorflow/tfjs';
import fc from 'fast-check';
import { beforeAll, describe, expect, it } from 'vitest';

import { initBackend } from '../../src/backend.js';
import { originalGradient } from '../../src/backend/gradient-gaps.js';
import { originalKernel } from '../../src/backend/wasm-grad-kernels.js';

const BACKENDS = ['wasm', 'cpu'] as const;

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

function uniform(n: number, seed: number): Float32Array {
  const r = rng(seed);
  return Float32Array.from({ length: n }, () => r() * 2 - 1);
}

const size = (s: readonly number[]): number => s.reduce((a, b) => a * b, 1);

function dot(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i]! * b[i]!;
  return s;
}

/** ⟨f(x), w⟩ = ⟨x, ∇ₓ⟨f(x), w⟩⟩ for a linear f; checks the gradient is f's exact adjoint. */
function expectAdjoint(f: (x: tf.Tensor) => tf.Tensor, xShape: number[], seed: number): void {
  const before = tf.memory().numTensors;
  const xd = uniform(size(xShape), seed);
  const [lhs, rhs] = tf.tidy(() => {
    const x = tf.tensor(xd, xShape);
    const y = f(x);
    const w = tf.tensor(uniform(y.size, seed + 1), y.shape);
    const g = tf.grad((a: tf.Tensor) => tf.sum(tf.mul(f(a), w)))(x);
    expect(g.shape).toEqual(xShape);
    return [dot(y.dataSync(), w.dataSync()), dot(xd, g.dataSync())];
  });
  expect(Math.abs(lhs - rhs)).toBeLessThanOrEqual(1e-4 * Math.max(1, Math.abs(lhs)));
  expect(tf.memory().numTensors).toBe(before);
}

beforeAll(async () => {
  await initBackend({ backend: 'wasm', log: () => {} });
});

// ---------------------------------------------------------------------------------------------
// StridedSlice

type SliceSpec = { start?: number; stop?: number; step: number };
/** One NumPy subscript: an index, a slice, `...` or `None` (new axis). */
type DimSpec = { index: number } | SliceSpec | { ellipsis: true } | { newAxis: true };

const FULL: SliceSpec = { step: 1 };

/** Python/NumPy semantics of one index or slice over an axis of length n: the indices it selects. */
function pyIndices(n: number, d: { index: number } | SliceSpec): number[] {
  if ('index' in d) return [d.index < 0 ? d.index + n : d.index];
  const { step } = d;
  const norm = (v: number, lo: number, hi: number): number => Math.min(Math.max(v < 0 ? v + n : v, lo), hi);
  const out: number[] = [];
  if (step > 0) {
    const start = d.start === undefined ? 0 : norm(d.start, 0, n);
    const stop = d.stop === undefined ? n : norm(d.stop, 0, n);
    for (let i = start; i < stop; i += step) out.push(i);
  } else {
    const start = d.start === undefined ? n - 1 : norm(d.start, -1, n - 1);
    const stop = d.stop === undefined ? -1 : norm(d.stop, -1, n - 1);
    for (let i = start; i > stop; i += step) out.push(i);
  }
  return out;
}

function toTfArgs(spec: DimSpec[]): [number[], number[], number[], number, number, number, number, number] {
  const begin: number[] = [];
  const end: number[] = [];
  const strides: number[] = [];
  let beginMask = 0;
  let endMask = 0;
  let ellipsis = 0;
  let newAxis = 0;
  let shrink = 0;
  spec.forEach((d, i) => {
    if ('ellipsis' in d || 'newAxis' in d) {
      begin.push(0);
      end.push(0);
      strides.push(1);
      if ('ellipsis' in d) ellipsis |= 1 << i;
      else newAxis |= 1 << i;
    } else if ('index' in d) {
      begin.push(d.index);
      end.push(d.index + 1);
      strides.push(1);
      shrink |= 1 << i;
    } else {
      begin.push(d.start ?? 0);
      end.push(d.stop ?? 0);
      strides.push(d.step);
      if (d.start === undefined) beginMask |= 1 << i;
      if (d.stop === undefined) endMask |= 1 << i;
    }
  });
  return [begin, end, strides, beginMask, endMask, ellipsis, newAxis, shrink];
}

function reference(xShape: number[], spec: DimSpec[], x: Float32Array): { shape: number[]; values: number[] } {
  // `...` (or, without one, the end of the subscript) stands for full slices of the unnamed axes.
  const consuming = spec.filter((d) => 'index' in d || 'step' in d).length;
  const fill = Array.from({ length: xShape.length - consuming }, () => FULL);
  const at = spec.findIndex((d) => 'ellipsis' in d);
  const dense = at < 0 ? [...spec, ...fill] : [...spec.slice(0, at), ...fill, ...spec.slice(at + 1)];
  const perAxis = dense.filter((d): d is { index: number } | SliceSpec => 'index' in d || 'step' in d);
  const idx = xShape.map((n, i) => pyIndices(n, perAxis[i]!));
  const shape: number[] = [];
  let axis = 0;
  for (const d of dense) {
    if ('newAxis' in d) shape.push(1);
    else if ('step' in d) shape.push(idx[axis++]!.length);
    else if ('index' in d) axis++;
  }
  const values: number[] = [];
  const strides = xShape.map((_, i) => size(xShape.slice(i + 1)));
  const walk = (dim: number, off: number): void => {
    if (dim === xShape.length) {
      values.push(x[off]!);
      return;
    }
    for (const i of idx[dim]!) walk(dim + 1, off + i * strides[dim]!);
  };
  walk(0, 0);
  return { shape, values };
}

const axisSpec = (n: number): fc.Arbitrary<DimSpec> =>
  fc.oneof(
    fc.integer({ min: -n, max: n - 1 }).map((index): DimSpec => ({ index })),
    fc
      .record({
        start: fc.option(fc.integer({ min: -n - 1, max: n + 1 }), { nil: undefined }),
        stop: fc.option(fc.integer({ min: -n - 1, max: n + 1 }), { nil: undefined }),
        step: fc.constantFrom(1, 2, 3, -1, -2),
      })
      .map((r): DimSpec => {
        const d: SliceSpec = { step: r.step };
        if (r.start !== undefined) d.start = r.start;
        if (r.stop !== undefined) d.stop = r.stop;
        return d;
      }),
  );

/** A shape and a subscript for it: per-axis specs, optionally an ellipsis over a run of axes
 *  and a new axis somewhere. */
function sliceCase(opts: { ellipsis: boolean; newAxis: boolean }): fc.Arbitrary<[number[], DimSpec[]]> {
  return fc
    .array(fc.integer({ min: 1, max: 5 }), { minLength: 1, maxLength: 4 })
    .chain((shape) =>
      fc.tuple(
        fc.constant(shape),
        fc.tuple(...shape.map(axisSpec)),
        fc.nat(shape.length),
        fc.nat(shape.length),
        fc.nat(shape.length + 1),
        fc.boolean(),
        fc.boolean(),
      ),
    )
    .map(([shape, perAxis, p, k, q, useEllipsis, useNewAxis]): [number[], DimSpec[]] => {
      let spec: DimSpec[] = [...perAxis];
      if (opts.ellipsis && useEllipsis) {
        const start = Math.min(p, spec.length);
        spec = [...spec.slice(0, start), { ellipsis: true }, ...spec.slice(Math.min(spec.length, start + k))];
      }
      if (opts.newAxis && useNewAxis) {
        const at = Math.min(q, spec.length);
        spec = [...spec.slice(0, at), { newAxis: true }, ...spec.slice(at)];
      }
      return [shape, spec];
    });
}

describe('StridedSlice', () => {
  it.each(BACKENDS)('forward matches NumPy semantics incl. shrink + stride on %s', async (backend) => {
    await tf.setBackend(backend);
    fc.assert(
      fc.property(sliceCase({ ellipsis: true, newAxis: true }), fc.nat(100), ([shape, spec], seed) => {
        const ref = reference(shape, spec, uniform(size(shape), seed));
        if (ref.values.length === 0) return; // tfjs's empty-slice shapes differ; not our concern
        const y = tf.tidy(() => tf.stridedSlice(tf.tensor(uniform(size(shape), seed), shape), ...toTfArgs(spec)));
        expect(y.shape).toEqual(ref.shape);
        expect(Array.from(y.dataSync())).toEqual(ref.values.map((v) => Math.fround(v)));
        y.dispose();
      }),
      { numRuns: 300 },
    );
  });

  it.each(BACKENDS)('gradient is the adjoint of the forward on %s', async (backend) => {
    await tf.setBackend(backend);
    fc.assert(
      fc.property(sliceCase({ ellipsis: true, newAxis: true }), fc.nat(100), ([shape, spec], seed) => {
        if (reference(shape, spec, new Float32Array(size(shape))).values.length === 0) return;
        expectAdjoint((x) => tf.stridedSlice(x, ...toTfArgs(spec)), shape, seed);
      }),
      { numRuns: 150 },
    );
  });

  it('native kernels are still broken for shrink + stride (drop our fix when this fails)', async () => {
    const orig = originalKernel('StridedSlice', 'wasm');
    expect(orig).toBeDefined();
    await tf.setBackend('wasm');
    const backend = tf.engine().backend;
    const x = tf.tensor(Float32Array.from({ length: 60 }, (_, i) => i), [3, 4, 5]);
    const [begin, end, strides, beginMask, endMask, ellipsisMask, newAxisMask, shrinkAxisMask] = toTfArgs([
      { step: 1 },
      { index: 1 },
      { step: 2 },
    ]);
    const out = orig!({
      inputs: { x },
      backend,
      attrs: { begin, end, strides, beginMask, endMask, ellipsisMask, newAxisMask, shrinkAxisMask },
    });
    const info = Array.isArray(out) ? out[0]! : out;
    const got = Array.from(backend.readSync(info.dataId) as Float32Array);
    backend.disposeData(info.dataId);
    x.dispose();
    expect(got).not.toEqual([5, 7, 9, 25, 27, 29, 45, 47, 49]);
  });
});

// ---------------------------------------------------------------------------------------------

describe('ResizeNearestNeighbor gradient', () => {
  const cases = [
    { x: [2, 3, 4, 3], size: [6, 8] as [number, number], ac: false, hp: false },
    { x: [3, 4, 4, 2], size: [8, 8] as [number, number], ac: false, hp: true },
    { x: [2, 3, 5, 1], size: [5, 9] as [number, number], ac: true, hp: false },
    { x: [2, 5, 4, 2], size: [3, 7] as [number, number], ac: false, hp: false },
  ];
  it.each(BACKENDS.flatMap((b) => cases.map((c) => [b, c] as const)))('is the adjoint of the forward on %s (%o)', async (backend, c) => {
    await tf.setBackend(backend);
    expectAdjoint((x) => tf.image.resizeNearestNeighbor(x as tf.Tensor4D, c.size, c.ac, c.hp), c.x, 3);
  });

  it('the native cpu kernel is wrong for batch > 1 (drop our fix when this fails)', async () => {
    const orig = originalKernel('ResizeNearestNeighborGrad', 'cpu');
    expect(orig).toBeDefined();
    await tf.setBackend('cpu');
    const backend = tf.engine().backend;
    const images = tf.zeros([2, 1, 1, 1]);
    const dy = tf.tensor4d([1, 1, 1, 1, 2, 2, 2, 2], [2, 2, 2, 1]);
    const out = orig!({ inputs: { images, dy }, backend, attrs: { alignCorners: false, halfPixelCenters: false, size: [2, 2] } });
    const info = Array.isArray(out) ? out[0]! : out;
    const got = Array.from(backend.readSync(info.dataId) as Float32Array);
    backend.disposeData(info.dataId);
    expect(got).not.toEqual([4, 8]);
    const ours = tf.tidy(() =>
      tf.grad((x: tf.Tensor) => tf.sum(tf.mul(tf.image.resizeNearestNeighbor(x as tf.Tensor4D, [2, 2]), dy)))(images),
    );
    expect(Array.from(ours.dataSync())).toEqual([4, 8]);
    tf.dispose([images, dy, ours]);
  });
});

// ---------------------------------------------------------------------------------------------

describe('Tile / broadcastTo gradient', () => {
  const tileCase = fc
    .array(fc.tuple(fc.integer({ min: 1, max: 3 }), fc.integer({ min: 1, max: 3 })), { minLength: 1, maxLength: 6 })
    .filter((dims) => size(dims.map(([d, r]) => d * r)) <= 4096);

  it.each(BACKENDS)('is the adjoint of tile for ranks 1–6 on %s', async (backend) => {
    await tf.setBackend(backend);
    fc.assert(
      fc.property(tileCase, fc.nat(100), (dims, seed) => {
        expectAdjoint((x) => tf.tile(x, dims.map(([, r]) => r)), dims.map(([d]) => d), seed);
      }),
      { numRuns: 100 },
    );
  });

  it('equals the original tfjs gradient where that one works (rank ≤ 4)', async () => {
    const orig = originalGradient('Tile');
    expect(orig).toBeDefined();
    await tf.setBackend('wasm');
    fc.assert(
      fc.property(tileCase.filter((d) => d.length <= 4), fc.nat(100), (dims, seed) => {
        tf.tidy(() => {
          const x = tf.tensor(uniform(size(dims.map(([d]) => d)), seed), dims.map(([d]) => d));
          const reps = dims.map(([, r]) => r);
          const dy = tf.tensor(uniform(size(dims.map(([d, r]) => d * r)), seed + 5), dims.map(([d, r]) => d * r));
          const ours = tf.grad((a: tf.Tensor) => tf.sum(tf.mul(tf.tile(a, reps), dy)))(x);
          const theirs = orig!.gradFunc(dy, [x], { reps })['x']!();
          const err = tf.max(tf.abs(tf.sub(ours, theirs))).dataSync()[0]!;
          expect(err).toBeLessThan(1e-4);
        });
      }),
      { numRuns: 50 },
    );
  });

  it.each(BACKENDS)('handles 2× nearest upsampling by broadcastTo at rank 6 on %s', async (backend) => {
    await tf.setBackend(backend);
    const up = (x: tf.Tensor): tf.Tensor =>
      tf.reshape(tf.broadcastTo(tf.reshape(x, [2, 3, 1, 4, 1, 5]), [2, 3, 2, 4, 2, 5]), [2, 6, 8, 5]);
    expectAdjoint(up, [2, 3, 4, 5], 9);
    // and it equals resizeNearestNeighbor's gradient
    const x = tf.tensor(uniform(120, 1), [2, 3, 4, 5]);
    const w = tf.tensor(uniform(480, 2), [2, 6, 8, 5]);
    const [a, b] = tf.tidy(() => [
      tf.grad((v: tf.Tensor) => tf.sum(tf.mul(up(v), w)))(x),
      tf.grad((v: tf.Tensor) => tf.sum(tf.mul(tf.image.resizeNearestNeighbor(v as tf.Tensor4D, [6, 8]), w)))(x),
    ]);
    expect(tf.tidy(() => tf.max(tf.abs(tf.sub(a!, b!))).dataSync()[0])).toBeLessThan(1e-5);
    tf.dispose([x, w, a!, b!]);
  });
});

// ---------------------------------------------------------------------------------------------

describe('broadcasting binary-op gradients', () => {
  /** Central differences in float64 over the loss computed by tfjs (float32): coarse but independent. */
  function numericGrad(f: (a: tf.Tensor, b: tf.Tensor) => tf.Tensor, a: Float32Array, aShape: number[], b: Float32Array, bShape: number[], which: 0 | 1): Float64Array {
    const h = 1e-2;
    const base = which === 0 ? a : b;
    const out = new Float64Array(base.length);
    const loss = (av: Float32Array, bv: Float32Array): number =>
      tf.tidy(() => tf.sum(f(tf.tensor(av, aShape), tf.tensor(bv, bShape))).dataSync()[0]!);
    for (let i = 0; i < base.length; i++) {
      const plus = Float32Array.from(base);
      const minus = Float32Array.from(base);
      plus[i]! += h;
      minus[i]! -= h;
      const lp = which === 0 ? loss(plus, b) : loss(a, plus);
      const lm = which === 0 ? loss(minus, b) : loss(a, minus);
      out[i] = (lp - lm) / (2 * h);
    }
    return out;
  }

  const ops: [string, (a: tf.Tensor, b: tf.Tensor) => tf.Tensor][] = [
    ['squaredDifference', (a, b) => tf.squaredDifference(a, b)],
    ['maximum', (a, b) => tf.mul(tf.maximum(a, b), tf.add(a, 2))],
    ['minimum', (a, b) => tf.mul(tf.minimum(a, b), tf.add(a, 2))],
  ];
  const shapes: [number[], number[]][] = [
    [[2, 3, 4], [4]],
    [[2, 3, 4], [3, 1]],
    [[3, 1], [1, 4]],
    [[2, 1, 1, 3, 1], [2, 2, 2, 3, 4]],
  ];

  it.each(BACKENDS.flatMap((be) => ops.flatMap(([n, f]) => shapes.map((s) => [be, n, f, s] as const))))(
    '%s %s grads reduce to input shapes and match central differences (%#)',
    async (backend, _name, f, [aShape, bShape]) => {
      await tf.setBackend(backend);
      // a on multiples of 0.2, b halfway between: never within ±h of each other, so no
      // difference quotient straddles a max/min kink.
      const grid = (n: number, seed: number, offset: number): Float32Array => {
        const r = rng(seed);
        return Float32Array.from({ length: n }, () => (Math.floor(r() * 20) - 10) * 0.2 + offset);
      };
      const a = grid(size(aShape), 1, 0);
      const b = grid(size(bShape), 2, 0.1);
      const [ga, gb] = tf.tidy(() => tf.grads(f)([tf.tensor(a, aShape), tf.tensor(b, bShape)]).map((g) => g.dataSync()));
      const na = numericGrad(f, a, aShape, b, bShape, 0);
      const nb = numericGrad(f, a, aShape, b, bShape, 1);
      expect(ga!.length).toBe(a.length);
      expect(gb!.length).toBe(b.length);
      na.forEach((v, i) => expect(Math.abs(ga![i]! - v)).toBeLessThan(2e-2 * Math.max(1, Math.abs(v))));
      nb.forEach((v, i) => expect(Math.abs(gb![i]! - v)).toBeLessThan(2e-2 * Math.max(1, Math.abs(v))));
    },
  );
});
