import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { findWeightFiles, readModelIndex, ModelFolderError } from '../../src/io/diffusers.js';
import { inspectModel } from '../../src/io/inspect.js';
import { SafetensorsFile, writeSafetensors, type TensorToWrite } from '../../src/io/safetensors.js';
import { TINY_SD } from '../helpers/fixtures.js';

let tmp: string;

beforeAll(async () => {
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'sdwb-diffusers-'));
});
afterAll(async () => {
  await fs.rm(tmp, { recursive: true, force: true });
});

/** A copy of the tiny fixture whose UNet weights are rewritten by `rewrite`. */
async function copyWithUnet(name: string, rewrite: (unetDir: string, tensors: Map<string, TensorToWrite>) => Promise<void>): Promise<string> {
  const dir = path.join(tmp, name);
  await fs.cp(TINY_SD, dir, { recursive: true });
  const unetDir = path.join(dir, 'unet');
  await fs.chmod(unetDir, 0o755);
  const file = path.join(unetDir, 'diffusion_pytorch_model.safetensors');
  const f = await SafetensorsFile.open(file);
  const tensors = new Map<string, TensorToWrite>();
  for (const k of f.keys()) tensors.set(k, { dtype: 'F32', shape: f.info(k).shape, data: await f.readFloat32(k) });
  await f.close();
  await fs.rm(file);
  await rewrite(unetDir, tensors);
  return dir;
}

describe('model_index.json', () => {
  it('lists the components of the tiny pipeline, skipping absent ones', async () => {
    const index = await readModelIndex(TINY_SD);
    expect(index.pipelineClass).toBe('StableDiffusionPipeline');
    expect(index.components.map((c) => c.name).sort()).toEqual(['scheduler', 'text_encoder', 'tokenizer', 'unet', 'vae']);
    expect(index.components.find((c) => c.name === 'unet')?.className).toBe('UNet2DConditionModel');
  });

  it('rejects a malformed component entry naming the file and component', async () => {
    const dir = path.join(tmp, 'bad-index');
    await fs.mkdir(dir);
    await fs.writeFile(path.join(dir, 'model_index.json'), JSON.stringify({ _class_name: 'X', unet: ['diffusers'] }));
    await expect(readModelIndex(dir)).rejects.toThrow(/model_index\.json: component 'unet' should be \[library, class\]/);
  });

  it('names a missing model_index.json', async () => {
    await expect(readModelIndex(path.join(tmp, 'nope'))).rejects.toThrow(/model_index\.json: file not found/);
  });
});

describe('weight files', () => {
  it('finds sharded weights through the index and checks them all', async () => {
    const dir = await copyWithUnet('sharded', async (unetDir, tensors) => {
      const keys = [...tensors.keys()];
      const half = Math.floor(keys.length / 2);
      const shards = [keys.slice(0, half), keys.slice(half)];
      const weightMap: Record<string, string> = {};
      for (const [i, part] of shards.entries()) {
        const name = `diffusion_pytorch_model-0000${i + 1}-of-00002.safetensors`;
        await writeSafetensors(path.join(unetDir, name), part.map((k) => [k, tensors.get(k)!] as const));
        for (const k of part) weightMap[k] = name;
      }
      await fs.writeFile(
        path.join(unetDir, 'diffusion_pytorch_model.safetensors.index.json'),
        JSON.stringify({ metadata: { total_size: 0 }, weight_map: weightMap }),
      );
    });
    const w = await findWeightFiles(path.join(dir, 'unet'));
    expect(w.files).toHaveLength(2);
    expect(w.shardOf?.size).toBe(208);
    const report = await inspectModel(dir);
    const unet = report.components.find((c) => c.name === 'unet')!;
    expect(unet.missingKeys).toEqual([]);
    expect(unet.stats?.tensors).toBe(208);
  });

  it('rejects a shard name that leaves the component folder', async () => {
    const dir = path.join(tmp, 'traversal', 'unet');
    await fs.mkdir(dir, { recursive: true });
    await fs.writeFile(
      path.join(dir, 'diffusion_pytorch_model.safetensors.index.json'),
      JSON.stringify({ weight_map: { 'conv_in.weight': '../../evil.safetensors' } }),
    );
    await expect(findWeightFiles(dir)).rejects.toThrow(/not a plain file name/);
  });

  it('uses an fp16 variant, converting to float32 shapes as declared', async () => {
    const dir = await copyWithUnet('fp16', async (unetDir, tensors) => {
      const half = [...tensors].map(([k, t]) => [k, { ...t, dtype: 'F16' as const }] as const);
      await writeSafetensors(path.join(unetDir, 'diffusion_pytorch_model.fp16.safetensors'), half);
    });
    const w = await findWeightFiles(path.join(dir, 'unet'));
    expect(w.variant).toBe('fp16');
    const report = await inspectModel(dir);
    const unet = report.components.find((c) => c.name === 'unet')!;
    expect(unet.variant).toBe('fp16');
    expect(unet.stats?.dtypes).toEqual({ F16: 208 });
    expect(unet.problems).toEqual([]);
  });

  it('explains that pickle-only components are not read', async () => {
    const dir = path.join(tmp, 'pickle-only', 'unet');
    await fs.mkdir(dir, { recursive: true });
    await fs.writeFile(path.join(dir, 'diffusion_pytorch_model.bin'), 'x');
    const err = await findWeightFiles(dir).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ModelFolderError);
    expect((err as Error).message).toMatch(/only pickle weights \(diffusion_pytorch_model\.bin\)/);
  });

  it('reports a shape that disagrees with the config', async () => {
    const dir = await copyWithUnet('wrong-shape', async (unetDir, tensors) => {
      tensors.set('conv_in.bias', { dtype: 'F32', shape: [31], data: new Float32Array(31) });
      await writeSafetensors(path.join(unetDir, 'diffusion_pytorch_model.safetensors'), tensors);
    });
    const report = await inspectModel(dir);
    expect(report.problems.join('\n')).toMatch(/'conv_in\.bias' has shape \[31\], config implies \[32\]/);
  });
});
