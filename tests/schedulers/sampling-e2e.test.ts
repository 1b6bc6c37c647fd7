/**
 * The end-to-end parity run: diffusers' 10-step DDIM, CFG 7.5 txt2img on the tiny SD fixture,
 * reproduced with our UNet, DDIM and VAE from the reference initial latents and text states —
 * every step's two UNet halves, the guided ε and x_prev, the final latents, the decoded image.
 */
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { initBackend } from '../../src/backend.js';
import { loadSafetensorsParams, paramStore } from '../../src/io/weights.js';
import { encodeText, loadTextEncoder } from '../../src/models/clip/text-encoder-tfjs.js';
import { readUnetConfig, type UnetConfig } from '../../src/models/unet/config.js';
import { unet } from '../../src/models/unet/unet.js';
import { readVaeConfig, type VaeConfig } from '../../src/models/vae/config.js';
import { denormalize, unscaleLatents, vaeDecode } from '../../src/models/vae/vae.js';
import { tfOps } from '../../src/ops/tfjs-ops.js';
import { readSchedulerConfig, samplerFromConfig, type SchedulerConfig } from '../../src/schedulers/config.js';
import type { StepResult } from '../../src/schedulers/sampler.js';
import { diff, get, readRef, TINY_SD, toNhwc, type RefTensor } from '../helpers/fixtures.js';

const TOL = 1e-4;
const GUIDANCE = 7.5;

let ref: Map<string, RefTensor>;
let unetCfg: UnetConfig;
let vaeCfg: VaeConfig;
let schedulerCfg: SchedulerConfig;
let unetWeights: Map<string, tf.Tensor>;
let vaeWeights: Map<string, tf.Tensor>;

beforeAll(async () => {
  await initBackend({ backend: 'wasm', log: () => {} });
  ref = await readRef('sampling.safetensors');
  unetCfg = await readUnetConfig(path.join(TINY_SD, 'unet'));
  vaeCfg = await readVaeConfig(path.join(TINY_SD, 'vae'));
  schedulerCfg = await readSchedulerConfig(path.join(TINY_SD, 'scheduler'));
  unetWeights = await loadSafetensorsParams([path.join(TINY_SD, 'unet', 'diffusion_pytorch_model.safetensors')]);
  vaeWeights = await loadSafetensorsParams([path.join(TINY_SD, 'vae', 'diffusion_pytorch_model.safetensors')]);
});

afterAll(() => {
  for (const t of [...unetWeights.values(), ...vaeWeights.values()]) t.dispose();
});

/** Step i of a [10, 1, 4, 16, 16] reference tensor, NHWC. */
function stepRef(key: string, i: number): Float32Array {
  const t = get(ref, key);
  const n = t.data.length / t.shape[0]!;
  return toNhwc({ data: t.data.subarray(i * n, (i + 1) * n), shape: t.shape.slice(1) }).data;
}

function tensor(t: RefTensor): tf.Tensor {
  return tf.tensor(t.data, t.shape);
}

describe('txt2img, 10 DDIM steps, guidance 7.5 (reference run)', () => {
  it('the text encoder gives the reference cond/uncond states', async () => {
    const te = await loadTextEncoder(TINY_SD);
    for (const which of ['cond', 'uncond'] as const) {
      const ids = [Array.from(get(ref, `${which}_input_ids`).data)];
      const states = encodeText(te.store, te.cfg, ids);
      const d = diff(states.dataSync(), get(ref, `${which}_embeds`).data);
      states.dispose();
      expect(d.rel, `${which}_embeds: max-abs ${d.maxAbs} vs scale ${d.scale}`).toBeLessThanOrEqual(TOL);
    }
    for (const t of te.store.keys()) te.store.get(t)?.dispose();
  });

  it('every step, the final latents and the decoded image match diffusers', () => {
    const unetStore = paramStore(unetWeights, 'unet');
    const sampler = samplerFromConfig<tf.Tensor>('ddim', schedulerCfg, { steps: 10 });
    expect(sampler.timesteps).toEqual(Array.from(get(ref, 'timesteps').data));
    // [uncond, cond] as diffusers batches them
    const context = tf.concat([tensor(get(ref, 'uncond_embeds')), tensor(get(ref, 'cond_embeds'))], 0);
    let x = tf.tidy(() => tf.mul(tensor(toNhwc(get(ref, 'init_latents'))), sampler.initNoiseSigma));
    let state = sampler.initialState;
    const worst = new Map<string, number>();
    const check = (key: string, i: number, actual: tf.Tensor) => {
      const d = diff(actual.dataSync(), stepRef(key, i));
      worst.set(key, Math.max(worst.get(key) ?? 0, d.rel));
      expect(d.rel, `step ${i} ${key}: max-abs ${d.maxAbs} vs scale ${d.scale}`).toBeLessThanOrEqual(TOL);
    };
    for (let i = 0; i < sampler.timesteps.length; i++) {
      check('steps.x_t', i, x);
      let next!: StepResult<tf.Tensor, unknown>;
      tf.tidy(() => {
        const xIn = sampler.scaleModelInput(tfOps, x, i);
        const t = sampler.timesteps[i]!;
        const eps = unet(tfOps, unetStore.scope(), tf.concat([xIn, xIn], 0), tf.tensor1d([t, t]), context, unetCfg);
        const [uncond, cond] = tf.split(eps, 2, 0) as [tf.Tensor, tf.Tensor];
        const guided = tf.add(uncond, tf.mul(tf.sub(cond, uncond), GUIDANCE));
        check('steps.eps_uncond', i, uncond);
        check('steps.eps_text', i, cond);
        check('steps.guided', i, guided);
        next = sampler.step(tfOps, state, guided, i, x);
        check('steps.x_prev', i, next.prev);
        for (const held of [next.prev, ...sampler.heldTensors(next.state)]) tf.keep(held);
      });
      x.dispose();
      x = next.prev;
      state = next.state;
    }
    expect(unetStore.unusedKeys()).toEqual([]);
    context.dispose();

    const final = diff(x.dataSync(), toNhwc(get(ref, 'final_latents')).data);
    worst.set('final_latents', final.rel);
    expect(final.rel, `final_latents: max-abs ${final.maxAbs} vs scale ${final.scale}`).toBeLessThanOrEqual(TOL);

    const vaeStore = paramStore(vaeWeights, 'vae');
    const decoded = tf.tidy(() => vaeDecode(tfOps, vaeStore.scope(), unscaleLatents(tfOps, x, vaeCfg), vaeCfg).dataSync() as Float32Array);
    x.dispose();
    const raw = diff(decoded, toNhwc(get(ref, 'decoded_raw')).data);
    const image = diff(decoded.map(denormalize), toNhwc(get(ref, 'image')).data);
    worst.set('decoded_raw', raw.rel);
    worst.set('image', image.rel);
    expect(raw.rel, `decoded_raw: max-abs ${raw.maxAbs} vs scale ${raw.scale}`).toBeLessThanOrEqual(TOL);
    expect(image.rel, `image: max-abs ${image.maxAbs} vs scale ${image.scale}`).toBeLessThanOrEqual(TOL);
    console.log(`[txt2img e2e, worst rel error over the steps]\n  ${[...worst].map(([k, v]) => `${k}: ${v.toExponential(2)}`).join('\n  ')}`);
  });
});
