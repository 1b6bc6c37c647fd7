/**
 * UCE — Unified Concept Editing (Gandikota et al. 2024, arXiv 2308.14761): a closed-form edit of
 * every cross-attention key/value projection W (d_out × d_text) so that erased concepts c_i map to
 * what their guide concepts map to, preserved concepts c_j keep their outputs, and W moves as
 * little as possible (λ). Minimising
 *   λ‖W' − W‖² + s_e Σ_i ‖W'c_i − v*_i‖² + s_p Σ_j ‖W'c_j − W c_j‖²,   v*_i = W·c_guide(i)
 * gives (paper eq. 7, with λ and the scales of the official `UCE()` of uce_sd_erase.py):
 *   W' = (λW + s_e Σ_i v*_i c_iᵀ + s_p Σ_j W c_j c_jᵀ) · A⁻¹,
 *   A  = λI + s_e Σ_i c_i c_iᵀ + s_p Σ_j c_j c_jᵀ.
 * c is the text encoder's last hidden state at the prompt's last real token (the attention mask's
 * sum − 2: the token before EOS; BOS for ""), computed once per prompt with no UNet at all.
 *
 * Rank form used here: the left factor minus W·A is s_e Σ_i (v*_i − W c_i) c_iᵀ (the preserve
 * terms cancel), so W' = W + Σ_i W (c_guide(i) − c_i) k_iᵀ with k_i = s_e A⁻¹ c_i. A (d_text ×
 * d_text, the same for every layer) is built and factored by Cholesky once, in float64, and solved
 * for the n_e erase vectors; each layer then takes two thin matrix products (2·d_out·d_text·n_e
 * multiply-adds) on the tfjs backend, or, with very many erase prompts, one product with the shared
 * P = I + Σ_i (c_guide(i) − c_i) k_iᵀ. No per-layer d_text × d_text solve, no UNet pass.
 *
 * In the plugin interface UCE is a run of zero optimizer steps: `setup` computes the edit,
 * `artifacts` saves the changed weights as a delta file, `generationPatch` overrides them.
 */
import path from 'node:path';

import * as tf from '@tensorflow/tfjs';
import { z } from 'zod';

import { encodeText } from '../models/clip/text-encoder-tfjs.js';
import { isCrossAttnKV, selectParams } from '../models/unet/params.js';
import type { StableDiffusion } from '../pipeline/load.js';
import { checkCommonFields, commonFields } from '../train/config.js';
import { cholesky, choleskySolveInPlace, NotPositiveDefiniteError } from './linalg.js';
import { applyDelta, writeDelta, type DeltaInfo } from './delta.js';
import type { Artifact, ParamOverride, TrainingMethod } from './types.js';

/** The official prompt templates (`--expand_prompts true` of uce_sd_erase.py), by concept type. */
export const UCE_TEMPLATES = {
  art: ['painting by {}', 'art by {}', 'artwork by {}', 'picture by {}', 'style of {}'],
  object: ['image of {}', 'photo of {}', 'portrait of {}', 'picture of {}', 'painting of {}'],
} as const satisfies Record<string, readonly string[]>;

/** Kinds of concept: they choose the default guide ("art" or "") and the templates. */
export const UCE_CONCEPT_TYPES = ['art', 'object'] as const;
export type UceConceptType = (typeof UCE_CONCEPT_TYPES)[number];

/** Config of a UCE run; defaults as the official uce_sd_erase.py. */
export const uceConfigSchema = z
  .strictObject({
    method: z.literal('uce').describe('Unified Concept Editing: closed-form erasure in the cross-attention K/V weights (no training steps).'),
    ...commonFields(),
    steps: z
      .number()
      .int()
      .default(0)
      .describe('Always 0: UCE solves for the edited weights directly, no optimizer steps.'),
    concepts: z
      .array(z.string().trim().min(1, 'expected a non-empty concept prompt'))
      .min(1)
      .describe('Concepts to erase, each a prompt such as "Van Gogh" (official --erase_concepts). Required.'),
    concept_type: z
      .enum(UCE_CONCEPT_TYPES)
      .default('object')
      .describe(
        "'art' (styles: default guide \"art\", templates \"painting by X\", …) or 'object' (default guide \"\", templates \"image of X\", …). Default object.",
      ),
    guide_concepts: z
      .array(z.string().trim())
      .min(1)
      .optional()
      .describe(
        'What each erased concept maps to instead: one prompt for all or one per concept; "" is the empty prompt. Default: "art" for concept_type art, "" otherwise.',
      ),
    preserve_concepts: z
      .array(z.string().trim().min(1, 'expected a non-empty concept prompt'))
      .default([])
      .describe('Concepts whose K/V outputs must not change (official --preserve_concepts). Default [].'),
    lambda: z.number().min(0).default(0.5).describe('λ: weight of keeping W close to the original (official --lamb). Default 0.5.'),
    erase_scale: z.number().min(0).default(1).describe('s_e: weight of the erase terms. Default 1.'),
    preserve_scale: z.number().min(0).default(1).describe('s_p: weight of the preserve terms. Default 1.'),
    templates: z
      .boolean()
      .default(false)
      .describe('Also erase each concept inside the five official templates of its concept_type ("painting by X", …), toward the same guide. Default false.'),
  })
  .superRefine((c, ctx) => {
    checkCommonFields(c, ctx);
    if (c.steps !== 0) {
      ctx.addIssue({ code: 'custom', path: ['steps'], message: `UCE is a closed-form edit with no optimizer steps; leave steps unset (0), found ${c.steps}` });
    }
    const guides = c.guide_concepts;
    if (guides !== undefined && guides.length !== 1 && guides.length !== c.concepts.length) {
      ctx.addIssue({
        code: 'custom',
        path: ['guide_concepts'],
        message: `expected one guide for all concepts or one per concept (${c.concepts.length}), found ${guides.length}`,
      });
    }
    if (c.sample_every !== null) {
      ctx.addIssue({ code: 'custom', path: ['sample_every'], message: 'UCE has no training steps to sample at; generate from the saved delta instead' });
    }
  });

export type UceConfig = z.infer<typeof uceConfigSchema>;

/** One erase term: a prompt and the prompt its K/V outputs should become. */
export interface UceEdit {
  readonly prompt: string;
  readonly guide: string;
}

/** The prompts of a run after guide broadcasting and template expansion. */
export interface UcePrompts {
  readonly erase: readonly UceEdit[];
  readonly preserve: readonly string[];
}

/**
 * The erase/preserve prompt lists as the official script builds them: one guide broadcast to all
 * concepts; with templates, the concepts first, then each concept's five templated prompts with
 * its guide. Preserve prompts are never templated.
 */
export function ucePrompts(
  cfg: Pick<UceConfig, 'concepts' | 'guide_concepts' | 'preserve_concepts' | 'concept_type' | 'templates'>,
): UcePrompts {
  const guides = cfg.guide_concepts ?? [cfg.concept_type === 'art' ? 'art' : ''];
  if (guides.length !== 1 && guides.length !== cfg.concepts.length) {
    throw new Error(`guide_concepts: expected 1 or ${cfg.concepts.length} guides, found ${guides.length}`);
  }
  const guideOf = (i: number) => (guides.length === 1 ? guides[0]! : guides[i]!);
  const erase: UceEdit[] = cfg.concepts.map((prompt, i) => ({ prompt, guide: guideOf(i) }));
  if (cfg.templates) {
    cfg.concepts.forEach((concept, i) => {
      for (const t of UCE_TEMPLATES[cfg.concept_type]) erase.push({ prompt: t.replace('{}', concept), guide: guideOf(i) });
    });
  }
  return { erase, preserve: [...cfg.preserve_concepts] };
}

/** What the text-state pass needs of a model. */
export type UceTextModel = Pick<StableDiffusion, 'tokenizer' | 'text'>;

/** Prompts encoded per text-encoder call. */
const ENCODE_BATCH = 32;

/**
 * c for each distinct prompt: the last hidden state at its last real token (mask sum − 2), in
 * float64. The encoder is causal, so only positions up to that token are fed: the state there is
 * the same as in the full 77-token pass, at a fraction of the cost.
 */
export async function lastTokenStates(model: UceTextModel, prompts: readonly string[]): Promise<Map<string, Float64Array>> {
  const distinct = [...new Set(prompts)];
  const width = model.text.cfg.width;
  const out = new Map<string, Float64Array>();
  for (let start = 0; start < distinct.length; start += ENCODE_BATCH) {
    const batch = distinct.slice(start, start + ENCODE_BATCH);
    const encodings = batch.map((p) => model.tokenizer.encodeWithMask(p));
    const last = encodings.map((e) => e.attentionMask.reduce((a, b) => a + b, 0) - 2); // index of the token before EOS
    const length = Math.max(...last) + 1;
    const ids = encodings.map((e) => e.inputIds.slice(0, length));
    const states = encodeText(model.text.store, model.text.cfg, ids); // [B, length, width]
    let data: Float32Array;
    try {
      data = (await states.data()) as Float32Array;
    } finally {
      states.dispose();
    }
    batch.forEach((prompt, b) => {
      const offset = (b * length + last[b]!) * width;
      out.set(prompt, Float64Array.from(data.subarray(offset, offset + width)));
    });
  }
  return out;
}

/** The closed-form terms shared by every layer (see the file comment). */
export interface UceSolution {
  /** d_text. */
  readonly width: number;
  /** Erase terms n_e. */
  readonly count: number;
  /** c_guide(i) − c_i, row i of an n_e × d_text matrix. */
  readonly directions: Float64Array;
  /** k_i = s_e·A⁻¹c_i, row i of an n_e × d_text matrix. */
  readonly keys: Float64Array;
}

/** The text states of the erase, guide and preserve prompts, with the hyperparameters. */
export interface UceInputs {
  readonly width: number;
  /** Each erase term's (c_i, c_guide(i)). */
  readonly erase: readonly { readonly c: Float64Array; readonly guide: Float64Array }[];
  /** Each preserve term's c_j. */
  readonly preserve: readonly Float64Array[];
  readonly lambda: number;
  readonly eraseScale: number;
  readonly preserveScale: number;
}

/**
 * A = λI + s_e Σ c_i c_iᵀ + s_p Σ c_j c_jᵀ (eq. 7, right factor), its Cholesky factor, and the
 * k_i = s_e A⁻¹ c_i, all in float64.
 */
export function solveUce(inputs: UceInputs): UceSolution {
  const { width: d, lambda, eraseScale, preserveScale } = inputs;
  // Columns √s·c of every term, stored transposed (d × terms) so each A entry is one contiguous dot product.
  const columns: { c: Float64Array; scale: number }[] = [
    ...inputs.erase.map((e) => ({ c: e.c, scale: eraseScale })),
    ...inputs.preserve.map((c) => ({ c, scale: preserveScale })),
  ].filter((t) => t.scale !== 0);
  const terms = columns.length;
  const ct = new Float64Array(d * terms);
  columns.forEach(({ c, scale }, p) => {
    if (c.length !== d) throw new RangeError(`UCE: a text state has ${c.length} values, expected the text width ${d}`);
    const root = Math.sqrt(scale);
    for (let r = 0; r < d; r++) ct[r * terms + p] = root * c[r]!;
  });
  const a = new Float64Array(d * d); // lower triangle only: cholesky() reads no more
  for (let r = 0; r < d; r++) {
    const rowR = r * terms;
    for (let k = 0; k <= r; k++) {
      const rowK = k * terms;
      let sum = r === k ? lambda : 0;
      for (let p = 0; p < terms; p++) sum += ct[rowR + p]! * ct[rowK + p]!;
      a[r * d + k] = sum;
    }
  }
  let factor;
  try {
    factor = cholesky(a, d, 'UCE matrix λI + Σ c cᵀ');
  } catch (e) {
    if (e instanceof NotPositiveDefiniteError) {
      throw new Error(
        `UCE: λI + s_e Σ c_i c_iᵀ + s_p Σ c_j c_jᵀ is singular (lambda ${lambda}, ${terms} concept prompt(s) for text width ${d}): use lambda > 0`,
      );
    }
    throw e;
  }
  const n = inputs.erase.length;
  const directions = new Float64Array(n * d);
  const keys = new Float64Array(n * d);
  inputs.erase.forEach((e, i) => {
    if (e.guide.length !== d) throw new RangeError(`UCE: a guide state has ${e.guide.length} values, expected the text width ${d}`);
    for (let k = 0; k < d; k++) {
      directions[i * d + k] = e.guide[k]! - e.c[k]!;
      keys[i * d + k] = eraseScale * e.c[k]!;
    }
  });
  choleskySolveInPlace(factor, keys); // rows become k_i = s_e A⁻¹ c_i
  return { width: d, count: n, directions, keys };
}

/**
 * W' = W + (W·Dᵀ)·K for every weight (D: the directions, K: the keys as n_e × d_text matrices),
 * as tfjs matrix products on the current backend. When the erase terms outnumber what a product
 * per layer is worth, the shared P = I + Dᵀ·K is formed once and W' = W·P (`form` forces one).
 * Returns new tensors (the caller owns them), by key.
 */
export function applyUce(sol: UceSolution, weights: ReadonlyMap<string, tf.Tensor>, form: 'auto' | 'rank' | 'dense' = 'auto'): Map<string, tf.Tensor> {
  const d = sol.width;
  const out = new Map<string, tf.Tensor>();
  if (sol.count === 0) {
    for (const [key, w] of weights) out.set(key, tf.clone(w));
    return out;
  }
  let rows = 0;
  for (const [key, w] of weights) {
    if (w.shape.length !== 2 || w.shape[1] !== d) throw new RangeError(`UCE: '${key}' has shape [${w.shape.join(', ')}], expected [d_out, ${d}]`);
    rows += w.shape[0]!;
  }
  // Multiply-adds: per-layer rank products 2·rows·d·n_e, against d²·n_e once + rows·d².
  const dense = form === 'auto' ? d * d * sol.count + rows * d * d < 2 * rows * d * sol.count : form === 'dense';
  const [directions, keys] = tf.tidy(() => [tf.tensor2d(Float32Array.from(sol.directions), [sol.count, d]), tf.tensor2d(Float32Array.from(sol.keys), [sol.count, d])]);
  try {
    const projection = dense ? tf.tidy(() => tf.add(tf.eye(d), tf.matMul(directions!, keys!, true, false))) : undefined; // [d, d]
    try {
      for (const [key, w] of weights) {
        out.set(
          key,
          tf.tidy(() => (projection !== undefined ? tf.matMul(w, projection) : tf.add(w, tf.matMul(tf.matMul(w, directions!, false, true), keys!)))),
        );
      }
    } finally {
      projection?.dispose();
    }
  } catch (e) {
    for (const t of out.values()) t.dispose();
    throw e;
  } finally {
    tf.dispose([directions!, keys!]);
  }
  return out;
}

/** The K/V weight keys UCE edits: every `attn2.to_k.weight` / `attn2.to_v.weight`, in store order. */
export function uceWeightKeys(keys: Iterable<string>): string[] {
  const all = selectParams(keys, isCrossAttnKV);
  const biases = all.filter((k) => k.endsWith('.bias'));
  if (biases.length > 0) throw new Error(`UCE: cross-attention K/V projections with a bias (${biases[0]}) are not supported (SD has none)`);
  return all.filter((k) => k.endsWith('.weight'));
}

/** A UCE edit of a model: the edited K/V weights by UNet key (tensors the caller owns). */
export interface UceResult {
  readonly weights: Map<string, tf.Tensor>;
  readonly prompts: UcePrompts;
  readonly solution: UceSolution;
}

/** What UCE reads of its config. */
export type UceSettings = Pick<
  UceConfig,
  'concepts' | 'guide_concepts' | 'preserve_concepts' | 'concept_type' | 'templates' | 'lambda' | 'erase_scale' | 'preserve_scale'
>;

/** Runs UCE on a loaded model: text states of every prompt, one solve, then every cross-attention K/V weight. */
export async function uceEdit(model: Pick<StableDiffusion, 'tokenizer' | 'text' | 'unet'>, cfg: UceSettings): Promise<UceResult> {
  const width = model.text.cfg.width;
  const contextDim = model.unet.cfg.contextDim[0];
  if (contextDim !== width) throw new Error(`UCE: the UNet cross-attends to width ${contextDim}, the text encoder gives ${width}`);
  const store = model.unet.store;
  const keys = uceWeightKeys(store.keys());
  if (keys.length === 0) throw new Error(`${store.source}: no cross-attention K/V weights (attn2.to_k / attn2.to_v) to edit`);
  const prompts = ucePrompts(cfg);
  const states = await lastTokenStates(model, [...prompts.erase.flatMap((e) => [e.prompt, e.guide]), ...prompts.preserve]);
  const solution = solveUce({
    width,
    erase: prompts.erase.map((e) => ({ c: states.get(e.prompt)!, guide: states.get(e.guide)! })),
    preserve: prompts.preserve.map((p) => states.get(p)!),
    lambda: cfg.lambda,
    eraseScale: cfg.erase_scale,
    preserveScale: cfg.preserve_scale,
  });
  const weights = applyUce(solution, new Map(keys.map((k) => [k, store.get(k)!])));
  return { weights, prompts, solution };
}

/** The delta file's name: `uce-<first concept>[-and-<n>-more].safetensors`. */
export function uceFileName(cfg: Pick<UceConfig, 'concepts'>): string {
  const slug = cfg.concepts[0]!.replace(/\s+/g, '_').replace(/[^A-Za-z0-9._-]/g, '-').replace(/^[.-]+/, '') || 'concept';
  const more = cfg.concepts.length - 1;
  return `uce-${slug}${more > 0 ? `-and-${more}-more` : ''}.safetensors`;
}

/** State after setup: the config, the model and the edit. */
export interface UceState {
  readonly cfg: UceConfig;
  readonly model: StableDiffusion;
  readonly result: UceResult;
}

function overridesOf(s: UceState): ParamOverride[] {
  return [...s.result.weights].map(([key, value]) => ({ component: 'unet', key, value }));
}

/** UCE as a training method: zero optimizer steps; `setup` computes the edit. */
export const uce: TrainingMethod<UceConfig, UceState, tf.TensorContainer> = {
  id: 'uce',
  description: 'UCE (Gandikota et al. 2024): closed-form concept erasure in the cross-attention K/V weights, no training steps; saves a delta.',
  configSchema: uceConfigSchema,

  async setup(ctx, cfg) {
    const model = await ctx.model();
    const started = performance.now();
    const result = await uceEdit(model, cfg);
    const { erase, preserve } = result.prompts;
    const guides = [...new Set(erase.map((e) => JSON.stringify(e.guide)))].join(', ');
    ctx.log(
      `uce: ${erase.length} erase prompt(s) toward ${guides}, ${preserve.length} preserved; λ ${cfg.lambda}, scales ${cfg.erase_scale}/${cfg.preserve_scale}; ${result.weights.size} K/V weights edited in ${(performance.now() - started).toFixed(0)} ms`,
    );
    return { cfg, model, result };
  },

  trainable: () => ({}),

  prepare() {
    return Promise.reject(new Error('uce: a closed-form edit has no training steps (steps must be 0)'));
  },

  loss() {
    throw new Error('uce: a closed-form edit has no loss (steps must be 0)');
  },

  async artifacts(s, step) {
    const { cfg } = s;
    const info: DeltaInfo = {
      method: 'uce',
      baseModel: s.model.name,
      baseModelHash: s.model.modelHash,
      concept: cfg.concepts.join('; '),
      parameters: 'attn2.to_k+to_v',
      step,
      config: JSON.stringify({ ...cfg, model: path.basename(cfg.model), output_dir: path.basename(cfg.output_dir) }),
      extra: {
        guide_concepts: JSON.stringify([...new Set(s.result.prompts.erase.map((e) => e.guide))]),
        preserve_concepts: JSON.stringify(cfg.preserve_concepts),
        lambda: String(cfg.lambda),
        erase_scale: String(cfg.erase_scale),
        preserve_scale: String(cfg.preserve_scale),
        templates: String(cfg.templates),
      },
    };
    const artifact: Artifact = {
      file: uceFileName(cfg),
      format: `UCE delta: ${s.result.weights.size} cross-attention K/V weights (diffusers UNet keys, as the official uce_sd_erase.py saves them)`,
      write: (target) => writeDelta(target, overridesOf(s), info),
    };
    return [artifact];
  },

  generationPatch: (s) => ({ params: overridesOf(s) }),

  applyArtifact: (model, file) => applyDelta(model, file),

  dispose(s) {
    for (const t of s.result.weights.values()) t.dispose();
  },
};
