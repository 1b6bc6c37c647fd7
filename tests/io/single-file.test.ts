import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { inspectModel } from '../../src/io/inspect.js';
import { emaKeyOf } from '../../src/io/ldm-keys.js';
import { SafetensorsFile, writeSafetensors, type TensorToWrite } from '../../src/io/safetensors.js';
import { writeTorchCheckpoint, type TensorToSave } from '../../src/io/torch-save.js';
import {
  convertDiffusersToSingleFile,
  convertSingleFileToDiffusers,
  loadSingleFile,
  readDiffusersFolder,
  readSingleFile,
  type ComponentTensors,
} from '../../src/io/single-file.js';
import { disposeStableDiffusion, loadStableDiffusion } from '../../src/pipeline/load.js';
import * as tf from '@tensorflow/tfjs';
import { clipTextEncoder } from '../../src/models/clip/text-encoder.js';
import { tfOps } from '../../src/ops/tfjs-ops.js';
import { diff, get, readRef, TINY_REF, TINY_SD } from '../helpers/fixtures.js';
import { TINY_SINGLE } from './keymaps.helpers.js';

let tmp: string;
beforeAll(async () => {
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'sdwb-single-'));
});
afterAll(async () => {
  await fs.rm(tmp, { recursive: true, force: true });
});

const WEIGHT_FILES = {
  unet: 'unet/diffusion_pytorch_model.safetensors',
  vae: 'vae/diffusion_pytorch_model.safetensors',
  text_encoder: 'text_encoder/model.safetensors',
} as const;
type Component = keyof typeof WEIGHT_FILES;
const COMPONENTS = Object.keys(WEIGHT_FILES) as Component[];

/** name → {dtype, shape, stored bytes} of a safetensors file. */
async function tensorsOf(file: string, skip: (k: string) => boolean = () => false): Promise<Map<string, { dtype: string; shape: number[]; bytes: Buffer }>> {
  const f = await SafetensorsFile.open(file);
  try {
    const out = new Map<string, { dtype: string; shape: number[]; bytes: Buffer }>();
    for (const k of f.keys()) {
      if (skip(k)) continue;
      const info = f.info(k);
      out.set(k, { dtype: info.dtype, shape: [...info.shape], bytes: Buffer.from(await f.readRaw(k)) });
    }
    return out;
  } finally {
    await f.close();
  }
}

/** Lazy component tensors materialised as name → {dtype, shape, bytes}. */
async function materialise(model: ComponentTensors, component: Component): Promise<Map<string, { dtype: string; shape: number[]; bytes: Buffer }>> {
  const out = new Map<string, { dtype: string; shape: number[]; bytes: Buffer }>();
  for (const [k, ref] of model.components[component]) out.set(k, { dtype: ref.dtype, shape: [...ref.shape], bytes: Buffer.from(await ref.readRaw()) });
  return out;
}

const isBuffer = (k: string) => k.endsWith('position_ids');

async function readJson(file: string): Promise<unknown> {
  return JSON.parse(await fs.readFile(file, 'utf8'));
}

/** Every tensor (bytes, dtype, shape) and every config of two diffusers folders are equal. */
async function expectSameFolder(actual: string, expected: string): Promise<void> {
  for (const c of COMPONENTS) {
    const a = await tensorsOf(path.join(actual, WEIGHT_FILES[c]), isBuffer);
    const e = await tensorsOf(path.join(expected, WEIGHT_FILES[c]), isBuffer);
    expect([...a.keys()].sort(), c).toEqual([...e.keys()].sort());
    for (const [k, t] of e) {
      const got = a.get(k)!;
      expect([got.dtype, got.shape], k).toEqual([t.dtype, t.shape]);
      expect(got.bytes.equals(t.bytes), `${c}: ${k} bytes`).toBe(true);
    }
    expect(await readJson(path.join(actual, c, 'config.json')), c).toEqual(await readJson(path.join(expected, c, 'config.json')));
  }
  expect(await readJson(path.join(actual, 'scheduler/scheduler_config.json'))).toEqual(await readJson(path.join(expected, 'scheduler/scheduler_config.json')));
  expect(await readJson(path.join(actual, 'model_index.json'))).toEqual(await readJson(path.join(expected, 'model_index.json')));
  for (const f of ['tokenizer_config.json', 'special_tokens_map.json', 'vocab.json']) {
    expect(await readJson(path.join(actual, 'tokenizer', f)), f).toEqual(await readJson(path.join(expected, 'tokenizer', f)));
  }
  expect(await fs.readFile(path.join(actual, 'tokenizer/merges.txt'), 'utf8')).toBe(await fs.readFile(path.join(expected, 'tokenizer/merges.txt'), 'utf8'));
}

describe('the tiny fixture as one original-layout file (written by diffusers)', () => {
  it('maps to exactly the diffusers folder\'s tensors, bit for bit, and with the folder as --config to its configs', async () => {
    const single = await readSingleFile(TINY_SINGLE, { config: TINY_SD });
    try {
      for (const c of COMPONENTS) {
        const expected = await tensorsOf(path.join(TINY_SD, WEIGHT_FILES[c]), isBuffer);
        const got = await materialise(single, c);
        expect([...got.keys()].sort(), c).toEqual([...expected.keys()].sort());
        for (const [k, t] of expected) {
          expect(got.get(k)!.shape, k).toEqual(t.shape);
          expect(got.get(k)!.bytes.equals(t.bytes), k).toBe(true);
        }
        expect(single.configs[c]).toEqual(await readJson(path.join(TINY_SD, c, 'config.json')));
      }
      expect(single.configs.scheduler).toEqual(await readJson(path.join(TINY_SD, 'scheduler/scheduler_config.json')));
      expect(single.notes.join('\n')).toMatch(/13|ignored|configs taken from/);
    } finally {
      await single.close();
    }
  });

  it('without a config gives the same parameters and says which values it had to assume', async () => {
    const single = await readSingleFile(TINY_SINGLE);
    try {
      const unet = await materialise(single, 'unet');
      const expected = await tensorsOf(path.join(TINY_SD, WEIGHT_FILES.unet));
      expect(unet.size).toBe(expected.size);
      expect(single.notes.join('\n')).toMatch(/non-standard size.*supply --config/);
    } finally {
      await single.close();
    }
  });

  it('loadSingleFile gives the same parameter stores and configs as loadStableDiffusion on the folder', async () => {
    const fromFile = await loadSingleFile(TINY_SINGLE, { config: TINY_SD });
    const fromFolder = await loadStableDiffusion(TINY_SD);
    try {
      for (const part of ['unet', 'vae', 'text'] as const) {
        const a = fromFile[part].store;
        const b = fromFolder[part].store;
        expect([...a.keys()].sort(), part).toEqual([...b.keys()].sort());
        for (const k of b.keys()) {
          const x = a.get(k)!;
          const y = b.get(k)!;
          expect(x.shape, k).toEqual(y.shape);
          expect(Buffer.from((x.dataSync() as Float32Array).buffer).equals(Buffer.from((y.dataSync() as Float32Array).buffer)), k).toBe(true);
        }
        expect(fromFile[part].cfg).toEqual(fromFolder[part].cfg);
      }
      expect(fromFile.scheduler).toEqual(fromFolder.scheduler);
      expect(fromFile.defaultSize).toEqual(fromFolder.defaultSize);
      expect(fromFile.sizeMultiple).toBe(fromFolder.sizeMultiple);
      expect(fromFile.tokenizer.encode('a photo of an astronaut')).toEqual(fromFolder.tokenizer.encode('a photo of an astronaut'));
      expect(fromFile.name).toBe('tiny-sd');
      // And so the same outputs: the text encoder loaded from the single file against transformers' numbers.
      const refFile = path.join(TINY_REF, 'text_encoder.safetensors');
      const f = await SafetensorsFile.open(refFile);
      const ids = await f.readInt('input_ids');
      const idsShape = f.info('input_ids').shape as [number, number];
      await f.close();
      const want = get(await readRef(refFile), 'last_hidden_state');
      const got = tf.tidy(() => clipTextEncoder(tfOps, fromFile.text.store.scope(), tf.tensor2d(ids, idsShape, 'int32'), fromFile.text.cfg).lastHiddenState.dataSync());
      expect(diff(got, want.data).rel).toBeLessThan(1e-4);
      // loadStableDiffusion takes a single file too, dispatching here.
      const viaPipeline = await loadStableDiffusion(TINY_SINGLE, { singleFile: { config: TINY_SD } });
      expect(viaPipeline.unet.cfg).toEqual(fromFolder.unet.cfg);
      expect([...viaPipeline.vae.store.keys()].sort()).toEqual([...fromFolder.vae.store.keys()].sort());
      disposeStableDiffusion(viaPipeline);
      expect(fromFile.modelHash).toMatch(/^[0-9a-f]{10}$/);
    } finally {
      disposeStableDiffusion(fromFile);
      disposeStableDiffusion(fromFolder);
    }
  });
});

describe('diffusers → single file → diffusers', () => {
  it('round-trips the tiny folder bit-identically (every tensor and every config)', async () => {
    const file = path.join(tmp, 'rt.safetensors');
    const out = path.join(tmp, 'rt-diffusers');
    await convertDiffusersToSingleFile(TINY_SD, file);
    await convertSingleFileToDiffusers(file, out);
    await expectSameFolder(out, TINY_SD);
  });

  it('writes the same names, shapes and bytes as diffusers\' own converter did for the fixture', async () => {
    const file = path.join(tmp, 'ours.safetensors');
    await convertDiffusersToSingleFile(TINY_SD, file);
    const ours = await tensorsOf(file);
    const theirs = await tensorsOf(TINY_SINGLE);
    const extras = [...theirs.keys()].filter((k) => !ours.has(k));
    expect(extras).toHaveLength(13);
    expect(extras.every((k) => !k.includes('.') || k.endsWith('position_ids'))).toBe(true);
    expect(ours.size).toBe(theirs.size - 13);
    for (const [k, t] of ours) {
      const e = theirs.get(k)!;
      expect(e, k).toBeDefined();
      expect([t.dtype, t.shape], k).toEqual([e.dtype, e.shape]);
      expect(t.bytes.equals(e.bytes), k).toBe(true);
    }
  });

  it('fuses and splits OpenCLIP q/k/v bit-identically (an SD 2.x-style text encoder)', async () => {
    // The tiny folder with a GELU text encoder is written with SD 2.x (OpenCLIP) names.
    const folder = path.join(tmp, 'tiny-openclip');
    await fs.cp(TINY_SD, folder, { recursive: true });
    await fs.chmod(path.join(folder, 'text_encoder'), 0o755);
    const cfgFile = path.join(folder, 'text_encoder/config.json');
    await fs.chmod(cfgFile, 0o644);
    const cfg = (await readJson(cfgFile)) as Record<string, unknown>;
    await fs.writeFile(cfgFile, JSON.stringify({ ...cfg, hidden_act: 'gelu' }, null, 2));
    const file = path.join(tmp, 'openclip.safetensors');
    await convertDiffusersToSingleFile(folder, file);
    const written = await tensorsOf(file);
    const text = await tensorsOf(path.join(TINY_SD, WEIGHT_FILES.text_encoder));
    const fused = written.get('cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight')!;
    expect(fused.shape).toEqual([96, 32]);
    const parts = ['q', 'k', 'v'].map((p) => text.get(`text_model.encoder.layers.1.self_attn.${p}_proj.weight`)!.bytes);
    expect(fused.bytes.equals(Buffer.concat(parts))).toBe(true);
    expect(written.has('cond_stage_model.model.positional_embedding')).toBe(true);
    expect([...written.keys()].some((k) => k.startsWith('cond_stage_model.transformer.'))).toBe(false);

    const out = path.join(tmp, 'openclip-back');
    await convertSingleFileToDiffusers(file, out);
    await expectSameFolder(out, folder);
  });

  it('converts to fp16 on request', async () => {
    const file = path.join(tmp, 'half.safetensors');
    await convertDiffusersToSingleFile(TINY_SD, file, { dtype: 'fp16' });
    const f = await SafetensorsFile.open(file);
    try {
      expect(new Set([...f.tensors.values()].map((t) => t.dtype))).toEqual(new Set(['F16']));
      const w = await f.readFloat32('model.diffusion_model.input_blocks.0.0.weight');
      const src = await SafetensorsFile.open(path.join(TINY_SD, WEIGHT_FILES.unet));
      const ref = await src.readFloat32('conv_in.weight');
      await src.close();
      for (let i = 0; i < ref.length; i++) expect(Math.abs(w[i]! - ref[i]!)).toBeLessThanOrEqual(Math.abs(ref[i]!) * 2 ** -11 + 1e-7);
    } finally {
      await f.close();
    }
  });

  it('refuses to overwrite an existing output and leaves nothing behind on failure', async () => {
    const out = path.join(tmp, 'exists');
    await fs.mkdir(out);
    await expect(convertSingleFileToDiffusers(TINY_SINGLE, out, { config: TINY_SD })).rejects.toThrow(/already exists/);
    const bad = path.join(tmp, 'fails');
    await expect(convertSingleFileToDiffusers(path.join(tmp, 'missing.safetensors'), bad)).rejects.toThrow();
    expect((await fs.readdir(tmp)).filter((n) => n.includes('.tmp'))).toEqual([]);
  });
});

describe('EMA weights', () => {
  it('--ema loads the UNet from model_ema.* (dots removed) and otherwise leaves them alone', async () => {
    const f = await SafetensorsFile.open(TINY_SINGLE);
    const tensors = new Map<string, TensorToWrite>();
    for (const k of f.keys()) {
      const info = f.info(k);
      if (info.dtype !== 'F32') continue;
      const data = await f.readFloat32(k);
      tensors.set(k, { dtype: 'F32', shape: info.shape, data });
      if (k.startsWith('model.diffusion_model.')) tensors.set(emaKeyOf(k), { dtype: 'F32', shape: info.shape, data: data.map((x) => x + 1) });
    }
    await f.close();
    tensors.set('model_ema.decay', { dtype: 'F32', shape: [], data: new Float32Array([0.9999]) });
    const file = path.join(tmp, 'ema.safetensors');
    await writeSafetensors(file, tensors);

    const plain = await readSingleFile(file, { config: TINY_SD });
    const ema = await readSingleFile(file, { config: TINY_SD, ema: true });
    try {
      const a = await plain.components.unet.get('conv_in.weight')!.readFloat32();
      const b = await ema.components.unet.get('conv_in.weight')!.readFloat32();
      expect(Array.from(b)).toEqual(Array.from(a).map((x) => Math.fround(x + 1)));
      expect(plain.notes.join('\n')).toMatch(/EMA weights .*--ema/);
      expect(ema.notes.join('\n')).toMatch(/EMA copies/);
    } finally {
      await plain.close();
      await ema.close();
    }
    await expect(readSingleFile(TINY_SINGLE, { config: TINY_SD, ema: true })).rejects.toThrow(/--ema: the file has no EMA weights/);
  });
});

describe('config sources', () => {
  it('an LDM inference yaml sets what weights cannot show (v-parameterization, heads rule)', async () => {
    const yaml = path.join(tmp, 'tiny.yaml');
    await fs.writeFile(
      yaml,
      ['model:', '  params:', '    parameterization: "v"', '    linear_start: 0.00085', '    linear_end: 0.012', '    unet_config:', '      params:', '        num_heads: 4', ''].join('\n'),
    );
    const single = await readSingleFile(TINY_SINGLE, { config: yaml });
    try {
      expect(single.configs.scheduler.prediction_type).toBe('v_prediction');
      expect(single.configs.unet.attention_head_dim).toBe(4);
      expect(single.detection.predictionSource).toBe('config');
    } finally {
      await single.close();
    }
  });

  it('a yaml of partial diffusers configs fills the rest; a sidecar <stem>.yaml is picked up by itself', async () => {
    const dir = path.join(tmp, 'sidecar');
    await fs.mkdir(dir);
    const file = path.join(dir, 'model.safetensors');
    await fs.copyFile(TINY_SINGLE, file);
    await fs.writeFile(path.join(dir, 'model.yaml'), 'unet:\n  norm_num_groups: 8\n  sample_size: 16\nvae:\n  norm_num_groups: 8\n  sample_size: 32\ntext_encoder:\n  num_attention_heads: 4\n  projection_dim: 32\n');
    const single = await readSingleFile(file);
    try {
      expect(single.notes.join('\n')).toMatch(/sidecar config/);
      const expected = {
        unet: await readJson(path.join(TINY_SD, 'unet/config.json')),
        text_encoder: await readJson(path.join(TINY_SD, 'text_encoder/config.json')),
      } as Record<string, Record<string, unknown>>;
      for (const c of ['unet', 'text_encoder'] as const) {
        for (const [k, v] of Object.entries(single.configs[c])) {
          if (k in expected[c]! && !k.startsWith('_')) expect(v, `${c}.${k}`).toEqual(expected[c]![k]);
        }
      }
    } finally {
      await single.close();
    }
  });

  it('rejects a config that contradicts the shapes, naming the tensor', async () => {
    const yaml = path.join(tmp, 'bad.json');
    await fs.writeFile(yaml, JSON.stringify({ text_encoder: { intermediate_size: 64 } }));
    await expect(readSingleFile(TINY_SINGLE, { config: yaml })).rejects.toThrow(/mlp\.fc1\.weight' has shape \[37, 32\], the config implies \[64, 32\]/);
  });
});

describe('formats', () => {
  it('reads a .ckpt (PyTorch pickle, through the safe reader) to the same tensors as the .safetensors', async () => {
    const f = await SafetensorsFile.open(TINY_SINGLE);
    const stateDict: Record<string, TensorToSave> = {};
    for (const k of f.keys()) {
      const info = f.info(k);
      stateDict[k] = info.dtype === 'I64' ? { dtype: 'I64', shape: info.shape, data: await f.readBigInt64(k) } : { dtype: 'F32', shape: info.shape, data: await f.readFloat32(k) };
    }
    await f.close();
    const ckpt = path.join(tmp, 'tiny.ckpt');
    await writeTorchCheckpoint(ckpt, { state_dict: stateDict, global_step: 1234, epoch: 0 });
    const fromCkpt = await readSingleFile(ckpt, { config: TINY_SD });
    const fromSafetensors = await readSingleFile(TINY_SINGLE, { config: TINY_SD });
    try {
      for (const c of COMPONENTS) {
        const a = await materialise(fromCkpt, c);
        const b = await materialise(fromSafetensors, c);
        expect([...a.keys()].sort()).toEqual([...b.keys()].sort());
        for (const [k, t] of b) expect(a.get(k)!.bytes.equals(t.bytes), k).toBe(true);
      }
      expect(fromCkpt.configs).toEqual(fromSafetensors.configs);
    } finally {
      await fromCkpt.close();
      await fromSafetensors.close();
    }
    const report = await inspectModel(ckpt);
    expect([report.format, report.architecture, report.problems]).toEqual(['pickle-file', 'SD 1.x (original single-file layout)', []]);
    // And converting it writes safetensors only.
    const out = path.join(tmp, 'from-ckpt');
    await convertSingleFileToDiffusers(ckpt, out, { config: TINY_SD });
    await expectSameFolder(out, TINY_SD);
  });

  it('reads a diffusers folder as lazy components with its configs', async () => {
    const model = await readDiffusersFolder(TINY_SD);
    try {
      expect(model.textEncoderLayout).toBe('clip');
      expect(model.components.unet.size).toBe(208);
      expect(model.components.text_encoder.has('text_model.embeddings.position_ids')).toBe(false);
    } finally {
      await model.close();
    }
  });
});
