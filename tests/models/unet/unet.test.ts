/**
 * UNet2DConditionModel parity against diffusers on the tiny SD fixture: output and every
 * intermediate module output, on wasm and cpu, plus attention chunking.
 */
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { initBackend } from '../../../src/backend.js';
import { loadSafetensorsParams, paramStore } from '../../../src/io/weights.js';
import { readUnetConfig, type UnetConfig } from '../../../src/models/unet/config.js';
import { unet, type UnetHooks } from '../../../src/models/unet/unet.js';
import { tfOps } from '../../../src/ops/tfjs-ops.js';
import { diff, get, readRef, toNhwc, TINY_SD, type RefTensor } from '../../helpers/fixtures.js';

const UNET_DIR = path.join(TINY_SD, 'unet');
const TOL = 1e-4;

const INTERMEDIATES = [
  'time_proj',
  'time_embedding',
  'conv_in',
  'down_blocks.0',
  'down_blocks.1',
  'mid_block',
  'up_blocks.0',
  'up_blocks.1',
  'conv_norm_out',
  'conv_out',
] as const;

let cfg: UnetConfig;
let ref: Map<string, RefTensor>;
let weights: Map<string, tf.Tensor>;

function inputs(): { sample: tf.Tensor; timesteps: tf.Tensor; context: tf.Tensor } {
  const s = toNhwc(get(ref, 'sample'));
  const t = get(ref, 'timesteps');
  const c = get(ref, 'encoder_hidden_states');
  return {
    sample: tf.tensor(s.data, s.shape, 'float32'),
    timesteps: tf.tensor(Float32Array.from(t.data), t.shape, 'float32'),
    context: tf.tensor(c.data, c.shape, 'float32'),
  };
}

/** The reference in our layout: NCHW feature maps → NHWC, everything else as stored. */
function expected(key: string): RefTensor {
  const t = get(ref, key);
  return t.shape.length === 4 ? toNhwc(t) : t;
}

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: () => {} });
  cfg = await readUnetConfig(UNET_DIR);
  ref = await readRef('unet.safetensors');
  weights = await loadSafetensorsParams([path.join(UNET_DIR, 'diffusion_pytorch_model.safetensors')]);
});

afterAll(() => {
  for (const t of weights.values()) t.dispose();
});

describe.each(['wasm', 'cpu'] as const)('UNet2DConditionModel on %s', (backend) => {
  it('matches diffusers: output and every intermediate, all weights used', async () => {
    await initBackend({ backend, log: () => {} });
    // Tensors created on cpu move to the active backend on first use.
    const store = paramStore(weights, UNET_DIR);
    const results = new Map<string, Float32Array>();
    tf.tidy(() => {
      const { sample, timesteps, context } = inputs();
      const intermediates = new Map<string, tf.Tensor>();
      const out = unet(tfOps, store.scope(), sample, timesteps, context, cfg, { intermediates });
      results.set('out', out.dataSync() as Float32Array);
      for (const [k, v] of intermediates) results.set(`intermediate.${k}`, v.dataSync() as Float32Array);
    });
    expect(store.unusedKeys()).toEqual([]);

    const report: string[] = [];
    for (const key of ['out', ...INTERMEDIATES.map((k) => `intermediate.${k}`)]) {
      const actual = results.get(key);
      expect(actual, `${key} recorded`).toBeDefined();
      const d = diff(actual!, expected(key).data);
      report.push(`${key}: maxAbs ${d.maxAbs.toExponential(2)} rel ${d.rel.toExponential(2)}`);
      expect(d.rel, `${backend} ${key}: max-abs ${d.maxAbs} vs scale ${d.scale} (rel ${d.rel})`).toBeLessThanOrEqual(TOL);
    }
    console.log(`[unet ${backend}]\n  ${report.join('\n  ')}`);
  });

});

describe('UNet attention on wasm', () => {
  it('gives the same numbers with attention chunked into small query blocks', async () => {
    await initBackend({ backend: 'wasm', log: () => {} });
    const store = paramStore(weights, UNET_DIR);
    const [whole, chunked] = tf.tidy(() => {
      const { sample, timesteps, context } = inputs();
      const a = unet(tfOps, store.scope(), sample, timesteps, context, cfg).dataSync() as Float32Array;
      // A query row costs 2·8 heads·Sk elements: full-resolution self-attention (Sk 256) runs in
      // blocks of 40 rows (6 full + a 16-row remainder), cross-attention (Sk 77) in 132 + 124.
      const b = unet(tfOps, store.scope(), sample, timesteps, context, cfg, {}, { maxScoreElements: 163_840 }).dataSync() as Float32Array;
      return [a, b];
    });
    const d = diff(chunked, whole);
    expect(d.maxAbs, `chunked vs whole: max-abs ${d.maxAbs}`).toBeLessThanOrEqual(1e-6);
    // The chunked run must still be the reference output.
    const r = diff(chunked, expected('out').data);
    expect(r.rel, `chunked vs diffusers: rel ${r.rel}`).toBeLessThanOrEqual(TOL);
  });

  it('sees every attention with its path and context width; identity changes nothing, a K/V change does', async () => {
    await initBackend({ backend: 'wasm', log: () => {} });
    const store = paramStore(weights, UNET_DIR);
    // Expected calls, read off the checkpoint: each attention's to_k input width.
    const expectedCalls = [...weights]
      .filter(([k]) => /\.attn[12]\.to_k\.weight$/.test(k))
      .map(([k, t]) => ({ path: k.replace(/\.to_k\.weight$/, ''), width: t.shape[1]!, kind: k.includes('.attn1.') ? 'self' : 'cross' }))
      .sort((a, b) => (a.path < b.path ? -1 : 1));
    const calls: { path: string; width: number; kind: string }[] = [];
    const [plain, identity, changed] = tf.tidy(() => {
      const { sample, timesteps, context } = inputs();
      const run = (hooks: UnetHooks<tf.Tensor>) =>
        unet(tfOps, store.scope(), sample, timesteps, context, cfg, hooks).dataSync() as Float32Array;
      return [
        run({}),
        run({
          attentionContext: (ctx, info) => {
            calls.push({ path: info.path, width: info.width, kind: info.kind });
            expect(tfOps.shape(ctx).at(-1)).toBe(info.width);
            return { k: ctx, v: ctx };
          },
        }),
        run({ attentionContext: (ctx, info) => (info.kind === 'cross' ? { k: ctx, v: tf.mul(ctx, 0.5) } : { k: ctx, v: ctx }) }),
      ];
    });
    expect(calls.sort((a, b) => (a.path < b.path ? -1 : 1))).toEqual(expectedCalls);
    expect(diff(identity, plain).maxAbs).toBe(0);
    expect(diff(changed, plain).maxAbs).toBeGreaterThan(1e-3);
  });
});
