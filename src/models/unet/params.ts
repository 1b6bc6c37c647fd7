/**
 * Parameter groups of the UNet, as pure predicates over diffusers keys relative to the UNet
 * (`down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight`, no `unet.` prefix).
 * Methods pick their trainable or edited parameters with these, never with ad-hoc string tests.
 */

/** A parameter group: whether a UNet key belongs to it. */
export type ParamSelector = (key: string) => boolean;

/** The module path of a parameter key (the key without its final `weight`/`bias`). */
export function modulePath(key: string): string {
  const dot = key.lastIndexOf('.');
  return dot < 0 ? '' : key.slice(0, dot);
}

/** Any parameter of a cross-attention (`attn2`) module. */
export const isCrossAttn: ParamSelector = (key) => /(^|\.)attn2\./.test(key);

/** The cross-attention key and value projections, the only layers that read the text states. */
export const isCrossAttnKV: ParamSelector = (key) => /(^|\.)attn2\.to_[kv]\./.test(key);

/** Any parameter of a self-attention (`attn1`) module. */
export const isSelfAttn: ParamSelector = (key) => /(^|\.)attn1\./.test(key);

/** The time MLP (`time_embedding.linear_1/2`; CompVis `time_embed`). */
export const isTimeEmbedding: ParamSelector = (key) => key.startsWith('time_embedding.');

/** The output head after the last up block: `conv_norm_out` and `conv_out` (CompVis `out.0`, `out.2`). */
export const isOutputHead: ParamSelector = (key) => key.startsWith('conv_norm_out.') || key.startsWith('conv_out.');

/**
 * Whether the key belongs to a normalisation layer rather than a Linear/Conv2d. In
 * UNet2DConditionModel every GroupNorm/LayerNorm module is named `norm`, `norm1`…`norm3` or
 * `conv_norm_out`; every other parameterised module is a Linear or a Conv2d.
 */
export function isNormLayer(key: string): boolean {
  const module = modulePath(key);
  const name = module.slice(module.lastIndexOf('.') + 1);
  return /^norm\d*$/.test(name) || name === 'conv_norm_out';
}

/** Linear and Conv2d weights and biases (everything that is not a norm). */
export const isLinearOrConv: ParamSelector = (key) => !isNormLayer(key);

/**
 * ESD's trainable sets in the paper's code (Gandikota et al. 2023, `train-esd.py`), defined there
 * on CompVis names and translated here: every parameter of the selected modules, norms included.
 * `noxattn` leaves out `attn2`, `time_embed` and the `out.` head; `notime` leaves out
 * `time_embed` and `out.`.
 */
export const esd2023Sets = {
  xattn: isCrossAttn,
  noxattn: (key: string) => !(isCrossAttn(key) || isTimeEmbedding(key) || isOutputHead(key)),
  selfattn: isSelfAttn,
  full: () => true,
  notime: (key: string) => !(isTimeEmbedding(key) || isOutputHead(key)),
} as const satisfies Record<string, ParamSelector>;

export type Esd2023Set = keyof typeof esd2023Sets;

/**
 * ESD's trainable sets in the later diffusers code (2024, `esd_sd.py`): only Linear/Conv2d
 * modules (weights and biases, never norms). `esd-x`: inside `attn2`; `esd-x-strict`:
 * `attn2.to_k`/`attn2.to_v`; `esd-u`: every Linear/Conv2d outside `attn2` (time embedding and
 * conv_in/conv_out included); `esd-all`: all of them.
 */
export const esd2024Sets = {
  'esd-x': (key: string) => isLinearOrConv(key) && isCrossAttn(key),
  'esd-x-strict': (key: string) => isLinearOrConv(key) && isCrossAttnKV(key),
  'esd-u': (key: string) => isLinearOrConv(key) && !isCrossAttn(key),
  'esd-all': isLinearOrConv,
} as const satisfies Record<string, ParamSelector>;

export type Esd2024Set = keyof typeof esd2024Sets;

/** The keys of `keys` a selector picks, in their given order. */
export function selectParams(keys: Iterable<string>, selector: ParamSelector): string[] {
  return [...keys].filter(selector);
}
