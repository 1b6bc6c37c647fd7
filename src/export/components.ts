/**
 * The four graphs of Optimum's ONNX Stable Diffusion layout, each a thin wrapper that calls the
 * model definition itself (`src/models`) — there is no second implementation to drift:
 *
 * | graph          | inputs (NCHW, optimum names)                                   | outputs                          |
 * |----------------|----------------------------------------------------------------|----------------------------------|
 * | text_encoder   | input_ids int32 [batch_size, 77]                               | last_hidden_state, pooler_output, hidden_states.0…L |
 * | unet           | sample [batch, C, height, width], timestep float32 [steps] (1 or batch), encoder_hidden_states [batch, sequence, D] | out_sample |
 * | vae_encoder    | sample [batch, 3, height, width]                               | latent_parameters (mean ‖ logvar) |
 * | vae_decoder    | latent_sample [batch, C, latent_height, latent_width]           | sample                           |
 *
 * Dynamic axes: batch everywhere; height/width (and the UNet's text length) where the
 * definition allows. `timestep` is 1-D as in Optimum's older exports and diffusers'
 * OnnxStableDiffusionPipeline ([1] per step); current Optimum exports a scalar, and its
 * ORTUnet unsqueezes for a 1-D input, so both pipelines load this one. The text encoder's sequence stays 77: CLIP's causal mask is a constant of
 * the definition, sized by the sequence (SD pipelines always pad to 77).
 */
import { clipTextEncoder, isClipTextBuffer, pooledPositions, type ClipTextConfig } from '../models/clip/text-encoder.js';
import { unet, type UnetHooks } from '../models/unet/unet.js';
import type { UnetConfig } from '../models/unet/config.js';
import { vaeDecode, vaeEncode } from '../models/vae/vae.js';
import type { VaeConfig } from '../models/vae/config.js';
import type { Ops } from '../ops/ops.js';
import type { Scope } from '../ops/scope.js';
import type { GraphSpec } from './trace.js';

/** Builds UNet hooks for any {@link Ops} (the export traces the forward several times, over different implementations). */
export type UnetHooksFactory = <T>(o: Ops<T>) => UnetHooks<T>;

const NCHW = [0, 3, 1, 2] as const;

/** The token-table key of CLIPTextModel. */
export const TOKEN_TABLE_KEY = 'text_model.embeddings.token_embedding.weight';

/**
 * lastHiddenState[b, positions[b]] as a one-hot matmul: [B,1,S] × [B,S,W] → [B,W]. Exact (every
 * other product is 0·x) and free of batch-sized constants, unlike the definition's gather at
 * b·S + position, whose offsets arange(B)·S are baked from the traced batch.
 */
export function poolAt<T>(o: Ops<T>, states: T, positions: T, seqLen: number, width: number): T {
  const position = o.reshape(o.cast(positions, 'float32'), [-1, 1]); // [B,1]
  const index = o.constant(Float32Array.from({ length: seqLen }, (_, i) => i), [1, seqLen]); // [1,S]
  const miss = o.clip(o.square(o.sub(position, index)), 0, 1); // 0 at the position, 1 elsewhere
  const weights = o.reshape(o.add(o.neg(miss), 1), [-1, 1, seqLen]); // [B,1,S]
  return o.reshape(o.matMul(weights, states), [-1, width]); // [B,W]
}

/** text_encoder: CLIPTextModel with `extraRows` appended token rows (textual-inversion embeddings baked in). */
export function textEncoderGraph(cfg: ClipTextConfig, extraRows = 0): GraphSpec {
  const seqLen = cfg.maxPositions;
  return {
    name: 'text_encoder',
    symbols: [{ name: 'batch_size', base: 2 }],
    inputs: [{ name: 'input_ids', dtype: 'int32', dims: [{ symbol: 0 }, seqLen] }],
    outputs: [
      { name: 'last_hidden_state' },
      { name: 'pooler_output' },
      ...Array.from({ length: cfg.numLayers + 1 }, (_, i) => ({ name: `hidden_states.${i}` })),
    ],
    forward: <T>(o: Ops<T>, p: Scope<T>, [ids]: readonly T[]): readonly T[] => {
      const table = (): T => p.sub('text_model').sub('embeddings').sub('token_embedding').param('weight', [cfg.vocabSize + extraRows, cfg.width]);
      const out = clipTextEncoder(o, p, ids!, cfg, { hiddenStates: true, ...(extraRows > 0 ? { tokenEmbeddings: (x: T) => o.gather(table(), x) } : {}) });
      const pooled = poolAt(o, out.lastHiddenState, pooledPositions(o, ids!, cfg), seqLen, cfg.width);
      return [out.lastHiddenState, pooled, ...(out.hiddenStates ?? [])];
    },
    ignoreUnused: isClipTextBuffer,
  };
}

/** unet: UNet2DConditionModel, ε (or v) prediction, with optional hooks recorded into the graph. */
export function unetGraph(cfg: UnetConfig, hooks?: UnetHooksFactory): GraphSpec {
  const side = 2 * 2 ** (cfg.blockChannels.length - 1);
  return {
    name: 'unet',
    symbols: [
      { name: 'batch_size', base: 2 },
      { name: 'height', base: side },
      { name: 'width', base: side },
      { name: 'sequence_length', base: 3 },
    ],
    inputs: [
      { name: 'sample', dtype: 'float32', dims: [{ symbol: 0 }, { symbol: 1 }, { symbol: 2 }, cfg.inChannels], layout: NCHW },
      { name: 'timestep', dtype: 'float32', dims: [], broadcastToSymbol: 0 },
      { name: 'encoder_hidden_states', dtype: 'float32', dims: [{ symbol: 0 }, { symbol: 3 }, cfg.contextDim[0]!] },
    ],
    outputs: [{ name: 'out_sample', layout: NCHW }],
    forward: <T>(o: Ops<T>, p: Scope<T>, [sample, timestep, context]: readonly T[]): readonly T[] => [
      // One attention block per layer: ORT plans the score memory itself, chunks would only add nodes.
      unet(o, p, sample!, timestep!, context!, cfg, hooks?.(o) ?? {}, { maxScoreElements: Number.MAX_SAFE_INTEGER }),
    ],
  };
}

const isDecoderKey = (k: string) => k.startsWith('decoder.') || k.startsWith('post_quant_conv.');
const isEncoderKey = (k: string) => k.startsWith('encoder.') || k.startsWith('quant_conv.');

/** vae_encoder: image in [-1, 1] → the posterior's moments (mean ‖ log σ², unclamped), diffusers' `latent_dist.parameters`. */
export function vaeEncoderGraph(cfg: VaeConfig): GraphSpec {
  const side = 2 * cfg.downscale;
  return {
    name: 'vae_encoder',
    symbols: [
      { name: 'batch_size', base: 2 },
      { name: 'sample_height', base: side },
      { name: 'sample_width', base: side },
    ],
    inputs: [{ name: 'sample', dtype: 'float32', dims: [{ symbol: 0 }, { symbol: 1 }, { symbol: 2 }, cfg.imageChannels], layout: NCHW }],
    outputs: [{ name: 'latent_parameters', layout: NCHW }],
    forward: <T>(o: Ops<T>, p: Scope<T>, [image]: readonly T[]): readonly T[] => [vaeEncode(o, p, image!, cfg).moments],
    ignoreUnused: isDecoderKey,
  };
}

/** vae_decoder: unscaled latents z → image ≈ [-1, 1] (post_quant_conv included, no clamping). */
export function vaeDecoderGraph(cfg: VaeConfig): GraphSpec {
  return {
    name: 'vae_decoder',
    symbols: [
      { name: 'batch_size', base: 2 },
      { name: 'latent_height', base: 2 },
      { name: 'latent_width', base: 2 },
    ],
    inputs: [{ name: 'latent_sample', dtype: 'float32', dims: [{ symbol: 0 }, { symbol: 1 }, { symbol: 2 }, cfg.latentChannels], layout: NCHW }],
    outputs: [{ name: 'sample', layout: NCHW }],
    forward: <T>(o: Ops<T>, p: Scope<T>, [z]: readonly T[]): readonly T[] => [vaeDecode(o, p, z!, cfg)],
    ignoreUnused: isEncoderKey,
  };
}
