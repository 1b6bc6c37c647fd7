/**
 * The CLIP text encoder — transformers' `CLIPTextModel` — over {@link Ops}: a pre-LayerNorm
 * transformer with a causal mask, whose last hidden state (after the final LayerNorm) is the
 * context every SD 1.x/2.x UNet cross-attends to.
 *
 * Parameters are read under `text_model.` with transformers' state-dict names verbatim, so a
 * `text_encoder/model.safetensors` loads without renaming. The scope passed in is the text
 * encoder's own (`store.scope()` for a text-encoder-only store, `root.sub('text_encoder')` in a
 * whole-pipeline store).
 */
import { activation, attention, layerNorm, linear } from '../../ops/nn.js';
import type { Ops } from '../../ops/ops.js';
import { ParamError, type ParamStore, type Scope } from '../../ops/scope.js';
import type { ClipTextConfig } from './config.js';

export type { ClipTextConfig } from './config.js';
export { parseClipTextConfig } from './config.js';

/**
 * Keys a CLIPTextModel checkpoint may carry that are buffers, not parameters: `position_ids` is
 * `arange(max_position_embeddings)`, saved by transformers before 4.31 and non-persistent since.
 * The forward never reads them.
 */
export const CLIP_TEXT_BUFFER_SUFFIXES: readonly string[] = ['embeddings.position_ids'];

export function isClipTextBuffer(key: string): boolean {
  return CLIP_TEXT_BUFFER_SUFFIXES.some((s) => key === `text_model.${s}` || key.endsWith(`.${s}`));
}

/**
 * transformers' causal mask value, `torch.finfo(float32).min`. Added to a finite score it stays
 * finite (no −∞ − −∞ = NaN in a max-subtracting softmax), and exp of it underflows to exactly 0,
 * so the masked weights are exactly 0 as in the reference.
 */
export const CAUSAL_MASK_VALUE = -3.4028234663852886e38;

export interface ClipTextOptions<T> {
  /** Also return every layer's output (`output_hidden_states=True`). */
  readonly hiddenStates?: boolean;
  /**
   * Replaces the token-embedding lookup: ids [B, S] int32 → [B, S, width]. The hook for textual
   * inversion (gather from `concat([frozenTable, newRows])`). When given, the table
   * `text_model.embeddings.token_embedding.weight` is not read.
   */
  readonly tokenEmbeddings?: (ids: T) => T;
}

export interface ClipTextOutput<T> {
  /** final_layer_norm(output of the last layer): [B, S, width]. */
  readonly lastHiddenState: T;
  /**
   * With `hiddenStates: true`: numLayers + 1 tensors [B, S, width]; index 0 = token + position
   * embeddings, index i = output of layer i, none with the final LayerNorm.
   */
  readonly hiddenStates?: readonly T[];
  /** lastHiddenState at each row's end-of-text position ({@link pooledPositions}): [B, width]. */
  readonly pooled: T;
}

/** Run CLIPTextModel on int32 token ids [B, S] (S ≤ maxPositions). No padding mask, as in SD. */
export function clipTextEncoder<T>(
  o: Ops<T>,
  p: Scope<T>,
  inputIds: T,
  cfg: ClipTextConfig,
  opts: ClipTextOptions<T> = {},
): ClipTextOutput<T> {
  const idsShape = o.shape(inputIds);
  if (idsShape.length !== 2) {
    throw new Error(`clipTextEncoder: input ids must be [batch, tokens], got [${idsShape.join(', ')}]`);
  }
  const [batch, seqLen] = idsShape as [number, number];
  if (seqLen > cfg.maxPositions) {
    throw new Error(`clipTextEncoder: ${seqLen} tokens exceed the ${cfg.maxPositions} position embeddings`);
  }
  const tm = p.sub('text_model');
  const width = cfg.width;

  // 1. Embeddings: token rows + the first S position rows.
  const emb = tm.sub('embeddings');
  const tokens =
    opts.tokenEmbeddings?.(inputIds) ??
    o.gather(emb.sub('token_embedding').param('weight', [cfg.vocabSize, width]), inputIds); // [B,S,W]
  const positionTable = emb.sub('position_embedding').param('weight', [cfg.maxPositions, width]);
  const positions = o.reshape(o.slice(positionTable, [0, 0], [seqLen, width]), [1, seqLen, width]); // [1,S,W]
  let h = o.add(tokens, positions); // [B,S,W]

  // 2. Encoder layers, each token attending to itself and earlier tokens only.
  const mask = causalMask(o, seqLen); // [S,S]
  const states: T[] = [h];
  for (let i = 0; i < cfg.numLayers; i++) {
    h = encoderLayer(o, tm.sub(`encoder.layers.${i}`), h, mask, cfg);
    states.push(h);
  }

  // 3. Final LayerNorm and pooling.
  const lastHiddenState = finalLayerNorm(o, p, h, cfg);
  const rows = o.add(pooledPositions(o, inputIds, cfg), o.intConstant(rowOffsets(batch, seqLen), [batch])); // [B]
  const pooled = o.gather(o.reshape(lastHiddenState, [batch * seqLen, width]), rows); // [B,W]

  return { lastHiddenState, pooled, ...(opts.hiddenStates ? { hiddenStates: states } : {}) };
}

/** `CLIPEncoderLayer`: x + attn(LN1 x), then + mlp(LN2 ·) (pre-LN). */
function encoderLayer<T>(o: Ops<T>, p: Scope<T>, x: T, mask: T, cfg: ClipTextConfig): T {
  const w = cfg.width;
  const a = layerNorm(o, p.sub('layer_norm1'), x, w, cfg.layerNormEps);
  const attn = p.sub('self_attn');
  const q = linear(o, attn.sub('q_proj'), a, w, w);
  const k = linear(o, attn.sub('k_proj'), a, w, w);
  const v = linear(o, attn.sub('v_proj'), a, w, w);
  const ctx = attention(o, q, k, v, { heads: cfg.numHeads, mask }); // [B,S,W]
  const h = o.add(x, linear(o, attn.sub('out_proj'), ctx, w, w));

  const m = layerNorm(o, p.sub('layer_norm2'), h, w, cfg.layerNormEps);
  const mlp = p.sub('mlp');
  const hidden = activation(o, cfg.activation, linear(o, mlp.sub('fc1'), m, w, cfg.mlpWidth));
  return o.add(h, linear(o, mlp.sub('fc2'), hidden, cfg.mlpWidth, w));
}

/** `text_model.final_layer_norm` applied to any [B, S, width] state. */
export function finalLayerNorm<T>(o: Ops<T>, p: Scope<T>, x: T, cfg: ClipTextConfig): T {
  return layerNorm(o, p.sub('text_model').sub('final_layer_norm'), x, cfg.width, cfg.layerNormEps);
}

/** Additive causal mask [S, S]: 0 on and below the diagonal, {@link CAUSAL_MASK_VALUE} above. */
function causalMask<T>(o: Ops<T>, seqLen: number): T {
  const m = new Float32Array(seqLen * seqLen);
  for (let q = 0; q < seqLen; q++) for (let k = q + 1; k < seqLen; k++) m[q * seqLen + k] = CAUSAL_MASK_VALUE;
  return o.constant(m, [seqLen, seqLen]);
}

function rowOffsets(batch: number, seqLen: number): number[] {
  return Array.from({ length: batch }, (_, b) => b * seqLen);
}

/**
 * The position pooled in each row, int32 [B]. transformers (≥ 4.31) keeps two rules:
 * - `eos_token_id == 2` (every config saved before the fix, SD 1.x/2.x included): the legacy
 *   argmax(input_ids), which is the first `<|endoftext|>` because that token has the largest id;
 * - otherwise the first position holding `eos_token_id` (0 if a row has none, as torch's argmax).
 * Ids are compared as float32, exact for ids < 2^24.
 */
export function pooledPositions<T>(o: Ops<T>, inputIds: T, cfg: ClipTextConfig): T {
  const ids = o.cast(inputIds, 'float32'); // [B,S]
  if (cfg.eosTokenId === 2) return o.argMax(ids, 1);
  const notEos = o.clip(o.square(o.sub(ids, cfg.eosTokenId)), 0, 1); // 0 where id == eos, else 1
  return o.argMax(o.neg(notEos), 1);
}

export interface TextStatesOptions {
  /**
   * Layers to skip from the end, diffusers' `encode_prompt(clip_skip=…)` convention: 0 → the
   * last hidden state; n ≥ 1 → final_layer_norm(hiddenStates[-(n + 1)]), so 1 is the penultimate
   * layer (what SD 2.x was trained on). A1111's "Clip skip" counts differently: its 1 is no skip
   * and its "Clip skip 2" equals clipSkip 1 here (A1111 n ↔ diffusers n − 1).
   */
  readonly clipSkip?: number;
}

/**
 * The text states the UNet cross-attends to. `out` must come from {@link clipTextEncoder} with
 * `hiddenStates: true` when `clipSkip` ≥ 1; `p` and `cfg` are the same ones (for the final LN).
 */
export function textStatesForUnet<T>(
  o: Ops<T>,
  p: Scope<T>,
  cfg: ClipTextConfig,
  out: ClipTextOutput<T>,
  { clipSkip = 0 }: TextStatesOptions = {},
): T {
  if (!Number.isInteger(clipSkip) || clipSkip < 0 || clipSkip > cfg.numLayers) {
    throw new Error(`clipSkip must be an integer in [0, ${cfg.numLayers}] (the encoder has ${cfg.numLayers} layers), got ${clipSkip}`);
  }
  if (clipSkip === 0) return out.lastHiddenState;
  const states = out.hiddenStates;
  if (states === undefined) throw new Error('clipSkip ≥ 1 needs the encoder output computed with { hiddenStates: true }');
  return finalLayerNorm(o, p, states[states.length - 1 - clipSkip]!, cfg);
}

/**
 * The strict check after one forward: every key of `store` was read, except buffers such as
 * `position_ids`. Throws a {@link ParamError} listing the unused keys.
 */
export function checkAllUsed<T>(store: ParamStore<T>, isBuffer: (key: string) => boolean = isClipTextBuffer): void {
  const unused = store.unusedKeys().filter((k) => !isBuffer(k));
  if (unused.length > 0) {
    throw new ParamError(`${store.source}: ${unused.length} parameter(s) not used by the model: ${unused.join(', ')}`);
  }
}
