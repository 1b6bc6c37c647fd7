/**
 * What a single-file checkpoint is, read from its tensor names and shapes alone (never its file
 * name): the model family, and the diffusers config of each component.
 *
 * Shapes fix almost everything: channels per level, ResNets per level, where the attentions are,
 * transformer depth, context width, Linear vs 1×1-conv projections, VAE levels and latent width,
 * text-encoder width, depth, MLP width, vocabulary and positions. What weights cannot show is
 * filled by the rules of the family the file belongs to, each stated in `notes`:
 *   - attention heads: SD 1.x uses 8 heads in every block (LDM v1 `num_heads: 8`); SD 2.x uses
 *     64-wide heads (`num_head_channels: 64`), so heads = channels / 64; CLIP text encoders use
 *     64-wide heads (ViT-L/14: 768 → 12, ViT-H/14: 1024 → 16).
 *   - GroupNorm groups 32, norm epsilons, activations (SD 1.x CLIP: quick_gelu; OpenCLIP: gelu),
 *     the VAE scaling factor 0.18215, the scaled_linear 0.00085–0.012 noise schedule.
 *   - the prediction type (ε vs v) and the training resolution: see {@link predictionFor}.
 * A config that says otherwise (`--config`, a sidecar LDM yaml, or the configs sdwb itself
 * stores in files it writes) takes precedence; it is checked against the shapes.
 */
import { z } from 'zod';
import { clipTextManifest, vaeManifest } from '../models/components.js';
import { parseClipTextConfig, type ClipTextConfig } from '../models/clip/config.js';
import { parseUnetConfig, type UnetConfig } from '../models/unet/config.js';
import { unetManifest } from '../models/unet/unet.js';
import { parseVaeConfig, type VaeConfig } from '../models/vae/config.js';
import { parseSchedulerConfig, PREDICTION_TYPES, type PredictionType } from '../schedulers/config.js';
import { DTYPE_BYTES, isDType } from './dtypes.js';
import { mappedShape } from './keymaps/apply.js';
import {
  canonicalLdmKey,
  COMPONENT_NAMES,
  componentOfLdmKey,
  EMA_PREFIX,
  ignoredLdmKey,
  LDM_PREFIX,
  ldmToDiffusers,
  diffusersToLdm,
  type ComponentName,
  type LdmLayout,
  type TextEncoderLayout,
} from './ldm-keys.js';

/** A tensor as a file header describes it. */
export interface TensorHeader {
  readonly dtype: string;
  readonly shape: readonly number[];
}

export type Headers = ReadonlyMap<string, TensorHeader>;

export type Family = 'sd1' | 'sd2';

/** A file this workbench recognises but cannot load (SDXL, SD3, Flux, LoRA, …) or does not recognise. */
export class UnsupportedModelError extends Error {
  constructor(
    message: string,
    /** Short name of what the file is, e.g. `SDXL`. */
    readonly architecture: string,
  ) {
    super(message);
    this.name = 'UnsupportedModelError';
  }
}

type Json = Record<string, unknown>;

/** Diffusers-format configs, as `config.json` / `scheduler_config.json` hold them. */
export interface DiffusersConfigs {
  readonly unet: Json;
  readonly vae: Json;
  readonly text_encoder: Json;
  readonly scheduler: Json;
}

/** Config values from outside the weights, with where they came from. */
export interface ConfigHints {
  /** For messages: the file or folder, e.g. `--config v2-inference-v.yaml`. */
  readonly origin: string;
  /** true: the configs are whole diffusers configs to use as they are (after checking them against the shapes). */
  readonly complete?: boolean;
  readonly unet?: Json;
  readonly vae?: Json;
  readonly text_encoder?: Json;
  readonly scheduler?: Json;
  /** LDM yaml: per-block heads from a head width (`num_head_channels`) or a head count (`num_heads`). */
  readonly unetHeads?: { readonly width: number } | { readonly count: number };
  /** LDM yaml `cond_stage_config.params.layer`: which OpenCLIP layer's output SD conditions on. */
  readonly openClipLayer?: 'last' | 'penultimate';
}

export interface DetectOptions {
  /** Overrides every other source of the prediction type. */
  readonly predictionType?: PredictionType;
  /** The file's `__metadata__` (sdwb's own configs, ModelSpec / kohya prediction-type hints). */
  readonly metadata?: Readonly<Record<string, string>>;
  readonly hints?: ConfigHints;
}

/** Per component: the file's tensors checked against the parameters the config implies. */
export interface ComponentCheck {
  /** Parameters the config implies that the file lacks (single-file names). */
  readonly missing: readonly string[];
  /** Tensors under the component's prefix that the config does not use (single-file names). */
  readonly unexpected: readonly string[];
  readonly wrongShape: readonly { readonly key: string; readonly expected: readonly number[]; readonly found: readonly number[] }[];
  readonly parameters: number;
  readonly tensors: number;
  /** Stored bytes of the component's tensors. */
  readonly bytes: number;
  /** dtype → tensor count. */
  readonly dtypes: Readonly<Record<string, number>>;
}

export interface Detection {
  /** For people: `SD 1.x`, `SD 2.x inpainting`, … */
  readonly architecture: string;
  readonly family: Family;
  readonly inpainting: boolean;
  readonly textEncoderLayout: TextEncoderLayout;
  /** The bundled tokenizer that goes with the family (SD 2.x pads with `!`). */
  readonly tokenizer: 'sd1' | 'sd2';
  readonly configs: DiffusersConfigs;
  readonly parsed: { readonly unet: UnetConfig; readonly vae: VaeConfig; readonly textEncoder: ClipTextConfig };
  readonly layout: LdmLayout;
  readonly predictionType: PredictionType;
  readonly predictionSource: 'option' | 'config' | 'metadata' | 'guess';
  /** Components the file does not contain (their configs are the family's standard ones). */
  readonly absent: readonly ComponentName[];
  readonly ema: { readonly present: boolean; readonly tensors: number };
  readonly checks: Readonly<Record<ComponentName, ComponentCheck>>;
  /** Keys deliberately not loaded, with the reason. */
  readonly ignored: readonly { readonly key: string; readonly reason: string }[];
  /** Keys that belong to no component and are not known extras. */
  readonly unmapped: readonly string[];
  /** Every assumption made and where each config value came from. */
  readonly notes: readonly string[];
}

/** Metadata key under which sdwb stores the diffusers configs of files it writes. */
export const SDWB_CONFIGS_METADATA_KEY = 'sdwb.configs';

/** The standard SD noise schedule (LDM `linear_start`/`linear_end` with `beta_schedule: scaled_linear`). */
export const SD_SCHEDULE = { beta_start: 0.00085, beta_end: 0.012, beta_schedule: 'scaled_linear', num_train_timesteps: 1000 } as const;

// =============================================================================================
// Families the workbench recognises but does not load

const NOT_SUPPORTED: readonly { readonly test: (keys: readonly string[]) => boolean; readonly name: string; readonly why: string }[] = [
  { test: (k) => k.some((x) => x.startsWith('conditioner.embedders.')), name: 'SDXL', why: 'SDXL (two text encoders under conditioner.embedders)' },
  { test: (k) => k.some((x) => x.includes('diffusion_model.joint_blocks.')), name: 'SD3', why: 'Stable Diffusion 3 (MMDiT joint_blocks)' },
  {
    test: (k) => k.some((x) => /^(model\.diffusion_model\.)?(double_blocks|single_blocks)\./.test(x)),
    name: 'Flux',
    why: 'Flux (double_blocks/single_blocks transformer)',
  },
  {
    test: (k) => k.some((x) => x.startsWith(`${LDM_PREFIX.unet}label_emb.`)),
    name: 'class-conditioned UNet',
    why: 'a class-conditioned UNet (label_emb: SDXL-style, SD 2.x unCLIP or the x4 upscaler)',
  },
  { test: (k) => k.some((x) => x.startsWith('control_model.')), name: 'ControlNet', why: 'a ControlNet (control_model)' },
  {
    test: (k) => k.some((x) => /(^|\.)lora_(up|down|A|B)\.|^lora_(unet|te)_|\.hada_|\.lokr_/.test(x)),
    name: 'LoRA',
    why: 'LoRA/LyCORIS adapter weights, not a full checkpoint',
  },
  {
    test: (k) => k.some((x) => x.startsWith('model.diffusion_model.') && /\.(adaLN_modulation|x_embedder|t_embedder)\./.test(x)),
    name: 'DiT',
    why: 'a diffusion transformer (DiT family), not an LDM UNet',
  },
];

/** Throws {@link UnsupportedModelError} for files that are not SD 1.x/2.x single files. */
function assertSupportedFamily(keys: readonly string[]): void {
  for (const family of NOT_SUPPORTED) {
    if (family.test(keys)) {
      throw new UnsupportedModelError(`${family.why}: not supported yet (this workbench loads SD 1.x and SD 2.x)`, family.name);
    }
  }
  if (!keys.some((k) => k.startsWith(LDM_PREFIX.unet))) {
    if (keys.some((k) => k.startsWith(EMA_PREFIX))) {
      throw new UnsupportedModelError(
        'only EMA weights (model_ema.*, names without dots) and no model.diffusion_model.*: re-save the checkpoint with its EMA weights applied',
        'EMA-only checkpoint',
      );
    }
    if (keys.includes('conv_in.weight') && keys.some((k) => k.startsWith('down_blocks.'))) {
      throw new UnsupportedModelError('diffusers-layout component weights (one UNet or VAE), not a single-file checkpoint: use a diffusers folder', 'diffusers component');
    }
    if (keys.includes('text_model.embeddings.token_embedding.weight')) {
      throw new UnsupportedModelError('a transformers CLIP text encoder on its own, not a single-file checkpoint', 'CLIP text encoder');
    }
    if (keys.includes('encoder.conv_in.weight') && keys.includes('decoder.conv_in.weight')) {
      throw new UnsupportedModelError('a VAE on its own (no UNet), not a full single-file checkpoint', 'VAE');
    }
    throw new UnsupportedModelError('no model.diffusion_model.* tensors: not a Stable Diffusion single-file checkpoint', 'unknown');
  }
}

// =============================================================================================
// Shapes → configs

/** Reads shapes under one prefix, naming the file's missing key in errors. */
class ShapeReader {
  constructor(
    private readonly headers: Headers,
    readonly prefix: string,
  ) {}

  has(key: string): boolean {
    return this.headers.has(this.prefix + key);
  }

  shape(key: string): readonly number[] {
    const h = this.headers.get(this.prefix + key);
    if (h === undefined) throw new UnsupportedModelError(`expected tensor '${this.prefix + key}' is missing: not a supported layout`, 'unknown');
    return h.shape;
  }

  dim(key: string, axis: number): number {
    const d = this.shape(key)[axis];
    if (d === undefined) throw new UnsupportedModelError(`'${this.prefix + key}' has shape [${this.shape(key).join(', ')}], expected at least ${axis + 1} dimensions`, 'unknown');
    return d;
  }

  /** Distinct numbers N in keys `<prefix><head>N.…`, ascending. */
  indices(head: string): number[] {
    const re = new RegExp(`^${escapeRegExp(this.prefix + head)}(\\d+)\\.`);
    const out = new Set<number>();
    for (const key of this.headers.keys()) {
      const m = re.exec(key);
      if (m !== null) out.add(Number(m[1]));
    }
    return [...out].sort((a, b) => a - b);
  }
}

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/** One value if all are equal (diffusers' own style for SD configs), else the list. */
function collapse(values: readonly number[]): number | number[] {
  return values.every((v) => v === values[0]) ? values[0]! : [...values];
}

interface UnetShapes {
  readonly json: Json;
  readonly contextDim: number;
  readonly blockChannels: readonly number[];
}

/** diffusers config values of an LDM UNet that its shapes determine (heads and sample size excluded). */
function unetFromShapes(r: ShapeReader): UnetShapes {
  const convIn = r.shape('input_blocks.0.0.weight'); // [C0, Cin, k, k]
  if (convIn.length !== 4) throw new UnsupportedModelError(`'${r.prefix}input_blocks.0.0.weight' is not a convolution`, 'unknown');
  const [ch0, inChannels, kernelIn] = convIn as [number, number, number, number];

  // 1. Down path: ResNets, each maybe with a transformer, then a downsampler per level but the last.
  interface Level {
    channels: number;
    layers: number;
    attn: boolean[];
    depth: number[];
  }
  const levels: Level[] = [];
  let level: Level = { channels: ch0, layers: 0, attn: [], depth: [] };
  let firstAttention: string | undefined;
  const inputs = r.indices('input_blocks.');
  for (let n = 1; n <= (inputs.at(-1) ?? 0); n++) {
    const p = `input_blocks.${n}.`;
    if (r.has(`${p}0.op.weight`)) {
      levels.push(level);
      level = { channels: level.channels, layers: 0, attn: [], depth: [] };
    } else if (r.has(`${p}0.in_layers.2.weight`)) {
      level.layers++;
      level.channels = r.dim(`${p}0.out_layers.3.weight`, 0);
      const attn = r.has(`${p}1.norm.weight`);
      level.attn.push(attn);
      if (attn) {
        firstAttention ??= `${p}1.`;
        level.depth.push(r.indices(`${p}1.transformer_blocks.`).length);
      }
    } else {
      throw new UnsupportedModelError(`'${r.prefix}${p}' is neither a ResNet nor a downsampler: not an SD UNet layout`, 'unknown');
    }
  }
  levels.push(level);
  if (levels.some((l) => l.layers === 0)) throw new UnsupportedModelError('a UNet level without ResNets: not an SD UNet layout', 'unknown');

  const downBlocks = levels.map((l, i) => {
    if (l.attn.every(Boolean)) return 'CrossAttnDownBlock2D';
    if (!l.attn.some(Boolean)) return 'DownBlock2D';
    throw new UnsupportedModelError(`UNet level ${i} has attention on some ResNets only: not supported`, 'unknown');
  });
  const depth = levels.map((l, i) => {
    if (l.depth.length === 0) return 1;
    if (l.depth.some((d) => d !== l.depth[0])) throw new UnsupportedModelError(`UNet level ${i} mixes transformer depths: not supported`, 'unknown');
    return l.depth[0]!;
  });

  // 2. Up path: one ResNet more per level, mirrored; the upsampler rides on a block's last entry.
  const upBlocks: string[] = [];
  let out = 0;
  for (let i = 0; i < levels.length; i++) {
    const layers = levels[levels.length - 1 - i]!.layers + 1;
    const attn: boolean[] = [];
    for (let j = 0; j < layers; j++, out++) {
      const p = `output_blocks.${out}.`;
      if (!r.has(`${p}0.in_layers.2.weight`)) {
        throw new UnsupportedModelError(`expected a ResNet at '${r.prefix}${p}0' (up block ${i}, layer ${j}): the up path does not mirror the down path`, 'unknown');
      }
      const hasAttn = r.has(`${p}1.norm.weight`);
      attn.push(hasAttn);
      if (j === layers - 1 && i < levels.length - 1 && !r.has(`${p}${hasAttn ? 2 : 1}.conv.weight`)) {
        throw new UnsupportedModelError(`expected the upsampler of up block ${i} at '${r.prefix}${p}${hasAttn ? 2 : 1}.conv'`, 'unknown');
      }
    }
    if (attn.every(Boolean)) upBlocks.push('CrossAttnUpBlock2D');
    else if (!attn.some(Boolean)) upBlocks.push('UpBlock2D');
    else throw new UnsupportedModelError(`UNet up block ${i} has attention on some ResNets only: not supported`, 'unknown');
  }
  if (r.has(`output_blocks.${out}.0.in_layers.2.weight`)) {
    throw new UnsupportedModelError(`'${r.prefix}output_blocks.${out}' is beyond the mirrored up path: not an SD UNet layout`, 'unknown');
  }
  if (!r.has('middle_block.1.norm.weight')) {
    throw new UnsupportedModelError('the UNet mid block has no attention (UNetMidBlock2D): not supported', 'unknown');
  }
  firstAttention ??= 'middle_block.1.';

  // 3. Attention details, read from the first transformer.
  const projIn = r.shape(`${firstAttention}proj_in.weight`);
  const contextDim = r.dim(`${firstAttention}transformer_blocks.0.attn2.to_k.weight`, 1);
  const timeEmbedDim = r.dim('time_embed.0.weight', 0);
  const outChannels = r.dim('out.2.weight', 0);
  const kernelOut = r.dim('out.2.weight', 2);
  const layersPerBlock = levels.map((l) => l.layers);
  return {
    contextDim,
    blockChannels: levels.map((l) => l.channels),
    json: {
      in_channels: inChannels,
      out_channels: outChannels,
      block_out_channels: levels.map((l) => l.channels),
      down_block_types: downBlocks,
      up_block_types: upBlocks,
      layers_per_block: collapse(layersPerBlock),
      transformer_layers_per_block: collapse(depth),
      cross_attention_dim: contextDim,
      use_linear_projection: projIn.length === 2,
      conv_in_kernel: kernelIn,
      conv_out_kernel: kernelOut,
      time_embedding_dim: timeEmbedDim === 4 * ch0 ? null : timeEmbedDim,
    },
  };
}

function vaeFromShapes(r: ShapeReader): Json {
  const levels = r.indices('encoder.down.');
  const blockChannels = levels.map((i) => r.dim(`encoder.down.${i}.block.0.conv2.weight`, 0));
  return {
    in_channels: r.dim('encoder.conv_in.weight', 1),
    out_channels: r.dim('decoder.conv_out.weight', 0),
    down_block_types: levels.map(() => 'DownEncoderBlock2D'),
    up_block_types: levels.map(() => 'UpDecoderBlock2D'),
    block_out_channels: blockChannels,
    layers_per_block: r.indices('encoder.down.0.block.').length,
    latent_channels: r.dim('decoder.conv_in.weight', 1),
    use_quant_conv: r.has('quant_conv.weight'),
    use_post_quant_conv: r.has('post_quant_conv.weight'),
    mid_block_add_attention: r.has('encoder.mid.attn_1.q.weight'),
  };
}

interface TextShapes {
  readonly json: Json;
  readonly width: number;
  readonly resblocks: number;
}

function textFromShapes(r: ShapeReader, layout: TextEncoderLayout): TextShapes {
  if (layout === 'clip') {
    const [vocab, width] = r.shape('text_model.embeddings.token_embedding.weight') as [number, number];
    const layers = r.indices('text_model.encoder.layers.').length;
    return {
      width,
      resblocks: layers,
      json: {
        vocab_size: vocab,
        hidden_size: width,
        max_position_embeddings: r.dim('text_model.embeddings.position_embedding.weight', 0),
        num_hidden_layers: layers,
        intermediate_size: r.dim('text_model.encoder.layers.0.mlp.fc1.weight', 0),
      },
    };
  }
  const [vocab, width] = r.shape('token_embedding.weight') as [number, number];
  const resblocks = r.indices('transformer.resblocks.').length;
  return {
    width,
    resblocks,
    json: {
      vocab_size: vocab,
      hidden_size: width,
      max_position_embeddings: r.dim('positional_embedding', 0),
      num_hidden_layers: resblocks,
      intermediate_size: r.dim('transformer.resblocks.0.mlp.c_fc.weight', 0),
    },
  };
}

// =============================================================================================
// Family defaults for what shapes cannot show

/** UNet keys diffusers writes for SD, with SD's values where shapes say nothing. */
const UNET_DEFAULTS: Json = {
  _class_name: 'UNet2DConditionModel',
  sample_size: 64,
  center_input_sample: false,
  flip_sin_to_cos: true,
  freq_shift: 0,
  mid_block_type: 'UNetMidBlock2DCrossAttn',
  only_cross_attention: false,
  downsample_padding: 1,
  mid_block_scale_factor: 1,
  dropout: 0,
  act_fn: 'silu',
  norm_num_groups: 32,
  norm_eps: 1e-5,
  reverse_transformer_layers_per_block: null,
  encoder_hid_dim: null,
  encoder_hid_dim_type: null,
  num_attention_heads: null,
  dual_cross_attention: false,
  class_embed_type: null,
  addition_embed_type: null,
  addition_time_embed_dim: null,
  num_class_embeds: null,
  upcast_attention: false,
  resnet_time_scale_shift: 'default',
  resnet_skip_time_act: false,
  resnet_out_scale_factor: 1.0,
  time_embedding_type: 'positional',
  time_embedding_act_fn: null,
  timestep_post_act: null,
  time_cond_proj_dim: null,
  projection_class_embeddings_input_dim: null,
  attention_type: 'default',
  class_embeddings_concat: false,
  mid_block_only_cross_attention: null,
  cross_attention_norm: null,
  addition_embed_type_num_heads: 64,
};

const VAE_DEFAULTS: Json = {
  _class_name: 'AutoencoderKL',
  act_fn: 'silu',
  norm_num_groups: 32,
  sample_size: 512,
  scaling_factor: 0.18215,
  shift_factor: null,
  latents_mean: null,
  latents_std: null,
  force_upcast: true,
};

const TEXT_DEFAULTS: Json = {
  architectures: ['CLIPTextModel'],
  model_type: 'clip_text_model',
  // SD 1.x/2.x configs predate transformers 4.31: eos 2 selects the legacy argmax pooling.
  bos_token_id: 0,
  pad_token_id: 1,
  eos_token_id: 2,
  layer_norm_eps: 1e-5,
};

/** Standard SD sizes: block channels and context width of the released models. */
function isStandardSize(family: Family, unet: UnetShapes, textWidth: number): boolean {
  const standardBlocks = unet.blockChannels.join() === '320,640,1280,1280';
  return standardBlocks && unet.contextDim === textWidth && textWidth === (family === 'sd1' ? 768 : 1024);
}

/** Per-block heads by the family's rule (see the module comment), or undefined if channels do not allow it. */
function headsByRule(family: Family, channels: readonly number[], rule?: ConfigHints['unetHeads']): number[] | undefined {
  const r = rule ?? (family === 'sd1' ? { count: 8 } : { width: 64 });
  const heads = channels.map((c) => ('count' in r ? r.count : c / r.width));
  return heads.every((h, i) => Number.isInteger(h) && h > 0 && channels[i]! % h === 0) ? heads : undefined;
}

/**
 * The prediction type and why: an explicit option, then a config, then metadata hints, else the
 * family's usual value. ε vs v cannot be read from weights: the two parameterisations have
 * identical architectures.
 */
function predictionFor(
  family: Family,
  inpainting: boolean,
  opts: DetectOptions,
  hinted: unknown,
): { value: PredictionType; source: Detection['predictionSource']; note: string } {
  const how = 'select it with --prediction-type epsilon|v_prediction or a --config';
  if (opts.predictionType !== undefined) return { value: opts.predictionType, source: 'option', note: `prediction type ${opts.predictionType} (from --prediction-type)` };
  if (typeof hinted === 'string' && (PREDICTION_TYPES as readonly string[]).includes(hinted)) {
    return { value: hinted as PredictionType, source: 'config', note: `prediction type ${hinted} (from the config)` };
  }
  const md = opts.metadata ?? {};
  const spec = md['modelspec.architecture'];
  if (md['ss_v_parameterization'] === 'True' || (spec !== undefined && /-v$/.test(spec))) {
    return { value: 'v_prediction', source: 'metadata', note: `prediction type v_prediction (from the file's metadata; cannot be read from weights — ${how})` };
  }
  if (family === 'sd2' && md['global_step'] === '875000') {
    return { value: 'epsilon', source: 'metadata', note: `prediction type epsilon: the checkpoint's global_step 875000 is SD 2.x 512-base's (the rule diffusers uses); ${how}` };
  }
  if (family === 'sd2' && !inpainting) {
    return {
      value: 'v_prediction',
      source: 'guess',
      note:
        'prediction type v_prediction is a guess: SD 2.x 768-v (v_prediction, 768 px) and 512-base (epsilon, 512 px) have identical weights, ' +
        `and the guess follows diffusers (768-v); ${how}`,
    };
  }
  return {
    value: 'epsilon',
    source: 'guess',
    note: `prediction type epsilon is the ${family === 'sd1' ? 'SD 1.x' : 'SD 2.x inpainting'} default; v-prediction fine-tunes cannot be told from weights — ${how}`,
  };
}

/** The configs sdwb stored in a file it wrote, if any. */
function sdwbConfigsOf(metadata: Readonly<Record<string, string>> | undefined): ConfigHints | undefined {
  const text = metadata?.[SDWB_CONFIGS_METADATA_KEY];
  if (text === undefined) return undefined;
  const schema = z.object({ unet: z.record(z.string(), z.unknown()), vae: z.record(z.string(), z.unknown()), text_encoder: z.record(z.string(), z.unknown()), scheduler: z.record(z.string(), z.unknown()) });
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    return undefined;
  }
  const r = schema.safeParse(parsed);
  return r.success ? { origin: `the file's ${SDWB_CONFIGS_METADATA_KEY} metadata`, complete: true, ...r.data } : undefined;
}

// =============================================================================================
// Detection

/** Architecture, configs and a key-by-key check of a single-file checkpoint, from its headers alone. */
export function detectCheckpoint(fileHeaders: Headers, opts: DetectOptions = {}): Detection {
  const notes: string[] = [];
  const headers = canonicalHeaders(fileHeaders, notes);
  const keys = [...headers.keys()];
  assertSupportedFamily(keys);
  const hints = opts.hints ?? sdwbConfigsOf(opts.metadata);

  // 1. Which text encoder, hence which family.
  const hasClip = headers.has(`${LDM_PREFIX.clip}text_model.embeddings.token_embedding.weight`);
  const hasOpenClip = headers.has(`${LDM_PREFIX.openclip}token_embedding.weight`);
  if (hasClip && hasOpenClip) throw new UnsupportedModelError('both a CLIP and an OpenCLIP text encoder: not an SD 1.x/2.x checkpoint', 'unknown');
  const unetShapes = unetFromShapes(new ShapeReader(headers, LDM_PREFIX.unet));
  const textLayout: TextEncoderLayout = hasClip ? 'clip' : hasOpenClip ? 'openclip' : unetShapes.contextDim === 1024 ? 'openclip' : 'clip';
  const family: Family = textLayout === 'openclip' ? 'sd2' : 'sd1';
  const familyName = family === 'sd1' ? 'SD 1.x' : 'SD 2.x';
  const absent: ComponentName[] = [];
  if (!hasClip && !hasOpenClip) absent.push('text_encoder');
  const hasVae = headers.has(`${LDM_PREFIX.vae}encoder.conv_in.weight`);
  if (!hasVae) absent.push('vae');

  const inChannels = unetShapes.json.in_channels as number;
  const inpainting = inChannels === 9;
  const special: Record<number, string> = { 5: 'SD 2.x depth-to-image', 7: 'SD 2.x x4 upscaler', 8: 'InstructPix2Pix' };
  if (inChannels !== 4 && inChannels !== 9) {
    const what = special[inChannels] ?? `a UNet with ${inChannels} input channels`;
    throw new UnsupportedModelError(`${what} (${inChannels} input channels): not supported yet (4: text-to-image, 9: inpainting)`, what);
  }

  // 2. Shape-derived configs, filled with the family's rules.
  const text = absent.includes('text_encoder')
    ? standardText(family)
    : textFromShapes(new ShapeReader(headers, textLayout === 'clip' ? LDM_PREFIX.clip : LDM_PREFIX.openclip), textLayout);
  const standard = isStandardSize(family, unetShapes, text.width);
  if (!standard) {
    notes.push(
      `non-standard size (block channels [${unetShapes.blockChannels.join(', ')}], text width ${text.width}): values weights cannot show ` +
        `(attention heads, GroupNorm groups, epsilons, activations) follow the ${familyName} rules; supply --config if the model was built otherwise`,
    );
  }
  const hintedPrediction = hints?.scheduler === undefined ? undefined : (hints.scheduler['prediction_type'] ?? (hints.complete ? 'epsilon' : undefined));
  const prediction = predictionFor(family, inpainting, opts, hintedPrediction);
  notes.push(prediction.note);

  const unetHeads = headsByRule(family, unetShapes.blockChannels, hints?.unetHeads);
  const derivedUnet: Json = {
    ...UNET_DEFAULTS,
    ...unetShapes.json,
    // 768-v SD 2.x models were trained at 768 px (latent 96); everything else at 512 px (latent 64).
    sample_size: family === 'sd2' && prediction.value === 'v_prediction' ? 96 : 64,
    // SD 2.1 needs float32 attention scores under fp16; harmless elsewhere (we compute in float32).
    upcast_attention: family === 'sd2' && !inpainting,
    attention_head_dim: unetHeads === undefined ? 8 : family === 'sd1' ? collapse(unetHeads) : unetHeads,
  };
  if (unetHeads === undefined && !hints?.complete && hints?.unet?.['attention_head_dim'] === undefined) {
    notes.push(`UNet attention heads cannot follow the ${familyName} rule for channels [${unetShapes.blockChannels.join(', ')}]; assumed 8 — supply --config`);
  }

  // A full OpenCLIP tower (with its projection, or ViT-H/14's 24 blocks) carries a last block SD 2.x
  // never runs; converters (diffusers', ours) drop it, so a file without those has only used blocks.
  const resblocks = text.resblocks;
  const fullOpenClip = headers.has(`${LDM_PREFIX.openclip}text_projection`) || resblocks === 24;
  const textLayers = textLayout === 'openclip' && fullOpenClip && hints?.openClipLayer !== 'last' ? resblocks - 1 : resblocks;
  if (textLayers < resblocks) {
    notes.push(`text encoder: ${textLayers} of ${resblocks} OpenCLIP layers (SD 2.x conditions on the penultimate layer; the last block is ignored, as diffusers does)`);
  }
  const textWidth = text.width;
  const textHeads = textWidth % 64 === 0 ? textWidth / 64 : undefined;
  if (textHeads === undefined && !hints?.complete && hints?.text_encoder?.['num_attention_heads'] === undefined) {
    notes.push(`text encoder heads cannot be read from weights and width ${textWidth} is not a multiple of 64; assumed 1 head — supply --config`);
  }
  const derivedText: Json = {
    ...TEXT_DEFAULTS,
    ...text.json,
    num_hidden_layers: textLayers,
    num_attention_heads: textHeads ?? 1,
    hidden_act: textLayout === 'clip' ? 'quick_gelu' : 'gelu',
    // CLIPTextModel never uses projection_dim; SD 1.x's config says 768, SD 2.x's the CLIPTextConfig default 512.
    projection_dim: textLayout === 'clip' ? textWidth : 512,
  };
  const derivedVae: Json = hasVae
    ? { ...VAE_DEFAULTS, ...vaeFromShapes(new ShapeReader(headers, LDM_PREFIX.vae)), sample_size: (derivedUnet.sample_size as number) * 8 }
    : { ...VAE_DEFAULTS, ...STANDARD_VAE, sample_size: (derivedUnet.sample_size as number) * 8 };
  if (!hasVae) notes.push('no VAE in the file (first_stage_model.*): the standard SD VAE config is assumed; load a VAE separately');
  if (absent.includes('text_encoder')) notes.push(`no text encoder in the file: the standard ${familyName} text encoder config is assumed`);
  const derivedScheduler: Json = {
    _class_name: family === 'sd1' ? 'PNDMScheduler' : 'DDIMScheduler',
    ...SD_SCHEDULE,
    clip_sample: false,
    prediction_type: prediction.value,
    set_alpha_to_one: false,
    skip_prk_steps: true,
    steps_offset: 1,
    timestep_spacing: 'leading',
    trained_betas: null,
  };

  // 3. Configs from elsewhere win over the rules; shapes still have the last word (step 4).
  const merge = (derived: Json, hinted: Json | undefined): Json => (hinted === undefined ? derived : hints?.complete ? { ...hinted } : { ...derived, ...hinted });
  const configs: DiffusersConfigs = {
    unet: merge(derivedUnet, hints?.unet),
    vae: merge(derivedVae, hints?.vae),
    text_encoder: merge(derivedText, hints?.text_encoder),
    scheduler: merge(derivedScheduler, hints?.scheduler),
  };
  (configs.scheduler as Json).prediction_type = prediction.value;
  if (hints !== undefined) notes.push(`configs ${hints.complete ? 'taken' : 'completed'} from ${hints.origin}`);

  const parsed = {
    unet: parseUnetConfig(configs.unet, `${hints?.origin ?? 'detected'} unet config`),
    vae: parseVaeConfig(configs.vae, `${hints?.origin ?? 'detected'} vae config`),
    textEncoder: parseClipTextConfig(configs.text_encoder, `${hints?.origin ?? 'detected'} text_encoder config`),
  };
  parseSchedulerConfig(configs.scheduler, `${hints?.origin ?? 'detected'} scheduler config`);
  const layout: LdmLayout = { unet: parsed.unet, vae: parsed.vae, textEncoder: { layout: textLayout, numLayers: parsed.textEncoder.numLayers } };

  // 4. Every tensor of the file against the parameters the configs imply.
  const { checks, ignored, unmapped } = checkHeaders(headers, layout, parsed, absent);
  const emaTensors = keys.filter((k) => k.startsWith(EMA_PREFIX) && k !== 'model_ema.decay' && k !== 'model_ema.num_updates').length;

  const parts = [familyName];
  if (inpainting) parts.push('inpainting');
  return {
    architecture: parts.join(' '),
    family,
    inpainting,
    textEncoderLayout: textLayout,
    tokenizer: family,
    configs,
    parsed,
    layout,
    predictionType: prediction.value,
    predictionSource: prediction.source,
    absent,
    ema: { present: emaTensors > 0, tensors: emaTensors },
    checks,
    ignored,
    unmapped,
    notes,
  };
}

/** Headers under canonical names (legacy aliases resolved), with a note when any were renamed. */
export function canonicalHeaders(headers: Headers, notes: string[] = []): Headers {
  let renamed = 0;
  const out = new Map<string, TensorHeader>();
  for (const [key, header] of headers) {
    const canonical = canonicalLdmKey(key);
    if (canonical !== key) renamed++;
    if (out.has(canonical)) throw new UnsupportedModelError(`'${key}' and another tensor both name '${canonical}'`, 'unknown');
    out.set(canonical, header);
  }
  if (renamed === 0) return headers;
  notes.push(`${renamed} text-encoder key(s) use the old naming without 'text_model.' (read as AUTOMATIC1111 does)`);
  return out;
}

/** SD's VAE (identical in 1.x and 2.x). */
const STANDARD_VAE: Json = {
  in_channels: 3,
  out_channels: 3,
  down_block_types: ['DownEncoderBlock2D', 'DownEncoderBlock2D', 'DownEncoderBlock2D', 'DownEncoderBlock2D'],
  up_block_types: ['UpDecoderBlock2D', 'UpDecoderBlock2D', 'UpDecoderBlock2D', 'UpDecoderBlock2D'],
  block_out_channels: [128, 256, 512, 512],
  layers_per_block: 2,
  latent_channels: 4,
  use_quant_conv: true,
  use_post_quant_conv: true,
  mid_block_add_attention: true,
};

function standardText(family: Family): TextShapes {
  const width = family === 'sd1' ? 768 : 1024;
  const resblocks = family === 'sd1' ? 12 : 24;
  return {
    width,
    resblocks,
    json: { vocab_size: 49408, hidden_size: width, max_position_embeddings: 77, num_hidden_layers: resblocks, intermediate_size: 4 * width },
  };
}

function checkHeaders(
  headers: Headers,
  layout: LdmLayout,
  parsed: Detection['parsed'],
  absent: readonly ComponentName[],
): Pick<Detection, 'checks' | 'ignored' | 'unmapped'> {
  const manifests: Record<ComponentName, Map<string, number[]>> = {
    unet: unetManifest(parsed.unet),
    vae: vaeManifest(parsed.vae),
    text_encoder: clipTextManifest(parsed.textEncoder),
  };
  const found: Record<ComponentName, Map<string, number[]>> = { unet: new Map(), vae: new Map(), text_encoder: new Map() };
  const unexpected: Record<ComponentName, string[]> = { unet: [], vae: [], text_encoder: [] };
  const stats: Record<ComponentName, { parameters: number; tensors: number; bytes: number; dtypes: Record<string, number> }> = {
    unet: { parameters: 0, tensors: 0, bytes: 0, dtypes: {} },
    vae: { parameters: 0, tensors: 0, bytes: 0, dtypes: {} },
    text_encoder: { parameters: 0, tensors: 0, bytes: 0, dtypes: {} },
  };
  const ignored: { key: string; reason: string }[] = [];
  const unmapped: string[] = [];
  for (const [key, header] of headers) {
    const reason = ignoredLdmKey(key, layout.textEncoder.numLayers);
    if (reason !== undefined) {
      ignored.push({ key, reason });
      continue;
    }
    const component = componentOfLdmKey(key);
    if (component === undefined) {
      unmapped.push(key);
      continue;
    }
    const s = stats[component];
    const elements = header.shape.reduce((a, b) => a * b, 1);
    s.tensors++;
    s.parameters += elements;
    s.bytes += elements * (isDType(header.dtype) ? DTYPE_BYTES[header.dtype] : 0);
    s.dtypes[header.dtype] = (s.dtypes[header.dtype] ?? 0) + 1;
    const hit = ldmToDiffusers(layout, key);
    if (hit === undefined || hit.component !== component) {
      unexpected[component].push(key);
      continue;
    }
    for (const m of hit.mapped) {
      if (!manifests[component].has(m.key)) unexpected[component].push(key);
      else found[component].set(m.key, mappedShape(header.shape, m.transform, 'foreign'));
    }
  }
  const checks = {} as Record<ComponentName, ComponentCheck>;
  for (const component of COMPONENT_NAMES) {
    const ldmName = (key: string) => diffusersToLdm(layout, component, key)?.key ?? key;
    const missing = new Set<string>();
    const wrongShape: { key: string; expected: number[]; found: number[] }[] = [];
    for (const [key, expected] of manifests[component]) {
      const got = found[component].get(key);
      if (got === undefined) {
        if (!absent.includes(component)) missing.add(ldmName(key));
      } else if (got.length !== expected.length || got.some((d, i) => d !== expected[i])) {
        const m = diffusersToLdm(layout, component, key);
        wrongShape.push({
          key: m?.key ?? key,
          expected: m ? mappedShape(expected, m.transform, 'diffusers') : expected,
          found: headers.get(m?.key ?? key)?.shape.slice() ?? got,
        });
      }
    }
    checks[component] = { missing: [...missing], unexpected: [...new Set(unexpected[component])], wrongShape, ...stats[component] };
  }
  return { checks, ignored, unmapped };
}

/** One line per problem of a detection's checks (empty when the file matches its configs). */
export function checkProblems(d: Detection): string[] {
  const out: string[] = [];
  const list = (keys: readonly string[]) => (keys.length > 3 ? `${keys.slice(0, 3).join(', ')}, … (${keys.length} in all)` : keys.join(', '));
  for (const c of COMPONENT_NAMES) {
    const ch = d.checks[c];
    if (ch.missing.length > 0) out.push(`${c}: ${ch.missing.length} parameter(s) missing: ${list(ch.missing)}`);
    if (ch.unexpected.length > 0) out.push(`${c}: ${ch.unexpected.length} tensor(s) the config does not use: ${list(ch.unexpected)}`);
    for (const w of ch.wrongShape.slice(0, 3)) out.push(`${c}: '${w.key}' has shape [${w.found.join(', ')}], the config implies [${w.expected.join(', ')}]`);
  }
  return out;
}
