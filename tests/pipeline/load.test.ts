/**
 * The pipeline loader on folders other than the plain fixture: an fp16 variant UNet, a VAE saved
 * with pre-0.14 attention names, and checkpoints that do not match their configs.
 */
import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { initBackend } from '../../src/backend.js';
import { SafetensorsFile, writeSafetensors, type TensorToWrite } from '../../src/io/safetensors.js';
import { disposeStableDiffusion, loadStableDiffusion } from '../../src/pipeline/load.js';
import { generate } from '../../src/pipeline/txt2img.js';
import { TINY_SD } from '../helpers/fixtures.js';

const UNET_FILE = 'diffusion_pytorch_model.safetensors';
let root: string;

beforeAll(async () => {
  await initBackend({ backend: 'wasm', log: () => {} });
  root = await fs.mkdtemp(path.join(os.tmpdir(), 'sdwb-load-'));
});

afterAll(async () => {
  await fs.rm(root, { recursive: true, force: true });
});

async function readAll(file: string): Promise<Map<string, { shape: readonly number[]; data: Float32Array }>> {
  const f = await SafetensorsFile.open(file);
  try {
    const out = new Map<string, { shape: readonly number[]; data: Float32Array }>();
    for (const k of f.keys()) out.set(k, { shape: f.info(k).shape, data: await f.readFloat32(k) });
    return out;
  } finally {
    await f.close();
  }
}

/** A writable copy of the (read-only) tiny fixture folder. */
async function copyFixture(dir: string): Promise<void> {
  await fs.cp(TINY_SD, dir, { recursive: true });
  const makeWritable = async (p: string): Promise<void> => {
    const stat = await fs.stat(p);
    await fs.chmod(p, stat.isDirectory() ? 0o755 : 0o644);
    if (stat.isDirectory()) for (const e of await fs.readdir(p)) await makeWritable(path.join(p, e));
  };
  await makeWritable(dir);
}

/** A copy of the tiny fixture whose UNet/VAE weights are rewritten by `edit`. */
async function variantFolder(
  name: string,
  edit: { unet?: (k: string) => string | undefined; vae?: (k: string) => string | undefined; unetDtype?: 'F16'; unetFile?: string; extra?: boolean },
): Promise<string> {
  const dir = path.join(root, name);
  await copyFixture(dir);
  for (const component of ['unet', 'vae'] as const) {
    const rename = edit[component] ?? ((k: string) => k);
    const src = path.join(dir, component, UNET_FILE);
    const tensors: [string, TensorToWrite][] = [];
    for (const [k, t] of await readAll(src)) {
      const to = rename(k);
      if (to !== undefined) tensors.push([to, { dtype: component === 'unet' ? (edit.unetDtype ?? 'F32') : 'F32', shape: t.shape, data: t.data }]);
    }
    if (component === 'unet' && edit.extra === true) tensors.push(['extra.weight', { dtype: 'F32', shape: [2], data: new Float32Array(2) }]);
    await fs.rm(src);
    await writeSafetensors(path.join(dir, component, component === 'unet' ? (edit.unetFile ?? UNET_FILE) : UNET_FILE), tensors);
  }
  return dir;
}

describe('loadStableDiffusion on other folder layouts', () => {
  it('reads an fp16-only UNet and a VAE with pre-0.14 attention names, and generates with them', async () => {
    const old = { to_q: 'query', to_k: 'key', to_v: 'value', 'to_out.0': 'proj_attn' } as const;
    const dir = await variantFolder('fp16-old-vae', {
      unetDtype: 'F16',
      unetFile: 'diffusion_pytorch_model.fp16.safetensors',
      vae: (k) => k.replace(/(mid_block\.attentions\.0\.)(to_q|to_k|to_v|to_out\.0)\./, (_m, p: string, n: keyof typeof old) => `${p}${old[n]}.`),
    });
    const vaeKeys = [...(await readAll(path.join(dir, 'vae', UNET_FILE))).keys()];
    expect(vaeKeys).toContain('decoder.mid_block.attentions.0.query.weight');

    const model = await loadStableDiffusion(dir);
    try {
      expect(model.unet.files).toEqual([path.join(dir, 'unet', 'diffusion_pytorch_model.fp16.safetensors')]);
      const bytes = await fs.readFile(model.unet.files[0]!);
      expect(model.modelHash).toBe(createHash('sha256').update(bytes).digest('hex').slice(0, 10));
      // fp16 weights are upcast: conv_in.bias equals the float32 original to fp16 precision.
      const original = (await readAll(path.join(TINY_SD, 'unet', UNET_FILE))).get('conv_in.bias')!.data;
      const loaded = model.unet.store.get('conv_in.bias')!.dataSync();
      original.forEach((v, i) => expect(Math.abs(loaded[i]! - v)).toBeLessThanOrEqual(Math.abs(v) * 2 ** -11 + 2 ** -24));
      expect(model.vae.store.get('decoder.mid_block.attentions.0.to_q.weight')).toBeDefined();
      const before = tf.memory().numTensors;
      const r = await generate(model, { prompts: ['x'], steps: 2, sampler: 'ddim', seed: 1 });
      expect(r.images[0]!.data.length).toBe(32 * 32 * 3);
      expect(tf.memory().numTensors).toBe(before);
    } finally {
      disposeStableDiffusion(model);
    }
  });

  it('lists missing and unexpected weights in one error before reading any tensor data', async () => {
    const dir = await variantFolder('broken', {
      vae: (k) => (k === 'decoder.conv_out.bias' ? undefined : k),
    });
    await expect(loadStableDiffusion(dir)).rejects.toThrow(/vae\/diffusion_pytorch_model\.safetensors: weights do not match the config: 1 missing: decoder\.conv_out\.bias$/);
    const extra = await variantFolder('extra', { extra: true });
    await expect(loadStableDiffusion(extra)).rejects.toThrow(/unet\/diffusion_pytorch_model\.safetensors: weights do not match the config: 1 unexpected: extra\.weight$/);
  });

  it('names the missing component', async () => {
    const dir = path.join(root, 'no-vae');
    await copyFixture(dir);
    const indexFile = path.join(dir, 'model_index.json');
    const index = JSON.parse(await fs.readFile(indexFile, 'utf8')) as Record<string, unknown>;
    delete index['vae'];
    await fs.writeFile(indexFile, JSON.stringify(index));
    await expect(loadStableDiffusion(dir)).rejects.toThrow(/model_index\.json: no 'vae' component/);
  });
});
