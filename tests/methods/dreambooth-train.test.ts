/**
 * DreamBooth training runs on the tiny model: LoRA changes only the adapters (base weights hash
 * the same), the loss falls with fixed noise, the kohya file applies; class images are made once
 * and a resumed run reuses them; a full fine-tune changes the UNet and saves a loadable diffusers
 * folder; `sdwb train configs/dreambooth-lora.yaml --set …` runs end to end.
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtemp, readdir, stat } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';

import * as tf from '@tensorflow/tfjs';
import sharp from 'sharp';
import { beforeAll, describe, expect, it } from 'vitest';

import { initBackend } from '../../src/backend.js';
import { SafetensorsFile } from '../../src/io/safetensors.js';
import { dreambooth, type DreamBoothConfig, type DreamBoothState } from '../../src/methods/dreambooth.js';
import { trainingConfigSchema } from '../../src/methods/registry.js';
import type { AnyTrainingMethod } from '../../src/methods/types.js';
import type { ParamStore } from '../../src/ops/scope.js';
import { disposeStableDiffusion, loadStableDiffusion } from '../../src/pipeline/load.js';
import { loadTrainingConfig, type MethodConfig } from '../../src/train/config.js';
import { train } from '../../src/train/loop.js';
import { TINY_SD } from '../helpers/fixtures.js';

const ROOT = path.resolve(import.meta.dirname, '../..');

let imageDir: string;
beforeAll(async () => {
  await initBackend({ backend: 'wasm', log: () => {} });
  imageDir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-dbt-images-'));
  for (const [i, x] of [9, 16, 23].entries()) {
    const svg = `<svg width="32" height="32"><rect width="32" height="32" fill="#2040c0"/><circle cx="${x}" cy="16" r="6" fill="#e02020"/></svg>`;
    await sharp(Buffer.from(svg)).png().toFile(path.join(imageDir, `subject-${i}.png`));
  }
});

const tmp = (prefix: string) => mkdtemp(path.join(os.tmpdir(), `sdwb-dbt-${prefix}-`));

async function dbConfig(outputDir: string, sets: readonly string[]): Promise<MethodConfig> {
  const base = ['method=dreambooth', `model=${TINY_SD}`, `output_dir=${outputDir}`, `data.dir=${imageDir}`, 'data.instance_prompt=a photo of sks dog', 'data.resolution=32', 'backend=wasm'];
  return (await loadTrainingConfig(undefined, [...base, ...sets], trainingConfigSchema())).config;
}

function storeHash(store: ParamStore<tf.Tensor>): string {
  const h = createHash('sha256');
  for (const key of [...store.keys()].sort()) {
    const data = store.get(key)!.dataSync() as Float32Array;
    h.update(key).update(new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
  }
  return h.digest('hex');
}

/** The method with hooks that record the base weights' hashes at setup and at dispose, and the final trained values. */
function observed() {
  const seen = { before: '', after: '', trained: new Map<string, Float32Array>(), initial: new Map<string, Float32Array>() };
  const hashModel = (s: DreamBoothState) => `${storeHash(s.model.unet.store)}/${storeHash(s.model.text.store)}`;
  const method: AnyTrainingMethod = {
    ...(dreambooth as unknown as AnyTrainingMethod),
    async setup(ctx, cfg) {
      const s = (await dreambooth.setup(ctx, cfg as DreamBoothConfig)) as DreamBoothState;
      seen.before = hashModel(s);
      for (const [k, v] of Object.entries(dreambooth.trainable(s))) seen.initial.set(k, Float32Array.from(v.dataSync()));
      return s;
    },
    dispose(state) {
      const s = state as DreamBoothState;
      seen.after = hashModel(s);
      for (const [k, v] of Object.entries(dreambooth.trainable(s))) seen.trained.set(k, Float32Array.from(v.dataSync()));
      dreambooth.dispose(s);
    },
  };
  return { method, seen };
}

const changed = (a: Float32Array, b: Float32Array) => a.some((v, i) => v !== b[i]);

describe('LoRA with prior preservation', () => {
  it('trains only the adapters, the loss falls, class images are reused on resume, the kohya file applies', async () => {
    const out = await tmp('lora');
    const sets = [
      'adapter=lora',
      'with_prior_preservation=true',
      'class_prompt=a photo of dog',
      'num_class_images=2',
      'class_sample_steps=2',
      'learning_rate=2e-2',
      'fixed_noise=true',
      'steps=6',
      'save_every=3',
      'save_formats=[kohya, diffusers]',
      'output_name=sks',
    ];
    const logs: string[] = [];
    const { method, seen } = observed();
    const result = await train(await dbConfig(out, sets), { method, progress: false, log: (l) => logs.push(l) });

    // 1. Base weights untouched; every adapter pair moved (B away from zero).
    expect(seen.after).toBe(seen.before);
    const names = [...seen.trained.keys()];
    expect(names.length).toBe(64);
    expect(names.every((n) => /^unet\..+\.(to_q|to_k|to_v|to_out\.0)\.lora_[AB]$/.test(n))).toBe(true);
    expect(names.filter((n) => n.endsWith('lora_B')).every((n) => seen.trained.get(n)!.some((v) => v !== 0))).toBe(true);
    expect(names.filter((n) => changed(seen.trained.get(n)!, seen.initial.get(n)!)).length).toBe(64);

    // 2. Same noise and timesteps every step: the objective is fixed, so the loss must fall.
    const losses = result.steps.map((s) => s.loss);
    console.log(`[dreambooth lora] losses ${losses.map((l) => l.toFixed(4)).join(' ')}`);
    expect(losses[losses.length - 1]!).toBeLessThan(losses[0]! * 0.9);

    // 3. Class images: made once in <output_dir>/class_images.
    const classDir = path.join(out, 'class_images');
    const files = (await readdir(classDir)).sort();
    expect(files).toHaveLength(2);
    const mtimes = await Promise.all(files.map(async (f) => (await stat(path.join(classDir, f))).mtimeMs));
    expect(logs.some((l) => /generating 2 class image\(s\)/.test(l))).toBe(true);

    // 4. Resume from the last checkpoint to step 7: no generation, the same files.
    const resumedLogs: string[] = [];
    const resumed = await train(await dbConfig(out, [...sets, 'steps=7']), { resume: 'latest', progress: false, log: (l) => resumedLogs.push(l) });
    expect(resumed.steps.map((s) => s.step)).toEqual([7]);
    expect(resumedLogs.some((l) => /generating/.test(l))).toBe(false);
    expect(resumedLogs.some((l) => /reusing 2 class image\(s\)/.test(l))).toBe(true);
    expect((await readdir(classDir)).sort()).toEqual(files);
    expect(await Promise.all(files.map(async (f) => (await stat(path.join(classDir, f))).mtimeMs))).toEqual(mtimes);

    // 5. The files: kohya layout with sd-scripts metadata, and diffusers' layout.
    expect(resumed.outputs.map((p) => path.basename(p)).sort()).toEqual(['pytorch_lora_weights.safetensors', 'sks.safetensors']);
    const kohya = await SafetensorsFile.open(path.join(out, 'sks.safetensors'));
    expect(kohya.keys()).toContain('lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight');
    expect(kohya.keys()).toContain('lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha');
    expect(kohya.metadata).toMatchObject({ ss_network_module: 'networks.lora', ss_network_dim: '4', ss_network_alpha: '4', ss_base_model_version: 'sd_v1', ss_output_name: 'sks', ss_steps: '7' });
    await kohya.close();

    // 6. Applied at weight 1 it changes exactly the adapted weights; the trained B·A is in them.
    const model = await loadStableDiffusion(TINY_SD);
    try {
      const applied = await dreambooth.applyArtifact(model, path.join(out, 'sks.safetensors'));
      expect(applied.triggers).toEqual(['a photo of sks dog']);
      const keys = applied.patch.params!.map((p) => p.key);
      expect(keys).toHaveLength(32);
      for (const p of applied.patch.params!) {
        expect(changed(p.value.dataSync() as Float32Array, model.unet.store.get(p.key)!.dataSync() as Float32Array)).toBe(true);
      }
      applied.dispose();
    } finally {
      disposeStableDiffusion(model);
    }
  });
});

describe('LoRA on the UNet and the text encoder, every option on', () => {
  it('trains both adapter sets with flat tensor counts; sample images use the current adapters', async () => {
    const out = await tmp('te');
    const counts: number[] = [];
    const { method, seen } = observed();
    const cfg = await dbConfig(out, [
      'adapter=lora',
      'train_text_encoder=true',
      'gradient_checkpointing=true',
      'snr_gamma=5',
      'noise_offset=0.1',
      'prediction_type=v_prediction',
      'lora_init=kaiming_uniform',
      'lora_alpha=2',
      'batch_size=2',
      'learning_rate=1e-2',
      'steps=4',
      'save_every=10',
      'sample_every=2',
      'sample_prompts=[a photo of sks dog]',
      'sample_steps=2',
      'save_formats=[peft]',
    ]);
    const result = await train(cfg, { method, progress: false, log: () => {}, onStep: () => counts.push(tf.memory().numTensors) });
    console.log(`[dreambooth te] tensors after each step: ${counts.join(" ")}`);
    expect(counts.slice(1).every((c) => c === counts[1])).toBe(true);
    expect(seen.after).toBe(seen.before);
    const text = [...seen.trained.keys()].filter((k) => k.startsWith('text_encoder.'));
    expect(text).toHaveLength(2 * 4 * 2);
    expect(text.every((k) => changed(seen.trained.get(k)!, seen.initial.get(k)!))).toBe(true);
    expect((await readdir(path.join(out, 'samples'))).sort()).toEqual(['step-000002.png', 'step-000004.png']);
    const peft = await SafetensorsFile.open(result.outputs[0]!);
    expect(peft.keys()).toContain('text_encoder.text_model.encoder.layers.1.self_attn.out_proj.lora_B.weight');
    expect(JSON.parse(peft.metadata['lora_adapter_metadata']!)).toMatchObject({ 'unet.r': 4, 'unet.lora_alpha': 2, 'text_encoder.lora_alpha': 2 });
    await peft.close();
  });
});

describe('full fine-tune', () => {
  it('changes the UNet (and only the copies), with gradient checkpointing; the saved folder and single file load as models', async () => {
    const out = await tmp('full');
    const { method, seen } = observed();
    const result = await train(
      await dbConfig(out, ['adapter=full', 'learning_rate=1e-3', 'steps=2', 'save_every=10', 'gradient_checkpointing=true', 'fixed_noise=true', 'output_name=db', 'save_formats=[diffusers, single_file]']),
      { method, progress: false, log: () => {} },
    );
    expect(seen.after).toBe(seen.before);
    const moved = [...seen.trained].filter(([k, v]) => changed(v, seen.initial.get(k)!));
    expect(moved.length).toBeGreaterThan(0.9 * seen.trained.size);
    expect([...seen.trained.keys()].every((k) => k.startsWith('unet.'))).toBe(true);
    expect(result.outputs.map((p) => path.basename(p))).toEqual(['db', 'db.safetensors']);

    const base = await loadStableDiffusion(TINY_SD);
    const tuned = await loadStableDiffusion(path.join(out, 'db'));
    const single = await loadStableDiffusion(path.join(out, 'db.safetensors'));
    try {
      expect(storeHash(single.unet.store)).toBe(storeHash(tuned.unet.store));
      const key = 'down_blocks.0.resnets.0.conv1.weight';
      // Saved OIHW, loaded back HWIO: the trained values in the model's own layout.
      expect(Array.from(tuned.unet.store.get(key)!.dataSync())).toEqual(Array.from(seen.trained.get(`unet.${key}`)!));
      expect(changed(tuned.unet.store.get(key)!.dataSync() as Float32Array, base.unet.store.get(key)!.dataSync() as Float32Array)).toBe(true);
      expect(storeHash(tuned.vae.store)).toBe(storeHash(base.vae.store));
      expect(storeHash(tuned.text.store)).toBe(storeHash(base.text.store));
    } finally {
      disposeStableDiffusion(base);
      disposeStableDiffusion(tuned);
      disposeStableDiffusion(single);
    }
  });
});

describe('sdwb train configs/dreambooth-lora.yaml', () => {
  it('runs on the tiny model with --set overrides and writes the LoRA files', async () => {
    const out = await tmp('cli');
    const sets = [
      `model=${TINY_SD}`,
      `data.dir=${imageDir}`,
      `output_dir=${out}`,
      'data.resolution=32',
      'backend=wasm',
      'steps=2',
      'num_class_images=1',
      'class_sample_steps=2',
      'sample_every=null',
      'save_every=10',
    ].flatMap((s) => ['--set', s]);
    const run = promisify(execFile);
    const r = await run(process.execPath, ['--import', 'tsx', path.join(ROOT, 'src/cli/main.ts'), 'train', path.join(ROOT, 'configs/dreambooth-lora.yaml'), ...sets], {
      cwd: ROOT,
      maxBuffer: 1 << 26,
    });
    const written = r.stdout.trim().split('\n').map((l) => path.basename(l)).sort();
    expect(written).toEqual(['pytorch_lora_weights.safetensors', 'sks-dog.safetensors']);
    expect(r.stderr).toMatch(/generating 1 class image/);
    const f = await SafetensorsFile.open(path.join(out, 'sks-dog.safetensors'));
    expect(f.metadata['ss_training_comment']).toBe('DreamBooth LoRA of sks dog');
    await f.close();
  });
});
