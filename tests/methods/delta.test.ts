/**
 * The delta file format (`src/methods/delta.ts`): PyTorch layouts and diffusers names in the file,
 * provenance in `__metadata__`, files of the official code (bare UNet keys, bf16, no metadata) and
 * the UCE reference output read and applied, and clear errors for deltas that do not fit.
 */
import { mkdtemp } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { initBackend } from '../../src/backend.js';
import { SafetensorsFile, writeSafetensors } from '../../src/io/safetensors.js';
import { applyDelta, checkDelta, deltaKey, overrideModel, parseDeltaKey, readDelta, writeDelta, type DeltaInfo } from '../../src/methods/delta.js';
import { disposeStableDiffusion, loadStableDiffusion, type StableDiffusion } from '../../src/pipeline/load.js';
import { ERASURE_REF, TINY_SD } from '../helpers/fixtures.js';

const TO_K = 'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight';
const CONV_IN = 'conv_in.weight';

let model: StableDiffusion;
let dir: string;
beforeAll(async () => {
  await initBackend({ backend: 'wasm', log: () => {} });
  model = await loadStableDiffusion(TINY_SD);
  dir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-delta-'));
});
afterAll(() => disposeStableDiffusion(model));

const info: DeltaInfo = {
  method: 'esd',
  baseModel: 'tiny-sd',
  baseModelHash: 'abc1234567',
  concept: 'Van Gogh',
  preset: 'esd-2024',
  parameters: 'esd-x',
  negativeGuidance: 2,
  step: 200,
  config: '{"method":"esd"}',
  extra: { erase_from: 'art' },
};

/** 0, 1, 2, … as float32. */
function iota(n: number): Float32Array {
  return Float32Array.from({ length: n }, (_, i) => i);
}

describe('writing and reading', () => {
  it('stores conv filters OIHW under diffusers names, with provenance, and reads them back HWIO', async () => {
    const file = path.join(dir, 'layout.safetensors');
    // Internal conv filter [kh, kw, I, O] = [3, 3, 4, 32] holding its own flat index.
    const conv = tf.tensor(iota(3 * 3 * 4 * 32), [3, 3, 4, 32]);
    const linear = tf.tensor(iota(32 * 32), [32, 32]);
    const text = tf.tensor(iota(4), [4]);
    await writeDelta(
      file,
      [
        { component: 'unet', key: CONV_IN, value: conv },
        { component: 'unet', key: TO_K, value: linear },
        { component: 'text', key: 'text_model.final_layer_norm.bias', value: text },
      ],
      info,
    );
    const f = await SafetensorsFile.open(file);
    expect([...f.keys()].sort()).toEqual([CONV_IN, TO_K, 'text_encoder.text_model.final_layer_norm.bias'].sort());
    expect(f.info(CONV_IN)).toMatchObject({ dtype: 'F32', shape: [32, 4, 3, 3] });
    const stored = await f.readFloat32(CONV_IN);
    // File element [o, i, y, x] is internal element [y, x, i, o].
    for (const [o, i, y, x] of [
      [0, 0, 0, 0],
      [5, 2, 1, 2],
      [31, 3, 2, 0],
    ] as const) {
      expect(stored[((o * 4 + i) * 3 + y) * 3 + x]).toBe(((y * 3 + x) * 4 + i) * 32 + o);
    }
    expect(Array.from(await f.readFloat32(TO_K))).toEqual(Array.from(iota(32 * 32)));
    expect(f.metadata).toEqual({
      format: 'pt',
      'sd_workbench.kind': 'delta',
      'sd_workbench.method': 'esd',
      'sd_workbench.base_model': 'tiny-sd',
      'sd_workbench.base_model_hash': 'abc1234567',
      'sd_workbench.concept': 'Van Gogh',
      'sd_workbench.preset': 'esd-2024',
      'sd_workbench.parameters': 'esd-x',
      'sd_workbench.negative_guidance': '2',
      'sd_workbench.step': '200',
      'sd_workbench.config': '{"method":"esd"}',
      'sd_workbench.erase_from': 'art',
    });
    await f.close();

    const delta = await readDelta(file);
    expect(delta.info).toEqual(info);
    const byKey = new Map(delta.overrides.map((o) => [deltaKey(o.component, o.key), o]));
    expect(byKey.get(CONV_IN)!.value.shape).toEqual([3, 3, 4, 32]);
    expect(Array.from(await byKey.get(CONV_IN)!.value.data())).toEqual(Array.from(iota(3 * 3 * 4 * 32)));
    expect(byKey.get('text_encoder.text_model.final_layer_norm.bias')).toMatchObject({ component: 'text', key: 'text_model.final_layer_norm.bias' });
    delta.dispose();
    tf.dispose([conv, linear, text]);
  });

  it('names components in keys: bare UNet keys (or unet.-prefixed), text_encoder. and vae. prefixes', () => {
    expect(parseDeltaKey(TO_K)).toEqual({ component: 'unet', key: TO_K });
    expect(parseDeltaKey(`unet.${TO_K}`)).toEqual({ component: 'unet', key: TO_K });
    expect(parseDeltaKey('vae.decoder.conv_in.weight')).toEqual({ component: 'vae', key: 'decoder.conv_in.weight' });
    expect(deltaKey('vae', 'decoder.conv_in.weight')).toBe('vae.decoder.conv_in.weight');
    expect(deltaKey('unet', TO_K)).toBe(TO_K);
  });

  it('refuses an empty delta and an extra field that would replace a standard one', async () => {
    await expect(writeDelta(path.join(dir, 'empty.safetensors'), [], info)).rejects.toThrow(/at least one tensor/);
    const t = tf.zeros([32, 32]);
    await expect(writeDelta(path.join(dir, 'clash.safetensors'), [{ component: 'unet', key: TO_K, value: t }], { ...info, extra: { concept: 'x' } })).rejects.toThrow(
      /extra field 'concept'/,
    );
    t.dispose();
  });
});

describe('applying', () => {
  it('applies an esd_sd.py-style file (bare keys, bf16, no metadata) by overriding exactly those weights', async () => {
    const file = path.join(dir, 'official.safetensors');
    // bf16 holds 0.5, 1.25 and −3 exactly.
    const values = Float32Array.from({ length: 32 * 32 }, (_, i) => [0.5, 1.25, -3][i % 3]!);
    await writeSafetensors(file, { [TO_K]: { dtype: 'BF16', shape: [32, 32], data: values } });
    const applied = await applyDelta(model, file);
    expect(applied.delta.info).toEqual({});
    expect(applied.warnings).toEqual([]);
    expect(applied.triggers).toEqual([]);
    const before = model.unet.store.get(TO_K)!;
    const otherBefore = model.unet.store.get(CONV_IN)!;
    overrideModel(model, applied.patch.params!);
    try {
      expect(Array.from(await model.unet.store.get(TO_K)!.data())).toEqual(Array.from(values));
      expect(model.unet.store.get(CONV_IN)).toBe(otherBefore);
    } finally {
      model.unet.store.clearOverrides();
      applied.dispose();
    }
    expect(model.unet.store.get(TO_K)).toBe(before);
  });

  it('applies the official UCE output (erasure-reference/uce.safetensors) to the tiny model', async () => {
    const applied = await applyDelta(model, path.join(ERASURE_REF, 'uce.safetensors'));
    expect(applied.patch.params!.map((p) => p.key).every((k) => /attn2\.to_[kv]\.weight$/.test(k))).toBe(true);
    expect(applied.patch.params).toHaveLength(8);
    applied.dispose();
  });

  it('names every key that does not fit, and warns when the base model differs', async () => {
    const file = path.join(dir, 'misfit.safetensors');
    await writeSafetensors(file, {
      [TO_K]: { dtype: 'F32', shape: [32, 16], data: new Float32Array(32 * 16) },
      'down_blocks.9.resnets.0.conv1.weight': { dtype: 'F32', shape: [1, 1, 1, 1], data: new Float32Array(1) },
    });
    await expect(applyDelta(model, file)).rejects.toThrow(
      new RegExp(`misfit.safetensors: does not fit tiny-sd:\\n  '${TO_K.replace(/\./g, '\\.')}': shape \\[32, 16\\] \\(internal layout\\), the model's is \\[32, 32\\]\\n  'down_blocks\\.9\\.resnets\\.0\\.conv1\\.weight': not a parameter of this model's unet`),
    );

    const other = path.join(dir, 'other-base.safetensors');
    const t = tf.zeros([32, 32]);
    await writeDelta(other, [{ component: 'unet', key: TO_K, value: t }], { ...info, baseModel: 'sd-v1-4', baseModelHash: '0000000000' });
    t.dispose();
    const delta = await readDelta(other);
    expect(checkDelta(model, delta)).toEqual([
      expect.stringMatching(/made for sd-v1-4 \(hash 0000000000\), applied to tiny-sd \(hash [0-9a-f]{10}\)/),
    ]);
    delta.dispose();
  });
});
