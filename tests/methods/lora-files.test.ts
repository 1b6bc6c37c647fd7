/**
 * LoRA files: files written by hand here (literal keys, known values) in the kohya, peft,
 * diffusers and attention-processor layouts load and give W + weight·(α/r)·up·down exactly;
 * weight 0 leaves the UNet bit-identical; save → load and kohya ↔ peft ↔ diffusers conversions
 * round-trip; kohya names map back to module paths; unsupported networks are refused clearly.
 */
import { mkdtemp } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { initBackend } from '../../src/backend.js';
import { SafetensorsFile, writeSafetensors, type TensorToWrite } from '../../src/io/safetensors.js';
import { applyLora, dreambooth } from '../../src/methods/dreambooth.js';
import {
  convertLoraFile,
  kohyaName,
  parseKohyaName,
  parseLoraTensors,
  readLoraFile,
  writeLoraFile,
  type LoraFileContent,
  type LoraLayout,
  type PlainTensor,
} from '../../src/methods/lora-files.js';
import { clipTextManifest } from '../../src/models/components.js';
import { unet, unetManifest } from '../../src/models/unet/unet.js';
import { tfOps } from '../../src/ops/tfjs-ops.js';
import { disposeStableDiffusion, loadStableDiffusion, type StableDiffusion } from '../../src/pipeline/load.js';
import type { AnyTrainingMethod } from '../../src/methods/types.js';
import { TINY_SD } from '../helpers/fixtures.js';

const TO_K = 'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k';
const PROJ_IN = 'down_blocks.0.attentions.0.proj_in'; // a 1×1 convolution in SD 1.x
const Q_PROJ = 'text_model.encoder.layers.0.self_attn.q_proj';
const RANK = 2;
const WIDTH = 32; // every one of these modules maps 32 → 32 in the tiny model

// Dyadic values: products and sums of them are exact in float32, so "exactly" means toEqual.
const down = (seed: number) => Float32Array.from({ length: RANK * WIDTH }, (_, i) => (((i * 7 + seed) % 5) - 2) / 4);
const up = (seed: number) => Float32Array.from({ length: WIDTH * RANK }, (_, i) => (((i * 3 + seed) % 7) - 3) / 8);
const f32 = (data: Float32Array, shape: number[]): TensorToWrite => ({ dtype: 'F32', shape, data });

let model: StableDiffusion;
let dir: string;
beforeAll(async () => {
  await initBackend({ backend: 'wasm', log: () => {} });
  model = await loadStableDiffusion(TINY_SD);
  dir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-lora-files-'));
});
afterAll(() => disposeStableDiffusion(model));

/** W + weight·scale·(up·down) in float64 then float32, in the module's internal layout (1×1 conv: HWIO). */
function expected(component: 'unet' | 'text', module: string, d: Float32Array, u: Float32Array, scale: number, weight: number, conv = false): Float32Array {
  const w = (component === 'unet' ? model.unet.store : model.text.store).get(`${module}.weight`)!.dataSync() as Float32Array;
  const out = new Float32Array(w.length);
  for (let o = 0; o < WIDTH; o++) {
    for (let i = 0; i < WIDTH; i++) {
      let s = 0;
      for (let r = 0; r < RANK; r++) s += u[o * RANK + r]! * d[r * WIDTH + i]!;
      const at = conv ? i * WIDTH + o : o * WIDTH + i; // HWIO [1,1,in,out] vs [out,in]
      out[at] = Math.fround(w[at]! + Math.fround(weight * scale * s));
    }
  }
  return out;
}

function overrideOf(applied: Awaited<ReturnType<typeof applyLora>>, component: 'unet' | 'text', module: string): Float32Array {
  const p = applied.patch.params!.find((x) => x.component === component && x.key === `${module}.weight`);
  if (p === undefined) throw new Error(`no override for ${module}`);
  return p.value.dataSync() as Float32Array;
}

describe('hand-written files of each layout', () => {
  it('kohya (lora_unet_/lora_te_, alpha tensors, a 1×1 conv): W + weight·(α/r)·up·down exactly', async () => {
    const file = path.join(dir, 'hand-kohya.safetensors');
    await writeSafetensors(file, {
      'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight': f32(down(1), [RANK, WIDTH]),
      'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight': f32(up(1), [WIDTH, RANK]),
      'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha': f32(Float32Array.of(1), []),
      'lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight': f32(down(2), [RANK, WIDTH, 1, 1]),
      'lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight': f32(up(2), [WIDTH, RANK, 1, 1]),
      'lora_unet_down_blocks_0_attentions_0_proj_in.alpha': f32(Float32Array.of(4), []),
      'lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight': f32(down(3), [RANK, WIDTH]),
      'lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight': f32(up(3), [WIDTH, RANK]),
    });
    // Through the method's applyArtifact with the `file:weight` form sdwb generate --lora passes.
    const applied = await dreambooth.applyArtifact(model, `${file}:0.5`);
    try {
      expect(applied.patch.params).toHaveLength(3);
      expect(overrideOf(applied, 'unet', TO_K)).toEqual(expected('unet', TO_K, down(1), up(1), 1 / RANK, 0.5));
      expect(overrideOf(applied, 'unet', PROJ_IN)).toEqual(expected('unet', PROJ_IN, down(2), up(2), 4 / RANK, 0.5, true));
      // No alpha tensor: α = rank, scale 1.
      expect(overrideOf(applied, 'text', Q_PROJ)).toEqual(expected('text', Q_PROJ, down(3), up(3), 1, 0.5));
    } finally {
      applied.dispose();
    }
  });

  it('peft (unet.*.lora_A/lora_B, α in lora_adapter_metadata)', async () => {
    const file = path.join(dir, 'hand-peft.safetensors');
    await writeSafetensors(
      file,
      {
        [`unet.${TO_K}.lora_A.weight`]: f32(down(4), [RANK, WIDTH]),
        [`unet.${TO_K}.lora_B.weight`]: f32(up(4), [WIDTH, RANK]),
        [`text_encoder.${Q_PROJ}.lora_A.weight`]: f32(down(5), [RANK, WIDTH]),
        [`text_encoder.${Q_PROJ}.lora_B.weight`]: f32(up(5), [WIDTH, RANK]),
      },
      { lora_adapter_metadata: JSON.stringify({ 'unet.r': 2, 'unet.lora_alpha': 1, 'text_encoder.r': 2, 'text_encoder.lora_alpha': 8 }) },
    );
    const applied = await applyLora(model, file, { weight: 2 });
    try {
      expect(overrideOf(applied, 'unet', TO_K)).toEqual(expected('unet', TO_K, down(4), up(4), 1 / RANK, 2));
      expect(overrideOf(applied, 'text', Q_PROJ)).toEqual(expected('text', Q_PROJ, down(5), up(5), 8 / RANK, 2));
    } finally {
      applied.dispose();
    }
  });

  it('diffusers save_lora_weights (lora.down / lora_linear_layer.down) and attention processors (processor.to_k_lora)', async () => {
    const current = path.join(dir, 'pytorch_lora_weights.safetensors');
    await writeSafetensors(current, {
      [`unet.${TO_K}.lora.down.weight`]: f32(down(6), [RANK, WIDTH]),
      [`unet.${TO_K}.lora.up.weight`]: f32(up(6), [WIDTH, RANK]),
      [`text_encoder.${Q_PROJ}.lora_linear_layer.down.weight`]: f32(down(7), [RANK, WIDTH]),
      [`text_encoder.${Q_PROJ}.lora_linear_layer.up.weight`]: f32(up(7), [WIDTH, RANK]),
    });
    const old = path.join(dir, 'attn-procs.safetensors');
    await writeSafetensors(old, {
      'down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight': f32(down(8), [RANK, WIDTH]),
      'down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.up.weight': f32(up(8), [WIDTH, RANK]),
    });
    const a = await applyLora(model, current, { weight: 1 });
    const b = await applyLora(model, old, { weight: 0.25 });
    try {
      expect(overrideOf(a, 'unet', TO_K)).toEqual(expected('unet', TO_K, down(6), up(6), 1, 1));
      expect(overrideOf(a, 'text', Q_PROJ)).toEqual(expected('text', Q_PROJ, down(7), up(7), 1, 1));
      expect(overrideOf(b, 'unet', TO_K)).toEqual(expected('unet', TO_K, down(8), up(8), 1, 0.25));
      expect((await readLoraFile(current)).layout).toBe('diffusers');
      expect((await readLoraFile(old)).layout).toBe('diffusers-old');
    } finally {
      a.dispose();
      b.dispose();
    }
  });

  it("through sdwb generate's add-on loader (--lora file:weight → applyArtifact(model, file, {strength}))", async () => {
    const file = path.join(dir, 'hand-kohya.safetensors');
    const { loadAddons, parseAddonSpec } = await import('../../src/pipeline/addons.js');
    // The loader looks the LoRA reader up by id; offer this method under both names.
    const methods = [dreambooth, { ...dreambooth, id: 'lora' }] as unknown as AnyTrainingMethod[];
    const addons = await loadAddons(model, [parseAddonSpec('lora', `${file}:0.5`)], { methods });
    try {
      const p = addons.patch.params!.find((x) => x.key === `${TO_K}.weight`)!;
      expect(p.value.dataSync()).toEqual(expected('unet', TO_K, down(1), up(1), 1 / RANK, 0.5));
      expect(addons.infotext['Lora weights']).toBe('hand-kohya: 0.5');
    } finally {
      addons.dispose();
    }
  });

  it('weight 0 leaves the UNet output bit-identical to the base model', async () => {
    const file = path.join(dir, 'hand-kohya.safetensors');
    const applied = await applyLora(model, file, { weight: 0 });
    const sample = tf.randomNormal([1, 16, 16, 4], 0, 1, 'float32', 3);
    const context = tf.randomNormal([1, 77, 32], 0, 1, 'float32', 4);
    const t = tf.tensor1d([500]);
    const run = () => tf.tidy(() => unet(tfOps, model.unet.store.scope(), sample, t, context, model.unet.cfg).dataSync() as Float32Array);
    try {
      const base = run();
      for (const p of applied.patch.params!) if (p.component === 'unet') model.unet.store.override(p.key, p.value);
      const patched = run();
      model.unet.store.clearOverrides();
      expect(Array.from(patched)).toEqual(Array.from(base));
      // And weight 1 does change it (the file is not a no-op).
      const one = await applyLora(model, file, { weight: 1 });
      for (const p of one.patch.params!) if (p.component === 'unet') model.unet.store.override(p.key, p.value);
      const changed = run();
      model.unet.store.clearOverrides();
      one.dispose();
      expect(Array.from(changed)).not.toEqual(Array.from(base));
    } finally {
      applied.dispose();
      tf.dispose([sample, context, t]);
    }
  });
});

describe('round trips', () => {
  const modules = (): LoraFileContent['modules'] => [
    { component: 'unet', module: TO_K, rank: RANK, alpha: 1, down: { shape: [RANK, WIDTH], data: down(9) }, up: { shape: [WIDTH, RANK], data: up(9) } },
    { component: 'unet', module: PROJ_IN, rank: RANK, alpha: 3, down: { shape: [RANK, WIDTH, 1, 1], data: down(10) }, up: { shape: [WIDTH, RANK, 1, 1], data: up(10) } },
    { component: 'text', module: Q_PROJ, rank: RANK, alpha: 2, down: { shape: [RANK, WIDTH], data: down(11) }, up: { shape: [WIDTH, RANK], data: up(11) } },
  ];
  const byName = (c: LoraFileContent) => new Map(c.modules.map((m) => [`${m.component}:${m.module}`, m]));

  it('save → load gives identical weights and alphas in every layout that stores α', async () => {
    for (const layout of ['kohya', 'peft', 'diffusers'] as const satisfies readonly LoraLayout[]) {
      const file = path.join(dir, `round-${layout}.safetensors`);
      await writeLoraFile(file, { modules: modules() }, layout);
      const back = await readLoraFile(file);
      expect(back.layout).toBe(layout);
      const got = byName(back);
      for (const m of modules()) {
        const b = got.get(`${m.component}:${m.module}`)!;
        expect([b.rank, b.alpha, b.down.shape, b.up.shape]).toEqual([m.rank, m.alpha, m.down.shape, m.up.shape]);
        expect(Array.from(b.down.data)).toEqual(Array.from(m.down.data));
        expect(Array.from(b.up.data)).toEqual(Array.from(m.up.data));
      }
    }
    const kohya = await SafetensorsFile.open(path.join(dir, 'round-kohya.safetensors'));
    expect(kohya.keys()).toContain('lora_unet_down_blocks_0_attentions_0_proj_in.alpha');
    expect(kohya.metadata).toMatchObject({ ss_network_module: 'networks.lora', ss_network_dim: '2', ss_network_alpha: 'Dynamic' });
    expect(kohya.metadata['sshs_model_hash']).toMatch(/^[0-9a-f]{64}$/);
    await kohya.close();
  });

  it('kohya → peft → diffusers → kohya is lossless; the attention-processor layout keeps the effect (α folded into B)', async () => {
    const start = path.join(dir, 'conv-start.safetensors');
    await writeLoraFile(start, { modules: modules() }, 'kohya');
    await convertLoraFile(start, path.join(dir, 'conv-peft.safetensors'), 'peft');
    await convertLoraFile(path.join(dir, 'conv-peft.safetensors'), path.join(dir, 'conv-diffusers.safetensors'), 'diffusers');
    await convertLoraFile(path.join(dir, 'conv-diffusers.safetensors'), path.join(dir, 'conv-end.safetensors'), 'kohya');
    const a = await readLoraFile(start);
    const b = await readLoraFile(path.join(dir, 'conv-end.safetensors'));
    expect(b.modules).toEqual(a.modules);
    const peftKeys = (await SafetensorsFile.open(path.join(dir, 'conv-peft.safetensors'))).keys();
    expect(peftKeys).toContain(`unet.${TO_K}.lora_A.weight`);
    expect(peftKeys).toContain(`text_encoder.${Q_PROJ}.lora_B.weight`);
    const diffusersKeys = (await SafetensorsFile.open(path.join(dir, 'conv-diffusers.safetensors'))).keys();
    expect(diffusersKeys).toContain(`unet.${TO_K}.lora.down.weight`);
    expect(diffusersKeys).toContain(`text_encoder.${Q_PROJ}.lora_linear_layer.up.weight`);
    expect(diffusersKeys).toContain(`unet.${PROJ_IN}.lora_A.weight`); // diffusers renames only attention projections

    // The old layout holds attention projections only, without α.
    const attention = { modules: modules().filter((m) => m.module !== PROJ_IN) };
    const oldFile = path.join(dir, 'conv-old.safetensors');
    await writeLoraFile(oldFile, attention, 'diffusers-old');
    const old = await readLoraFile(oldFile);
    expect((await SafetensorsFile.open(oldFile)).keys()).toContain('unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight');
    const viaOld = await applyLoraContentOf(old);
    const direct = await applyLoraContentOf({ source: 'direct', layout: 'kohya', modules: attention.modules, metadata: {} });
    for (const key of [`${TO_K}.weight`, `${Q_PROJ}.weight`]) expect(viaOld.get(key)).toEqual(direct.get(key));
    await expect(writeLoraFile(path.join(dir, 'x.safetensors'), { modules: modules() }, 'diffusers-old')).rejects.toThrow(/only holds attention q\/k\/v\/out LoRAs/);
  });

  async function applyLoraContentOf(content: LoraFileContent): Promise<Map<string, number[]>> {
    const { applyLoraContent } = await import('../../src/methods/dreambooth.js');
    const applied = applyLoraContent(model, content, 1);
    const out = new Map(applied.patch.params!.map((p) => [p.key, Array.from(p.value.dataSync())]));
    applied.dispose();
    return out;
  }
});

describe('kohya module names', () => {
  it('map back to every module path of a UNet and a CLIP text encoder', () => {
    const modulesOf = (keys: Iterable<string>) => [...keys].filter((k) => k.endsWith('.weight')).map((k) => k.slice(0, -'.weight'.length));
    const unetModules = modulesOf(unetManifest(model.unet.cfg).keys());
    const textModules = modulesOf(clipTextManifest(model.text.cfg).keys());
    expect(unetModules.length).toBeGreaterThan(50);
    for (const m of unetModules) expect(parseKohyaName(kohyaName('unet', m))).toEqual({ component: 'unet', module: m });
    for (const m of textModules) expect(parseKohyaName(kohyaName('text', m))).toEqual({ component: 'text', module: m });
  });

  it('read names as they appear in SD 1.5 kohya files', () => {
    expect(parseKohyaName('lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj').module).toBe('up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj');
    expect(parseKohyaName('lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0').module).toBe('mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0');
    expect(parseKohyaName('lora_te_text_model_encoder_layers_11_mlp_fc2')).toEqual({ component: 'text', module: 'text_model.encoder.layers.11.mlp.fc2' });
  });
});

describe('refusals', () => {
  const t = (shape: number[]): PlainTensor => ({ shape, data: new Float32Array(shape.reduce((a, b) => a * b, 1)) });
  it('names what is not supported', () => {
    const locon = new Map([
      ['lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight', t([4, 32, 3, 3])],
      ['lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight', t([32, 4, 1, 1])],
    ]);
    expect(() => parseLoraTensors('locon.safetensors', locon)).toThrow(/3×3 convolution LoRA \(LoCon\): conv LoRA is not supported yet/);
    expect(() => parseLoraTensors('loha.safetensors', new Map([['lora_unet_x_to_q.hada_w1_a', t([4, 4])]]))).toThrow(/LyCORIS LoHa network, which is not supported yet/);
    expect(() => parseLoraTensors('dora.safetensors', new Map([['unet.a.to_q.lora_magnitude_vector', t([4])]]))).toThrow(/DoRA/);
    expect(() => parseLoraTensors('xl.safetensors', new Map([['lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight', t([4, 4])]]))).toThrow(/SDXL/);
    expect(() => parseLoraTensors('odd.safetensors', new Map([['model.weight', t([4, 4])]]))).toThrow(/'model.weight' is not a LoRA tensor of a known layout/);
    expect(() => parseLoraTensors('half.safetensors', new Map([[`unet.${TO_K}.lora_A.weight`, t([2, 32])]]))).toThrow(/has no up \(B\) matrix/);
  });

  it('refuses a LoRA for modules or sizes this model does not have', async () => {
    const file = path.join(dir, 'other-model.safetensors');
    await writeSafetensors(file, {
      'lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn1_to_q.lora_down.weight': f32(new Float32Array(8), [2, 4]),
      'lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn1_to_q.lora_up.weight': f32(new Float32Array(8), [4, 2]),
    });
    await expect(applyLora(model, file)).rejects.toThrow(/adapts modules this model does not have: UNet 'down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q'/);
    const wide = path.join(dir, 'wide.safetensors');
    await writeSafetensors(wide, { [`unet.${TO_K}.lora_A.weight`]: f32(new Float32Array(2 * 768), [2, 768]), [`unet.${TO_K}.lora_B.weight`]: f32(new Float32Array(64), [32, 2]) });
    await expect(applyLora(model, wide)).rejects.toThrow(/maps 768 → 32 features \(linear\), the model's module is 32 → 32/);
    await expect(dreambooth.applyArtifact(model, path.join(dir, 'missing.safetensors:0.5'))).rejects.toThrow(/no such LoRA file/);
  });
});
