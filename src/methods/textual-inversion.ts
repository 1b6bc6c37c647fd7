/**
 * Textual inversion (Gal et al. 2022, "An Image is Worth One Word"): learn new token embeddings
 * for a placeholder word such that the frozen model reproduces the training images, as
 * diffusers' `examples/textual_inversion/textual_inversion.py` does.
 *
 * Only the new rows train. They are their own variable `rows` [numVectors, width], initialised
 * from the initializer token's row; the text encoder's token lookup is replaced (its
 * `tokenEmbeddings` hook) by one that takes ids < V from the frozen table and ids ≥ V from
 * `rows`. That gives exactly gather(concat([table, rows]), ids) — same values, same gradient for
 * `rows` — without copying the V × width table or forming its V × width gradient every step;
 * diffusers instead trains the whole table and copies the old rows back after each step.
 *
 * Loss (diffusers' TI loop): z ~ q(z|x) from the VAE, x₀ = z × scaling factor, ε ~ N(0, I),
 * t ~ U{0, …, T−1}, x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε (DDPM eq. 4), loss = mean((UNet(x_t, t, text) −
 * target)²) with target ε (epsilon models) or v = √ᾱ_t ε − √(1−ᾱ_t) x₀ (v-prediction models).
 */
import path from 'node:path';

import * as tf from '@tensorflow/tfjs';
import { z } from 'zod';

import { clipTextEncoder } from '../models/clip/text-encoder.js';
import type { ClipTokenizer } from '../models/clip/tokenizer.js';
import { unet } from '../models/unet/unet.js';
import { samplePosterior, scaleLatents } from '../models/vae/vae.js';
import { tfOps } from '../ops/tfjs-ops.js';
import type { StableDiffusion } from '../pipeline/load.js';
import type { PredictionType } from '../schedulers/config.js';
import { addNoise, trainingTarget } from '../schedulers/ddpm.js';
import { noiseSchedule, type NoiseSchedule } from '../schedulers/tables.js';
import { checkCommonFields, commonFields, dataField } from '../train/config.js';
import {
  fileStem,
  loadEmbedding,
  multiVectorTokens,
  saveA1111Pt,
  saveA1111Safetensors,
  saveDiffusersEmbedding,
  type Embedding,
} from './embedding-files.js';
import type { AppliedArtifact, Artifact, ModelPatch, StepCtx, TrainingMethod } from './types.js';
import { drawTrainingNoise, posteriorMoments } from './diffusion-batch.js';

/** The text encoder's token table, relative to its store. */
export const TOKEN_TABLE_KEY = 'text_model.embeddings.token_embedding.weight';

/** File formats a run can write. */
export const EMBEDDING_FORMATS = ['a1111_safetensors', 'a1111_pt', 'diffusers'] as const;

/** Config of a textual-inversion run; defaults as diffusers' example README. */
export const textualInversionConfigSchema = z
  .strictObject({
    method: z.literal('textual_inversion').describe('Train new token embeddings (textual inversion).'),
    ...commonFields({ steps: 3000, learning_rate: 5e-4, gradient_accumulation_steps: 4, adam_weight_decay: 1e-2, save_every: 500 }),
    data: dataField.describe('Training images (the data section of src/data). data.dir is required.'),
    placeholder_token: z
      .string()
      .min(1)
      .regex(/^\S+$/, 'expected one word without spaces, such as "<my-cat>"')
      .describe('The new word to learn, e.g. "<my-cat>"; it must not be in the vocabulary already. Required.'),
    initializer_token: z
      .string()
      .min(1)
      .describe('An existing word that is exactly one token ("cat", "toy"); the new rows start as its embedding. Required.'),
    num_vectors: z
      .number()
      .int()
      .min(1)
      .max(75)
      .default(1)
      .describe('Embedding vectors per concept: tokens <t>, <t>_1, …, <t>_{n-1} as in diffusers. Default 1.'),
    template: z
      .enum(['object', 'style', 'none'])
      .default('object')
      .describe(
        "Captions: 'object' (\"a photo of a <t>\", …) or 'style' (\"a painting in the style of <t>\", …) templates, or 'none' for data's sidecar captions / instance_prompt, which must contain the token. Default object.",
      ),
    embedding_name: z
      .string()
      .regex(/^[A-Za-z0-9][A-Za-z0-9._-]*$/, 'expected a file-name-safe word (letters, digits, . _ -)')
      .optional()
      .describe('Stem of the A1111 files (<name>.safetensors, <name>.pt), which A1111 uses as the trigger word. Default: the placeholder token without <>.'),
    save_formats: z
      .array(z.enum(EMBEDDING_FORMATS))
      .min(1)
      .default([...EMBEDDING_FORMATS])
      .describe(
        'Files to write: a1111_safetensors (<name>.safetensors, emb_params), a1111_pt (<name>.pt), diffusers (learned_embeds.safetensors). Default all three.',
      ),
  })
  .superRefine((c, ctx) => {
    checkCommonFields(c, ctx);
    if (c.data.template !== 'none' && c.data.template !== c.template) {
      ctx.addIssue({
        code: 'custom',
        path: ['data', 'template'],
        message: `textual inversion takes its templates from 'template' (here '${c.template}'); leave data.template unset`,
      });
    }
    if (c.data.instance_prompt !== undefined && c.template !== 'none') {
      ctx.addIssue({ code: 'custom', path: ['template'], message: "set template: none to caption every image with data.instance_prompt" });
    }
    if (c.data.instance_prompt !== undefined && !c.data.instance_prompt.includes(c.placeholder_token)) {
      ctx.addIssue({
        code: 'custom',
        path: ['data', 'instance_prompt'],
        message: `must contain the placeholder token '${c.placeholder_token}' (only captions with it train the embedding)`,
      });
    }
  });

export type TextualInversionConfig = z.infer<typeof textualInversionConfigSchema>;

/** State after setup. */
export interface TextualInversionState {
  readonly cfg: TextualInversionConfig;
  readonly model: StableDiffusion;
  /** The trained rows [numVectors, width]. */
  readonly rows: tf.Variable;
  /** The placeholder tokens, `<t>`, `<t>_1`, … */
  readonly tokens: readonly string[];
  /** Token id of `tokens[0]`; the others follow (= the table's row count V). */
  readonly firstId: number;
  readonly schedule: NoiseSchedule;
  readonly prediction: PredictionType;
}

/** A prepared micro-batch. */
export interface TextualInversionBatch {
  /** int32 [B, S] token ids. */
  readonly ids: tf.Tensor;
  /** x_t, NHWC [B, h, w, C]. */
  readonly noisy: tf.Tensor;
  /** float32 [B] timesteps. */
  readonly timesteps: tf.Tensor;
  /** ε or v, NHWC like `noisy`. */
  readonly target: tf.Tensor;
  /** Index signature: makes the batch a `tf.TensorContainer`, which the loop frees with tf.dispose. */
  readonly [key: string]: tf.Tensor;
}

/**
 * Token embeddings with `rows` appended after the frozen `table` ([V, width]): ids < `firstId`
 * (= V) read the table, ids ≥ V read row id − V. Equal to gather(concat([table, rows]), ids).
 */
export function lookupWithNewRows(table: tf.Tensor, rows: tf.Tensor, firstId: number, ids: tf.Tensor): tf.Tensor {
  const n = rows.shape[0]!;
  // int32 scalars: a plain number would be float32 and promote the indices.
  const int = (v: number) => tf.scalar(v, 'int32');
  const isNew = tf.greaterEqual(ids, int(firstId)); // [B,S]
  const newIndex = tf.maximum(tf.minimum(tf.sub(ids, int(firstId)), int(n - 1)), int(0)); // [B,S] in [0, n)
  const oldIndex = tf.minimum(ids, int(firstId - 1)); // [B,S] in [0, V)
  const fromRows = tf.gather(rows, newIndex); // [B,S,W]
  const fromTable = tf.gather(table, oldIndex); // [B,S,W]
  const mask = tf.broadcastTo(tf.expandDims(isNew, -1), fromRows.shape); // [B,S,W]
  return tf.where(mask, fromRows, fromTable);
}

/** Replaces each placeholder `<t>` of a multi-vector embedding by `<t> <t>_1 …` (diffusers' maybe_convert_prompt). */
export function expandMultiVector(prompt: string, token: string, numVectors: number): string {
  if (numVectors === 1) return prompt;
  const escape = (t: string) => t.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  // Skip `<t>_1` (it starts with `<t>`) and a `<t>` already followed by its `<t>_1`.
  const pattern = new RegExp(`${escape(token)}(?!_\\d|\\s+${escape(`${token}_1`)})`, 'g');
  return prompt.replace(pattern, multiVectorTokens(token, numVectors).join(' '));
}

/** The one token id of `word`, or a clear error naming what it splits into. */
export function singleTokenId(tokenizer: ClipTokenizer, word: string, field: string): number {
  const ids = tokenizer.contentIds(word);
  if (ids.length !== 1) {
    const pieces = tokenizer.tokenize(word);
    throw new Error(
      `${field} '${word}': must be exactly one token, but the tokenizer splits it into ${ids.length}${ids.length > 0 ? ` (${pieces.join(' ')})` : ''}; pick a single common word such as 'cat', 'toy' or 'painting'`,
    );
  }
  return ids[0]!;
}

/** Adds `tokens` to the tokenizer; they must land right after the text encoder's table (ids V, V+1, …). */
function addTokensAfterTable(model: StableDiffusion, tokens: readonly string[], field: string): number {
  const tokenizer = model.tokenizer;
  const vocab = model.text.cfg.vocabSize;
  for (const t of tokens) {
    const existing = tokenizer.tokenToId(t);
    if (existing !== undefined) {
      throw new Error(`${field} '${t}': already a token of this tokenizer (id ${existing}); choose a new word such as '<${t.replace(/[<>]/g, '')}-1>'`);
    }
  }
  if (tokenizer.vocabSize !== vocab) {
    throw new Error(
      `the tokenizer has ${tokenizer.vocabSize} tokens but the text encoder's table has ${vocab} rows: add embeddings to a freshly loaded model (tokens added before cannot be matched to rows)`,
    );
  }
  const ids = tokenizer.addTokens(tokens);
  ids.forEach((id, i) => {
    if (id !== vocab + i) throw new Error(`token '${tokens[i]}' got id ${id}, expected ${vocab + i} (right after the table)`);
  });
  return vocab;
}

/** A file-name-safe stem for the A1111 files: the placeholder without <>, other characters as '-'. */
export function embeddingFileStem(cfg: Pick<TextualInversionConfig, 'embedding_name' | 'placeholder_token'>): string {
  if (cfg.embedding_name !== undefined) return cfg.embedding_name;
  const stem = cfg.placeholder_token.replace(/^<|>$/g, '').replace(/[^A-Za-z0-9._-]/g, '-').replace(/^[.-]+/, '');
  return stem === '' ? 'embedding' : stem;
}

function tokenTable(model: StableDiffusion): tf.Tensor {
  const table = model.text.store.get(TOKEN_TABLE_KEY);
  if (table === undefined) throw new Error(`${model.text.store.source}: no '${TOKEN_TABLE_KEY}' (not a CLIP text encoder?)`);
  return table;
}

/** NCHW-drawn normals as an NHWC tensor (so a seed gives torch's values in torch's layout). */

/** Textual inversion as a training method. */
export const textualInversion: TrainingMethod<TextualInversionConfig, TextualInversionState, TextualInversionBatch> = {
  id: 'textual_inversion',
  description: 'Textual inversion: learn new token embeddings for a placeholder word (A1111 and diffusers embedding files).',
  configSchema: textualInversionConfigSchema,

  async setup(ctx, cfg) {
    const model = await ctx.model();
    const initializerId = singleTokenId(model.tokenizer, cfg.initializer_token, 'initializer_token');
    const tokens = multiVectorTokens(cfg.placeholder_token, cfg.num_vectors);
    const firstId = addTokensAfterTable(model, tokens, 'placeholder_token');
    const width = model.text.cfg.width;
    const table = tokenTable(model);
    const rows = tf.tidy(() => tf.variable(tf.tile(tf.slice(table, [initializerId, 0], [1, width]), [cfg.num_vectors, 1]), true));
    const prediction = cfg.prediction_type ?? model.scheduler.predictionType;
    ctx.log(
      `textual inversion: ${tokens.join(' ')} (ids ${firstId}…${firstId + tokens.length - 1}), ${cfg.num_vectors}×${width} trainable values, initialised from '${cfg.initializer_token}' (id ${initializerId}); ${prediction} target`,
    );
    return { cfg, model, rows, tokens, firstId, schedule: noiseSchedule(model.scheduler), prediction };
  },

  trainable: (s) => ({ 'text_encoder.token_embedding.new_rows': s.rows }),

  datasetOptions: (s) => ({ placeholderToken: s.tokens.join(' '), template: s.cfg.template }),

  async prepare(ctx, s, raw) {
    const images = raw.images;
    if (images === undefined) throw new Error('textual inversion needs images (a data: section)');
    for (const caption of images.captions) {
      if (caption !== '' && !caption.includes(s.tokens[0]!)) {
        throw new Error(`caption "${caption}" does not contain the placeholder token '${s.tokens[0]}': it would not train the embedding`);
      }
    }
    const { model } = s;
    const vae = model.vae.cfg;
    const n = images.count;
    const latentShape = [images.height / vae.downscale, images.width / vae.downscale, vae.latentChannels] as const;
    const { posteriorEps, noise, timesteps } = drawTrainingNoise(ctx.random, n, latentShape, {
      noiseOffset: s.cfg.noise_offset,
      trainTimesteps: s.schedule.trainTimesteps,
    });
    const posterior = posteriorMoments(model.vae.store.scope(), vae, images, 'textual inversion');
    const x0 = scaleLatents(tfOps, samplePosterior(tfOps, posterior, posteriorEps), vae);
    const ids = images.captions.map((caption) => model.tokenizer.encode(caption));
    return {
      ids: tf.tensor2d(ids.flat(), [n, ids[0]!.length], 'int32'),
      noisy: addNoise(tfOps, s.schedule, x0, noise, timesteps),
      timesteps: tf.tensor1d(timesteps, 'float32'),
      target: trainingTarget(tfOps, s.schedule, s.prediction, x0, noise, timesteps),
    };
  },

  loss(_ctx: StepCtx, s, b) {
    const { model } = s;
    const table = tokenTable(model);
    const text = clipTextEncoder(tfOps, model.text.store.scope(), b.ids, model.text.cfg, {
      tokenEmbeddings: (ids) => lookupWithNewRows(table, s.rows, s.firstId, ids),
    }).lastHiddenState; // [B,S,W]
    const pred = unet(tfOps, model.unet.store.scope(), b.noisy, b.timesteps, text, model.unet.cfg);
    return tf.mean(tf.square(tf.sub(pred, b.target))) as tf.Scalar;
  },

  async artifacts(s, step) {
    const vectors = Float32Array.from(await s.rows.data<'float32'>());
    const [numVectors, width] = s.rows.shape as [number, number];
    const embedding = { vectors, numVectors, width };
    const stem = embeddingFileStem(s.cfg);
    const token = s.cfg.placeholder_token;
    const provenance = {
      'sd_workbench.method': 'textual_inversion',
      'sd_workbench.placeholder_token': token,
      'sd_workbench.step': String(step),
      'sd_workbench.base_model': s.model.name,
      'sd_workbench.base_model_hash': s.model.modelHash,
      'sd_workbench.config': JSON.stringify(shareableConfig(s.cfg)),
    };
    const out: Artifact[] = [];
    for (const format of s.cfg.save_formats) {
      if (format === 'a1111_safetensors') {
        out.push({
          file: `${stem}.safetensors`,
          format: `A1111 embedding (emb_params ${numVectors}×${width}); prompt word '${stem}'`,
          write: (target) => saveA1111Safetensors(target, embedding, provenance),
        });
      } else if (format === 'a1111_pt') {
        out.push({
          file: `${stem}.pt`,
          format: `A1111 embedding (.pt, string_to_param); prompt word '${stem}'`,
          write: (target) =>
            saveA1111Pt(target, embedding, { name: stem, step, sdCheckpoint: s.model.modelHash, sdCheckpointName: s.model.name }),
        });
      } else {
        out.push({
          file: 'learned_embeds.safetensors',
          format: `diffusers embedding (load_textual_inversion); prompt word '${token}'`,
          write: (target) => saveDiffusersEmbedding(target, token, embedding),
        });
      }
    }
    return out;
  },

  generationPatch(s) {
    const table = tokenTable(s.model);
    return {
      tokenEmbeddings: (ids) => lookupWithNewRows(table, s.rows, s.firstId, ids),
      rewritePrompt: (p) => expandMultiVector(p, s.cfg.placeholder_token, s.cfg.num_vectors),
    };
  },

  async applyArtifact(model, file) {
    return applyEmbeddings(model, [await loadEmbedding(file)]);
  },

  dispose(s) {
    s.rows.dispose();
  },
};

/**
 * Adds embeddings to a freshly loaded model: their tokens join the tokenizer and a patch supplies
 * their rows (and expands multi-vector tokens in prompts). Dispose the result to free the rows.
 */
export function applyEmbeddings(model: StableDiffusion, embeddings: readonly Embedding[]): AppliedArtifact {
  const width = model.text.cfg.width;
  for (const e of embeddings) {
    if (e.width !== width) {
      throw new Error(
        `${e.file}: embedding vectors are ${e.width} wide, this model's text encoder is ${width} wide (an embedding for ${describeWidth(e.width)} on ${describeWidth(width)})`,
      );
    }
  }
  const tokens = embeddings.flatMap((e) => multiVectorTokens(e.token, e.numVectors));
  const firstId = addTokensAfterTable(model, tokens, `embedding (${embeddings.map((e) => fileStem(e.file)).join(', ')})`);
  const total = embeddings.reduce((a, e) => a + e.numVectors, 0);
  const all = new Float32Array(total * width);
  let offset = 0;
  for (const e of embeddings) {
    all.set(e.vectors, offset);
    offset += e.vectors.length;
  }
  const rows = tf.tensor2d(all, [total, width]);
  const table = tokenTable(model);
  const patch: ModelPatch = {
    tokenEmbeddings: (ids) => lookupWithNewRows(table, rows, firstId, ids),
    rewritePrompt: (p) => embeddings.reduce((text, e) => expandMultiVector(text, e.token, e.numVectors), p),
  };
  return { patch, triggers: embeddings.map((e) => e.token), dispose: () => rows.dispose() };
}

// The run config for file metadata, with local paths cut to their last component.
function shareableConfig(cfg: TextualInversionConfig): TextualInversionConfig {
  const base = (p: string) => path.basename(p);
  return { ...cfg, model: base(cfg.model), output_dir: base(cfg.output_dir), data: { ...cfg.data, dir: base(cfg.data.dir) } };
}

function describeWidth(width: number): string {
  return width === 768 ? 'SD 1.x (768)' : width === 1024 ? 'SD 2.x (1024)' : `width ${width}`;
}
