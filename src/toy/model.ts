/**
 * The toy model's architecture (a small SD: CLIP text encoder with the real CLIP vocabulary,
 * AutoencoderKL, UNet2DConditionModel) as one zod-validated spec, turned into the diffusers
 * configs those components read, and a seeded from-scratch diffusers folder to start training from.
 */
import { readFile } from 'node:fs/promises';

import { parse as parseYaml } from 'yaml';
import { z } from 'zod';

import type { TensorRef } from '../io/single-file.js';
import { writeDiffusersFolder } from '../io/single-file.js';
import { clipTextManifest, vaeManifest } from '../models/components.js';
import { parseClipTextConfig } from '../models/clip/config.js';
import { clipTextInit, initParameters, torchDefaultInit } from '../models/init.js';
import { parseUnetConfig } from '../models/unet/config.js';
import { unetManifest } from '../models/unet/unet.js';
import { parseVaeConfig } from '../models/vae/config.js';

const channels = z.array(z.number().int().positive()).min(1);

/** The toy architecture, named for meaning; diffusers' names are produced by {@link toyDiffusersConfigs}. */
export const toyModelSpecSchema = z.strictObject({
  image_size: z.number().int().min(16).default(32).describe('Training image side in pixels. Default 32.'),
  vae_channels: channels.default([32, 64]).describe('AutoencoderKL block_out_channels; the factor is 2^(levels−1). Default [32, 64] (factor 2).'),
  vae_layers_per_block: z.number().int().min(1).default(1),
  latent_channels: z.number().int().min(1).default(4),
  unet_channels: channels.default([32, 64]).describe('UNet block_out_channels. Default [32, 64].'),
  unet_attention: z
    .array(z.boolean())
    .min(1)
    .optional()
    .describe('Per UNet level: cross-attention blocks (true) or plain ResNet blocks. Default: attention at every level but the last (the mid block always has it).'),
  unet_layers_per_block: z.number().int().min(1).default(1),
  unet_heads: z.number().int().min(1).default(4).describe("Attention heads per transformer block (diffusers' attention_head_dim for SD 1.x configs). Default 4."),
  norm_groups: z.number().int().min(1).default(8).describe('GroupNorm groups in the UNet and VAE. Default 8.'),
  text_width: z.number().int().min(8).default(32).describe('Text encoder hidden size = UNet cross-attention width. Default 32.'),
  text_layers: z.number().int().min(1).default(2),
  text_heads: z.number().int().min(1).default(4),
  text_mlp_ratio: z.number().int().min(1).default(4).describe('MLP width = ratio × text_width. Default 4.'),
});
export type ToyModelSpec = z.infer<typeof toyModelSpecSchema>;

type Json = Record<string, unknown>;

/** The diffusers configs of a spec (unet, vae, text_encoder, scheduler: SD 1.x's DDPM schedule). */
export function toyDiffusersConfigs(spec: ToyModelSpec): { unet: Json; vae: Json; text_encoder: Json; scheduler: Json } {
  const levels = spec.unet_channels.length;
  const attention = spec.unet_attention ?? spec.unet_channels.map((_, i) => levels === 1 || i < levels - 1);
  if (attention.length !== levels) throw new Error(`toy model: unet_attention has ${attention.length} entries, unet_channels ${levels}`);
  const vaeFactor = 2 ** (spec.vae_channels.length - 1);
  if (spec.image_size % vaeFactor !== 0) throw new Error(`toy model: image_size ${spec.image_size} is not a multiple of the VAE factor ${vaeFactor}`);
  const unet: Json = {
    _class_name: 'UNet2DConditionModel',
    _diffusers_version: '0.30.3',
    act_fn: 'silu',
    attention_head_dim: spec.unet_heads,
    block_out_channels: spec.unet_channels,
    center_input_sample: false,
    cross_attention_dim: spec.text_width,
    down_block_types: attention.map((a) => (a ? 'CrossAttnDownBlock2D' : 'DownBlock2D')),
    downsample_padding: 1,
    flip_sin_to_cos: true,
    freq_shift: 0,
    in_channels: spec.latent_channels,
    layers_per_block: spec.unet_layers_per_block,
    mid_block_scale_factor: 1,
    norm_eps: 1e-5,
    norm_num_groups: spec.norm_groups,
    out_channels: spec.latent_channels,
    sample_size: spec.image_size / vaeFactor,
    up_block_types: [...attention].reverse().map((a) => (a ? 'CrossAttnUpBlock2D' : 'UpBlock2D')),
    use_linear_projection: false,
  };
  const vae: Json = {
    _class_name: 'AutoencoderKL',
    _diffusers_version: '0.30.3',
    act_fn: 'silu',
    block_out_channels: spec.vae_channels,
    down_block_types: spec.vae_channels.map(() => 'DownEncoderBlock2D'),
    up_block_types: spec.vae_channels.map(() => 'UpDecoderBlock2D'),
    in_channels: 3,
    out_channels: 3,
    latent_channels: spec.latent_channels,
    layers_per_block: spec.vae_layers_per_block,
    norm_num_groups: spec.norm_groups,
    sample_size: spec.image_size,
    // Replaced by the `vae` method with 1/std of the trained latents (LDM §4.3.2).
    scaling_factor: 1,
  };
  const text_encoder: Json = {
    architectures: ['CLIPTextModel'],
    attention_dropout: 0,
    bos_token_id: 0,
    eos_token_id: 2,
    hidden_act: 'quick_gelu',
    hidden_size: spec.text_width,
    initializer_factor: 1,
    initializer_range: 0.02,
    intermediate_size: spec.text_mlp_ratio * spec.text_width,
    layer_norm_eps: 1e-5,
    max_position_embeddings: 77,
    model_type: 'clip_text_model',
    num_attention_heads: spec.text_heads,
    num_hidden_layers: spec.text_layers,
    pad_token_id: 1,
    projection_dim: spec.text_width,
    torch_dtype: 'float32',
    vocab_size: 49408,
  };
  const scheduler: Json = {
    _class_name: 'DDIMScheduler',
    _diffusers_version: '0.30.3',
    beta_end: 0.012,
    beta_schedule: 'scaled_linear',
    beta_start: 0.00085,
    clip_sample: false,
    num_train_timesteps: 1000,
    prediction_type: 'epsilon',
    set_alpha_to_one: false,
    steps_offset: 1,
    timestep_spacing: 'leading',
    trained_betas: null,
  };
  return { unet, vae, text_encoder, scheduler };
}

/** Reads a toy model spec from YAML (a file of spec fields; missing fields take the defaults). */
export async function readToyModelSpec(file: string): Promise<ToyModelSpec> {
  const raw: unknown = parseYaml(await readFile(file, 'utf8')) ?? {};
  const parsed = toyModelSpecSchema.safeParse(raw);
  if (!parsed.success) throw new Error(`${file}: ${parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
  return parsed.data;
}

/** Parameter counts per component of a spec. */
export function toyParameterCounts(spec: ToyModelSpec): { unet: number; vae: number; text_encoder: number } {
  const cfgs = toyDiffusersConfigs(spec);
  const count = (m: Map<string, number[]>) => [...m.values()].reduce((a, s) => a + s.reduce((x, y) => x * y, 1), 0);
  return {
    unet: count(unetManifest(parseUnetConfig(cfgs.unet, 'unet config'))),
    vae: count(vaeManifest(parseVaeConfig(cfgs.vae, 'vae config'))),
    text_encoder: count(clipTextManifest(parseClipTextConfig(cfgs.text_encoder, 'text_encoder config'))),
  };
}

/** An in-memory float32 PyTorch-layout tensor as a {@link TensorRef}. */
export function float32Ref(data: Float32Array, shape: readonly number[]): TensorRef {
  return {
    dtype: 'F32',
    shape,
    readRaw: async () => new Uint8Array(data.buffer, data.byteOffset, data.byteLength),
    readFloat32: async () => data,
  };
}

/**
 * Writes a diffusers folder of the spec with seeded from-scratch weights (PyTorch defaults for the
 * UNet and VAE, transformers' CLIP init for the text encoder) and the bundled CLIP tokenizer.
 */
export async function writeScratchModel(dir: string, spec: ToyModelSpec, seed: number, opts: { overwrite?: boolean } = {}): Promise<void> {
  const configs = toyDiffusersConfigs(spec);
  const text = parseClipTextConfig(configs.text_encoder, 'text_encoder config');
  const refs = (params: Map<string, { shape: number[]; data: Float32Array }>) => new Map([...params].map(([k, p]) => [k, float32Ref(p.data, p.shape)]));
  // One seed per component, so changing one component's architecture leaves the others' weights alone.
  const unet = refs(initParameters(unetManifest(parseUnetConfig(configs.unet, 'unet config')), torchDefaultInit, seed));
  const vae = refs(initParameters(vaeManifest(parseVaeConfig(configs.vae, 'vae config')), torchDefaultInit, seed + 1));
  const textEncoder = refs(initParameters(clipTextManifest(text), clipTextInit(text), seed + 2));
  await writeDiffusersFolder(
    dir,
    { components: { unet, vae, text_encoder: textEncoder }, configs, textEncoderLayout: 'clip', close: async () => undefined },
    { family: 'sd1', ...(opts.overwrite === undefined ? {} : { overwrite: opts.overwrite }) },
  );
}
