/**
 * diffusers' AutoencoderKL (the SD VAE of Rombach et al. 2022), written once over {@link Ops}.
 * Parameter keys are diffusers' state-dict keys relative to the VAE (`encoder.conv_in.weight`,
 * `decoder.mid_block.attentions.0.to_q.weight`, `quant_conv.weight`, …); images and latents are
 * NHWC.
 *
 * Encoder: conv_in → down blocks (resnets, then a stride-2 conv except at the last level) → mid
 * block (resnet, single-head self-attention, resnet) → GroupNorm, SiLU → conv_out → quant_conv:
 * the moments [mean | log σ²] of a diagonal Gaussian posterior q(z|x). Decoder: post_quant_conv →
 * conv_in → mid block → up blocks (layers + 1 resnets, then 2× nearest upsampling and a conv
 * except at the last level) → GroupNorm, SiLU → conv_out.
 */
import type { Ops } from '../../ops/ops.js';
import type { Scope } from '../../ops/scope.js';
import { attention, conv2d, groupNorm, linear, silu } from '../../ops/nn.js';
import { roundHalfEven } from '../../schedulers/tables.js';
import { downsample2D, upsample2D } from '../unet/blocks.js';
import type { VaeConfig } from './config.js';

/** GroupNorm ε of every VAE norm layer (fixed in diffusers' Encoder/Decoder). */
const NORM_EPS = 1e-6;

/** Bounds diffusers clamps log σ² to before exponentiating (DiagonalGaussianDistribution). */
const LOGVAR_MIN = -30;
const LOGVAR_MAX = 20;

// =============================================================================================
// Parameter names

const DEPRECATED_ATTENTION_NAMES: Readonly<Record<string, string>> = {
  query: 'to_q',
  key: 'to_k',
  value: 'to_v',
  proj_attn: 'to_out.0',
};

/**
 * diffusers before 0.14 saved the VAE's mid-block attention as `query`/`key`/`value`/`proj_attn`
 * (AttentionBlock); it now uses `to_q`/`to_k`/`to_v`/`to_out.0` and converts old checkpoints at
 * load (`_convert_deprecated_attention_blocks`). Pass this as the loader's `rename` to read both;
 * every other key is returned unchanged.
 */
export function renameDeprecatedVaeAttentionKey(key: string): string {
  const m = /^(.*\bmid_block\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$/.exec(key);
  return m === null ? key : `${m[1]}${DEPRECATED_ATTENTION_NAMES[m[2]!]}.${m[3]}`;
}

// =============================================================================================
// Blocks

/** ResnetBlock2D without time conditioning: x + conv2(SiLU(GN(conv1(SiLU(GN(x)))))) (1×1 shortcut if widths differ). */
function resnet<T>(o: Ops<T>, p: Scope<T>, x: T, inCh: number, outCh: number, groups: number): T {
  let h = silu(o, groupNorm(o, p.sub('norm1'), x, inCh, groups, NORM_EPS));
  h = conv2d(o, p.sub('conv1'), h, { inCh, outCh, kernel: 3 });
  h = silu(o, groupNorm(o, p.sub('norm2'), h, outCh, groups, NORM_EPS));
  h = conv2d(o, p.sub('conv2'), h, { inCh: outCh, outCh, kernel: 3 });
  const shortcut = inCh === outCh ? x : conv2d(o, p.sub('conv_shortcut'), x, { inCh, outCh, kernel: 1 });
  return o.add(shortcut, h);
}

/** The mid block's `Attention`: GroupNorm → to_q/k/v → one head over all H·W positions → to_out.0 → + x. */
function selfAttention<T>(o: Ops<T>, p: Scope<T>, x: T, ch: number, groups: number): T {
  const [b, h, w] = o.shape(x) as [number, number, number, number];
  // NHWC flattens to tokens without a transpose.
  const tokens = o.reshape(groupNorm(o, p.sub('group_norm'), x, ch, groups, NORM_EPS), [b, h * w, ch]); // [B,HW,C]
  const q = linear(o, p.sub('to_q'), tokens, ch, ch);
  const k = linear(o, p.sub('to_k'), tokens, ch, ch);
  const v = linear(o, p.sub('to_v'), tokens, ch, ch);
  const out = linear(o, p.sub('to_out').sub('0'), attention(o, q, k, v, { heads: 1 }), ch, ch); // [B,HW,C]
  return o.add(o.reshape(out, [b, h, w, ch]), x);
}

/** UNetMidBlock2D without time conditioning: resnet, (attention, resnet). */
function midBlock<T>(o: Ops<T>, p: Scope<T>, x: T, ch: number, cfg: VaeConfig): T {
  const resnets = p.sub('resnets');
  let h = resnet(o, resnets.sub('0'), x, ch, ch, cfg.groups);
  if (cfg.midBlockAttention) h = selfAttention(o, p.sub('attentions').sub('0'), h, ch, cfg.groups);
  return resnet(o, resnets.sub('1'), h, ch, ch, cfg.groups);
}

/** GroupNorm → SiLU → 3×3 conv, the head of both encoder and decoder. */
function outputHead<T>(o: Ops<T>, p: Scope<T>, x: T, inCh: number, outCh: number, groups: number): T {
  const h = silu(o, groupNorm(o, p.sub('conv_norm_out'), x, inCh, groups, NORM_EPS));
  return conv2d(o, p.sub('conv_out'), h, { inCh, outCh, kernel: 3 });
}

/** 1×1 convolution (quant_conv / post_quant_conv). */
function pointwise<T>(o: Ops<T>, p: Scope<T>, x: T, ch: number): T {
  return conv2d(o, p, x, { inCh: ch, outCh: ch, kernel: 1 });
}

// =============================================================================================
// Encoder, posterior, decoder

/** The encoder: image NHWC [B,H,W,3] in [-1, 1] → [B,H/f,W/f,2·latent] (before quant_conv). */
export function vaeEncoder<T>(o: Ops<T>, p: Scope<T>, image: T, cfg: VaeConfig): T {
  const ch = cfg.blockChannels;
  const levels = ch.length;
  // 1. Stem.
  let h = conv2d(o, p.sub('conv_in'), image, { inCh: cfg.imageChannels, outCh: ch[0]!, kernel: 3 });
  // 2. Down blocks: resnets, then (except at the last level) a stride-2 conv padded bottom/right only.
  let inCh = ch[0]!;
  for (let level = 0; level < levels; level++) {
    const block = p.sub('down_blocks').sub(String(level));
    const outCh = ch[level]!;
    for (let j = 0; j < cfg.layersPerBlock; j++) {
      h = resnet(o, block.sub('resnets').sub(String(j)), h, j === 0 ? inCh : outCh, outCh, cfg.groups);
    }
    if (level < levels - 1) h = downsample2D(o, block.sub('downsamplers').sub('0').sub('conv'), h, outCh, 0);
    inCh = outCh;
  }
  // 3. Mid block and head.
  const top = ch[levels - 1]!;
  h = midBlock(o, p.sub('mid_block'), h, top, cfg);
  return outputHead(o, p, h, top, 2 * cfg.latentChannels, cfg.groups);
}

/** The diagonal Gaussian posterior q(z|x) = N(mean, σ²), all NHWC [B,h,w,latent]. */
export interface Posterior<T> {
  /** quant_conv(encoder(x)): [mean | raw log σ²] along channels, [B,h,w,2·latent]. */
  readonly moments: T;
  readonly mean: T;
  /** log σ² clamped to [-30, 20]. */
  readonly logvar: T;
  /** σ = exp(log σ² / 2). */
  readonly std: T;
}

/** Encode an image NHWC [B,H,W,3] in [-1, 1] to its latent posterior (diffusers' `vae.encode(x).latent_dist`). */
export function vaeEncode<T>(o: Ops<T>, p: Scope<T>, image: T, cfg: VaeConfig): Posterior<T> {
  const h = vaeEncoder(o, p.sub('encoder'), image, cfg);
  const moments = cfg.useQuantConv ? pointwise(o, p.sub('quant_conv'), h, 2 * cfg.latentChannels) : h;
  const lc = cfg.latentChannels;
  const mean = o.slice(moments, [0, 0, 0, 0], [-1, -1, -1, lc]);
  const logvar = o.clip(o.slice(moments, [0, 0, 0, lc], [-1, -1, -1, lc]), LOGVAR_MIN, LOGVAR_MAX);
  return { moments, mean, logvar, std: o.exp(o.mul(logvar, 0.5)) };
}

/** z = mean + σ·ε, a sample of the posterior for caller-supplied ε ~ N(0, I) (unscaled latents). */
export function samplePosterior<T>(o: Ops<T>, posterior: Pick<Posterior<T>, 'mean' | 'std'>, eps: T): T {
  return o.add(posterior.mean, o.mul(posterior.std, eps));
}

/** VAE latents → the UNet's latents: (z − shift)·scale (LDM §4.3.2). */
export function scaleLatents<T>(o: Ops<T>, z: T, cfg: VaeConfig): T {
  return o.mul(cfg.shiftFactor === 0 ? z : o.sub(z, cfg.shiftFactor), cfg.scalingFactor);
}

/** The UNet's latents → VAE latents: z/scale + shift (division, as diffusers' pipelines). */
export function unscaleLatents<T>(o: Ops<T>, latents: T, cfg: VaeConfig): T {
  const z = o.div(latents, cfg.scalingFactor);
  return cfg.shiftFactor === 0 ? z : o.add(z, cfg.shiftFactor);
}

/** The decoder: z NHWC [B,h,w,latent] (after post_quant_conv) → image [B,h·f,w·f,3]. */
export function vaeDecoder<T>(o: Ops<T>, p: Scope<T>, z: T, cfg: VaeConfig): T {
  const reversed = [...cfg.blockChannels].reverse();
  const levels = reversed.length;
  // 1. Stem and mid block at the lowest resolution.
  let h = conv2d(o, p.sub('conv_in'), z, { inCh: cfg.latentChannels, outCh: reversed[0]!, kernel: 3 });
  h = midBlock(o, p.sub('mid_block'), h, reversed[0]!, cfg);
  // 2. Up blocks: layers + 1 resnets, then (except at the last level) 2× nearest upsampling + conv.
  let inCh = reversed[0]!;
  for (let level = 0; level < levels; level++) {
    const block = p.sub('up_blocks').sub(String(level));
    const outCh = reversed[level]!;
    for (let j = 0; j <= cfg.layersPerBlock; j++) {
      h = resnet(o, block.sub('resnets').sub(String(j)), h, j === 0 ? inCh : outCh, outCh, cfg.groups);
    }
    if (level < levels - 1) h = upsample2D(o, block.sub('upsamplers').sub('0').sub('conv'), h, outCh);
    inCh = outCh;
  }
  // 3. Head.
  return outputHead(o, p, h, reversed[levels - 1]!, cfg.outputChannels, cfg.groups);
}

/** Decode unscaled latents z NHWC [B,h,w,latent] to an image, raw (≈ [-1, 1], not clamped). */
export function vaeDecode<T>(o: Ops<T>, p: Scope<T>, z: T, cfg: VaeConfig): T {
  const h = cfg.usePostQuantConv ? pointwise(o, p.sub('post_quant_conv'), z, cfg.latentChannels) : z;
  return vaeDecoder(o, p.sub('decoder'), h, cfg);
}

// =============================================================================================
// Tiled decoding (diffusers' `AutoencoderKL.tiled_decode`)

export interface TileOptions {
  /** Latent tile side (default: the config's sample size / f, 64 for SD 1.x). */
  readonly tileLatent?: number;
  /** Fraction of a tile shared with its neighbour (default 0.25). */
  readonly overlap?: number;
}

/** Where tiles start and how decoded tiles are blended and cropped, in latent and image pixels. */
export interface TileGeometry {
  readonly tileLatent: number;
  /** Latent distance between tile origins: ⌊tile·(1 − overlap)⌋. */
  readonly strideLatent: number;
  /** Image rows/columns blended linearly between neighbours: ⌊tile·f·overlap⌋. */
  readonly blendPixels: number;
  /** Image rows/columns kept of each blended tile: tile·f − blend. */
  readonly keepPixels: number;
}

/** The tiling diffusers uses for this VAE. */
export function tileGeometry(cfg: VaeConfig, opts: TileOptions = {}): TileGeometry {
  const tileLatent = opts.tileLatent ?? Math.trunc(cfg.sampleSize / cfg.downscale);
  const overlap = opts.overlap ?? 0.25;
  const tileSample = tileLatent * cfg.downscale;
  const strideLatent = Math.trunc(tileLatent * (1 - overlap));
  const blendPixels = Math.trunc(tileSample * overlap);
  if (!(strideLatent >= 1) || !(overlap >= 0 && overlap < 1)) {
    throw new Error(`tiled decoding: a ${tileLatent}-latent tile with overlap ${overlap} does not advance`);
  }
  return { tileLatent, strideLatent, blendPixels, keepPixels: tileSample - blendPixels };
}

/**
 * Decode with diffusers' tiling when the latents exceed one tile (as `enable_tiling()`), otherwise
 * in one pass. Tiles are decoded independently, so GroupNorm statistics and the mid-block
 * attention see one tile each: the result differs from untiled decoding everywhere, not only at
 * the seams — tiling trades exactness for memory.
 */
export function vaeDecodeTiled<T>(o: Ops<T>, p: Scope<T>, z: T, cfg: VaeConfig, opts: TileOptions = {}): T {
  const geometry = tileGeometry(cfg, opts);
  const [, h, w] = o.shape(z) as [number, number, number, number];
  if (h <= geometry.tileLatent && w <= geometry.tileLatent) return vaeDecode(o, p, z, cfg);
  return decodeInTiles(o, z, (tile) => vaeDecode(o, p, tile, cfg), geometry);
}

/**
 * The tiling itself, for any per-tile decoder: overlapping latent tiles in raster order, each
 * decoded tile blended with its already-blended upper and left neighbours over `blendPixels`
 * (weight y/blend for the new tile), cropped to `keepPixels`, and the crops concatenated.
 */
export function decodeInTiles<T>(o: Ops<T>, z: T, decodeTile: (tile: T) => T, g: TileGeometry): T {
  const [, h, w] = o.shape(z) as [number, number, number, number];
  const origins = (size: number) => Array.from({ length: Math.ceil(size / g.strideLatent) }, (_, k) => k * g.strideLatent);
  // 1. Decode every tile.
  const rows = origins(h).map((top) =>
    origins(w).map((left) =>
      decodeTile(o.slice(z, [0, top, left, 0], [-1, Math.min(g.tileLatent, h - top), Math.min(g.tileLatent, w - left), -1])),
    ),
  );
  // 2. Blend with the neighbours above and to the left, in raster order (each blend sees final neighbours).
  for (let i = 0; i < rows.length; i++) {
    const row = rows[i]!;
    for (let j = 0; j < row.length; j++) {
      let tile: T = row[j]!;
      if (i > 0) tile = blendEdge(o, rows[i - 1]![j]!, tile, 1, g.blendPixels);
      if (j > 0) tile = blendEdge(o, row[j - 1]!, tile, 2, g.blendPixels);
      row[j] = tile;
    }
  }
  // 3. Crop each tile and assemble.
  const crop = (t: T) => {
    const [, th, tw] = o.shape(t) as [number, number, number, number];
    return o.slice(t, [0, 0, 0, 0], [-1, Math.min(th, g.keepPixels), Math.min(tw, g.keepPixels), -1]);
  };
  return o.concat(
    rows.map((row) => o.concat(row.map(crop), 2)),
    1,
  );
}

/**
 * `next` with its first rows (axis 1) or columns (axis 2) replaced by a linear blend with the last
 * ones of `before`: before·(1 − k/n) + next·(k/n) for k < n (diffusers' blend_v / blend_h).
 */
function blendEdge<T>(o: Ops<T>, before: T, next: T, axis: 1 | 2, blend: number): T {
  const sizeBefore = o.shape(before)[axis]!;
  const sizeNext = o.shape(next)[axis]!;
  const n = Math.min(sizeBefore, sizeNext, blend);
  if (n === 0) return next;
  const along = (start: number, size: number) => {
    const begin = [0, 0, 0, 0];
    const extent = [-1, -1, -1, -1];
    begin[axis] = start;
    extent[axis] = size;
    return { begin, extent };
  };
  const weightShape = axis === 1 ? [1, n, 1, 1] : [1, 1, n, 1];
  const ramp = Array.from({ length: n }, (_, k) => k / n);
  const tail = along(sizeBefore - n, n);
  const head = along(0, n);
  const blended = o.add(
    o.mul(o.slice(before, tail.begin, tail.extent), o.constant(ramp.map((r) => 1 - r), weightShape)),
    o.mul(o.slice(next, head.begin, head.extent), o.constant(ramp, weightShape)),
  );
  if (n === sizeNext) return blended;
  const rest = along(n, -1);
  return o.concat([blended, o.slice(next, rest.begin, rest.extent)], axis);
}

// =============================================================================================
// Images ↔ tensors (diffusers' VaeImageProcessor)

/** An 8-bit image, pixels row-major with interleaved channels (RGB: channels = 3). */
export interface Image8 {
  readonly width: number;
  readonly height: number;
  readonly channels: number;
  readonly data: Uint8Array;
}

/** Images → float32 NHWC in [-1, 1]: 2·(u/255) − 1 in float32, as VaeImageProcessor.preprocess. */
export function imageToTensor(images: readonly Image8[]): { data: Float32Array; shape: [number, number, number, number] } {
  const first = images[0];
  if (first === undefined) throw new Error('imageToTensor: no images');
  const { width, height, channels } = first;
  const size = width * height * channels;
  const data = new Float32Array(images.length * size);
  images.forEach((img, n) => {
    if (img.width !== width || img.height !== height || img.channels !== channels || img.data.length !== size) {
      throw new Error(
        `imageToTensor: image ${n} is ${img.width}×${img.height}×${img.channels} (${img.data.length} bytes), image 0 is ${width}×${height}×${channels}`,
      );
    }
    for (let i = 0; i < size; i++) data[n * size + i] = Math.fround(Math.fround(2 * Math.fround(img.data[i]! / 255)) - 1);
  });
  return { data, shape: [images.length, height, width, channels] };
}

/** A decoded image in [-1, 1] → [0, 1]: (x/2 + 0.5) clamped, float32 (diffusers' output_type 'pt'/'np'). */
export function denormalize(x: number): number {
  return Math.min(1, Math.max(0, Math.fround(Math.fround(x / 2) + 0.5)));
}

/**
 * Decoded float32 NHWC in [-1, 1] → 8-bit images: (x/2 + 0.5) clamped to [0, 1], ×255 in float32,
 * rounded half to even (numpy), as VaeImageProcessor.postprocess(output_type='pil').
 */
export function tensorToImage(data: Float32Array, shape: readonly [number, number, number, number]): Image8[] {
  const [n, height, width, channels] = shape;
  const size = height * width * channels;
  if (data.length !== n * size) throw new Error(`tensorToImage: ${data.length} values for shape [${shape.join(', ')}]`);
  return Array.from({ length: n }, (_, b) => {
    const pixels = new Uint8Array(size);
    for (let i = 0; i < size; i++) pixels[i] = roundHalfEven(Math.fround(denormalize(data[b * size + i]!) * 255));
    return { width, height, channels, data: pixels };
  });
}
