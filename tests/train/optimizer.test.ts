/**
 * Adam/AdamW: one AdamW step reproduces torch.optim.AdamW on the reference gradients; Adam's
 * coupled L2 and later steps follow the published update written out in float64 here; state
 * export/import continues bit-for-bit; no tensors leak.
 */
import path from 'node:path';

import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { initBackend } from '../../src/backend.js';
import { SafetensorsFile } from '../../src/io/safetensors.js';
import { AdamOptimizer, OptimizerError, type OptimizerState } from '../../src/train/optimizer.js';
import { TINY_SD, diff, get, readRef, type RefTensor } from '../helpers/fixtures.js';

let uid = 0;
function variable(data: ArrayLike<number>, shape: number[], name = `opt_test_${uid++}`): tf.Variable {
  const init = tf.tensor(Float32Array.from(data), shape);
  const v = tf.variable(init, true, name);
  init.dispose();
  return v;
}

async function readWeights(file: string, keys: readonly string[]): Promise<Map<string, Float32Array>> {
  const f = await SafetensorsFile.open(file);
  try {
    const out = new Map<string, Float32Array>();
    for (const k of keys) out.set(k, await f.readFloat32(k));
    return out;
  } finally {
    await f.close();
  }
}

// grad.<component>.<key>: component file and key inside it.
function source(refKey: string): { file: string; key: string } {
  const rest = refKey.replace(/^adamw_step1\./, '');
  if (rest.startsWith('unet.')) {
    const file = path.join(TINY_SD, 'unet/diffusion_pytorch_model.safetensors');
    return { file, key: rest.slice('unet.'.length) };
  }
  if (rest.startsWith('text_encoder.')) {
    return { file: path.join(TINY_SD, 'text_encoder/model.safetensors'), key: rest.slice('text_encoder.'.length) };
  }
  throw new Error(`unexpected reference key ${refKey}`);
}

describe.each(['wasm', 'cpu'] as const)('AdamW vs torch.optim.AdamW (%s)', (backend) => {
  let ref: Map<string, RefTensor>;
  const weights = new Map<string, Float32Array>();

  beforeAll(async () => {
    await initBackend({ backend, log: () => {} });
    ref = await readRef('train_grad.safetensors');
    const steps = [...ref.keys()].filter((k) => k.startsWith('adamw_step1.'));
    expect(steps).toHaveLength(6);
    for (const k of steps) {
      const { file, key } = source(k);
      const w = await readWeights(file, [key]);
      weights.set(k, w.get(key)!);
    }
  });

  it('one step (lr 1e-3, betas 0.9/0.999, eps 1e-8, wd 0.01) matches adamw_step1.* to ≤1e-6 rel (bit-exact in practice)', () => {
    const names: string[] = [];
    const vars: tf.Variable[] = [];
    const grads: Record<string, tf.Tensor> = {};
    for (const [k, w] of weights) {
      const gradKey = k.replace(/^adamw_step1\./, 'grad.');
      const g = get(ref, gradKey);
      const v = variable(w, g.shape);
      vars.push(v);
      names.push(k);
      grads[v.name] = tf.tensor(g.data, g.shape);
    }
    const opt = new AdamOptimizer(vars, {
      kind: 'adamw',
      lr: 1e-3,
      betas: [0.9, 0.999],
      eps: 1e-8,
      weightDecay: 0.01,
    });
    opt.step(grads);
    const report: string[] = [];
    vars.forEach((v, i) => {
      const expected = get(ref, names[i]!);
      const actual = v.dataSync();
      const d = diff(actual, expected.data);
      // The step really moves the weights (≈ lr per element), far more than the tolerance.
      const moved = diff(weights.get(names[i]!)!, expected.data);
      report.push(`${names[i]}: maxAbs ${d.maxAbs.toExponential(2)} rel ${d.rel.toExponential(2)}`);
      expect(moved.maxAbs).toBeGreaterThan(5e-4);
      expect(d.rel, names[i]).toBeLessThanOrEqual(1e-6);
    });
    console.log(`[${backend}] AdamW step 1 vs torch:\n  ${report.join('\n  ')}`);
    opt.dispose();
    tf.dispose([...vars, ...Object.values(grads)]);
  });
});

describe('Adam / AdamW update rule', () => {
  let baseline = 0;
  beforeAll(async () => {
    await initBackend({ backend: 'wasm', log: () => {} });
    baseline = tf.memory().numTensors;
  });

  // Torch's update in float64, written from the documented algorithm (torch.optim.Adam/AdamW docs).
  function reference(
    kind: 'adam' | 'adamw',
    p0: number[],
    grads: number[][],
    o: { lr: number; b1: number; b2: number; eps: number; wd: number },
  ): number[] {
    const p = [...p0];
    const m = p.map(() => 0);
    const v = p.map(() => 0);
    grads.forEach((g, step) => {
      const t = step + 1;
      for (let i = 0; i < p.length; i++) {
        let gi = g[i]!;
        if (kind === 'adamw') p[i] = p[i]! * (1 - o.lr * o.wd);
        else gi += o.wd * p[i]!;
        m[i] = o.b1 * m[i]! + (1 - o.b1) * gi;
        v[i] = o.b2 * v[i]! + (1 - o.b2) * gi * gi;
        const mHat = m[i]! / (1 - o.b1 ** t);
        const denom = Math.sqrt(v[i]!) / Math.sqrt(1 - o.b2 ** t) + o.eps;
        p[i] = p[i]! - (o.lr * mHat) / denom;
      }
    });
    return p;
  }

  const p0 = [1, -2, 0.5, 0];
  const gs = [
    [0.5, 0.25, -1, 1e-3],
    [-0.25, 0.5, -0.5, 2],
    [0.125, 0.125, 3, -1],
  ];
  const hyper = { lr: 0.1, b1: 0.9, b2: 0.999, eps: 1e-8, wd: 0.1 };

  function run(kind: 'adam' | 'adamw'): Float32Array {
    const v = variable(p0, [4]);
    const opt = new AdamOptimizer([v], { kind, lr: hyper.lr, weightDecay: hyper.wd });
    for (const g of gs) {
      const gt = tf.tensor(g, [4]);
      opt.step({ [v.name]: gt });
      gt.dispose();
    }
    const out = Float32Array.from(v.dataSync());
    opt.dispose();
    v.dispose();
    return out;
  }

  it('first AdamW step by hand: p·(1−lr·wd) − lr·sign(g)', () => {
    // Step 1: m̂ = g, v̂ = g², so the update is lr·g/(|g| + eps) ≈ lr·sign(g).
    const v = variable([1, -2], [2]);
    const opt = new AdamOptimizer([v], { kind: 'adamw', lr: 0.1, weightDecay: 0.1 });
    const g = tf.tensor([0.5, -0.25], [2]);
    opt.step({ [v.name]: g });
    const got = v.dataSync();
    expect(got[0]).toBeCloseTo(1 * 0.99 - 0.1, 6); // 0.89
    expect(got[1]).toBeCloseTo(-2 * 0.99 + 0.1, 6); // -1.88
    opt.dispose();
    tf.dispose([v, g]);
  });

  it('AdamW over three steps follows the published update', () => {
    const d = diff(run('adamw'), reference('adamw', p0, gs, hyper));
    expect(d.maxAbs).toBeLessThan(2e-6);
  });

  it('Adam folds weight decay into the gradient (torch.optim.Adam), unlike AdamW', () => {
    const adam = run('adam');
    const d = diff(adam, reference('adam', p0, gs, hyper));
    expect(d.maxAbs).toBeLessThan(2e-6);
    // The two rules really differ on these numbers.
    expect(diff(adam, run('adamw')).maxAbs).toBeGreaterThan(1e-3);
  });

  it('per-group lr and weight decay; lrScale multiplies every group', () => {
    const a = variable([1], [1]);
    const b = variable([1], [1]);
    const frozen = variable([1], [1]);
    const opt = new AdamOptimizer(
      [{ params: [a] }, { params: [b], lr: 0.01, weightDecay: 0 }, { params: [frozen], lr: 0 }],
      { kind: 'adamw', lr: 0.1, weightDecay: 0.5 },
    );
    const g = tf.tensor([2], [1]);
    opt.step({ [a.name]: g, [b.name]: g, [frozen.name]: g }, { lrScale: 0.5 });
    // a: lr 0.05, wd 0.5 → 1·(1 − 0.025) − 0.05 = 0.925;  b: lr 0.005, wd 0 → 0.995.
    expect(a.dataSync()[0]).toBeCloseTo(0.925, 6);
    expect(b.dataSync()[0]).toBeCloseTo(0.995, 6);
    expect(frozen.dataSync()[0]).toBe(1);
    opt.dispose();
    tf.dispose([a, b, frozen, g]);
  });

  it('a parameter without a gradient is untouched and its step count does not advance', () => {
    const a = variable([1, 2], [2]);
    const b = variable([3], [1]);
    const opt = new AdamOptimizer([a, b], { kind: 'adamw', lr: 0.1 });
    const g = tf.tensor([1, 1], [2]);
    opt.step({ [a.name]: g, [b.name]: null });
    opt.step({ [a.name]: g });
    expect(Array.from(b.dataSync())).toEqual([3]);
    const s = opt.state();
    expect(s.step).toBe(2);
    expect(s.paramSteps).toEqual({ [a.name]: 2, [b.name]: 0 });
    expect(Object.keys(s.m)).toEqual([a.name]);
    opt.dispose();
    tf.dispose([a, b, g]);
  });

  it('rejects gradients of unknown variables or the wrong shape', () => {
    const a = variable([1, 2], [2]);
    const opt = new AdamOptimizer([a], { kind: 'adamw', lr: 0.1 });
    const g = tf.tensor([1, 2, 3], [3]);
    expect(() => opt.step({ nope: g })).toThrow(/'nope'.*not a parameter/);
    expect(() => opt.step({ [a.name]: g })).toThrow(/shape \[3\], parameter is \[2\]/);
    opt.dispose();
    tf.dispose([a, g]);
  });

  it('state export/import continues bit-for-bit', () => {
    const shape = [3, 5];
    const n = 15;
    // Deterministic, varied gradients (LCG), including tiny and large magnitudes.
    let seed = 12345;
    const rand = (): number => {
      seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
      return seed / 2 ** 32 - 0.5;
    };
    const init = Array.from({ length: n }, () => rand());
    const gradSeq = Array.from({ length: 5 }, (_, s) => Array.from({ length: n }, () => rand() * 10 ** (s - 2)));
    const opts = { kind: 'adamw' as const, lr: 3e-3, weightDecay: 0.02 };

    const straight = variable(init, shape);
    const optA = new AdamOptimizer([straight], opts);
    for (const g of gradSeq) {
      const t = tf.tensor(g, shape);
      optA.step({ [straight.name]: t }, { lrScale: 0.7 });
      t.dispose();
    }

    const first = variable(init, shape);
    const optB = new AdamOptimizer([first], opts);
    for (const g of gradSeq.slice(0, 3)) {
      const t = tf.tensor(g, shape);
      optB.step({ [first.name]: t }, { lrScale: 0.7 });
      t.dispose();
    }
    const saved: OptimizerState = JSON.parse(
      JSON.stringify(optB.state(), (_k, v: unknown) => (v instanceof Float32Array ? Array.from(v) : v)),
    ) as OptimizerState;
    const savedParams = Float32Array.from(first.dataSync());
    optB.dispose();

    // "New process": a fresh variable named like the old one, state from plain arrays.
    const resumed = variable(savedParams, shape, `${first.name}_resumed`);
    const optC = new AdamOptimizer([resumed], opts);
    const remap = (r: Readonly<Record<string, ArrayLike<number>>>): Record<string, Float32Array> =>
      Object.fromEntries(Object.values(r).map((a) => [resumed.name, Float32Array.from(a)]));
    optC.loadState({
      step: saved.step,
      paramSteps: { [resumed.name]: saved.paramSteps[first.name]! },
      m: remap(saved.m),
      v: remap(saved.v),
    });
    expect(optC.stepCount).toBe(3);
    for (const g of gradSeq.slice(3)) {
      const t = tf.tensor(g, shape);
      optC.step({ [resumed.name]: t }, { lrScale: 0.7 });
      t.dispose();
    }
    const a = straight.dataSync();
    const c = resumed.dataSync();
    expect(Array.from(c)).toEqual(Array.from(a));
    // And the moments agree too.
    expect(Array.from(optC.state().v[resumed.name]!)).toEqual(Array.from(optA.state().v[straight.name]!));
    optA.dispose();
    optC.dispose();
    tf.dispose([straight, first, resumed]);
  });

  it('loadState rejects mismatched state with the parameter name and sizes', () => {
    const a = variable([1, 2], [2]);
    const opt = new AdamOptimizer([a], { kind: 'adamw', lr: 0.1 });
    const wrongM: OptimizerState = {
      step: 1,
      paramSteps: { [a.name]: 1 },
      m: { [a.name]: new Float32Array(3) },
      v: { [a.name]: new Float32Array(2) },
    };
    expect(() => opt.loadState(wrongM)).toThrow(OptimizerError);
    expect(() => opt.loadState(wrongM)).toThrow(/m of '.*' has 3 values, parameter has 2/);
    expect(() => opt.loadState({ step: 1, paramSteps: { other: 1 }, m: {}, v: {} })).toThrow(/'other'/);
    opt.dispose();
    a.dispose();
  });

  it('keeps tf.memory().numTensors flat over steps', () => {
    const vars = [variable([1, 2, 3, 4], [2, 2]), variable([5, 6], [2])];
    const opt = new AdamOptimizer(vars, { kind: 'adamw', lr: 0.01 });
    const grads = { [vars[0]!.name]: tf.ones([2, 2]), [vars[1]!.name]: tf.ones([2]) };
    opt.step(grads);
    const after1 = tf.memory().numTensors;
    for (let i = 0; i < 5; i++) opt.step(grads);
    expect(tf.memory().numTensors).toBe(after1);
    opt.state();
    expect(tf.memory().numTensors).toBe(after1);
    opt.dispose();
    tf.dispose([...vars, ...Object.values(grads)]);
  });

  afterAll(() => {
    expect(tf.memory().numTensors).toBe(baseline);
  });
});
