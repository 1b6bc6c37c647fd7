/**
 * LoRA maths and targeting: which modules the default targets pick in the tiny UNet and text
 * encoder, the initialisations' distributions, step 0 = the base model, and the gradients of A
 * and B through the scope against the closed form.
 */
import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { initBackend } from '../../src/backend.js';
import {
  byModule,
  createAdapters,
  DEFAULT_TEXT_TARGETS,
  DEFAULT_UNET_TARGETS,
  findTargets,
  initialDown,
  loraScope,
  type LoraAdapter,
} from '../../src/methods/lora.js';
import { linear } from '../../src/ops/nn.js';
import { ParamStore } from '../../src/ops/scope.js';
import { tfOps } from '../../src/ops/tfjs-ops.js';
import { disposeStableDiffusion, loadStableDiffusion, type StableDiffusion } from '../../src/pipeline/load.js';
import { setupRandom, TrainRandom } from '../../src/train/rng-state.js';
import { TINY_SD } from '../helpers/fixtures.js';

let model: StableDiffusion;
beforeAll(async () => {
  await initBackend({ backend: 'wasm', log: () => {} });
  model = await loadStableDiffusion(TINY_SD);
});
afterAll(() => disposeStableDiffusion(model));

describe('targets', () => {
  it("diffusers' defaults pick the q/k/v/out projections of every attention, and only those", () => {
    const unetTargets = findTargets(model.unet.store, 'unet', DEFAULT_UNET_TARGETS);
    // Tiny UNet: transformer blocks in down_blocks.0, mid_block and up_blocks.1 (×2), each with attn1 and attn2.
    expect(unetTargets).toHaveLength(4 * 2 * 4);
    expect(unetTargets.every((t) => /\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$/.test(t.module) && t.kind === 'linear')).toBe(true);
    const textTargets = findTargets(model.text.store, 'text', DEFAULT_TEXT_TARGETS);
    expect(textTargets.map((t) => t.module).sort()).toEqual(
      [0, 1].flatMap((l) => ['q_proj', 'k_proj', 'v_proj', 'out_proj'].map((p) => `text_model.encoder.layers.${l}.self_attn.${p}`)).sort(),
    );
    // SD 1.x proj_in is a 1×1 convolution: adaptable as a Linear over channels.
    expect(findTargets(model.unet.store, 'unet', ['proj_in']).every((t) => t.kind === 'conv1x1' && t.inFeatures === t.outFeatures)).toBe(true);
  });

  it('refuses 3×3 convolutions and targets that match nothing', () => {
    expect(() => findTargets(model.unet.store, 'unet', ['conv1'])).toThrow(/3×3 convolution: conv LoRA \(LoCon\) is not supported yet/);
    expect(() => findTargets(model.unet.store, 'unet', ['to_z'])).toThrow(/no unet module matches the LoRA targets 'to_z'/);
  });
});

describe('initialisation', () => {
  it('gaussian A has std 1/r, kaiming-uniform A lies in ±1/√in with the uniform variance', () => {
    const rank = 4;
    const inF = 2500;
    const g = initialDown(new TrainRandom(1), rank, inF, 'gaussian');
    const std = Math.sqrt(g.reduce((a, v) => a + v * v, 0) / g.length);
    expect(Math.abs(std - 1 / rank) / (1 / rank)).toBeLessThan(0.03);
    const k = initialDown(new TrainRandom(2), rank, inF, 'kaiming_uniform');
    const bound = 1 / Math.sqrt(inF);
    expect(Math.max(...k.map(Math.abs))).toBeLessThanOrEqual(bound);
    const variance = k.reduce((a, v) => a + v * v, 0) / k.length;
    expect(Math.abs(variance - (bound * bound) / 3) / ((bound * bound) / 3)).toBeLessThan(0.05);
  });

  it('B = 0, so the adapted UNet reads exactly the base weights at step 0', () => {
    const adapters = createAdapters(findTargets(model.unet.store, 'unet', DEFAULT_UNET_TARGETS), { rank: 4, alpha: 4, init: 'gaussian' }, setupRandom(0));
    const scope = loraScope(model.unet.store.scope(), byModule(adapters as LoraAdapter<tf.Tensor>[]));
    for (const a of adapters) {
      expect(a.up.dataSync().every((v) => v === 0)).toBe(true);
      expect(a.down.dataSync().some((v) => v !== 0)).toBe(true);
      const key = `${a.module}.weight`;
      const parts = key.split('.');
      const leaf = parts.pop()!;
      const w = tf.tidy(() => parts.reduce((s, p) => s.sub(p), scope).param(leaf, model.unet.store.get(key)!.shape).dataSync());
      expect(Array.from(w)).toEqual(Array.from(model.unet.store.get(key)!.dataSync()));
    }
    tf.dispose(adapters.flatMap((a) => [a.down, a.up]));
  });
});

describe('gradients through the scope', () => {
  it('equal the closed form dA = (α/r)·Bᵀ·dW, dB = (α/r)·dW·Aᵀ with dW = gᵀx', () => {
    const [inF, outF, rank, alpha] = [6, 5, 3, 1.5];
    const w = tf.randomNormal([outF, inF], 0, 1, 'float32', 1);
    const store = new ParamStore(new Map([['proj.weight', w], ['proj.bias', tf.zeros([outF])]]), (t: tf.Tensor) => t.shape, 'test');
    const adapter: LoraAdapter<tf.Variable> = {
      component: 'unet',
      module: 'proj',
      kind: 'linear',
      inFeatures: inF,
      outFeatures: outF,
      rank,
      alpha,
      down: tf.variable(tf.randomNormal([rank, inF], 0, 1, 'float32', 2)),
      up: tf.variable(tf.randomNormal([outF, rank], 0, 1, 'float32', 3)),
    };
    const x = tf.randomNormal([4, inF], 0, 1, 'float32', 4);
    const g = tf.randomNormal([4, outF], 0, 1, 'float32', 5);
    const scope = loraScope(store.scope(), byModule([adapter as LoraAdapter<tf.Tensor>]));
    const { grads } = tf.variableGrads(() => tf.sum(tf.mul(linear(tfOps, scope.sub('proj'), x, inF, outF), g)) as tf.Scalar, [adapter.down, adapter.up]);
    const s = alpha / rank;
    const dW = tf.matMul(g, x, true, false); // [out,in]
    const dA = tf.mul(tf.matMul(adapter.up, dW, true, false), s); // [r,in]
    const dB = tf.mul(tf.matMul(dW, adapter.down, false, true), s); // [out,r]
    const close = (a: tf.Tensor, b: tf.Tensor) => {
      const [da, db] = [a.dataSync(), b.dataSync()];
      return da.every((v, i) => Math.abs(v - db[i]!) <= 1e-5 * (1 + Math.abs(db[i]!)));
    };
    expect(close(grads[adapter.down.name]!, dA)).toBe(true);
    expect(close(grads[adapter.up.name]!, dB)).toBe(true);
    tf.dispose([w, x, g, dW, dA, dB, adapter.down, adapter.up, ...Object.values(grads)]);
  });
});
