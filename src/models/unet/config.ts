/**
 * diffusers' `unet/config.json` (UNet2DConditionModel) → the configuration our UNet code reads.
 *
 * The schema accepts the file as diffusers writes it (unknown keys tolerated), rejects
 * architectures this UNet does not implement with an error naming the key, and translates the
 * result into fields named for what they mean: per-block lists, `numHeads` instead of diffusers'
 * misnamed `attention_head_dim`, and so on.
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { z } from 'zod';

const int = z.number().int();
const positiveInt = int.positive();
/** `expected …, found <the value>` for a failed check. */
const expected =
  (what: string) =>
  (issue: { readonly input?: unknown }): string =>
    `expected ${what}, found ${issue.input === undefined ? 'nothing' : JSON.stringify(issue.input)}`;
const intOrList = z.union([positiveInt, z.array(positiveInt)], { error: expected('a positive integer or a list of them') });

const DOWN_BLOCKS = ['CrossAttnDownBlock2D', 'DownBlock2D'] as const;
const UP_BLOCKS = ['UpBlock2D', 'CrossAttnUpBlock2D'] as const;

export type DownBlockType = (typeof DOWN_BLOCKS)[number];
export type UpBlockType = (typeof UP_BLOCKS)[number];

/** A config value that must equal one supported setting; anything else is rejected by name. */
function only<V extends string | number | boolean | null>(value: V, why: string) {
  return z
    .unknown()
    .optional()
    .superRefine((v, ctx) => {
      const given = v === undefined ? value : v;
      if (given !== value) {
        ctx.addIssue({
          code: 'custom',
          message: `${JSON.stringify(given)} is not supported (only ${JSON.stringify(value)}): ${why}`,
        });
      }
    });
}

/** The file as diffusers writes it. Keys with diffusers defaults are optional; structural ones are required. */
const rawUnetConfig = z.looseObject({
  in_channels: positiveInt,
  out_channels: positiveInt,
  block_out_channels: z.array(positiveInt).min(1),
  down_block_types: z.array(z.enum(DOWN_BLOCKS, { error: expected(`one of ${DOWN_BLOCKS.join(', ')}`) })).min(1),
  up_block_types: z.array(z.enum(UP_BLOCKS, { error: expected(`one of ${UP_BLOCKS.join(', ')}`) })).min(1),
  mid_block_type: z
    .literal('UNetMidBlock2DCrossAttn', { error: expected('"UNetMidBlock2DCrossAttn" (the only mid block implemented)') })
    .optional()
    .default('UNetMidBlock2DCrossAttn'),
  layers_per_block: intOrList,
  attention_head_dim: intOrList,
  num_attention_heads: intOrList.nullable().optional().default(null),
  cross_attention_dim: intOrList,
  transformer_layers_per_block: z
    .union([positiveInt, z.array(positiveInt)], {
      error: expected('a positive integer or one per block (nested per-layer lists are unsupported)'),
    })
    .optional()
    .default(1),
  use_linear_projection: z.boolean().optional().default(false),
  upcast_attention: z.boolean().nullable().optional().default(false),
  only_cross_attention: z
    .union([z.literal(false), z.array(z.literal(false))], {
      error: expected('false (attn1 as a second cross-attention is not implemented)'),
    })
    .optional()
    .default(false),
  mid_block_only_cross_attention: z
    .union([z.null(), z.literal(false)], { error: expected('null or false') })
    .optional()
    .default(null),
  flip_sin_to_cos: z.boolean().optional().default(true),
  freq_shift: z.number().optional().default(0),
  norm_num_groups: positiveInt.optional().default(32),
  norm_eps: z.number().positive().optional().default(1e-5),
  downsample_padding: z.union([z.literal(0), z.literal(1)]).optional().default(1),
  mid_block_scale_factor: z.number().positive().optional().default(1),
  center_input_sample: z.boolean().optional().default(false),
  conv_in_kernel: positiveInt.optional().default(3),
  conv_out_kernel: positiveInt.optional().default(3),
  time_embedding_dim: positiveInt.nullable().optional().default(null),
  time_embedding_type: only('positional', 'Fourier time embeddings are not implemented'),
  class_embed_type: only(null, 'class-conditioned UNets (SD upscalers, SDXL-style conditioning) are unsupported'),
  addition_embed_type: only(null, 'added text/time conditioning (SDXL, Kandinsky) is unsupported'),
  num_class_embeds: only(null, 'class-conditioned UNets are unsupported'),
  encoder_hid_dim: only(null, 'an encoder_hid_proj on the text states is unsupported'),
  time_cond_proj_dim: only(null, 'guidance-embedding (LCM) conditioning is unsupported'),
  time_embedding_act_fn: only(null, 'only the plain time MLP is implemented'),
  timestep_post_act: only(null, 'only the plain time MLP is implemented'),
  act_fn: only('silu', 'only SiLU activations are implemented'),
  resnet_time_scale_shift: only('default', 'only additive time conditioning is implemented'),
  attention_type: only('default', 'gated/adapter attention is unsupported'),
  dual_cross_attention: only(false, 'dual transformers are unsupported'),
  cross_attention_norm: only(null, 'normed cross-attention context is unsupported'),
  reverse_transformer_layers_per_block: only(null, 'per-layer transformer depths are unsupported'),
  dropout: only(0, 'dropout is not implemented (training would silently differ)'),
});

type RawUnetConfig = z.infer<typeof rawUnetConfig>;

/** One value per down block, from an int (broadcast) or a list that must have one entry per block. */
function perBlock(value: number | number[], blocks: number, key: string, ctx: z.RefinementCtx): number[] {
  if (typeof value === 'number') return new Array<number>(blocks).fill(value);
  if (value.length !== blocks) {
    ctx.addIssue({ code: 'custom', path: [key], message: `expected ${blocks} entries (one per block), found ${value.length}` });
  }
  return value;
}

function toUnetConfig(raw: RawUnetConfig, ctx: z.RefinementCtx) {
  const blocks = raw.block_out_channels.length;
  const issue = (key: string, message: string) => ctx.addIssue({ code: 'custom', path: [key], message });
  if (raw.down_block_types.length !== blocks) {
    issue('down_block_types', `expected ${blocks} entries (one per block_out_channels), found ${raw.down_block_types.length}`);
  }
  if (raw.up_block_types.length !== blocks) {
    issue('up_block_types', `expected ${blocks} entries (one per block_out_channels), found ${raw.up_block_types.length}`);
  }
  if (raw.in_channels !== 4 && raw.in_channels !== 9) {
    issue('in_channels', `expected 4 (text-to-image) or 9 (inpainting: latents + mask + masked-image latents), found ${raw.in_channels}`);
  }
  if (raw.block_out_channels[0]! % 2 !== 0) {
    issue('block_out_channels', `the first entry sets the sinusoidal timestep width and must be even, found ${raw.block_out_channels[0]}`);
  }
  if (raw.conv_in_kernel % 2 === 0) issue('conv_in_kernel', `expected an odd kernel size, found ${raw.conv_in_kernel}`);
  if (raw.conv_out_kernel % 2 === 0) issue('conv_out_kernel', `expected an odd kernel size, found ${raw.conv_out_kernel}`);
  if (Array.isArray(raw.only_cross_attention) && raw.only_cross_attention.length !== blocks) {
    issue('only_cross_attention', `expected ${blocks} entries (one per block), found ${raw.only_cross_attention.length}`);
  }

  // diffusers' `attention_head_dim` is misnamed: UNet2DConditionModel passes it on as
  // `num_attention_heads` (`num_attention_heads or attention_head_dim`), and the transformers then
  // use `channels // heads` as the head width. So SD 1.x's `8` means 8 heads of 40/80/160 channels,
  // and SD 2.x's [5, 10, 20, 20] means 5/10/20/20 heads of 64 channels. An explicit
  // `num_attention_heads` (which diffusers itself refuses) means the same thing and wins.
  const numHeads = perBlock(
    raw.num_attention_heads ?? raw.attention_head_dim,
    blocks,
    raw.num_attention_heads !== null ? 'num_attention_heads' : 'attention_head_dim',
    ctx,
  );
  if (Array.isArray(raw.cross_attention_dim) && new Set(raw.cross_attention_dim).size > 1) {
    issue('cross_attention_dim', `one text-state width feeds every block, found ${JSON.stringify(raw.cross_attention_dim)}`);
  }
  const blockChannels = raw.block_out_channels;
  const groups = raw.norm_num_groups;
  blockChannels.forEach((ch, i) => {
    if (ch % groups !== 0) issue('norm_num_groups', `${groups} groups do not divide block ${i}'s ${ch} channels`);
    const heads = numHeads[i];
    if (heads !== undefined && ch % heads !== 0) {
      issue('attention_head_dim', `${heads} heads do not divide block ${i}'s ${ch} channels`);
    }
  });

  return {
    inChannels: raw.in_channels,
    outChannels: raw.out_channels,
    /** Feature width of each resolution level, top (full resolution) first. */
    blockChannels,
    downBlocks: raw.down_block_types,
    upBlocks: raw.up_block_types,
    /** Resnets per down block; up blocks have one more (they also consume the downsampler's skip). */
    layersPerBlock: perBlock(raw.layers_per_block, blocks, 'layers_per_block', ctx),
    /** BasicTransformerBlocks per Transformer2DModel, per down block (up blocks: reversed; mid: last). */
    transformerDepth: perBlock(raw.transformer_layers_per_block, blocks, 'transformer_layers_per_block', ctx),
    numHeads,
    contextDim: perBlock(raw.cross_attention_dim, blocks, 'cross_attention_dim', ctx),
    /** SD 2.x: proj_in/proj_out are Linear [C, C] instead of 1×1 convolutions. */
    linearProjection: raw.use_linear_projection,
    /**
     * SD 2.1 computes attention scores in float32 under fp16; our tfjs graph is float32
     * throughout, so this changes nothing and is kept only for export/provenance.
     */
    upcastAttention: raw.upcast_attention ?? false,
    flipSinToCos: raw.flip_sin_to_cos,
    freqShift: raw.freq_shift,
    groups,
    eps: raw.norm_eps,
    downsamplePadding: raw.downsample_padding,
    midBlockScale: raw.mid_block_scale_factor,
    /** Maps input latents from [0, 1] to [-1, 1] before conv_in. */
    centerInput: raw.center_input_sample,
    convInKernel: raw.conv_in_kernel,
    convOutKernel: raw.conv_out_kernel,
    timeEmbedDim: raw.time_embedding_dim ?? blockChannels[0]! * 4,
  };
}

/** diffusers' UNet config → our UnetConfig (as a zod schema: parse with {@link parseUnetConfig}). */
export const unetConfigSchema = rawUnetConfig.transform(toUnetConfig);

export type UnetConfig = z.infer<typeof unetConfigSchema>;

export class UnetConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UnetConfigError';
  }
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Validate and translate a parsed `unet/config.json`; errors name `source` and each offending key. */
export function parseUnetConfig(json: unknown, source = 'unet/config.json'): UnetConfig {
  const result = unetConfigSchema.safeParse(json);
  if (result.success) return result.data;
  const lines = result.error.issues.map((i) => {
    const key = i.path.length > 0 ? i.path.join('.') : '(root)';
    const missing = i.path.length === 1 && isRecord(json) && json[String(i.path[0])] === undefined;
    return `  ${key}: ${missing ? 'required key is missing' : i.message}`;
  });
  throw new UnetConfigError(`${source}: unsupported or invalid UNet config\n${lines.join('\n')}`);
}

/** Read and parse `<dir>/config.json` of a diffusers `unet` folder. */
export async function readUnetConfig(dir: string): Promise<UnetConfig> {
  const file = path.join(dir, 'config.json');
  let json: unknown;
  try {
    json = JSON.parse(await readFile(file, 'utf8'));
  } catch (e) {
    throw new UnetConfigError(`${file}: cannot read UNet config: ${(e as Error).message}`);
  }
  return parseUnetConfig(json, file);
}
