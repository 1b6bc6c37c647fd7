/**
 * diffusers' `vae/config.json` (AutoencoderKL) → the configuration the VAE code reads, with fields
 * named for what they mean. Keys with diffusers defaults are optional; the architecture's
 * structural keys are required; unknown keys are tolerated.
 */
import path from 'node:path';
import { z } from 'zod';
import { parseWithSchema, readJsonFile } from '../../io/diffusers.js';

const positiveInt = z.number().int().positive();

const rawVaeConfig = z.looseObject({
  in_channels: positiveInt.optional().default(3),
  out_channels: positiveInt.optional().default(3),
  down_block_types: z.array(z.literal('DownEncoderBlock2D', { error: 'only "DownEncoderBlock2D" is supported' })).min(1),
  up_block_types: z.array(z.literal('UpDecoderBlock2D', { error: 'only "UpDecoderBlock2D" is supported' })).min(1),
  block_out_channels: z.array(positiveInt).min(1),
  layers_per_block: positiveInt,
  act_fn: z.literal('silu', { error: 'only "silu" is supported' }).optional().default('silu'),
  latent_channels: positiveInt.optional().default(4),
  norm_num_groups: positiveInt.optional().default(32),
  sample_size: z.union([positiveInt, z.array(positiveInt).length(2)]).optional().default(32),
  scaling_factor: z.number().positive().optional().default(0.18215),
  shift_factor: z.number().nullable().optional().default(null),
  use_quant_conv: z.boolean().optional().default(true),
  use_post_quant_conv: z.boolean().optional().default(true),
  mid_block_add_attention: z.boolean().optional().default(true),
});

/** AutoencoderKL config as the VAE code reads it (parse with {@link parseVaeConfig}). */
export const vaeConfigSchema = rawVaeConfig
  .superRefine((raw, ctx) => {
    const levels = raw.block_out_channels.length;
    for (const key of ['down_block_types', 'up_block_types'] as const) {
      if (raw[key].length !== levels) {
        ctx.addIssue({ code: 'custom', path: [key], message: `expected ${levels} entries (one per block_out_channels), found ${raw[key].length}` });
      }
    }
    raw.block_out_channels.forEach((ch, i) => {
      if (ch % raw.norm_num_groups !== 0) {
        ctx.addIssue({ code: 'custom', path: ['norm_num_groups'], message: `${raw.norm_num_groups} groups do not divide block ${i}'s ${ch} channels` });
      }
    });
  })
  .transform((raw) => {
    const sampleSize = Array.isArray(raw.sample_size) ? raw.sample_size[0]! : raw.sample_size;
    const levels = raw.block_out_channels.length;
    return {
      imageChannels: raw.in_channels,
      outputChannels: raw.out_channels,
      latentChannels: raw.latent_channels,
      /** Feature width of each encoder level, full resolution first (the decoder runs them reversed). */
      blockChannels: raw.block_out_channels,
      /** Resnets per encoder block; decoder blocks have one more. */
      layersPerBlock: raw.layers_per_block,
      groups: raw.norm_num_groups,
      /** Image pixels per latent pixel along each side: 2^(levels − 1). */
      downscale: 2 ** (levels - 1),
      /** Latents the UNet sees are (z − shift)·scale (LDM §4.3.2: unit variance in latent space). */
      scalingFactor: raw.scaling_factor,
      shiftFactor: raw.shift_factor ?? 0,
      useQuantConv: raw.use_quant_conv,
      usePostQuantConv: raw.use_post_quant_conv,
      midBlockAttention: raw.mid_block_add_attention,
      /** The image size the VAE was trained on: diffusers' tile size for tiled decoding. */
      sampleSize,
    };
  });

export type VaeConfig = z.infer<typeof vaeConfigSchema>;

/** Validate a parsed `vae/config.json` (`file` names it in errors). */
export function parseVaeConfig(json: unknown, file = 'vae/config.json'): VaeConfig {
  return parseWithSchema(vaeConfigSchema, json, file);
}

/** Read and parse `<dir>/config.json` of a diffusers `vae` folder. */
export async function readVaeConfig(dir: string): Promise<VaeConfig> {
  const file = path.join(dir, 'config.json');
  return parseVaeConfig(await readJsonFile(file), file);
}
