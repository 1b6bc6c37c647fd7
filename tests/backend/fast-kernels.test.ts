/**
 * Our wasm BatchMatMul and Conv2DBackpropInput replacements against the cpu backend (and the
 * native wasm kernels where those handle the case), on shapes large enough to take our paths.
 */
import * as tf from '@tensorflow/tfjs';
import fc from 'fast-check';
import { beforeAll, describe, expect, it } from 'vitest';

import { initBackend } from '../../src/backend.js';
import { originalKernel, setConvChunkElems } from '../../src/backend/wasm-grad-kernels.js';

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

const size = (s: readonly number[]): number => s.reduce((a, b) => a * b, 1);

function uniform(n: number, seed: number): Float32Array {
  const r = rng(seed);
  return Float32Array.from({ length: n }, () => r() * 2 - 1);
}

async function run(backend: 'wasm' | 'cpu', f: () => tf.Tensor): Promise<{ shape: number[]; values: Float32Array }> {
  await tf.setBackend(backend);
  const before = tf.memory().numTensors;
  const dataIds = tf.engine().backend.numDataIds();
  const t = tf.tidy(f);
  const out = { shape: t.shape, values: Float32Array.from(t.dataSync()) };
  t.dispose();
  expect(tf.memory().numTensors).toBe(before);
  expect(tf.engine().backend.numDataIds()).toBe(dataIds);
  return out;
}

function expectClose(got: { shape: number[]; values: Float32Array }, want: { shape: number[]; values: Float32Array }): void {
  expect(got.shape).toEqual(want.shape);
  let scale = 1;
  for (const v of want.values) scale = Math.max(scale, Math.abs(v));
  let err = 0;
  want.values.forEach((v, i) => {
    err = Math.max(err, Math.abs(got.values[i]! - v));
  });
  expect(err).toBeLessThanOrEqual(1e-4 * scale);
}

beforeAll(async () => {
  await initBackend({ backend: 'wasm', log: () => {} });
});

describe('BatchMatMul (wasm fast path)', () => {
  const batchPair = fc.oneof(
    fc.constant<[number[], number[]]>([[], []]),
    fc.constant<[number[], number[]]>([[3], [3]]),
    fc.constant<[number[], number[]]>([[3], []]),
    fc.constant<[number[], number[]]>([[], [2]]),
    fc.constant<[number[], number[]]>([[2, 3], [2, 3]]),
    fc.constant<[number[], number[]]>([[2, 3], [1, 3]]),
    fc.constant<[number[], number[]]>([[2, 1], [1, 3]]), // general broadcast
    fc.constant<[number[], number[]]>([[2, 2], []]),
  );
  const mmCase = fc.record({
    batch: batchPair,
    m: fc.integer({ min: 1, max: 40 }),
    k: fc.integer({ min: 1, max: 40 }),
    n: fc.integer({ min: 1, max: 40 }),
    ta: fc.boolean(),
    tb: fc.boolean(),
    seed: fc.nat(1000),
  });

  it('matches cpu across transposes, batch shapes and broadcasting', async () => {
    await fc.assert(
      fc.asyncProperty(mmCase, async ({ batch: [ba, bb], m, k, n, ta, tb, seed }) => {
        const aShape = [...ba, ...(ta ? [k, m] : [m, k])];
        const bShape = [...bb, ...(tb ? [n, k] : [k, n])];
        const ad = uniform(size(aShape), seed);
        const bd = uniform(size(bShape), seed + 1);
        const f = (): tf.Tensor => tf.matMul(tf.tensor(ad, aShape), tf.tensor(bd, bShape), ta, tb);
        // The cpu kernel mishandles batch dims that broadcast both ways ([2,1] with [1,3]), so
        // its reference gets the batch dims expanded up front.
        const outBatch = tf.broadcast_util.assertAndGetBroadcastShape(ba, bb);
        const ref = (): tf.Tensor =>
          tf.matMul(
            tf.broadcastTo(tf.tensor(ad, aShape), [...outBatch, ...aShape.slice(-2)]),
            tf.broadcastTo(tf.tensor(bd, bShape), [...outBatch, ...bShape.slice(-2)]),
            ta,
            tb,
          );
        expectClose(await run('wasm', f), await run('cpu', ref));
      }),
      { numRuns: 120 },
    );
  });

  it('agrees with the native wasm kernel on an attention-shaped product', async () => {
    const native = originalKernel('BatchMatMul', 'wasm');
    expect(native).toBeDefined();
    await tf.setBackend('wasm');
    const q = tf.tensor(uniform(8 * 77 * 64, 1), [8, 77, 64]);
    const k = tf.tensor(uniform(8 * 77 * 64, 2), [8, 77, 64]);
    const ours = tf.matMul(q, k, false, true);
    const info = native!({ inputs: { a: q, b: k }, backend: tf.engine().backend, attrs: { transposeA: false, transposeB: true } });
    const ref = Array.isArray(info) ? info[0]! : info;
    const refVals = tf.engine().backend.readSync(ref.dataId) as Float32Array;
    const got = ours.dataSync();
    let err = 0;
    refVals.forEach((v, i) => {
      err = Math.max(err, Math.abs(v - got[i]!));
    });
    expect(ours.shape).toEqual([8, 77, 77]);
    expect(err).toBeLessThan(1e-3);
    tf.engine().backend.disposeData(ref.dataId);
    tf.dispose([q, k, ours]);
  });
});

describe('Conv2DBackpropInput (wasm fast path)', () => {
  type Pad = 'same' | 'valid' | [[0, 0], [number, number], [number, number], [0, 0]];
  const convCase = fc
    .record({
      b: fc.integer({ min: 1, max: 3 }),
      h: fc.integer({ min: 1, max: 9 }),
      w: fc.integer({ min: 1, max: 9 }),
      ci: fc.integer({ min: 1, max: 6 }),
      co: fc.integer({ min: 1, max: 5 }),
      kh: fc.integer({ min: 1, max: 3 }),
      kw: fc.integer({ min: 1, max: 3 }),
      s: fc.constantFrom(1, 2),
      pad: fc.oneof(
        fc.constant<Pad>('same'),
        fc.constant<Pad>('valid'),
        fc.tuple(fc.nat(2), fc.nat(2), fc.nat(2), fc.nat(2)).map(([t, b, l, r]): Pad => [[0, 0], [t, b], [l, r], [0, 0]]),
      ),
      seed: fc.nat(1000),
    })
    .filter((c) => {
      const out = (n: number, k: number, lo: number, hi: number): number =>
        c.pad === 'same' ? Math.ceil(n / c.s) : c.pad === 'valid' ? Math.ceil((n - k + 1) / c.s) : Math.floor((n + lo + hi - k) / c.s) + 1;
      const [t, bt, l, r] = Array.isArray(c.pad) ? [c.pad[1][0], c.pad[1][1], c.pad[2][0], c.pad[2][1]] : [0, 0, 0, 0];
      return out(c.h, c.kh, t, bt) > 0 && out(c.w, c.kw, l, r) > 0;
    });

  type ConvCase = typeof convCase extends fc.Arbitrary<infer T> ? T : never;

  function inputGrad(c: ConvCase): () => tf.Tensor {
    const xs: [number, number, number, number] = [c.b, c.h, c.w, c.ci];
    const fs: [number, number, number, number] = [c.kh, c.kw, c.ci, c.co];
    const xd = uniform(size(xs), c.seed);
    const fd = uniform(size(fs), c.seed + 1);
    return () => {
      const x = tf.tensor4d(xd, xs);
      const f = tf.tensor4d(fd, fs);
      const y = tf.conv2d(x, f, c.s, c.pad);
      const w = tf.tensor(uniform(y.size, c.seed + 2), y.shape);
      return tf.grad((a: tf.Tensor) => tf.sum(tf.mul(tf.conv2d(a as tf.Tensor4D, f, c.s, c.pad), w)))(x);
    };
  }

  it('matches cpu on random shapes, strides, paddings (one chunk and many)', async () => {
    for (const chunk of [1 << 20, 40]) {
      const prev = setConvChunkElems(chunk);
      try {
        await fc.assert(
          fc.asyncProperty(convCase, async (c) => {
            expectClose(await run('wasm', inputGrad(c)), await run('cpu', inputGrad(c)));
          }),
          { numRuns: 40 },
        );
      } finally {
        setConvChunkElems(prev);
      }
    }
  });

  it('handles NCHW via the raw kernel', async () => {
    const dyd = uniform(2 * 4 * 4 * 4, 5);
    const fd = uniform(3 * 3 * 3 * 4, 6);
    const f = (): tf.Tensor =>
      tf.engine().runKernel(
        'Conv2DBackpropInput',
        { dy: tf.tensor(dyd, [2, 4, 4, 4]), filter: tf.tensor(fd, [3, 3, 3, 4]) },
        { strides: [2, 2], pad: 'same', dataFormat: 'NCHW', inputShape: [2, 3, 7, 7] },
      ) as tf.Tensor;
    expectClose(await run('wasm', f), await run('cpu', f));
  });
});
