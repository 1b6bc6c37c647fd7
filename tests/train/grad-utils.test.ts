/**
 * Gradient accumulation, global-norm clipping and the non-finite guard on small hand-worked
 * examples.
 */
import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { initBackend } from '../../src/backend.js';
import {
  GradAccumulator,
  NonFiniteError,
  NonFiniteGuard,
  clipGradNorm,
  disposeGrads,
  gradStats,
} from '../../src/train/grad-utils.js';

let baseline = 0;
beforeAll(async () => {
  await initBackend({ backend: 'wasm', log: () => {} });
  baseline = tf.memory().numTensors;
});
afterAll(() => {
  expect(tf.memory().numTensors).toBe(baseline);
});

function values(t: tf.Tensor): number[] {
  return Array.from(t.dataSync());
}

describe('GradAccumulator', () => {
  it('N micro-batches of a mean loss give the full-batch gradient (loss / N, summed)', () => {
    // L(w) = mean((w·x)²) over x = [1, 2, 3, 4] at w = 1: dL/dw = mean(2x²) = 2·30/4 = 15.
    // Micro-batches [1, 2] and [3, 4]: mean(2x²) = 5 and 25; accumulated (5 + 25)/2 = 15.
    const w0 = tf.scalar(1);
    const w = tf.variable(w0, true, 'acc_w');
    w0.dispose();
    const lossOn = (xs: number[]) => (): tf.Scalar => {
      const x = tf.tensor1d(xs);
      return tf.mean(tf.square(tf.mul(w, x))) as tf.Scalar;
    };
    const acc = new GradAccumulator(2);
    for (const xs of [
      [1, 2],
      [3, 4],
    ]) {
      const { value, grads } = tf.variableGrads(lossOn(xs), [w]);
      value.dispose();
      acc.add(grads);
    }
    expect(acc.ready).toBe(true);
    const out = acc.take();
    expect(values(out[w.name]!)[0]).toBeCloseTo(15, 5);
    const full = tf.variableGrads(lossOn([1, 2, 3, 4]), [w]);
    expect(values(full.grads[w.name]!)[0]).toBeCloseTo(15, 5);
    full.value.dispose();
    disposeGrads(full.grads);
    disposeGrads(out);
    expect(acc.count).toBe(0);
    w.dispose();
  });

  it('a short final window is still divided by N (as accelerate does); missing names just sum', () => {
    const acc = new GradAccumulator(3);
    acc.add({ a: tf.tensor1d([3, 6]), b: tf.tensor1d([9]) });
    acc.add({ a: tf.tensor1d([3, 0]), frozen: null });
    expect(acc.ready).toBe(false);
    const out = acc.take();
    expect(values(out['a']!)).toEqual([2, 2]); // (3 + 3)/3, (6 + 0)/3
    expect(values(out['b']!)[0]).toBeCloseTo(3, 6); // 9/3
    expect(Object.keys(out).sort()).toEqual(['a', 'b']);
    disposeGrads(out);
  });

  it('N = 1 passes gradients through; overfilling and shape changes are errors; reset frees', () => {
    const one = new GradAccumulator(1);
    const g = tf.tensor1d([1.5, -2]);
    one.add({ g });
    const extra = tf.tensor1d([0, 0]);
    expect(() => one.add({ g: extra })).toThrow(/take\(\) first/);
    extra.dispose();
    const out = one.take();
    expect(values(out['g']!)).toEqual([1.5, -2]);
    disposeGrads(out);

    const two = new GradAccumulator(2);
    two.add({ g: tf.tensor1d([1, 2]) });
    const bad = tf.tensor1d([1, 2, 3]);
    expect(() => two.add({ g: bad })).toThrow(/'g' changed shape.*\[2\] then \[3\]/);
    bad.dispose();
    two.reset();
    expect(two.count).toBe(0);
    expect(() => new GradAccumulator(0)).toThrow(/≥ 1/);
  });
});

describe('clipGradNorm (torch.nn.utils.clip_grad_norm_)', () => {
  it('total norm over all tensors; coef = maxNorm/(total + 1e-6) when below 1', () => {
    // ‖[3, 4]‖ = 5, ‖[[12]]‖ = 12, total = √(25 + 144) = 13.
    const grads = { a: tf.tensor1d([3, 4]), b: tf.tensor2d([[12]]) };
    const r = clipGradNorm(grads, 6.5);
    expect(r.totalNorm).toBeCloseTo(13, 5);
    // 6.5 / 13.000001 = 0.49999996…
    expect(r.coef).toBeCloseTo(0.5 - 0.5e-6 / 13, 7);
    expect(values(r.grads['a']!)[0]).toBeCloseTo(1.5, 5);
    expect(values(r.grads['a']!)[1]).toBeCloseTo(2, 5);
    expect(values(r.grads['b']!)[0]).toBeCloseTo(6, 5);
    // The clipped set has norm maxNorm (up to the 1e-6 guard); inputs untouched.
    expect(gradStats(r.grads).globalNorm).toBeCloseTo(6.5, 4);
    expect(values(grads.a)).toEqual([3, 4]);
    disposeGrads(r.grads);
    disposeGrads(grads);
  });

  it('leaves gradients unchanged when the norm is already below maxNorm (coef clamped to 1)', () => {
    const grads = { a: tf.tensor1d([0.3, -0.4]) };
    const r = clipGradNorm(grads, 1);
    expect(r.coef).toBe(1);
    expect(r.totalNorm).toBeCloseTo(0.5, 6);
    expect(values(r.grads['a']!)).toEqual(values(grads.a));
    disposeGrads(r.grads);
    disposeGrads(grads);
    expect(() => clipGradNorm({}, 0)).toThrow(/> 0/);
  });
});

describe('gradStats', () => {
  it('global norm and finiteness with one read', () => {
    const ok = { a: tf.tensor1d([3, 4]), b: tf.tensor1d([0]) };
    expect(gradStats(ok).globalNorm).toBeCloseTo(5, 6);
    expect(gradStats(ok).finite).toBe(true);
    const nan = { a: tf.tensor1d([1, NaN]) };
    const inf = { a: tf.tensor1d([1, 2]), b: tf.tensor1d([-Infinity]) };
    expect(gradStats(nan).finite).toBe(false);
    expect(gradStats(inf).finite).toBe(false);
    // Finite elements whose norm overflows float32 (max ≈ 3.4e38) are still finite elements.
    const big = { a: tf.tensor1d([3e38, 3e38]) };
    const s = gradStats(big);
    expect(s.finite).toBe(true);
    expect(s.globalNorm).toBe(Infinity);
    for (const m of [ok, nan, inf, big]) disposeGrads(m);
  });
});

describe('NonFiniteGuard', () => {
  it('skips non-finite steps, resets on a good one, throws after N in a row', () => {
    const guard = new NonFiniteGuard({ maxConsecutive: 3 });
    expect(guard.check(1, 0.5, true)).toBe(true);
    expect(guard.check(2, NaN, true)).toBe(false);
    expect(guard.check(3, 0.4, false)).toBe(false);
    expect(guard.consecutive).toBe(2);
    expect(guard.check(4, 0.3, true)).toBe(true);
    expect(guard.consecutive).toBe(0);
    expect(guard.check(5, Infinity, true)).toBe(false);
    expect(guard.check(6, NaN, false)).toBe(false);
    let err: unknown;
    try {
      guard.check(7, NaN, true);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(NonFiniteError);
    const msg = (err as Error).message;
    expect(msg).toMatch(/step 7/);
    expect(msg).toMatch(/3 consecutive steps skipped \(5 in total\)/);
    expect(msg).toMatch(/lower the learning rate/);
    expect(msg).toMatch(/check the data/);
    expect(guard.skipped).toBe(5);
  });
});
