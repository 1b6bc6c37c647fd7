/**
 * diffusers' UNet2DConditionModel (SD 1.x / 2.x layouts), written once over {@link Ops}.
 * Parameter keys are diffusers' state-dict keys relative to the UNet (`conv_in.weight`, …).
 */
import type { Ops } from '../../ops/ops.js';
import { ManifestScope, type Scope } from '../../ops/scope.js';
import { shapeOps, type ShapeOnly } from '../../ops/shape-ops.js';
import { conv2d, groupNorm, silu } from '../../ops/nn.js';
import {
  child,
  downsample2D,
  resnetBlock2D,
  transformer2D,
  upsample2D,
  type AttentionContextInfo,
  type AttentionRun,
  type Module,
} from './blocks.js';
import type { UnetConfig } from './config.js';
import { timeEmbedding, timestepFeatures } from './embeddings.js';

export type { AttentionContextInfo } from './blocks.js';

/** Optional taps into a UNet forward, for methods (hypernetworks) and parity tests. */
export interface UnetHooks<T> {
  /** Replace the context fed to to_k and to_v of every attention (self and cross); see {@link AttentionRun}. */
  readonly attentionContext?: (context: T, info: AttentionContextInfo) => { readonly k: T; readonly v: T };
  /**
   * Filled with module outputs by diffusers path: `time_proj`, `time_embedding`, `conv_in`,
   * `down_blocks.i` (hidden states only), `mid_block`, `up_blocks.i`, `conv_norm_out`, `conv_out`.
   */
  readonly intermediates?: Map<string, T>;
}

export interface UnetOptions<T = unknown> {
  /**
   * Most attention-score elements (B·heads·Sq·Sk) computed at once; longer queries are chunked.
   * The default (2²⁴) keeps 64×64-latent self-attention (4,096 tokens) to 64 MB of scores per chunk.
   */
  readonly maxScoreElements?: number;
  /**
   * Wraps every ResnetBlock2D and Transformer2DModel call, told the block's diffusers path; must
   * return `run(inputs)`'s value. Inputs are [hidden, temb] (ResNet) or [hidden, context]
   * (transformer), the only tensors a block reads besides its parameters, so a wrapper can
   * recompute the block in the backward pass (gradient checkpointing, `src/train/checkpointing.ts`).
   */
  readonly wrapBlock?: (path: string, run: (inputs: readonly T[]) => T, inputs: readonly T[]) => T;
}

/**
 * The UNet's ε (or v) prediction: sample NHWC [B,H,W,Cin], float32 timesteps [B] (may be
 * fractional), text states [B,S,D] → NHWC [B,H,W,Cout]. H and W must be divisible by
 * 2^(levels − 1).
 */
export function unet<T>(
  o: Ops<T>,
  p: Scope<T>,
  sample: T,
  timesteps: T,
  context: T,
  cfg: UnetConfig,
  hooks: UnetHooks<T> = {},
  opts: UnetOptions<T> = {},
): T {
  const root: Module<T> = { p, path: '' };
  const record = (name: string, t: T): T => {
    hooks.intermediates?.set(name, t);
    return t;
  };
  const run: AttentionRun<T> = { attentionContext: hooks.attentionContext, maxScoreElements: opts.maxScoreElements };
  const levels = cfg.blockChannels.length;
  const [, height, width] = o.shape(sample) as [number, number, number, number];
  const factor = 2 ** (levels - 1);
  if (height % factor !== 0 || width % factor !== 0) {
    throw new Error(`unet: latent size ${height}×${width} must be divisible by ${factor} (${levels} resolution levels)`);
  }
  const ch0 = cfg.blockChannels[0]!;
  const block = (path: string, f: (inputs: readonly T[]) => T, inputs: readonly T[]): T =>
    opts.wrapBlock === undefined ? f(inputs) : opts.wrapBlock(path, f, inputs);
  const resnet = (m: Module<T>, x: T, temb: T, inCh: number, outCh: number, outputScale = 1): T =>
    block(
      m.path,
      ([bx, bt]) => resnetBlock2D(o, m.p, bx!, bt!, { inCh, outCh, timeCh: cfg.timeEmbedDim, groups: cfg.groups, eps: cfg.eps, outputScale }),
      [x, temb],
    );
  const transformer = (m: Module<T>, x: T, level: number): T =>
    block(
      m.path,
      ([bx, bc]) =>
        transformer2D(
          o,
          m,
          bx!,
          bc!,
          {
            channels: cfg.blockChannels[level]!,
            heads: cfg.numHeads[level]!,
            depth: cfg.transformerDepth[level]!,
            contextDim: cfg.contextDim[level]!,
            groups: cfg.groups,
            linearProjection: cfg.linearProjection,
          },
          run,
        ),
      [x, context],
    );

  // 1. Time conditioning.
  const features = record('time_proj', timestepFeatures(o, timesteps, { dim: ch0, flipSinToCos: cfg.flipSinToCos, freqShift: cfg.freqShift }));
  const temb = record('time_embedding', timeEmbedding(o, p.sub('time_embedding'), features, ch0, cfg.timeEmbedDim)); // [B,E]

  // 2. Input convolution.
  const input = cfg.centerInput ? o.sub(o.mul(sample, 2), 1) : sample;
  let h = record('conv_in', conv2d(o, p.sub('conv_in'), input, { inCh: cfg.inChannels, outCh: ch0, kernel: cfg.convInKernel }));

  // 3. Down path; every resnet/transformer output and downsampled map is kept as a skip.
  const skips: T[] = [h];
  const downBlocks = child(root, 'down_blocks');
  let channels = ch0;
  cfg.downBlocks.forEach((type, level) => {
    const block = child(downBlocks, level);
    const outCh = cfg.blockChannels[level]!;
    for (let i = 0; i < cfg.layersPerBlock[level]!; i++) {
      h = resnet(child(child(block, 'resnets'), i), h, temb, channels, outCh);
      channels = outCh;
      if (type === 'CrossAttnDownBlock2D') h = transformer(child(child(block, 'attentions'), i), h, level);
      skips.push(h);
    }
    if (level < levels - 1) {
      h = downsample2D(o, block.p.sub('downsamplers').sub('0').sub('conv'), h, outCh, cfg.downsamplePadding);
      skips.push(h);
    }
    record(`down_blocks.${level}`, h);
  });

  // 4. Middle: resnet → transformer → resnet at the lowest resolution.
  const mid = child(root, 'mid_block');
  const top = levels - 1;
  h = resnet(child(child(mid, 'resnets'), 0), h, temb, channels, channels, cfg.midBlockScale);
  h = transformer(child(child(mid, 'attentions'), 0), h, top);
  h = record('mid_block', resnet(child(child(mid, 'resnets'), 1), h, temb, channels, channels, cfg.midBlockScale));

  // 5. Up path: each resnet first concatenates the latest unused skip along channels.
  const upBlocks = child(root, 'up_blocks');
  cfg.upBlocks.forEach((type, i) => {
    const block = child(upBlocks, i);
    const level = top - i; // up block i mirrors down block `level`
    const outCh = cfg.blockChannels[level]!;
    const skipInCh = cfg.blockChannels[Math.max(level - 1, 0)]!;
    const layers = cfg.layersPerBlock[level]! + 1;
    for (let j = 0; j < layers; j++) {
      const skip = skips.pop()!;
      const skipCh = j === layers - 1 ? skipInCh : outCh;
      h = o.concat([h, skip], 3); // [B,H,W,C+Cskip]
      h = resnet(child(child(block, 'resnets'), j), h, temb, channels + skipCh, outCh);
      channels = outCh;
      if (type === 'CrossAttnUpBlock2D') h = transformer(child(child(block, 'attentions'), j), h, level);
    }
    if (i < levels - 1) h = upsample2D(o, block.p.sub('upsamplers').sub('0').sub('conv'), h, outCh);
    record(`up_blocks.${i}`, h);
  });

  // 6. Output: GroupNorm → SiLU → conv_out.
  h = record('conv_norm_out', groupNorm(o, p.sub('conv_norm_out'), h, ch0, cfg.groups, cfg.eps));
  return record('conv_out', conv2d(o, p.sub('conv_out'), silu(o, h), { inCh: ch0, outCh: cfg.outChannels, kernel: cfg.convOutKernel }));
}

/**
 * Every parameter key a config implies, with its PyTorch-layout shape (conv filters OIHW), in
 * first-use order: what a loader checks a checkpoint against before reading tensor data.
 */
export function unetManifest(cfg: UnetConfig): Map<string, number[]> {
  const scope = new ManifestScope<ShapeOnly>((_key, shape) => ({ shape: [...shape] }));
  const side = 2 ** (cfg.blockChannels.length - 1);
  const sample: ShapeOnly = { shape: [1, side, side, cfg.inChannels] };
  const context: ShapeOnly = { shape: [1, 1, cfg.contextDim[0]!] };
  unet(shapeOps, scope, sample, { shape: [1] }, context, cfg);
  const out = new Map<string, number[]>();
  for (const [key, shape] of scope.entries) {
    // Internal conv filters are HWIO; checkpoints store OIHW.
    out.set(key, shape.length === 4 ? [shape[3]!, shape[2]!, shape[0]!, shape[1]!] : [...shape]);
  }
  return out;
}
