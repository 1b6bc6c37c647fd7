import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { checkProblems, detectCheckpoint, UnsupportedModelError, type Headers } from '../../src/io/detect.js';
import { inspectModel } from '../../src/io/inspect.js';
import { emaKeyOf } from '../../src/io/ldm-keys.js';
import { SafetensorsFile } from '../../src/io/safetensors.js';
import { TINY_SD } from '../helpers/fixtures.js';
import { headersOf, loadSd15, sd2LdmShapes, SD21_UNET_CONFIG, SD2_TEXT_CONFIG, TINY_SINGLE, writeSparseSafetensors } from './keymaps.helpers.js';

let tmp: string;
beforeAll(async () => {
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'sdwb-detect-'));
});
afterAll(async () => {
  await fs.rm(tmp, { recursive: true, force: true });
});

/** Every SD 1.5 single-file key (weights and the listed extras) with its shape. */
async function sd15Shapes(): Promise<Map<string, number[]>> {
  const m = await loadSd15();
  const shapes = new Map<string, number[]>();
  for (const c of Object.values(m.components)) for (const t of c.tensors) shapes.set(t.ldm, t.ldm_shape ?? t.shape);
  return shapes;
}

function withExtras(headers: Map<string, { dtype: string; shape: number[] }>, extras: [string, string, number[]][]): Headers {
  for (const [k, dtype, shape] of extras) headers.set(k, { dtype, shape });
  return headers;
}

async function readHeaders(file: string): Promise<{ headers: Headers; metadata: Record<string, string> }> {
  const f = await SafetensorsFile.open(file);
  try {
    return { headers: new Map([...f.tensors].map(([k, t]) => [k, { dtype: t.dtype, shape: t.shape }])), metadata: { ...f.metadata } };
  } finally {
    await f.close();
  }
}

describe('SD 1.5 from its headers (every manifest key and shape, fp16)', () => {
  it('is SD 1.x with exactly the published diffusers configs, component sizes and no problems', async () => {
    const m = await loadSd15();
    const headers = withExtras(
      headersOf(await sd15Shapes()),
      m.ldm_only_keys.map((x) => [x.ldm, x.dtype === 'int64' ? 'I64' : 'F32', x.shape]),
    );
    const d = detectCheckpoint(headers);
    expect(d.architecture).toBe('SD 1.x');
    expect(d.family).toBe('sd1');
    expect(d.inpainting).toBe(false);
    expect(d.configs.unet).toMatchObject(m.components.unet.diffusers_config);
    expect(d.configs.vae).toMatchObject(m.components.vae.diffusers_config);
    expect(d.configs.text_encoder).toMatchObject(m.components.text_encoder.diffusers_config);
    expect(d.configs.scheduler).toMatchObject({ beta_schedule: 'scaled_linear', beta_start: 0.00085, beta_end: 0.012, steps_offset: 1, prediction_type: 'epsilon' });
    expect(checkProblems(d)).toEqual([]);
    expect([d.checks.unet.parameters, d.checks.vae.parameters, d.checks.text_encoder.parameters]).toEqual([859520964, 83653863, 123060480]);
    expect([d.checks.unet.tensors, d.checks.vae.tensors, d.checks.text_encoder.tensors]).toEqual([686, 248, 196]);
    expect(d.checks.unet.dtypes).toEqual({ F16: 686 });
    expect(d.ignored.map((i) => i.key).sort()).toEqual(m.ldm_only_keys.map((x) => x.ldm).sort());
    expect(d.unmapped).toEqual([]);
    expect(d.ema.present).toBe(false);
    // The prediction type is a stated default, never presented as read from weights.
    expect(d.predictionSource).toBe('guess');
    expect(d.notes.join('\n')).toMatch(/--prediction-type/);
  });

  it('reads the same from a header-only (sparse) file on disk, and sdwb inspect reports it', async () => {
    const file = path.join(tmp, 'sd15-fp16.safetensors');
    await writeSparseSafetensors(file, headersOf(await sd15Shapes()));
    expect((await fs.stat(file)).size).toBeGreaterThan(1.7e9);
    const { headers } = await readHeaders(file);
    expect(detectCheckpoint(headers).architecture).toBe('SD 1.x');
    const report = await inspectModel(file);
    expect(report.architecture).toBe('SD 1.x (original single-file layout)');
    expect(report.problems).toEqual([]);
    expect(report.components.map((c) => [c.name, c.stats?.parameters, c.stats?.dtypes])).toEqual([
      ['unet', 859520964, { F16: 686 }],
      ['vae', 83653863, { F16: 248 }],
      ['text_encoder', 123060480, { F16: 196 }],
    ]);
    expect(report.notes?.join('\n')).toMatch(/no EMA weights/);
  });

  it('notices EMA weights stored with their dots removed', async () => {
    const shapes = await sd15Shapes();
    const headers = headersOf(shapes);
    for (const [k, s] of shapes) if (k.startsWith('model.diffusion_model.')) headers.set(emaKeyOf(k), { dtype: 'F16', shape: s });
    headers.set('model_ema.decay', { dtype: 'F32', shape: [] });
    headers.set('model_ema.num_updates', { dtype: 'I64', shape: [] });
    const d = detectCheckpoint(headers);
    expect(d.ema).toEqual({ present: true, tensors: 686 });
    expect(checkProblems(d)).toEqual([]);
    expect(d.unmapped).toEqual([]);
  });

  it('reads old files whose CLIP keys lack the text_model. level, as A1111 does', async () => {
    const legacy = new Map([...(await sd15Shapes())].map(([k, v]) => [k.replace('cond_stage_model.transformer.text_model.', 'cond_stage_model.transformer.'), v]));
    const d = detectCheckpoint(headersOf(legacy));
    expect(d.architecture).toBe('SD 1.x');
    expect(checkProblems(d)).toEqual([]);
    expect(d.checks.text_encoder.tensors).toBe(196);
    expect(d.notes.join('\n')).toMatch(/196 text-encoder key\(s\) use the old naming/);
  });

  it('recognises the inpainting UNet by its 9 input channels', async () => {
    const shapes = await sd15Shapes();
    shapes.set('model.diffusion_model.input_blocks.0.0.weight', [320, 9, 3, 3]);
    const d = detectCheckpoint(headersOf(shapes));
    expect(d.architecture).toBe('SD 1.x inpainting');
    expect(d.configs.unet.in_channels).toBe(9);
    expect(checkProblems(d)).toEqual([]);
  });

  it('names tensors that do not fit, by their single-file names', async () => {
    const shapes = await sd15Shapes();
    shapes.delete('model.diffusion_model.output_blocks.4.1.proj_out.bias');
    shapes.set('first_stage_model.decoder.mid.attn_1.q.weight', [512, 256, 1, 1]);
    const d = detectCheckpoint(headersOf(shapes));
    const problems = checkProblems(d).join('\n');
    expect(problems).toContain('model.diffusion_model.output_blocks.4.1.proj_out.bias');
    expect(problems).toContain("'first_stage_model.decoder.mid.attn_1.q.weight' has shape [512, 256, 1, 1], the config implies [512, 512, 1, 1]");
  });
});

describe('SD 2.x from a synthetic manifest (public SD 2.1 / OpenCLIP ViT-H/14 structure)', () => {
  it('is SD 2.x with the SD 2.1 configs; 768-v is a stated guess', async () => {
    const d = detectCheckpoint(headersOf(await sd2LdmShapes()));
    expect(d.architecture).toBe('SD 2.x');
    expect(d.textEncoderLayout).toBe('openclip');
    expect(d.tokenizer).toBe('sd2');
    const { _class_name, ...unet } = SD21_UNET_CONFIG;
    expect(_class_name).toBe(d.configs.unet._class_name);
    expect(d.configs.unet).toMatchObject(unet);
    expect(d.configs.text_encoder).toMatchObject(SD2_TEXT_CONFIG);
    expect(checkProblems(d)).toEqual([]);
    expect(d.ignored.map((i) => i.key)).toContain('cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight');
    expect(d.ignored.map((i) => i.key)).toContain('cond_stage_model.model.text_projection');
    expect(d.predictionType).toBe('v_prediction');
    expect(d.predictionSource).toBe('guess');
    expect(d.notes.join('\n')).toMatch(/cannot be read|identical weights/);
    expect(d.notes.join('\n')).toMatch(/--prediction-type epsilon\|v_prediction/);
  });

  it('takes 512-base settings when told epsilon', async () => {
    const d = detectCheckpoint(headersOf(await sd2LdmShapes()), { predictionType: 'epsilon' });
    expect(d.configs.scheduler.prediction_type).toBe('epsilon');
    expect(d.configs.unet.sample_size).toBe(64);
    expect(d.predictionSource).toBe('option');
  });

  it('uses the metadata hint of kohya / ModelSpec files for v-prediction', async () => {
    const d = detectCheckpoint(headersOf(await sd2LdmShapes()), { metadata: { 'modelspec.architecture': 'stable-diffusion-v2-768-v' } });
    expect(d.predictionSource).toBe('metadata');
    expect(d.predictionType).toBe('v_prediction');
  });

  it('keeps all 23 blocks of a file whose unused last block was already dropped (as diffusers writes SD 2.x)', async () => {
    const shapes = await sd2LdmShapes();
    for (const k of [...shapes.keys()]) if (k.includes('resblocks.23.') || k.endsWith('text_projection') || k.endsWith('logit_scale')) shapes.delete(k);
    const d = detectCheckpoint(headersOf(shapes));
    expect(d.configs.text_encoder.num_hidden_layers).toBe(23);
    expect(checkProblems(d)).toEqual([]);
  });

  it('SD 2.x inpainting defaults to epsilon at 512', async () => {
    const shapes = await sd2LdmShapes();
    shapes.set('model.diffusion_model.input_blocks.0.0.weight', [320, 9, 3, 3]);
    const d = detectCheckpoint(headersOf(shapes));
    expect(d.architecture).toBe('SD 2.x inpainting');
    expect(d.predictionType).toBe('epsilon');
    expect(d.configs.unet.sample_size).toBe(64);
  });
});

describe('families that are recognised but not supported yet', () => {
  const cases: [string, string[], RegExp][] = [
    [
      'SDXL',
      ['conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight', 'conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias', 'model.diffusion_model.label_emb.0.0.weight', 'model.diffusion_model.input_blocks.0.0.weight'],
      /SDXL.*not supported yet/,
    ],
    ['SD3', ['model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight', 'model.diffusion_model.x_embedder.proj.weight'], /Stable Diffusion 3.*not supported yet/],
    ['Flux', ['double_blocks.0.img_attn.qkv.weight', 'single_blocks.0.linear1.weight'], /Flux.*not supported yet/],
    ['LoRA', ['lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight'], /LoRA/],
  ];
  for (const [name, keys, message] of cases) {
    it(`${name}: a clear error naming it`, () => {
      const headers = new Map(keys.map((k) => [k, { dtype: 'F16', shape: [4, 4] }]));
      let error: unknown;
      try {
        detectCheckpoint(headers);
      } catch (e) {
        error = e;
      }
      expect(error).toBeInstanceOf(UnsupportedModelError);
      expect((error as UnsupportedModelError).architecture).toBe(name);
      expect((error as Error).message).toMatch(message);
    });
  }

  it('sdwb inspect reports an SDXL file as not supported yet', async () => {
    const file = path.join(tmp, 'sdxl.safetensors');
    await writeSparseSafetensors(
      file,
      new Map([
        ['conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias', { dtype: 'F16', shape: [1280] }],
        ['model.diffusion_model.input_blocks.0.0.weight', { dtype: 'F16', shape: [320, 4, 3, 3] }],
      ]),
    );
    const report = await inspectModel(file);
    expect(report.architecture).toBe('SDXL (not supported yet)');
    expect(report.problems.join()).toMatch(/not supported yet/);
  });

  it('names depth-to-image and pix2pix UNets by their input channels', async () => {
    const shapes = await sd15Shapes();
    shapes.set('model.diffusion_model.input_blocks.0.0.weight', [320, 8, 3, 3]);
    expect(() => detectCheckpoint(headersOf(shapes))).toThrow(/InstructPix2Pix \(8 input channels\): not supported yet/);
  });
});

describe('the tiny fixture (non-standard size)', () => {
  it('reads every shape-given value and states the assumptions it had to make', async () => {
    const { headers, metadata } = await readHeaders(TINY_SINGLE);
    const d = detectCheckpoint(headers, { metadata });
    const read = async (c: string) => JSON.parse(await fs.readFile(path.join(TINY_SD, c, 'config.json'), 'utf8')) as Record<string, unknown>;
    const unet = await read('unet');
    for (const key of ['block_out_channels', 'down_block_types', 'up_block_types', 'layers_per_block', 'cross_attention_dim', 'in_channels', 'out_channels', 'use_linear_projection', 'attention_head_dim']) {
      expect(d.configs.unet[key], key).toEqual(unet[key]);
    }
    const text = await read('text_encoder');
    for (const key of ['hidden_size', 'intermediate_size', 'num_hidden_layers', 'vocab_size', 'max_position_embeddings', 'hidden_act']) {
      expect(d.configs.text_encoder[key], key).toEqual(text[key]);
    }
    const vae = await read('vae');
    for (const key of ['block_out_channels', 'layers_per_block', 'latent_channels', 'in_channels', 'out_channels']) {
      expect(d.configs.vae[key], key).toEqual(vae[key]);
    }
    // Not readable from weights: GroupNorm groups (8 here) and text heads (4 here).
    expect(d.configs.unet.norm_num_groups).toBe(32);
    expect(d.notes.join('\n')).toMatch(/non-standard size/);
    expect(d.notes.join('\n')).toMatch(/text encoder heads cannot be read from weights/);
    expect(checkProblems(d)).toEqual([]);
    expect(d.ignored).toHaveLength(13);
  });

  it('takes the missing values from a config, checked against the shapes', async () => {
    const { headers } = await readHeaders(TINY_SINGLE);
    const read = async (c: string, f = 'config.json') => JSON.parse(await fs.readFile(path.join(TINY_SD, c, f), 'utf8')) as Record<string, unknown>;
    const hints = { origin: 'tiny-sd', complete: true, unet: await read('unet'), vae: await read('vae'), text_encoder: await read('text_encoder'), scheduler: await read('scheduler', 'scheduler_config.json') };
    const d = detectCheckpoint(headers, { hints });
    expect(d.configs.unet).toEqual(hints.unet);
    expect(d.configs.text_encoder).toEqual(hints.text_encoder);
    expect(d.configs.scheduler).toEqual(hints.scheduler);
    expect(checkProblems(d)).toEqual([]);
    const wrong = detectCheckpoint(headers, { hints: { ...hints, unet: { ...hints.unet, block_out_channels: [32, 96] } } });
    expect(checkProblems(wrong).join('\n')).toMatch(/unet: .*shape/);
  });
});
