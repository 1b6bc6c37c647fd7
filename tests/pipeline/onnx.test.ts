/**
 * The onnxruntime pipeline on an export of the tiny fixture: the reference 10-step CFG DDIM run
 * (every step, final latents, image), seeds, clip skip against transformers, and the samplers
 * that draw per-step noise and img2img against the tfjs pipeline with the same seed — the two
 * engines share schedulers, generator and loop, so they must agree.
 */
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { initBackend } from '../../src/backend.js';
import { exportModel } from '../../src/export/export-model.js';
import { denormalize, type Image8 } from '../../src/models/vae/vae.js';
import { disposeStableDiffusion, loadStableDiffusion, type StableDiffusion } from '../../src/pipeline/load.js';
import { generateOnnx, img2imgOnnx, OnnxStableDiffusion } from '../../src/pipeline/onnx.js';
import { generate, img2img } from '../../src/pipeline/txt2img.js';
import { diff, get, readRef, TINY_SD, toNhwc, type RefTensor } from '../helpers/fixtures.js';

const TOL = 1e-4;
const PROMPT = 'a photo of an astronaut riding a horse';

let root: string;
let tfjsModel: StableDiffusion;
let model: OnnxStableDiffusion;
let sampling: Map<string, RefTensor>;
const measured = new Map<string, number>();

function expectClose(actual: ArrayLike<number>, expected: ArrayLike<number>, what: string, tol = TOL): void {
  const d = diff(actual, expected);
  measured.set(what, Math.max(measured.get(what) ?? 0, d.rel));
  expect(d.rel, `${what}: max-abs ${d.maxAbs} vs scale ${d.scale}`).toBeLessThanOrEqual(tol);
}

/** Step i of a [steps, 1, C, h, w] reference tensor, NHWC. */
function stepRef(key: string, i: number): Float32Array {
  const t = get(sampling, key);
  const n = t.data.length / t.shape[0]!;
  return toNhwc({ data: t.data.subarray(i * n, (i + 1) * n), shape: t.shape.slice(1) }).data;
}

beforeAll(async () => {
  await initBackend({ backend: 'wasm', log: () => {} });
  root = await fs.mkdtemp(path.join(os.tmpdir(), 'sdwb-onnx-pipeline-'));
  tfjsModel = await loadStableDiffusion(TINY_SD);
  await exportModel(tfjsModel, path.join(root, 'tiny'));
  model = await OnnxStableDiffusion.load(path.join(root, 'tiny'), { intraOpNumThreads: 1 });
  sampling = await readRef('sampling.safetensors');
});

afterAll(async () => {
  await model?.release();
  if (tfjsModel !== undefined) disposeStableDiffusion(tfjsModel);
  if (root !== undefined) await fs.rm(root, { recursive: true, force: true });
  console.log(`[onnx pipeline, rel error] ${[...measured].map(([k, v]) => `${k} ${v.toExponential(2)}`).join(', ')}`);
});

describe('OnnxStableDiffusion.load', () => {
  it('reads the export: sizes, hash, CPU provider; rejects a folder that is not an export', async () => {
    expect(model.defaultSize).toEqual({ width: 32, height: 32 });
    expect(model.sizeMultiple).toBe(4);
    expect(model.modelHash).toBe('887e133466');
    expect(model.name).toBe('tiny');
    expect(model.executionProvider).toBe('cpu');
    await expect(OnnxStableDiffusion.load(TINY_SD)).rejects.toThrow(/no text_encoder\/model.onnx — not an ONNX export/);
    await expect(OnnxStableDiffusion.load('/nonexistent/x')).rejects.toThrow(/no such model folder/);
  });
});

describe('generateOnnx against the reference run', () => {
  it('reproduces every step, the final latents and the image from the reference x_T', async () => {
    let worst = 0;
    const result = await generateOnnx(model, {
      prompts: [PROMPT],
      negativePrompt: '',
      steps: 10,
      guidance: 7.5,
      sampler: 'ddim',
      width: 32,
      height: 32,
      seed: 0,
      initLatents: get(sampling, 'init_latents').data,
      onStep: (done, total, info) => {
        expect(total).toBe(10);
        worst = Math.max(worst, diff(info.latents.dataSync(), stepRef('steps.x_prev', done - 1)).rel);
      },
    });
    measured.set('max over steps.x_prev', worst);
    expect(worst).toBeLessThanOrEqual(TOL);
    expect(result.settings.timesteps).toEqual(Array.from(get(sampling, 'timesteps').data));
    expect(result.latentShape).toEqual([1, 4, 16, 16]);
    expectClose(result.latents, get(sampling, 'final_latents').data, 'final_latents');
    expectClose(result.decoded!.data, toNhwc(get(sampling, 'decoded_raw')).data, 'decoded_raw');
    expectClose(result.decoded!.data.map(denormalize), toNhwc(get(sampling, 'image')).data, 'image');
    const ref8 = toNhwc(get(sampling, 'image')).data.map((v) => Math.round(v * 255));
    expect(diff(result.images[0]!.data, ref8).maxAbs).toBeLessThanOrEqual(1);
  });

  it('seed 1007 draws the reference x_T and gives the reference final latents', async () => {
    const result = await generateOnnx(model, { prompts: [PROMPT], steps: 10, guidance: 7.5, sampler: 'ddim', seed: 1007, decode: false });
    expect(result.images).toEqual([]);
    expectClose(result.latents, get(sampling, 'final_latents').data, 'final_latents (seed 1007)');
  });

  it('clip skip 1 gives transformers’ final-LN penultimate states', async () => {
    const ref = await readRef('text_encoder.safetensors');
    const ids = get(ref, 'input_ids');
    const rows = Array.from({ length: ids.shape[0]! }, (_, r) => Array.from(ids.data.subarray(r * 77, (r + 1) * 77)));
    const states = await model.encodeIds(rows, 1);
    expectClose(states.dataSync(), get(ref, 'penultimate_final_ln').data, 'clip skip 1');
    states.dispose();
    const last = await model.encodeIds(rows, 0);
    expectClose(last.dataSync(), get(ref, 'last_hidden_state').data, 'clip skip 0');
    last.dispose();
  });
});

describe('the same run on both engines', () => {
  it('Euler a (per-step noise from the generator), batch 2, two prompts, clip skip 1: equal latents', async () => {
    const opts = { prompts: ['a red cube', 'a blue sphere'], negativePrompt: 'blurry', steps: 6, guidance: 5, sampler: 'euler_a', seed: 42, clipSkip: 1, decode: false } as const;
    const a = await generateOnnx(model, opts);
    const b = await generate(tfjsModel, opts);
    expect(a.latentShape).toEqual([2, 4, 16, 16]);
    expectClose(a.latents, b.latents, 'euler_a onnx vs tfjs');
  });

  it('img2img with DPM++ 2M Karras: equal latents and images', async () => {
    const image: Image8 = { width: 32, height: 32, channels: 3, data: Uint8Array.from({ length: 32 * 32 * 3 }, (_, i) => (i * 37) % 256) };
    const opts = { prompts: [PROMPT], initImages: [image], strength: 0.6, steps: 10, guidance: 7.5, sampler: 'dpmpp_2m', karras: true, seed: 7 } as const;
    const a = await img2imgOnnx(model, opts);
    const b = await img2img(tfjsModel, opts);
    expect(a.settings.timesteps).toEqual(b.settings.timesteps);
    expectClose(a.latents, b.latents, 'img2img onnx vs tfjs');
    expect(diff(a.images[0]!.data, b.images[0]!.data).maxAbs).toBeLessThanOrEqual(1);
  });

  it('keeps the tfjs tensor count flat across runs', async () => {
    const run = () => generateOnnx(model, { prompts: ['x'], steps: 3, sampler: 'pndm', seed: 1 });
    await run();
    const before = tf.memory().numTensors;
    await run();
    await run();
    expect(tf.memory().numTensors).toBe(before);
  });

  it('rejects tiled decoding and a size the model cannot divide', async () => {
    await expect(generateOnnx(model, { prompts: ['x'], steps: 1, seed: 1, tiledDecode: true })).rejects.toThrow(/tiled VAE decoding is not available on the onnx engine/);
    await expect(generateOnnx(model, { prompts: ['x'], steps: 1, width: 30, height: 32, seed: 1 })).rejects.toThrow(/width 30 is not a positive multiple of 4/);
  });
});

describe('an export with a multi-vector embedding', () => {
  it('expands the token in prompts and conditions on its rows', async () => {
    const rows = [Float32Array.from({ length: 32 }, (_, i) => Math.sin(i)), Float32Array.from({ length: 32 }, (_, i) => Math.cos(3 * i))];
    await exportModel(tfjsModel, path.join(root, 'ti'), { embeddings: [{ token: '<cube>', rows }] });
    const ti = await OnnxStableDiffusion.load(path.join(root, 'ti'), { intraOpNumThreads: 1 });
    try {
      expect(ti.rewritePrompt('a <cube> on a table')).toBe('a <cube> <cube>_1 on a table');
      const opts = { prompts: ['a <cube> on a table'], steps: 2, sampler: 'ddim', seed: 3, decode: false } as const;
      const withToken = await generateOnnx(ti, opts);
      const without = await generateOnnx(model, opts);
      expect(diff(withToken.latents, without.latents).maxAbs).toBeGreaterThan(1e-4);
      const plainPrompt = { ...opts, prompts: ['a cube on a table'] };
      expect(Array.from((await generateOnnx(ti, plainPrompt)).latents)).toEqual(Array.from((await generateOnnx(model, plainPrompt)).latents));
    } finally {
      await ti.release();
    }
  });
});
