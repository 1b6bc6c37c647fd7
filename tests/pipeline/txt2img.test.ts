/**
 * The product pipeline against diffusers: the reference 10-step CFG DDIM run through `generate`,
 * seeds giving torch's initial latents, partial PNDM denoising as ESD's diffusers code runs it,
 * img2img's start latents from the VAE fixture, and the loop's memory behaviour.
 */
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { initBackend } from '../../src/backend.js';
import { defaultSamplerKind, denoise, img2imgStartStep, makeSampler, noiseToStep } from '../../src/pipeline/denoise.js';
import { disposeStableDiffusion, loadStableDiffusion, type StableDiffusion } from '../../src/pipeline/load.js';
import { drawInitialLatents, encodePrompts, generate, img2img, img2imgLatents } from '../../src/pipeline/txt2img.js';
import { denormalize } from '../../src/models/vae/vae.js';
import { TorchGenerator } from '../../src/schedulers/rng.js';
import { diff, ERASURE_REF, get, readRef, toNhwc, TINY_SD, type RefTensor } from '../helpers/fixtures.js';

const TOL = 1e-4;
const PROMPT = 'a photo of an astronaut riding a horse';

let model: StableDiffusion;
let sampling: Map<string, RefTensor>;

beforeAll(async () => {
  await initBackend({ backend: 'wasm', log: () => {} });
  model = await loadStableDiffusion(TINY_SD);
  sampling = await readRef('sampling.safetensors');
});

const measured = new Map<string, number>();

afterAll(() => {
  disposeStableDiffusion(model);
  console.log(`[pipeline vs reference, rel error] ${[...measured].map(([k, v]) => `${k} ${v.toExponential(2)}`).join(', ')}`);
});

/** Step i of a [steps, 1, C, h, w] reference tensor, NHWC. */
function stepRef(key: string, i: number): Float32Array {
  const t = get(sampling, key);
  const n = t.data.length / t.shape[0]!;
  return toNhwc({ data: t.data.subarray(i * n, (i + 1) * n), shape: t.shape.slice(1) }).data;
}

function expectClose(actual: ArrayLike<number>, expected: ArrayLike<number>, what: string, tol = TOL): number {
  const d = diff(actual, expected);
  measured.set(what, d.rel);
  expect(d.rel, `${what}: max-abs ${d.maxAbs} vs scale ${d.scale}`).toBeLessThanOrEqual(tol);
  return d.rel;
}

describe('loadStableDiffusion', () => {
  it('reads the folder: sizes, default sampler, and the UNet file hash from the fixture README', () => {
    // README: unet/diffusion_pytorch_model.safetensors sha256 887e1334661ac50d…
    expect(model.modelHash).toBe('887e133466');
    expect(model.name).toBe('tiny-sd');
    // sample_size 16 × VAE factor 2; 2 UNet levels → multiples of 2 × 2.
    expect(model.defaultSize).toEqual({ width: 32, height: 32 });
    expect(model.sizeMultiple).toBe(4);
    expect(defaultSamplerKind(model.scheduler)).toBe('pndm');
  });

  it('rejects a missing folder and a folder that is not a model in one line', async () => {
    await expect(loadStableDiffusion('/nonexistent/model')).rejects.toThrow(/^\/nonexistent\/model: no such model folder$/);
    await expect(loadStableDiffusion(path.join(TINY_SD, 'unet'))).rejects.toThrow(/not a diffusers model folder \(no model_index.json\)/);
  });
});

describe('generate (txt2img) against the reference run', () => {
  it('reproduces every step, the final latents and the image from the reference x_T', async () => {
    const init = get(sampling, 'init_latents');
    const worst = new Map<string, number>();
    const result = await generate(model, {
      prompts: [PROMPT],
      negativePrompt: '',
      steps: 10,
      guidance: 7.5,
      sampler: 'ddim',
      width: 32,
      height: 32,
      seed: 0,
      initLatents: init.data,
      onStep: (done, total, info) => {
        expect(total).toBe(10);
        const d = diff(info.latents.dataSync(), stepRef('steps.x_prev', done - 1));
        worst.set('steps.x_prev', Math.max(worst.get('steps.x_prev') ?? 0, d.rel));
      },
    });
    expect(result.settings.timesteps).toEqual(Array.from(get(sampling, 'timesteps').data));
    expect(worst.get('steps.x_prev')).toBeLessThanOrEqual(TOL);
    expect(result.latentShape).toEqual([1, 4, 16, 16]);
    expectClose(result.latents, get(sampling, 'final_latents').data, 'final_latents (NCHW)');
    const decoded = result.decoded!;
    expectClose(decoded.data, toNhwc(get(sampling, 'decoded_raw')).data, 'decoded_raw');
    expectClose(decoded.data.map(denormalize), toNhwc(get(sampling, 'image')).data, 'image');
    // 8-bit output: the reference image × 255, rounded (at most one level off at rounding edges).
    const ref8 = toNhwc(get(sampling, 'image')).data.map((v) => Math.round(v * 255));
    expect(diff(result.images[0]!.data, ref8).maxAbs).toBeLessThanOrEqual(1);
    measured.set('max over steps.x_prev', worst.get('steps.x_prev')!);
  });

  it('seed 1007 draws the reference x_T (torch.Generator().manual_seed(1007)) and so gives the same run', async () => {
    const g = new TorchGenerator(1007);
    const xT = drawInitialLatents(g, [1, 4, 16, 16]);
    expect(Array.from(xT)).toEqual(Array.from(get(sampling, 'init_latents').data));
    let firstStep: Float32Array | undefined;
    const result = await generate(model, {
      prompts: [PROMPT],
      steps: 10,
      guidance: 7.5,
      sampler: 'ddim',
      seed: 1007,
      decode: false,
      onStep: (done, _total, info) => {
        if (done === 1) firstStep = info.latents.dataSync() as Float32Array;
      },
    });
    expect(result.seed).toBe(1007);
    expect(result.images).toEqual([]);
    expectClose(firstStep!, stepRef('steps.x_prev', 0), 'x after step 0');
    expectClose(result.latents, get(sampling, 'final_latents').data, 'final_latents');
  });

  it('draws a batch of latents in one call, as diffusers does for num_images_per_prompt', () => {
    // unet.safetensors `sample` is torch.randn([2, 4, 16, 16]) from seed 1001.
    return readRef('unet.safetensors').then((unetRef) => {
      const xT = drawInitialLatents(new TorchGenerator(1001), [2, 4, 16, 16]);
      expect(Array.from(xT)).toEqual(Array.from(get(unetRef, 'sample').data));
    });
  });

  it('with guidance ≤ 1 runs no uncond pass: the negative prompt has no effect', async () => {
    const run = (guidance: number, negativePrompt: string) =>
      generate(model, { prompts: ['a cat'], negativePrompt, guidance, steps: 2, sampler: 'ddim', seed: 9, decode: false }).then((r) => r.latents);
    expect(Array.from(await run(1, 'blurry'))).toEqual(Array.from(await run(1, '')));
    expect(diff(await run(7.5, 'blurry'), await run(7.5, '')).maxAbs).toBeGreaterThan(1e-3);
  });

  it('rejects a size the VAE and UNet cannot divide, naming the multiple', async () => {
    await expect(generate(model, { prompts: ['x'], steps: 1, width: 30, height: 32, seed: 1 })).rejects.toThrow(
      /width 30 is not a positive multiple of 4 \(VAE factor 2 × 2\^1 UNet downsamplings\)/,
    );
    await expect(generate(model, { prompts: ['x'], steps: 1, initLatents: new Float32Array(10), seed: 1 })).rejects.toThrow(
      /initLatents has 10 values, expected 1024 = \[1, 4, 16, 16\]/,
    );
  });
});

describe('denoise (partial runs for training methods)', () => {
  it('PNDM, 50 steps, CFG 3, stopped after 10 model calls equals ESD-2024 x_t (seed 4010)', async () => {
    const esd = await readRef(path.join(ERASURE_REF, 'esd.safetensors'));
    const sampler = makeSampler(model.scheduler, { kind: 'pndm', steps: 50 });
    expect(sampler.timesteps).toEqual(Array.from(get(esd, 'esd2024.scheduler_timesteps_50').data));
    // run_till_0: no step taken, x_t is the pipeline's seeded x_T.
    expect(Array.from(drawInitialLatents(new TorchGenerator(4000), [1, 4, 16, 16]))).toEqual(Array.from(get(esd, 'esd2024.run_till_0.x_t').data));

    const xT = drawInitialLatents(new TorchGenerator(4010), [1, 4, 16, 16]);
    const start = tf.tensor4d(toNhwc({ data: xT, shape: [1, 4, 16, 16] }).data, [1, 16, 16, 4]);
    const { context } = encodePrompts(model, ['Van Gogh'], [''], 3);
    const before = tf.memory().numTensors;
    const xt = await denoise(model, start, { sampler, context, guidance: 3, toStep: 10 });
    expect(tf.memory().numTensors).toBe(before + 1); // only the result survives
    expect(sampler.timesteps[10]).toBe(Array.from(get(esd, 'esd2024.run_till_10.t').data)[0]);
    expectClose(xt.dataSync(), toNhwc(get(esd, 'esd2024.run_till_10.x_t')).data, 'run_till_10.x_t');
    tf.dispose([xt, start, context]);
  });

  it('keeps tensor counts flat over the steps and frees everything but the result', async () => {
    const before = tf.memory().numTensors;
    for (const sampler of ['ddim', 'lms'] as const) {
      const counts: number[] = [];
      await generate(model, {
        prompts: ['a', 'b'],
        steps: 7,
        sampler,
        seed: 5,
        decode: false,
        onStep: () => counts.push(tf.memory().numTensors),
      });
      // LMS holds up to 4 past slopes: flat once its history is full.
      const steady = sampler === 'lms' ? counts.slice(3) : counts;
      expect(new Set(steady).size, `${sampler}: ${counts.join(', ')}`).toBe(1);
      expect(tf.memory().numTensors).toBe(before);
    }
  });
});

describe('img2img', () => {
  it('starts at the step diffusers get_timesteps keeps: steps − ⌊steps·strength⌋ (float product)', () => {
    expect(img2imgStartStep(10, 0.75)).toBe(3); // ⌊7.5⌋ = 7 kept
    expect(img2imgStartStep(50, 1)).toBe(0);
    expect(img2imgStartStep(100, 0.29)).toBe(72); // 100 × 0.29 = 28.999999999999996 in float64
    expect(img2imgStartStep(10, 0.3)).toBe(7); // 10 × 0.3 = 3.0000000000000004
    expect(() => img2imgStartStep(10, 0.05)).toThrow(/leaves no denoising step/);
    expect(() => img2imgStartStep(10, 0)).toThrow(/strength must be in \(0, 1\]/);
  });

  it('noises (posterior sample × 0.18215) to the first kept DDIM timestep, as prepare_latents', async () => {
    const vaeRef = await readRef('vae.safetensors');
    const sched = await readRef('scheduler.safetensors');
    // Image 0 of the fixture is an 8-bit photo mapped to u/127.5 − 1: recover the bytes.
    const image = toNhwc(get(vaeRef, 'image'));
    const per = 32 * 32 * 3;
    const bytes = Uint8Array.from(image.data.subarray(0, per), (v) => Math.round((v + 1) * 127.5));
    const spec = { kind: 'ddim' as const, steps: 10 };
    const sampler = makeSampler(model.scheduler, spec);
    const fromStep = img2imgStartStep(10, 0.5);
    expect(sampler.timesteps.slice(fromStep)).toEqual([401, 301, 201, 101, 1]);
    // The generator's first draw is the posterior ε: vae.safetensors `eps` is seed 1004's draw.
    const generator = new TorchGenerator(1004);
    const start = img2imgLatents(model, [{ width: 32, height: 32, channels: 3, data: bytes }], { batch: 1, spec, sampler, fromStep, generator });
    // Expected: √ᾱ_401 · 0.18215 · latent_sample[0] + √(1 − ᾱ_401) · (seed 1004's second draw).
    const reference = new TorchGenerator(1004);
    reference.randn([1, 4, 16, 16]);
    const noise = reference.randn([1, 4, 16, 16]);
    const acp = get(sched, 'alphas_cumprod').data[401]!;
    const z = get(vaeRef, 'latent_sample').data.subarray(0, 1024);
    const expected = z.map((v, i) => Math.sqrt(acp) * 0.18215 * v + Math.sqrt(1 - acp) * noise[i]!);
    expectClose(start.dataSync(), toNhwc({ data: expected, shape: [1, 4, 16, 16] }).data, 'img2img start latents');
    start.dispose();
  });

  it('runs only the kept steps and leaves no tensors behind', async () => {
    const before = tf.memory().numTensors;
    const image = { width: 32, height: 32, channels: 3, data: new Uint8Array(32 * 32 * 3).fill(128) };
    let calls = 0;
    const r = await img2img(model, { prompts: ['x'], initImages: [image], strength: 0.5, steps: 10, sampler: 'euler', seed: 3, onStep: () => calls++ });
    expect(calls).toBe(5);
    expect(r.settings.strength).toBe(0.5);
    expect(r.images).toHaveLength(1);
    expect(tf.memory().numTensors).toBe(before);
  });

  it('σ samplers start from x₀ + σ_i ε (Euler on the leading grid: σ of timestep t from ᾱ)', async () => {
    const sched = await readRef('scheduler.safetensors');
    const spec = { kind: 'euler' as const, steps: 10 };
    const sampler = makeSampler(model.scheduler, spec);
    // The folder's config says leading spacing with offset 1: t = 901, 801, …
    expect(sampler.timesteps[3]).toBe(601);
    const acp = get(sched, 'alphas_cumprod').data[601]!;
    const sigma = Math.sqrt((1 - acp) / acp);
    const x0 = tf.fill([1, 4, 4, 4], 0.5);
    const eps = tf.fill([1, 4, 4, 4], 2);
    const noised = noiseToStep(model.scheduler, spec, sampler, x0, eps, 3);
    expectClose(noised.dataSync(), new Float32Array(64).fill(0.5 + 2 * sigma), 'euler x₀ + σε', 1e-6);
    tf.dispose([x0, eps, noised]);
  });
});
