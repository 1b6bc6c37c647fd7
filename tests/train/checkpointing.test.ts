/**
 * Gradient checkpointing: the same gradients as the plain backward pass (a small function, and
 * the tiny UNet with LoRA adapters and with every weight trained), fewer bytes alive at the peak,
 * no leaked tensors, and a forward without a tape that computes the same value.
 */
import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { initBackend } from '../../src/backend.js';
import { byModule, createAdapters, findTargets, loraScope, patchedScope, type LoraAdapter } from '../../src/methods/lora.js';
import { unet } from '../../src/models/unet/unet.js';
import { tfOps } from '../../src/ops/tfjs-ops.js';
import { disposeStableDiffusion, loadStableDiffusion, type StableDiffusion } from '../../src/pipeline/load.js';
import { checkpoint, checkpointBlocks } from '../../src/train/checkpointing.js';
import { setupRandom } from '../../src/train/rng-state.js';
import { diff, TINY_SD } from '../helpers/fixtures.js';

let model: StableDiffusion;
beforeAll(async () => {
  await initBackend({ backend: 'wasm', log: () => {} });
  model = await loadStableDiffusion(TINY_SD);
});
afterAll(() => disposeStableDiffusion(model));

/** Gradients of `loss` w.r.t. `vars` as plain arrays, with the tensors freed. */
function gradsOf(loss: () => tf.Scalar, vars: readonly tf.Variable[]): { value: number; grads: Float32Array[] } {
  const { value, grads } = tf.variableGrads(loss, [...vars]);
  const out = { value: value.dataSync()[0]!, grads: vars.map((v) => Float32Array.from(grads[v.name]!.dataSync())) };
  tf.dispose([value, ...Object.values(grads)]);
  return out;
}

/**
 * Largest |a − b| over all tensors, relative to the largest |b| over all tensors. Not bit-exact:
 * tfjs sums a tensor's gradient contributions in tape order, and a checkpointed block hands its
 * internal sum over as one term, so additions associate differently (float32 noise, ~1e-9 here).
 */
function maxRel(a: readonly Float32Array[], b: readonly Float32Array[]): number {
  let worst = 0;
  let scale = 0;
  a.forEach((g, i) => {
    const d = diff(g, b[i]!);
    worst = Math.max(worst, d.maxAbs);
    scale = Math.max(scale, d.scale);
  });
  return worst / scale;
}

describe('checkpoint()', () => {
  it('gives the gradients of the plain computation, for inputs and for parameters read by closure', () => {
    const x = tf.variable(tf.randomNormal([3, 5], 0, 1, 'float32', 1), true, 'ckpt-x');
    const w = tf.variable(tf.randomNormal([5, 5], 0, 1, 'float32', 2), true, 'ckpt-w');
    const bias = tf.variable(tf.randomNormal([5], 0, 1, 'float32', 3), true, 'ckpt-b');
    // Two blocks, the second reading x again (a residual) and the parameters through a closure.
    const block = ([h]: readonly tf.Tensor[]) => tf.add(tf.tanh(tf.add(tf.matMul(h!, w), bias)), h!);
    const plain = () => tf.sum(tf.square(block([block([x])])) as tf.Tensor) as tf.Scalar;
    const ckpt = () => {
      const h1 = checkpoint(block, [x], [w, bias]);
      return tf.sum(tf.square(checkpoint(block, [h1], [w, bias]))) as tf.Scalar;
    };
    const a = gradsOf(plain, [x, w, bias]);
    const b = gradsOf(ckpt, [x, w, bias]);
    expect(b.value).toBe(a.value);
    expect(maxRel(b.grads, a.grads)).toBeLessThanOrEqual(1e-6);
    // A parameter the block does not read gets a zero gradient, not an error.
    const unused = tf.variable(tf.ones([2]), true, 'ckpt-unused');
    const c = tf.variableGrads(() => tf.sum(checkpoint(block, [x], [w, bias, unused])) as tf.Scalar, [w, unused]);
    expect(Array.from(c.grads[unused.name]!.dataSync())).toEqual([0, 0]);
    tf.dispose([c.value, ...Object.values(c.grads), x, w, bias, unused]);
  });

  it('without a tape it is just the forward, and it leaks nothing either way', () => {
    const x = tf.randomNormal([4, 4], 0, 1, 'float32', 4);
    const w = tf.variable(tf.randomNormal([4, 4], 0, 1, 'float32', 5), true, 'ckpt-w2');
    const block = ([h]: readonly tf.Tensor[]) => tf.relu(tf.matMul(h!, w));
    const before = tf.memory().numTensors;
    const y1 = tf.tidy(() => block([x]));
    const y2 = tf.tidy(() => checkpoint(block, [x], [w]));
    expect(Array.from(y2.dataSync())).toEqual(Array.from(y1.dataSync()));
    tf.dispose([y1, y2]);
    for (let i = 0; i < 3; i++) {
      const { value, grads } = tf.variableGrads(() => tf.sum(checkpoint(block, [x], [w])) as tf.Scalar, [w]);
      tf.dispose([value, ...Object.values(grads)]);
    }
    expect(tf.memory().numTensors).toBe(before);
    tf.dispose([x, w]);
  });
});

describe('the tiny UNet with checkpointed blocks', () => {
  const cfgOf = () => model.unet.cfg;
  const inputs = () => {
    const sample = tf.randomNormal([2, 16, 16, 4], 0, 1, 'float32', 11);
    const target = tf.randomNormal([2, 16, 16, 4], 0, 1, 'float32', 12);
    const context = tf.randomNormal([2, 77, 32], 0, 1, 'float32', 13);
    const timesteps = tf.tensor1d([10, 700], 'float32');
    return { sample, target, context, timesteps };
  };

  it('LoRA: gradients of every A and B equal the plain backward pass (≤ 1e-6 of the largest)', () => {
    const adapters = createAdapters(findTargets(model.unet.store, 'unet', ['to_q', 'to_k', 'to_v', 'to_out.0']), { rank: 4, alpha: 4, init: 'kaiming_uniform' }, setupRandom(0));
    // B = 0 would give A a zero gradient; random B makes every gradient informative.
    adapters.forEach((a, i) => a.up.assign(tf.randomNormal(a.up.shape, 0, 0.1, 'float32', 100 + i)));
    const scope = loraScope(model.unet.store.scope(), byModule(adapters as LoraAdapter<tf.Tensor>[]));
    const paramsUnder = (p: string) => adapters.filter((a) => a.module.startsWith(`${p}.`)).flatMap((a) => [a.down, a.up]);
    const { sample, target, context, timesteps } = inputs();
    const lossWith = (opts: object) => () => tf.mean(tf.square(tf.sub(unet(tfOps, scope, sample, timesteps, context, cfgOf(), {}, opts), target))) as tf.Scalar;
    const vars = adapters.flatMap((a) => [a.down, a.up]);
    const plain = gradsOf(lossWith({}), vars);
    const ckpt = gradsOf(lossWith({ wrapBlock: checkpointBlocks(paramsUnder) }), vars);
    const rel = maxRel(ckpt.grads, plain.grads);
    console.log(`[checkpointing] LoRA: loss ${plain.value} vs ${ckpt.value}; worst gradient diff ${rel.toExponential(2)} of the largest over ${vars.length} tensors`);
    expect(ckpt.value).toBe(plain.value);
    expect(rel).toBeLessThanOrEqual(1e-6);
    expect(plain.grads.every((g) => g.some((v) => v !== 0))).toBe(true);
    tf.dispose([...vars, sample, target, context, timesteps]);
  });

  it('every weight trained: gradients equal (≤ 1e-6 of the largest), peak memory lower, no leak', async () => {
    const store = model.unet.store;
    const vars = new Map([...store.keys()].map((k) => [k, tf.variable(store.get(k)!, true)]));
    const scope = patchedScope(store.scope(), (key) => vars.get(key));
    const paramsUnder = (p: string) => [...vars].filter(([k]) => k.startsWith(`${p}.`)).map(([, v]) => v);
    const { sample, target, context, timesteps } = inputs();
    const lossWith = (opts: object) => () => tf.mean(tf.square(tf.sub(unet(tfOps, scope, sample, timesteps, context, cfgOf(), {}, opts), target))) as tf.Scalar;
    const list = [...vars.values()];
    const wrap = { wrapBlock: checkpointBlocks(paramsUnder) };
    const plain = gradsOf(lossWith({}), list);
    const before = tf.memory().numTensors;
    const ckpt = gradsOf(lossWith(wrap), list);
    expect(tf.memory().numTensors).toBe(before);
    const rel = maxRel(ckpt.grads, plain.grads);
    const peak = async (opts: object) => {
      const base = tf.memory().numBytes;
      const info = await tf.profile(() => {
        const { value, grads } = tf.variableGrads(lossWith(opts), list);
        tf.dispose([value, ...Object.values(grads)]);
      });
      return info.peakBytes - base;
    };
    const [plainPeak, ckptPeak] = [await peak({}), await peak(wrap)];
    console.log(`[checkpointing] full: worst gradient diff ${rel.toExponential(2)} of the largest over ${list.length} tensors; peak bytes ${plainPeak} → ${ckptPeak}`);
    expect(rel).toBeLessThanOrEqual(1e-6);
    expect(ckptPeak).toBeLessThan(plainPeak);
    tf.dispose([...list, sample, target, context, timesteps]);
  });
});
