/**
 * The UNet's building blocks, as diffusers defines them (parameter names = its module names):
 * ResnetBlock2D, Transformer2DModel with BasicTransformerBlock, Downsample2D and Upsample2D.
 * Feature maps are NHWC throughout.
 */
import type { Ops } from '../../ops/ops.js';
import type { Scope } from '../../ops/scope.js';
import { attention, conv2d, gelu, groupNorm, layerNorm, linear, silu } from '../../ops/nn.js';

/** A module's parameter scope together with its diffusers path (what hooks are told). */
export interface Module<T> {
  readonly p: Scope<T>;
  readonly path: string;
}

/** The child module `name` of `m`. */
export function child<T>(m: Module<T>, name: string | number): Module<T> {
  const key = String(name);
  return { p: m.p.sub(key), path: m.path === '' ? key : `${m.path}.${key}` };
}

export interface AttentionContextInfo {
  /** The attention module's diffusers path, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn2`. */
  readonly path: string;
  /** Width of the context: the text-state width for attn2, the block's channels for attn1. */
  readonly width: number;
  readonly kind: 'self' | 'cross';
}

/** What the transformer blocks need beyond parameters: hooks and the attention chunk size. */
export interface AttentionRun<T> {
  /**
   * Replace the context fed to `to_k` and to `to_v` (A1111 hypernetworks transform them
   * separately, picked by context width). For self-attention the context is the normed hidden
   * states. Absent: both are the context itself.
   */
  readonly attentionContext?: (context: T, info: AttentionContextInfo) => { readonly k: T; readonly v: T };
  /** Most attention-score elements materialised at once (see {@link attention}). */
  readonly maxScoreElements?: number;
}

export interface ResnetSpec {
  readonly inCh: number;
  readonly outCh: number;
  readonly timeCh: number;
  readonly groups: number;
  readonly eps: number;
  /** The block's output is divided by this (diffusers' `output_scale_factor`; ≠ 1 only in mid blocks). */
  readonly outputScale: number;
}

/**
 * ResnetBlock2D (pre-norm, additive time conditioning):
 * out = (shortcut(x) + conv2(SiLU(GN2(conv1(SiLU(GN1(x))) + W·SiLU(temb))))) / outputScale.
 */
export function resnetBlock2D<T>(o: Ops<T>, p: Scope<T>, x: T, temb: T, c: ResnetSpec): T {
  let h = silu(o, groupNorm(o, p.sub('norm1'), x, c.inCh, c.groups, c.eps));
  h = conv2d(o, p.sub('conv1'), h, { inCh: c.inCh, outCh: c.outCh, kernel: 3 }); // [B,H,W,Co]
  const t = linear(o, p.sub('time_emb_proj'), silu(o, temb), c.timeCh, c.outCh); // [B,Co]
  h = o.add(h, o.reshape(t, [-1, 1, 1, c.outCh])); // broadcast over H, W
  h = silu(o, groupNorm(o, p.sub('norm2'), h, c.outCh, c.groups, c.eps));
  h = conv2d(o, p.sub('conv2'), h, { inCh: c.outCh, outCh: c.outCh, kernel: 3 });
  const shortcut = c.inCh === c.outCh ? x : conv2d(o, p.sub('conv_shortcut'), x, { inCh: c.inCh, outCh: c.outCh, kernel: 1 });
  const sum = o.add(shortcut, h);
  return c.outputScale === 1 ? sum : o.div(sum, c.outputScale);
}

export interface AttentionSpec {
  readonly queryDim: number;
  readonly contextDim: number;
  readonly heads: number;
}

/**
 * diffusers' `Attention` with `AttnProcessor`: to_q / to_k / to_v (no bias), multi-head
 * softmax(q kᵀ/√d_head) v, then to_out.0 (with bias). `context` = undefined means self-attention.
 */
export function attentionModule<T>(o: Ops<T>, m: Module<T>, x: T, context: T | undefined, c: AttentionSpec, run: AttentionRun<T>): T {
  const inner = c.queryDim;
  const kind = context === undefined ? 'self' : 'cross';
  const ctx = context ?? x;
  const ctxDim = context === undefined ? c.queryDim : c.contextDim;
  const kv = run.attentionContext?.(ctx, { path: m.path, width: ctxDim, kind }) ?? { k: ctx, v: ctx };
  const q = linear(o, m.p.sub('to_q'), x, c.queryDim, inner, false); // [B,Sq,C]
  const k = linear(o, m.p.sub('to_k'), kv.k, ctxDim, inner, false); // [B,Sk,C]
  const v = linear(o, m.p.sub('to_v'), kv.v, ctxDim, inner, false); // [B,Sk,C]
  const out = attention(o, q, k, v, { heads: c.heads, maxScoreElements: run.maxScoreElements }); // [B,Sq,C]
  return linear(o, m.p.sub('to_out').sub('0'), out, inner, c.queryDim);
}

/** FeedForward with GEGLU: net.0.proj → [h | gate] → h·GELU(gate) → net.2 (inner width 4·dim). */
export function feedForwardGeglu<T>(o: Ops<T>, p: Scope<T>, x: T, dim: number): T {
  const inner = dim * 4;
  const projected = linear(o, p.sub('net').sub('0').sub('proj'), x, dim, 2 * inner); // [B,S,2·inner]
  const h = o.slice(projected, [0, 0, 0], [-1, -1, inner]);
  const gate = o.slice(projected, [0, 0, inner], [-1, -1, inner]);
  return linear(o, p.sub('net').sub('2'), o.mul(h, gelu(o, gate)), inner, dim);
}

export interface TransformerBlockSpec {
  readonly dim: number;
  readonly heads: number;
  readonly contextDim: number;
}

/** BasicTransformerBlock: x += attn1(LN1 x); x += attn2(LN2 x, context); x += ff(LN3 x). */
export function basicTransformerBlock<T>(o: Ops<T>, m: Module<T>, x: T, context: T, c: TransformerBlockSpec, run: AttentionRun<T>): T {
  const spec: AttentionSpec = { queryDim: c.dim, contextDim: c.contextDim, heads: c.heads };
  const eps = 1e-5; // BasicTransformerBlock's LayerNorm default `norm_eps`
  let h = o.add(attentionModule(o, child(m, 'attn1'), layerNorm(o, m.p.sub('norm1'), x, c.dim, eps), undefined, spec, run), x);
  h = o.add(attentionModule(o, child(m, 'attn2'), layerNorm(o, m.p.sub('norm2'), h, c.dim, eps), context, spec, run), h);
  return o.add(feedForwardGeglu(o, m.p.sub('ff'), layerNorm(o, m.p.sub('norm3'), h, c.dim, eps), c.dim), h);
}

export interface Transformer2DSpec {
  readonly channels: number;
  readonly heads: number;
  /** Number of BasicTransformerBlocks. */
  readonly depth: number;
  readonly contextDim: number;
  readonly groups: number;
  /** proj_in/proj_out as Linear [C, C] (SD 2.x) instead of 1×1 convolutions. */
  readonly linearProjection: boolean;
}

/**
 * Transformer2DModel on continuous input: GroupNorm (eps 1e-6, fixed in diffusers) → proj_in →
 * tokens → transformer blocks → proj_out → + residual.
 */
export function transformer2D<T>(o: Ops<T>, m: Module<T>, x: T, context: T, c: Transformer2DSpec, run: AttentionRun<T>): T {
  const [b, hgt, wid] = o.shape(x) as [number, number, number, number];
  const ch = c.channels;
  const normed = groupNorm(o, m.p.sub('norm'), x, ch, c.groups, 1e-6);
  const project = (name: string, t: T): T =>
    c.linearProjection ? linear(o, m.p.sub(name), t, ch, ch) : conv2d(o, m.p.sub(name), t, { inCh: ch, outCh: ch, kernel: 1 });
  // NHWC flattens to tokens without a transpose; a 1×1 conv equals the same Linear on tokens.
  let h = o.reshape(project('proj_in', normed), [b, hgt * wid, ch]); // [B,HW,C]
  const blocks = child(m, 'transformer_blocks');
  for (let i = 0; i < c.depth; i++) {
    h = basicTransformerBlock(o, child(blocks, i), h, context, { dim: ch, heads: c.heads, contextDim: c.contextDim }, run);
  }
  const out = project('proj_out', o.reshape(h, [b, hgt, wid, ch])); // [B,H,W,C]
  return o.add(out, x);
}

/** Downsample2D: 3×3 conv, stride 2; padding 0 pads only bottom/right by one first (diffusers' F.pad (0,1,0,1)). */
export function downsample2D<T>(o: Ops<T>, p: Scope<T>, x: T, channels: number, padding: 0 | 1): T {
  const w = p.param('weight', [3, 3, channels, channels]);
  const pad = padding === 1 ? ([1, 1, 1, 1] as const) : ([0, 1, 0, 1] as const);
  return o.add(o.conv2d(x, w, { stride: 2, pad }), p.param('bias', [channels]));
}

/** Upsample2D: nearest-neighbour 2× then a 3×3 conv. */
export function upsample2D<T>(o: Ops<T>, p: Scope<T>, x: T, channels: number): T {
  return conv2d(o, p, o.upsampleNearest2x(x), { inCh: channels, outCh: channels, kernel: 3 });
}
