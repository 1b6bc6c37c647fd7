/**
 * Shared inputs for the single-file tests: the SD 1.5 manifest, the public SD 2.1 / OpenCLIP
 * ViT-H configs, an SD 2.x manifest in LDM naming written from OpenCLIP's and LDM's public
 * structure (independently of the keymaps under test), and header-only safetensors files.
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { SHARED } from '../helpers/fixtures.js';

export const MANIFEST_SD15 = path.join(SHARED, 'fixtures/manifests/sd15.json');
export const TINY_SINGLE = path.join(SHARED, 'fixtures/tiny-sd-single-file/tiny-sd.safetensors');
export const TINY_MAPPING = path.join(SHARED, 'fixtures/tiny-sd-single-file/mapping.json');

export interface ManifestTensor {
  readonly diffusers: string;
  readonly shape: number[];
  readonly ldm: string;
  readonly ldm_shape?: number[];
}
export interface ManifestComponent {
  readonly diffusers_config: Record<string, unknown>;
  readonly ldm_prefix: string;
  readonly tensors: ManifestTensor[];
  readonly ldm_tensors: { name: string; shape: number[] }[] | Record<string, number[]>;
}
export interface Sd15Manifest {
  readonly components: Record<'unet' | 'vae' | 'text_encoder', ManifestComponent>;
  readonly ldm_only_keys: { ldm: string; shape: number[]; dtype: string }[];
}

let sd15: Promise<Sd15Manifest> | undefined;
/** The SD 1.5 manifest (parsed once per test file). */
export function loadSd15(): Promise<Sd15Manifest> {
  sd15 ??= fs.readFile(MANIFEST_SD15, 'utf8').then((t) => JSON.parse(t) as Sd15Manifest);
  return sd15;
}

/** stabilityai/stable-diffusion-2-1 `unet/config.json` (public). */
export const SD21_UNET_CONFIG = {
  _class_name: 'UNet2DConditionModel',
  act_fn: 'silu',
  attention_head_dim: [5, 10, 20, 20],
  block_out_channels: [320, 640, 1280, 1280],
  center_input_sample: false,
  cross_attention_dim: 1024,
  down_block_types: ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
  downsample_padding: 1,
  dual_cross_attention: false,
  flip_sin_to_cos: true,
  freq_shift: 0,
  in_channels: 4,
  layers_per_block: 2,
  mid_block_scale_factor: 1,
  norm_eps: 1e-5,
  norm_num_groups: 32,
  num_class_embeds: null,
  only_cross_attention: false,
  out_channels: 4,
  sample_size: 96,
  up_block_types: ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'],
  upcast_attention: true,
  use_linear_projection: true,
};

/** stabilityai/stable-diffusion-2-1 `text_encoder/config.json` (public): OpenCLIP ViT-H/14's text tower, 23 of 24 layers. */
export const SD2_TEXT_CONFIG = {
  architectures: ['CLIPTextModel'],
  bos_token_id: 0,
  eos_token_id: 2,
  hidden_act: 'gelu',
  hidden_size: 1024,
  intermediate_size: 4096,
  layer_norm_eps: 1e-5,
  max_position_embeddings: 77,
  model_type: 'clip_text_model',
  num_attention_heads: 16,
  num_hidden_layers: 23,
  pad_token_id: 1,
  projection_dim: 512,
  vocab_size: 49408,
};

/** Name → shape of an SD 1.5 component in LDM naming, from the manifest. */
export async function sd15LdmShapes(component: 'unet' | 'vae' | 'text_encoder'): Promise<Map<string, number[]>> {
  const c = (await loadSd15()).components[component];
  return new Map(c.tensors.map((t) => [t.ldm, t.ldm_shape ?? t.shape]));
}

/**
 * SD 2.x (v2-1_768 layout) in LDM naming, written from the public structure: the UNet is SD 1.5's
 * LDM UNet with Linear proj_in/proj_out ([C, C]) and a 1024-wide context; the VAE is SD 1.5's; the
 * text encoder is the OpenCLIP ViT-H/14 text tower (width 1024, 24 resblocks, MLP 4096,
 * vocabulary 49408, 77 positions) with its projection and temperature.
 */
export async function sd2LdmShapes(): Promise<Map<string, number[]>> {
  const out = new Map<string, number[]>();
  for (const [k, s] of await sd15LdmShapes('unet')) {
    if (/\.(proj_in|proj_out)\.weight$/.test(k)) out.set(k, [s[0]!, s[1]!]);
    else if (/attn2\.to_[kv]\.weight$/.test(k)) out.set(k, [s[0]!, 1024]);
    else out.set(k, s);
  }
  for (const [k, s] of await sd15LdmShapes('vae')) out.set(k, s);
  const p = 'cond_stage_model.model.';
  const w = 1024;
  out.set(`${p}token_embedding.weight`, [49408, w]);
  out.set(`${p}positional_embedding`, [77, w]);
  out.set(`${p}ln_final.weight`, [w]);
  out.set(`${p}ln_final.bias`, [w]);
  out.set(`${p}text_projection`, [w, w]);
  out.set(`${p}logit_scale`, []);
  for (let i = 0; i < 24; i++) {
    const b = `${p}transformer.resblocks.${i}.`;
    out.set(`${b}ln_1.weight`, [w]);
    out.set(`${b}ln_1.bias`, [w]);
    out.set(`${b}attn.in_proj_weight`, [3 * w, w]);
    out.set(`${b}attn.in_proj_bias`, [3 * w]);
    out.set(`${b}attn.out_proj.weight`, [w, w]);
    out.set(`${b}attn.out_proj.bias`, [w]);
    out.set(`${b}ln_2.weight`, [w]);
    out.set(`${b}ln_2.bias`, [w]);
    out.set(`${b}mlp.c_fc.weight`, [4 * w, w]);
    out.set(`${b}mlp.c_fc.bias`, [4 * w]);
    out.set(`${b}mlp.c_proj.weight`, [w, 4 * w]);
    out.set(`${b}mlp.c_proj.bias`, [w]);
  }
  return out;
}

/** Header entries (name → dtype, shape) as a file of that layout would list them. */
export function headersOf(shapes: ReadonlyMap<string, readonly number[]>, dtype = 'F16'): Map<string, { dtype: string; shape: number[] }> {
  return new Map([...shapes].map(([k, s]) => [k, { dtype, shape: [...s] }]));
}

const BYTES: Record<string, number> = { F16: 2, BF16: 2, F32: 4, I64: 8 };

/**
 * A safetensors file with these headers whose data section is a hole (sparse, all zeros): a
 * full-size SD checkpoint in a few hundred kilobytes of disk, for header-only code paths.
 */
export async function writeSparseSafetensors(
  file: string,
  headers: ReadonlyMap<string, { dtype: string; shape: readonly number[] }>,
  metadata?: Record<string, string>,
): Promise<void> {
  const json: Record<string, unknown> = {};
  if (metadata) json.__metadata__ = metadata;
  let offset = 0;
  for (const [name, { dtype, shape }] of headers) {
    const bytes = shape.reduce((a, b) => a * b, 1) * BYTES[dtype]!;
    json[name] = { dtype, shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let text = JSON.stringify(json);
  text += ' '.repeat((8 - (text.length % 8)) % 8);
  const head = Buffer.alloc(8 + Buffer.byteLength(text));
  head.writeBigUInt64LE(BigInt(Buffer.byteLength(text)), 0);
  head.write(text, 8);
  await fs.writeFile(file, head);
  await fs.truncate(file, head.length + offset);
}
