/**
 * OpenCLIP text tower names (SD 2.x: LDM's `FrozenOpenCLIPEmbedder` keeps the whole OpenCLIP
 * `CLIP` model minus `visual` as `cond_stage_model.model`) ↔ transformers' `CLIPTextModel` names.
 *
 * OpenCLIP's `nn.MultiheadAttention` stores q, k and v fused as `in_proj_weight` [3·W, W] and
 * `in_proj_bias` [3·W] (rows q, then k, then v); transformers keeps three Linear layers. The
 * OpenCLIP keys with no CLIPTextModel counterpart (`text_projection`, `logit_scale`, and the last
 * resblock, which SD 2.x never runs) are listed by `ldm-keys.ts` as ignored, not mapped.
 */
import { split, type InnerRow, type Keymap, type Row } from './apply.js';

const RESBLOCK: readonly InnerRow[] = [
  ['layer_norm1.', 'ln_1.'],
  ['layer_norm2.', 'ln_2.'],
  ['mlp.fc1.', 'mlp.c_fc.'],
  ['mlp.fc2.', 'mlp.c_proj.'],
  ['self_attn.out_proj.', 'attn.out_proj.'],
  ['self_attn.q_proj.weight', 'attn.in_proj_weight', split(0, 3)],
  ['self_attn.k_proj.weight', 'attn.in_proj_weight', split(1, 3)],
  ['self_attn.v_proj.weight', 'attn.in_proj_weight', split(2, 3)],
  ['self_attn.q_proj.bias', 'attn.in_proj_bias', split(0, 3)],
  ['self_attn.k_proj.bias', 'attn.in_proj_bias', split(1, 3)],
  ['self_attn.v_proj.bias', 'attn.in_proj_bias', split(2, 3)],
];

const TOP: readonly Row[] = [
  ['text_model.embeddings.token_embedding.weight', 'token_embedding.weight'],
  ['text_model.embeddings.position_embedding.weight', 'positional_embedding'],
  ['text_model.final_layer_norm.', 'ln_final.'],
];

/** The OpenCLIP ↔ transformers keymap for a text encoder of `layers` layers (OpenCLIP names without `cond_stage_model.model.`). */
export function openClipKeymap(layers: number): Keymap {
  const blocks: Row[] = [];
  for (let i = 0; i < layers; i++) blocks.push([`text_model.encoder.layers.${i}.`, `transformer.resblocks.${i}.`]);
  return { name: 'OpenCLIP text encoder', sections: [{ modules: TOP }, { modules: blocks, inner: RESBLOCK }] };
}
