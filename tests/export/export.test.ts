/**
 * ONNX export of the tiny fixture through onnxruntime-node: every graph against the diffusers /
 * transformers reference fixtures and the tfjs model, dynamic batch and sizes, external data,
 * a textual-inversion embedding and a parameter override against tfjs with the same change,
 * the folder layout and provenance, and the initializers = the checkpoint.
 */
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import * as ort from 'onnxruntime-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { initBackend } from '../../src/backend.js';
import { exportModel, type ExportReport } from '../../src/export/export-model.js';
import { readInitializers } from '../../src/export/read.js';
import { hwioToOihw, nchwToNhwc, nhwcToNchw } from '../../src/io/layout.js';
import { SafetensorsFile } from '../../src/io/safetensors.js';
import { clipTextEncoder } from '../../src/models/clip/text-encoder.js';
import { ClipTokenizer } from '../../src/models/clip/tokenizer.js';
import { unet, type UnetHooks } from '../../src/models/unet/unet.js';
import { vaeDecode } from '../../src/models/vae/vae.js';
import type { Ops } from '../../src/ops/ops.js';
import { tfOps } from '../../src/ops/tfjs-ops.js';
import { disposeStableDiffusion, loadStableDiffusion, type StableDiffusion } from '../../src/pipeline/load.js';
import { diff, get, readRef, TINY_SD, toNhwc, type RefTensor } from '../helpers/fixtures.js';

const TOL = 1e-4;
const TO_K = 'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight';

let model: StableDiffusion;
let root: string;
let plain: ExportReport;
let external: ExportReport;
let patched: ExportReport;
let embeddingRows: Float32Array[];
let toK: Float32Array;
const sessions = new Map<string, ort.InferenceSession>();
const measured = new Map<string, number>();

async function session(dir: string, component: string): Promise<ort.InferenceSession> {
  const file = path.join(dir, component, 'model.onnx');
  let s = sessions.get(file);
  if (s === undefined) {
    s = await ort.InferenceSession.create(file, { intraOpNumThreads: 1 });
    sessions.set(file, s);
  }
  return s;
}

/** A seeded N(0, 1) array. */
function normal(n: number, seed: number): Float32Array {
  return tf.tidy(() => tf.randomNormal([n], 0, 1, 'float32', seed).dataSync() as Float32Array);
}

function expectClose(actual: ArrayLike<number>, expected: ArrayLike<number>, what: string, tol = TOL): void {
  const d = diff(actual, expected);
  measured.set(what, Math.max(measured.get(what) ?? 0, d.rel));
  expect(d.rel, `${what}: max-abs ${d.maxAbs} vs scale ${d.scale}`).toBeLessThanOrEqual(tol);
}

function f32(t: ort.Tensor): Float32Array {
  return t.data as Float32Array;
}

beforeAll(async () => {
  await initBackend({ backend: 'wasm', log: () => {} });
  model = await loadStableDiffusion(TINY_SD);
  root = await fs.mkdtemp(path.join(os.tmpdir(), 'sdwb-export-test-'));
  plain = await exportModel(model, path.join(root, 'plain'));
  external = await exportModel(model, path.join(root, 'external'), { externalDataThreshold: 0 });
  // A made-up token with two random rows, and attn2.to_k of the first transformer scaled and shifted.
  embeddingRows = [normal(32, 11), normal(32, 12)];
  const base = hwioFree(model.unet.store.get(TO_K)!);
  toK = base.map((v, i) => v * 1.5 + 0.01 * Math.sin(i));
  patched = await exportModel(model, path.join(root, 'patched'), {
    embeddings: [{ token: '<sdwb-test>', rows: embeddingRows }],
    paramOverrides: new Map([[`unet.${TO_K}`, toK]]),
    addOns: [{ kind: 'embedding', source: 'test' }],
  });
});

/** A non-conv parameter's values (linear weights keep PyTorch's layout). */
function hwioFree(t: tf.Tensor): Float32Array {
  expect(t.rank).toBeLessThan(4);
  return Float32Array.from(t.dataSync());
}

afterAll(async () => {
  for (const s of sessions.values()) await s.release();
  if (model !== undefined) disposeStableDiffusion(model);
  if (root !== undefined) await fs.rm(root, { recursive: true, force: true });
  console.log(`[onnx export vs reference/tfjs, rel error] ${[...measured].map(([k, v]) => `${k} ${v.toExponential(2)}`).join(', ')}`);
});

describe('the exported graphs against the reference fixtures', () => {
  it('text encoder: last_hidden_state, pooler_output and the penultimate hidden state (5 prompts)', async () => {
    const ref = await readRef('text_encoder.safetensors');
    const ids = get(ref, 'input_ids');
    const s = await session(plain.outDir, 'text_encoder');
    const out = await s.run({ input_ids: new ort.Tensor('int32', Int32Array.from(ids.data), ids.shape) });
    expectClose(f32(out.last_hidden_state!), get(ref, 'last_hidden_state').data, 'text last_hidden_state');
    expectClose(f32(out.pooler_output!), get(ref, 'pooler_output').data, 'text pooler_output');
    expectClose(f32(out['hidden_states.1']!), get(ref, 'penultimate_hidden_state').data, 'text hidden_states.1');
    expect(out.last_hidden_state!.dims).toEqual([5, 77, 32]);
  });

  it('UNet: out_sample for the reference sample, timesteps and text states (NCHW in and out)', async () => {
    const ref = await readRef('unet.safetensors');
    const s = await session(plain.outDir, 'unet');
    const sample = get(ref, 'sample');
    const states = get(ref, 'encoder_hidden_states');
    const out = await s.run({
      sample: new ort.Tensor('float32', sample.data, sample.shape),
      timestep: new ort.Tensor('float32', Float32Array.from(get(ref, 'timesteps').data), [2]),
      encoder_hidden_states: new ort.Tensor('float32', states.data, states.shape),
    });
    expect(out.out_sample!.dims).toEqual([2, 4, 16, 16]);
    expectClose(f32(out.out_sample!), get(ref, 'out').data, 'unet out_sample');
  });

  it('VAE encoder: latent_parameters are the posterior moments; VAE decoder: the decoded sample', async () => {
    const ref = await readRef('vae.safetensors');
    const image = get(ref, 'image');
    const enc = await (await session(plain.outDir, 'vae_encoder')).run({ sample: new ort.Tensor('float32', image.data, image.shape) });
    expect(enc.latent_parameters!.dims).toEqual([2, 8, 16, 16]);
    expectClose(f32(enc.latent_parameters!), get(ref, 'moments').data, 'vae latent_parameters');
    const z = get(ref, 'latent_sample');
    const dec = await (await session(plain.outDir, 'vae_decoder')).run({ latent_sample: new ort.Tensor('float32', z.data, z.shape) });
    expect(dec.sample!.dims).toEqual([2, 3, 32, 32]);
    expectClose(f32(dec.sample!), get(ref, 'decoded_sample').data, 'vae decoded sample');
  });
});

describe('dynamic axes', () => {
  it('UNet: batch 1 and 3, non-square sizes and another text length, equal to tfjs; timestep as [1] or [batch]', async () => {
    const s = await session(plain.outDir, 'unet');
    const cases = [
      { b: 1, h: 8, w: 8, seq: 77, t: 'one' },
      { b: 3, h: 12, w: 20, seq: 7, t: 'batch' },
      { b: 3, h: 16, w: 16, seq: 77, t: 'one' },
    ] as const;
    for (const [n, c] of cases.entries()) {
      const x = tf.tensor4d(normal(c.b * c.h * c.w * 4, 20 + n), [c.b, c.h, c.w, 4]);
      const ctx = tf.tensor3d(normal(c.b * c.seq * 32, 30 + n), [c.b, c.seq, 32]);
      const tValues = Array.from({ length: c.b }, (_, i) => (c.t === 'batch' ? 900 - 250 * i : 481));
      const expected = tf.tidy(() => unet(tfOps, model.unet.store.scope(), x, tf.tensor1d(tValues), ctx, model.unet.cfg).dataSync() as Float32Array);
      const timestep = c.t === 'one' ? new ort.Tensor('float32', Float32Array.of(481), [1]) : new ort.Tensor('float32', Float32Array.from(tValues), [c.b]);
      const sample = nhwcToNchw(x.dataSync() as Float32Array, x.shape);
      const out = await s.run({ sample: new ort.Tensor('float32', sample.data, sample.shape), timestep, encoder_hidden_states: new ort.Tensor('float32', ctx.dataSync() as Float32Array, ctx.shape) });
      expect(out.out_sample!.dims).toEqual([c.b, 4, c.h, c.w]);
      expectClose(nchwToNhwc(f32(out.out_sample!), [...out.out_sample!.dims]).data, expected, 'unet vs tfjs (dynamic)');
      tf.dispose([x, ctx]);
    }
  });

  it('text encoder and VAE decoder: batch 1 and 3 equal to tfjs', async () => {
    const te = await session(plain.outDir, 'text_encoder');
    const vd = await session(plain.outDir, 'vae_decoder');
    for (const b of [1, 3]) {
      const ids = Int32Array.from({ length: b * 77 }, (_, i) => (i % 77 === 0 ? 49406 : i % 77 < 4 + 2 * b ? 320 + ((i * 7919) % 40000) : 49407));
      const ref = tf.tidy(() => {
        const out = clipTextEncoder(tfOps, model.text.store.scope(), tf.tensor2d(ids, [b, 77], 'int32'), model.text.cfg);
        return [out.lastHiddenState.dataSync() as Float32Array, out.pooled.dataSync() as Float32Array] as const;
      });
      const out = await te.run({ input_ids: new ort.Tensor('int32', ids, [b, 77]) });
      expectClose(f32(out.last_hidden_state!), ref[0], 'text vs tfjs (dynamic)');
      expectClose(f32(out.pooler_output!), ref[1], 'text pooled vs tfjs (dynamic)');

      const z = tf.tensor4d(normal(b * 6 * 10 * 4, 40 + b), [b, 6, 10, 4]);
      const expected = tf.tidy(() => vaeDecode(tfOps, model.vae.store.scope(), z, model.vae.cfg).dataSync() as Float32Array);
      const zn = nhwcToNchw(z.dataSync() as Float32Array, z.shape);
      const dec = await vd.run({ latent_sample: new ort.Tensor('float32', zn.data, zn.shape) });
      expect(dec.sample!.dims).toEqual([b, 3, 12, 20]);
      expectClose(nchwToNhwc(f32(dec.sample!), [...dec.sample!.dims]).data, expected, 'vae decoder vs tfjs (dynamic)');
      z.dispose();
    }
  });

  it('declares the dynamic axes with optimum names', async () => {
    const s = await session(plain.outDir, 'unet');
    const shape = (name: string) => {
      const m = s.inputMetadata.find((x) => x.name === name);
      return m !== undefined && m.isTensor ? m.shape : undefined;
    };
    expect(shape('sample')).toEqual(['batch_size', 4, 'height', 'width']);
    expect(shape('encoder_hidden_states')).toEqual(['batch_size', 'sequence_length', 32]);
    expect(shape('timestep')).toEqual(['steps']);
    const te = await session(plain.outDir, 'text_encoder');
    const ids = te.inputMetadata.find((x) => x.name === 'input_ids');
    expect(ids !== undefined && ids.isTensor ? [ids.type, ids.shape] : undefined).toEqual(['int32', ['batch_size', 77]]);
    const enc = await session(plain.outDir, 'vae_encoder');
    const lp = enc.outputMetadata.find((x) => x.name === 'latent_parameters');
    expect(lp !== undefined && lp.isTensor ? lp.shape : undefined).toEqual(['batch_size', 8, 'sample_height/2', 'sample_width/2']);
  });
});

describe('external data', () => {
  it('puts the weights (all of 1 KiB or more) in model.onnx_data and gives bit-identical outputs', async () => {
    for (const c of external.components) {
      expect(c.externalData).toBe(path.join(external.outDir, c.component, 'model.onnx_data'));
      const [model, data] = await Promise.all([fs.stat(c.file), fs.stat(c.externalData!)]);
      expect(model.size).toBeLessThan(0.05 * c.payloadBytes);
      expect(data.size).toBeGreaterThan(0.95 * c.payloadBytes);
    }
    for (const c of plain.components) expect(c.externalData).toBeUndefined();
    const ref = await readRef('unet.safetensors');
    const feeds = {
      sample: new ort.Tensor('float32', get(ref, 'sample').data, get(ref, 'sample').shape),
      timestep: new ort.Tensor('float32', Float32Array.of(321), [1]),
      encoder_hidden_states: new ort.Tensor('float32', get(ref, 'encoder_hidden_states').data, get(ref, 'encoder_hidden_states').shape),
    };
    const a = await (await session(plain.outDir, 'unet')).run(feeds);
    const b = await (await session(external.outDir, 'unet')).run(feeds);
    expect(Array.from(f32(b.out_sample!))).toEqual(Array.from(f32(a.out_sample!)));
    const ids = get(await readRef('text_encoder.safetensors'), 'input_ids');
    const feed = { input_ids: new ort.Tensor('int32', Int32Array.from(ids.data), ids.shape) };
    const ta = await (await session(plain.outDir, 'text_encoder')).run(feed);
    const tb = await (await session(external.outDir, 'text_encoder')).run(feed);
    expect(Array.from(f32(tb.last_hidden_state!))).toEqual(Array.from(f32(ta.last_hidden_state!)));
  });

  it('stores the checkpoint itself: initializers named by key, conv filters OIHW, values equal (inline and external)', async () => {
    const file = await SafetensorsFile.open(path.join(TINY_SD, 'unet', 'diffusion_pytorch_model.safetensors'));
    try {
      for (const dir of [plain.outDir, external.outDir]) {
        const stored = await readInitializers(path.join(dir, 'unet', 'model.onnx'), (n) => file.keys().includes(n));
        expect(stored.size).toBe(file.keys().length);
        for (const key of ['conv_in.weight', 'conv_in.bias', TO_K, 'time_embedding.linear_1.weight']) {
          const t = stored.get(key)!;
          expect(t.dims).toEqual(file.info(key).shape);
          expect(Array.from(t.data as Float32Array)).toEqual(Array.from(await file.readFloat32(key)));
        }
      }
    } finally {
      await file.close();
    }
  });
});

describe('add-ons baked in', () => {
  it('a textual-inversion embedding: the tokenizer knows the tokens, the text encoder gives the states tfjs gives with the same rows', async () => {
    expect(patched.addedTokens).toEqual(['<sdwb-test>', '<sdwb-test>_1']);
    const tokenizer = await ClipTokenizer.fromDir(path.join(patched.outDir, 'tokenizer'));
    expect(tokenizer.tokenToId('<sdwb-test>')).toBe(49408);
    expect(tokenizer.tokenToId('<sdwb-test>_1')).toBe(49409);
    const config = JSON.parse(await fs.readFile(path.join(patched.outDir, 'text_encoder', 'config.json'), 'utf8')) as { vocab_size: number };
    expect(config.vocab_size).toBe(49410);

    const rows = [tokenizer.encode('a photo of <sdwb-test> <sdwb-test>_1 on a beach'), tokenizer.encode('a photo of a cat')];
    expect(rows[0]).toContain(49409);
    const ids = Int32Array.from(rows.flat());
    const expected = tf.tidy(() => {
      const table = model.text.store.get('text_model.embeddings.token_embedding.weight')!;
      const big = tf.concat([table, tf.tensor2d([...embeddingRows[0]!, ...embeddingRows[1]!], [2, 32])], 0);
      const out = clipTextEncoder(tfOps, model.text.store.scope(), tf.tensor2d(ids, [2, 77], 'int32'), model.text.cfg, {
        tokenEmbeddings: (x) => tf.gather(big, x),
      });
      return out.lastHiddenState.dataSync() as Float32Array;
    });
    const out = await (await session(patched.outDir, 'text_encoder')).run({ input_ids: new ort.Tensor('int32', ids, [2, 77]) });
    expectClose(f32(out.last_hidden_state!), expected, 'text with embedding vs tfjs');
    // The prompt without the token is unchanged from the plain export.
    const base = await (await session(plain.outDir, 'text_encoder')).run({ input_ids: new ort.Tensor('int32', Int32Array.from(rows[1]!), [1, 77]) });
    expect(Array.from(f32(out.last_hidden_state!).subarray(77 * 32))).toEqual(Array.from(f32(base.last_hidden_state!)));
  });

  it('a parameter override of attn2.to_k: the UNet equals tfjs with the same override, and differs from the base', async () => {
    const ref = await readRef('unet.safetensors');
    const sample = toNhwc(get(ref, 'sample'));
    const states = get(ref, 'encoder_hidden_states');
    const t = Float32Array.from(get(ref, 'timesteps').data);
    const store = model.unet.store;
    const expected = tf.tidy(() => {
      store.override(TO_K, tf.tensor(toK, store.get(TO_K)!.shape));
      try {
        return unet(tfOps, store.scope(), tf.tensor4d(sample.data, sample.shape as [number, number, number, number]), tf.tensor1d(t), tf.tensor3d(states.data, states.shape as [number, number, number]), model.unet.cfg).dataSync() as Float32Array;
      } finally {
        store.clearOverrides();
      }
    });
    const nchw = get(ref, 'sample');
    const out = await (await session(patched.outDir, 'unet')).run({
      sample: new ort.Tensor('float32', nchw.data, nchw.shape),
      timestep: new ort.Tensor('float32', t, [2]),
      encoder_hidden_states: new ort.Tensor('float32', states.data, states.shape),
    });
    const got = nchwToNhwc(f32(out.out_sample!), [...out.out_sample!.dims]).data;
    expectClose(got, expected, 'unet with override vs tfjs');
    const changed = diff(got, toNhwc(get(ref, 'out')).data);
    expect(changed.maxAbs).toBeGreaterThan(1e-3);
    const stored = await readInitializers(path.join(patched.outDir, 'unet', 'model.onnx'), (n) => n === TO_K);
    expect(Array.from(stored.get(TO_K)!.data as Float32Array)).toEqual(Array.from(toK));
  });

  it('records provenance in model_index.json and a new model hash', async () => {
    const index = JSON.parse(await fs.readFile(path.join(patched.outDir, 'model_index.json'), 'utf8')) as Record<string, unknown> & {
      _sdwb_export: { base_model_hash: string; model_hash: string; embeddings: { token: string; vectors: number }[]; param_overrides: { keys: string[] }; add_ons: unknown[] };
    };
    expect(index._class_name).toBe('OnnxStableDiffusionPipeline');
    expect(index.unet).toEqual(['onnxruntime', 'OnnxRuntimeModel']);
    expect(index.scheduler).toEqual(['diffusers', 'PNDMScheduler']);
    const p = index._sdwb_export;
    expect(p.base_model_hash).toBe('887e133466');
    expect(p.model_hash).toMatch(/^[0-9a-f]{10}$/);
    expect(p.model_hash).not.toBe(p.base_model_hash);
    expect(patched.modelHash).toBe(p.model_hash);
    expect(plain.modelHash).toBe('887e133466');
    expect(p.embeddings).toMatchObject([{ token: '<sdwb-test>', vectors: 2 }]);
    expect(p.param_overrides.keys).toEqual([`unet.${TO_K}`]);
    expect(p.add_ons).toEqual([{ kind: 'embedding', source: 'test' }]);
    for (const f of ['tokenizer/vocab.json', 'tokenizer/merges.txt', 'scheduler/scheduler_config.json', 'unet/config.json', 'vae_encoder/config.json', 'vae_decoder/config.json']) {
      await expect(fs.stat(path.join(plain.outDir, f))).resolves.toBeDefined();
    }
  });
});

describe('UNet hooks', () => {
  it('records hook-added ops (a hypernetwork-like K/V transform with its own weights) and equals tfjs with the same hook', async () => {
    const w = normal(32 * 32, 77).map((v) => v * 0.1);
    const hooks = <T>(o: Ops<T>): UnetHooks<T> => ({
      attentionContext: (context, info) => {
        if (info.kind !== 'cross') return { k: context, v: context };
        const shape = o.shape(context);
        const flat = o.reshape(context, [-1, info.width]); // [B·S, D]
        const mixed = o.reshape(o.matMul(flat, o.constant(w, [32, 32])), shape); // [B,S,D]
        return { k: o.add(context, o.mul(o.tanh(mixed), 0.5)), v: o.add(context, mixed) };
      },
    });
    const hooked = await exportModel(model, path.join(root, 'hooked'), { unetHooks: hooks });
    const ref = await readRef('unet.safetensors');
    const sample = get(ref, 'sample');
    const states = get(ref, 'encoder_hidden_states');
    const t = Float32Array.from(get(ref, 'timesteps').data);
    const expected = tf.tidy(() => {
      const x = toNhwc(sample);
      return unet(tfOps, model.unet.store.scope(), tf.tensor4d(x.data, x.shape as [number, number, number, number]), tf.tensor1d(t), tf.tensor3d(states.data, states.shape as [number, number, number]), model.unet.cfg, hooks(tfOps)).dataSync() as Float32Array;
    });
    const out = await (await session(hooked.outDir, 'unet')).run({
      sample: new ort.Tensor('float32', sample.data, sample.shape),
      timestep: new ort.Tensor('float32', t, [2]),
      encoder_hidden_states: new ort.Tensor('float32', states.data, states.shape),
    });
    const got = nchwToNhwc(f32(out.out_sample!), [...out.out_sample!.dims]).data;
    expectClose(got, expected, 'unet with hooks vs tfjs');
    expect(diff(got, toNhwc(get(ref, 'out')).data).maxAbs).toBeGreaterThan(1e-3);
    const index = JSON.parse(await fs.readFile(path.join(hooked.outDir, 'model_index.json'), 'utf8')) as { _sdwb_export: { unet_hooks: boolean } };
    expect(index._sdwb_export.unet_hooks).toBe(true);
    expect(hooked.modelHash).not.toBe('887e133466');
  });
});

describe('errors', () => {
  it('rejects an unsupported opset, a non-empty folder, and overrides of unknown keys or the wrong size', async () => {
    await expect(exportModel(model, path.join(root, 'x'), { opset: 12 })).rejects.toThrow(/opset 12 is not supported \(14–21\)/);
    await expect(exportModel(model, plain.outDir)).rejects.toThrow(/folder exists and is not empty/);
    await expect(exportModel(model, path.join(root, 'y'), { paramOverrides: new Map([['unet.nope.weight', new Float32Array(1)]]) })).rejects.toThrow(
      /parameter override 'unet.nope.weight': the unet has no parameter 'nope.weight'/,
    );
    await expect(exportModel(model, path.join(root, 'z'), { paramOverrides: new Map([['conv_in.weight', new Float32Array(1)]]) })).rejects.toThrow(
      /must start with unet., text_encoder. or vae./,
    );
    await expect(exportModel(model, path.join(root, 'w'), { paramOverrides: new Map([['unet.conv_in.bias', new Float32Array(3)]]) })).rejects.toThrow(
      /3 values, the parameter has shape \[32\]/,
    );
    await expect(exportModel(model, path.join(root, 'v'), { embeddings: [{ token: 'cat</w>', rows: [new Float32Array(32)] }] })).rejects.toThrow(
      /already a token of this tokenizer/,
    );
    // Checked before anything is written.
    for (const d of ['x', 'y', 'z', 'w', 'v']) await expect(fs.stat(path.join(root, d))).rejects.toThrow(/ENOENT/);
  });
});

// Keep the conv helper honest: OIHW in the file is the HWIO the model reads, transposed back.
it('the OIHW initializer of conv_in is the HWIO parameter transposed', async () => {
  const stored = await readInitializers(path.join(plain.outDir, 'unet', 'model.onnx'), (n) => n === 'conv_in.weight');
  const hwio = model.unet.store.get('conv_in.weight')!;
  expect(Array.from(stored.get('conv_in.weight')!.data as Float32Array)).toEqual(Array.from(hwioToOihw(hwio.dataSync() as Float32Array, hwio.shape).data));
});
