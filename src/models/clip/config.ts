/**
 * The CLIP text encoder's configuration, read from transformers' `text_encoder/config.json`
 * (`CLIPTextConfig`) and translated once, here, into names that say what each number is.
 */
import { z } from 'zod';
import { parseWithSchema } from '../../io/diffusers.js';

/**
 * transformers' `CLIPTextConfig` fields. A key absent from the file means the class default (what
 * transformers itself would use), so those defaults are repeated here; unknown keys are ignored.
 */
const clipTextConfigFile = z
  .object({
    vocab_size: z.number().int().positive().default(49408),
    hidden_size: z.number().int().positive().default(512),
    intermediate_size: z.number().int().positive().default(2048),
    projection_dim: z.number().int().positive().default(512),
    num_hidden_layers: z.number().int().positive().default(12),
    num_attention_heads: z.number().int().positive().default(8),
    max_position_embeddings: z.number().int().positive().default(77),
    hidden_act: z.enum(['quick_gelu', 'gelu']).default('quick_gelu'),
    layer_norm_eps: z.number().positive().default(1e-5),
    pad_token_id: z.number().int().nonnegative().default(1),
    bos_token_id: z.number().int().nonnegative().default(49406),
    eos_token_id: z.number().int().nonnegative().default(49407),
  })
  .refine((c) => c.hidden_size % c.num_attention_heads === 0, {
    message: 'hidden_size must be divisible by num_attention_heads',
    path: ['num_attention_heads'],
  })
  .transform((c) => ({
    vocabSize: c.vocab_size,
    /** Width of the token states (the UNet's cross-attention context width). */
    width: c.hidden_size,
    /** Hidden width of each layer's MLP. */
    mlpWidth: c.intermediate_size,
    /** Width of CLIPTextModelWithProjection's projection (unused by CLIPTextModel). */
    projectionDim: c.projection_dim,
    numLayers: c.num_hidden_layers,
    numHeads: c.num_attention_heads,
    /** Rows of the position-embedding table: the longest token sequence the model accepts. */
    maxPositions: c.max_position_embeddings,
    activation: c.hidden_act,
    layerNormEps: c.layer_norm_eps,
    padTokenId: c.pad_token_id,
    bosTokenId: c.bos_token_id,
    /**
     * Selects the pooled position. `2` is what configs written before transformers 4.31 carry
     * (SD 1.x/2.x included) and triggers the legacy argmax(input_ids) rule; see `pooledPositions`.
     */
    eosTokenId: c.eos_token_id,
  }));

export type ClipTextConfig = z.output<typeof clipTextConfigFile>;

/** Validate a parsed `text_encoder/config.json` (`file` names it in errors). */
export function parseClipTextConfig(json: unknown, file: string): ClipTextConfig {
  return parseWithSchema(clipTextConfigFile, json, file);
}
