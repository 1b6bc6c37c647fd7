/**
 * ESD, "Erasing Concepts from Diffusion Models" (Gandikota et al., ICCV 2023): fine-tune the UNet
 * so that its prediction for a concept c becomes the frozen model's prediction guided *away* from c.
 *
 * Per step, with θ the model being trained, θ* the frozen original and η = negative_guidance:
 *   1. pick a concept prompt c (one of the `separator`-split words, uniformly);
 *   2. x_t by partial sampling conditioned on c with guidance `start_guidance` (no gradients);
 *   3. frozen ε*(x_t, t, ∅), ε*(x_t, t, c) and the trained prediction ε_θ(x_t, t, c);
 *   4. loss = MSE(ε_θ(x_t, t, c), target), Adam, batch 1 (paper eq. 3–4: the target is the
 *      frozen score with negative classifier-free guidance on c).
 * Two presets, each exact to one version of the official code (rohitgandikota/erasing):
 * - `esd-2023` (`train-scripts/train-esd.py`, the paper's code): x_t from the CompVis DDIM sampler
 *   run with the **trained** model to a random DDIM step t_enc (its off-by-one quirks kept, see
 *   `esd-sampling.ts`); loss timestep uniform in the t_enc-th interval of 1000/S DDPM steps;
 *   target = ε*(∅) − η·(ε*(c) − ε*(∅)); 1000 iterations, lr 1e-5, η 1, start_guidance 3,
 *   50 DDIM steps; parameter sets xattn (ESD-x), noxattn (ESD-u), selfattn, notime, full.
 * - `esd-2024` (`esd_sd.py` + `utils/sd_utils.py`): x_t from the pipeline's own scheduler run with
 *   the **frozen** model over timesteps[0:run_till] from the seeded initial latents of
 *   `torch.Generator().manual_seed(seed)`, t = timesteps[run_till]; target = ε*(from) − η·(ε*(c) −
 *   ε*(∅)) with `from` = `erase_from` (which then also conditions x_t and the trained prediction)
 *   or c; 200 iterations, lr 5e-5, η 2, guidance 3; sets esd-x, esd-x-strict, esd-u, esd-all.
 *
 * One option goes beyond both scripts: `preserve` prompts. On models whose text states for related
 * concepts overlap (the toy model's tiny text encoder), erasing one shape drags the others along;
 * a retain term — each step also pulls ε_θ(x_t, t, p) toward ε*(x_t, t, p) for one preserve prompt
 * p at the same x_t, weighted by `preserve_weight` — is the usual remedy in later erasure work.
 * Without `preserve` the step is exactly the official one.
 *
 * The frozen original costs no second UNet: the same `unet()` runs over two parameter views of
 * the one set of loaded tensors — θ* the loaded tensors as they are, θ the same map with only the
 * trainable subset overridden by variables (tfjs tensors are immutable, so the loaded tensors
 * stay the original values while the variables move). Extra memory: the trainable subset once.
 */
import { createHash } from 'node:crypto';
import { stat } from 'node:fs/promises';
import path from 'node:path';

import * as tf from '@tensorflow/tfjs';
import { z } from 'zod';

import type { DType } from '../io/dtypes.js';
import { hwioToOihw, nchwToNhwc } from '../io/layout.js';
import { readDiffusersFolder, readSingleFile, writeDiffusersFolder, type ComponentTensors, type TensorRef } from '../io/single-file.js';
import { encodeText } from '../models/clip/text-encoder-tfjs.js';
import { esd2023Sets, esd2024Sets, selectParams, type ParamSelector } from '../models/unet/params.js';
import { unet } from '../models/unet/unet.js';
import { ParamStore } from '../ops/scope.js';
import { tfOps } from '../ops/tfjs-ops.js';
import { defaultSamplerKind, denoise, makeSampler } from '../pipeline/denoise.js';
import type { StableDiffusion } from '../pipeline/load.js';
import { checkImageSize } from '../pipeline/txt2img.js';
import { TorchGenerator } from '../schedulers/rng.js';
import type { Sampler } from '../schedulers/sampler.js';
import { checkCommonFields, commonFields } from '../train/config.js';
import type { TrainRandom } from '../train/rng-state.js';
import { applyDelta, writeDelta, type DeltaInfo } from './delta.js';
import { compvisDdimGrid, lossTimestepRange, quickSampleTillT, type CompvisDdimGrid } from './esd-sampling.js';
import type { Artifact, ParamOverride, TrainingMethod } from './types.js';

/** The two versions of the official code. */
export const ESD_PRESETS = ['esd-2023', 'esd-2024'] as const;
export type EsdPreset = (typeof ESD_PRESETS)[number];

/** Parameter-set names of each preset (`--train_method` of its script). */
export const ESD_PARAMETER_SETS: Readonly<Record<EsdPreset, readonly string[]>> = {
  'esd-2023': Object.keys(esd2023Sets),
  'esd-2024': Object.keys(esd2024Sets),
};

/** Defaults of each preset: the scripts' argparse defaults. */
export const ESD_PRESET_DEFAULTS: Readonly<Record<EsdPreset, { readonly steps: number; readonly learning_rate: number; readonly negative_guidance: number }>> = {
  'esd-2023': { steps: 1000, learning_rate: 1e-5, negative_guidance: 1 },
  'esd-2024': { steps: 200, learning_rate: 5e-5, negative_guidance: 2 },
};

/** train-esd.py's shorthand concepts, expanded before splitting (split only with a separator, as there). */
export const ESD_2023_CONCEPT_LISTS: Readonly<Record<string, string>> = {
  allartist: 'Kelly Mckernan, Thomas Kinkade, Ajin Demi Human, Alena Aenami, Tyler Edlin, Kilian Eng',
  i2p: 'hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity, bodily fluids, blood',
  artifact:
    'ugly, tiling, poorly drawn hands, poorly drawn feet, poorly drawn face, out of frame, mutation, mutated, extra limbs, extra legs, extra arms, disfigured, deformed, cross-eye, body out of frame, blurry, bad art, bad anatomy, blurred, text, watermark, grainy',
};

// Placeholder default of the preset-dependent fields (never valid input), filled in after parsing.
const FROM_PRESET = Number.NaN;

/** Config of an ESD run. */
export const esdConfigSchema = z
  .strictObject({
    method: z.literal('esd').describe('Erase a concept from the UNet (ESD, Gandikota et al. 2023).'),
    ...commonFields({ adam_weight_decay: 0 }),
    steps: z
      .number()
      .int()
      .min(1)
      .default(FROM_PRESET)
      .describe('Training iterations (batch 1 each). Default: 1000 for esd-2023, 200 for esd-2024 (the scripts’ --iterations).'),
    learning_rate: z
      .number()
      .positive()
      .default(FROM_PRESET)
      .describe('Adam learning rate. Default: 1e-5 for esd-2023, 5e-5 for esd-2024 (the scripts’ --lr).'),
    concept: z
      .string()
      .trim()
      .min(1)
      .describe('The concept to erase, as a prompt ("Van Gogh", "nudity"). esd-2023 also takes allartist, i2p and artifact (its lists). Required.'),
    erase_from: z
      .string()
      .trim()
      .min(1)
      .nullable()
      .default(null)
      .describe('esd-2024 only: erase the concept from this prompt (x_t and the trained prediction use it; target ε*(from) − η(ε*(c) − ε*(∅))). Default null: the concept itself.'),
    separator: z
      .string()
      .min(1)
      .nullable()
      .default(null)
      .describe('Split the concept at this string into several prompts, one drawn per step (train-esd.py --seperator, e.g. ","). Default null: one prompt.'),
    preset: z
      .enum(ESD_PRESETS)
      .default('esd-2024')
      .describe('Which official code to reproduce: esd-2023 (train-esd.py, the paper) or esd-2024 (esd_sd.py). Default esd-2024.'),
    parameters: z
      .string()
      .min(1)
      .describe(
        'UNet parameters to train. esd-2023: xattn (ESD-x, styles/artists), noxattn (ESD-u, global concepts such as nudity), selfattn, notime, full. esd-2024: esd-x, esd-x-strict, esd-u, esd-all. Required.',
      ),
    negative_guidance: z
      .number()
      .default(FROM_PRESET)
      .describe('η, how far the target is pushed away from the concept. Default: 1 for esd-2023, 2 for esd-2024 (the same target when erasing a concept from itself: ε*(c) − 2(ε*(c) − ε*(∅)) = ε*(∅) − (ε*(c) − ε*(∅))).'),
    start_guidance: z
      .number()
      .min(0)
      .default(3)
      .describe('Classifier-free guidance of the partial sampling that makes x_t (esd_sd.py --guidance_scale). Default 3.'),
    ddim_steps: z
      .number()
      .int()
      .min(2)
      .max(500)
      .default(50)
      .describe('Sampler steps of the schedule x_t is drawn from (esd-2023: DDIM steps; esd-2024: --num_inference_steps with the model’s scheduler). Default 50.'),
    preserve: z
      .string()
      .trim()
      .min(1)
      .nullable()
      .default(null)
      .describe('Prompts to keep (split at `separator` like the concept): each step adds preserve_weight × MSE(ε_θ(x_t, t, p), ε*(x_t, t, p)) for one drawn prompt p at the same x_t. Not in the official scripts. Default null: plain ESD.'),
    preserve_weight: z
      .number()
      .min(0)
      .default(1)
      .describe('Weight of the preserve term against the erasure term. Default 1.'),
    save_full_model: z
      .boolean()
      .default(false)
      .describe('Also write the whole edited model as a diffusers folder <name>-diffusers/ next to the delta file. Default false (delta only).'),
  })
  .superRefine((c, ctx) => {
    checkCommonFields(c, ctx);
    const sets = ESD_PARAMETER_SETS[c.preset];
    if (!sets.includes(c.parameters)) {
      const other = ESD_PRESETS.find((p) => ESD_PARAMETER_SETS[p].includes(c.parameters));
      ctx.addIssue({
        code: 'custom',
        path: ['parameters'],
        message: `expected one of ${sets.map((s) => JSON.stringify(s)).join(', ')} for preset ${c.preset}; found ${JSON.stringify(c.parameters)}${other === undefined ? '' : ` (a ${other} set)`}`,
      });
    }
    if (c.preset === 'esd-2023' && c.erase_from !== null) {
      ctx.addIssue({ code: 'custom', path: ['erase_from'], message: 'train-esd.py (esd-2023) has no erase_from; use preset: esd-2024' });
    }
    if (c.batch_size !== 1) ctx.addIssue({ code: 'custom', path: ['batch_size'], message: `ESD trains with batch 1 (one x_t per step); found ${c.batch_size}` });
    if (c.noise_offset !== 0) ctx.addIssue({ code: 'custom', path: ['noise_offset'], message: 'ESD draws no training noise (its x_t comes from sampling); leave it 0' });
    if (c.prediction_type !== null) {
      ctx.addIssue({ code: 'custom', path: ['prediction_type'], message: "ESD's target is made of the model's own predictions; leave prediction_type unset" });
    }
  })
  .overwrite((c) => {
    const d = ESD_PRESET_DEFAULTS[c.preset];
    return {
      ...c,
      steps: Number.isNaN(c.steps) ? d.steps : c.steps,
      learning_rate: Number.isNaN(c.learning_rate) ? d.learning_rate : c.learning_rate,
      negative_guidance: Number.isNaN(c.negative_guidance) ? d.negative_guidance : c.negative_guidance,
    };
  });

export type EsdConfig = z.infer<typeof esdConfigSchema>;

/** The concept prompts one of which each step draws (train-esd.py's `words`). */
export function esdConceptWords(cfg: Pick<EsdConfig, 'concept' | 'separator' | 'preset'>): string[] {
  const concept = cfg.preset === 'esd-2023' ? (ESD_2023_CONCEPT_LISTS[cfg.concept] ?? cfg.concept) : cfg.concept;
  if (cfg.separator === null) return [concept];
  const words = concept.split(cfg.separator).map((w) => w.trim());
  if (words.some((w) => w === '')) throw new Error(`concept: splitting "${concept}" at ${JSON.stringify(cfg.separator)} leaves an empty prompt`);
  return words;
}

/** The preserve prompts (split like the concept), or none. */
export function esdPreservePrompts(cfg: Pick<EsdConfig, 'preserve' | 'separator'>): string[] {
  if (cfg.preserve === null) return [];
  if (cfg.separator === null) return [cfg.preserve];
  const prompts = cfg.preserve.split(cfg.separator).map((w) => w.trim());
  if (prompts.some((w) => w === '')) throw new Error(`preserve: splitting "${cfg.preserve}" at ${JSON.stringify(cfg.separator)} leaves an empty prompt`);
  return prompts;
}

/** The selector of a preset's parameter set (`src/models/unet/params.ts`). */
export function esdSelector(preset: EsdPreset, parameters: string): ParamSelector {
  const sets: Readonly<Record<string, ParamSelector>> = preset === 'esd-2023' ? esd2023Sets : esd2024Sets;
  const selector = sets[parameters];
  if (selector === undefined) throw new Error(`parameters: '${parameters}' is not an ${preset} set (${ESD_PARAMETER_SETS[preset].join(', ')})`);
  return selector;
}

/** State after setup. */
export interface EsdState {
  readonly cfg: EsdConfig;
  readonly model: StableDiffusion;
  /** Trainable UNet keys (relative to the UNet), in the store's order. */
  readonly keys: readonly string[];
  readonly variables: ReadonlyMap<string, tf.Variable>;
  /** θ*: the loaded tensors as they are. */
  readonly frozen: ParamStore<tf.Tensor>;
  /** θ: the same tensors with the trainable subset overridden by `variables`. */
  readonly trained: ParamStore<tf.Tensor>;
  readonly words: readonly string[];
  /** Text states [1, S, D] of "", of each word, and of erase_from. */
  readonly nullContext: tf.Tensor;
  readonly wordContexts: readonly tf.Tensor[];
  readonly fromContext: tf.Tensor | undefined;
  /** Text states [1, S, D] of each preserve prompt (empty without `preserve`). */
  readonly preserveContexts: readonly tf.Tensor[];
  /** Latent size [h, w, C]. */
  readonly latent: readonly [number, number, number];
  /** esd-2023: the CompVis DDIM grid. */
  readonly grid: CompvisDdimGrid | undefined;
  /** esd-2024: the model's own sampler for `ddim_steps` steps. */
  readonly sampler: Sampler<tf.Tensor> | undefined;
}

/** A prepared step: x_t, its timestep, the trained prediction's text states and the target (row 1, if any: the preserve prompt). */
export interface EsdBatch {
  /** NHWC [n, h, w, C]: n = 1, or 2 with a preserve prompt (the same x_t twice). */
  readonly xT: tf.Tensor;
  /** float32 [n]. */
  readonly timesteps: tf.Tensor;
  /** [n, S, D]. */
  readonly context: tf.Tensor;
  /** NHWC like xT. */
  readonly target: tf.Tensor;
  /** Index signature: makes the batch a `tf.TensorContainer`, which the loop frees with tf.dispose. */
  readonly [key: string]: tf.Tensor;
}

/** Frozen predictions at one (x_t, t). */
export interface FrozenPredictions {
  /** ε*(x_t, t, "") */
  readonly eNull: tf.Tensor;
  /** ε*(x_t, t, c) */
  readonly eConcept: tf.Tensor;
  /** ε*(x_t, t, erase_from), when set. */
  readonly eFrom: tf.Tensor | undefined;
  /** ε*(x_t, t, p) for the step's preserve prompt, when there is one. */
  readonly ePreserve: tf.Tensor | undefined;
}

/** ε*(x_t, t, ·) for "", the word, erase_from and the preserve prompt in one batched UNet call over the frozen parameters. */
export function frozenPredictions(s: EsdState, xT: tf.Tensor, t: number, word: number, preserve?: number): FrozenPredictions {
  const from = s.fromContext === undefined ? [] : [s.fromContext];
  const kept = preserve === undefined ? [] : [preserveContext(s, preserve)];
  const contexts = [s.nullContext, wordContext(s, word), ...from, ...kept];
  const outs = tf.tidy(() => {
    const n = contexts.length;
    const x = tf.concat(new Array<tf.Tensor>(n).fill(xT), 0); // [n,h,w,C]
    const out = unet(tfOps, s.frozen.scope(), x, tf.fill([n], t, 'float32'), tf.concat(contexts, 0), s.model.unet.cfg);
    return tf.split(out, n, 0);
  });
  return { eNull: outs[0]!, eConcept: outs[1]!, eFrom: from.length > 0 ? outs[2] : undefined, ePreserve: kept.length > 0 ? outs[2 + from.length] : undefined };
}

/** The ESD target of a preset from frozen predictions (2023: ε*(∅) − η(ε*(c) − ε*(∅)); 2024: ε*(from) − η(ε*(c) − ε*(∅))). */
export function esdTarget(preset: EsdPreset, negativeGuidance: number, p: FrozenPredictions): tf.Tensor {
  return tf.tidy(() => {
    const base = preset === 'esd-2023' ? p.eNull : (p.eFrom ?? p.eConcept);
    return tf.sub(base, tf.mul(tf.sub(p.eConcept, p.eNull), negativeGuidance));
  });
}

/** The batch at a given x_t (NHWC) and timestep for concept word `word` (and preserve prompt `preserve`): frozen targets and the trained prediction's text states. */
export function esdBatchAt(s: EsdState, xT: tf.Tensor, t: number, word: number, preserve?: number): EsdBatch {
  const p = frozenPredictions(s, xT, t, word, preserve);
  try {
    if (p.ePreserve === undefined) {
      return {
        xT: tf.clone(xT),
        timesteps: tf.tensor1d([t], 'float32'),
        context: tf.clone(trainedContext(s, word)),
        target: esdTarget(s.cfg.preset, s.cfg.negative_guidance, p),
      };
    }
    const ePreserve = p.ePreserve;
    return tf.tidy(() => ({
      xT: tf.concat([xT, xT], 0),
      timesteps: tf.tensor1d([t, t], 'float32'),
      context: tf.concat([trainedContext(s, word), preserveContext(s, preserve!)], 0),
      target: tf.concat([esdTarget(s.cfg.preset, s.cfg.negative_guidance, p), ePreserve], 0),
    }));
  } finally {
    tf.dispose([p.eNull, p.eConcept, ...(p.eFrom === undefined ? [] : [p.eFrom]), ...(p.ePreserve === undefined ? [] : [p.ePreserve])]);
  }
}

/** The trained prediction ε_θ(x_t, t, c) of a batch. */
export function trainedPrediction(s: EsdState, b: EsdBatch): tf.Tensor {
  return unet(tfOps, s.trained.scope(), b.xT, b.timesteps, b.context, s.model.unet.cfg);
}

/** The ESD loss of a batch: mean((ε_θ(x_t, t, c) − target)²), torch.nn.MSELoss, plus preserve_weight × the preserve row's. */
export function esdLoss(s: EsdState, b: EsdBatch): tf.Scalar {
  const err = tf.square(tf.sub(trainedPrediction(s, b), b.target));
  if (b.xT.shape[0] === 1) return tf.mean(err) as tf.Scalar;
  const [erase, keep] = tf.split(err, 2, 0);
  return tf.add(tf.mean(erase!), tf.mul(tf.mean(keep!), s.cfg.preserve_weight)) as tf.Scalar;
}

/** esd-2023's x_t: `quick_sample_till_t` with the trained model from NHWC `startCode` (caller owns the result). */
export async function sampleXt2023(s: EsdState, startCode: tf.Tensor, tEnc: number, word: number): Promise<tf.Tensor> {
  if (s.grid === undefined) throw new Error('sampleXt2023: not an esd-2023 state');
  return quickSampleTillT({
    scope: s.trained.scope(),
    cfg: s.model.unet.cfg,
    grid: s.grid,
    startCode,
    uncond: s.nullContext,
    cond: wordContext(s, word),
    guidance: s.cfg.start_guidance,
    tEnc,
  });
}

/**
 * esd-2024's x_t: the pipeline call of `esd_sd.py` — initial latents from
 * `torch.Generator().manual_seed(seed)`, the model's scheduler over timesteps[0:runTill] with the
 * frozen UNet, prompt erase_from (else the word), guidance start_guidance — and t = timesteps[runTill].
 */
export async function sampleXt2024(s: EsdState, seed: number, runTill: number, word: number): Promise<{ xT: tf.Tensor; t: number }> {
  const sampler = s.sampler;
  if (sampler === undefined) throw new Error('sampleXt2024: not an esd-2024 state');
  const t = sampler.timesteps[runTill];
  if (t === undefined) throw new Error(`run_till ${runTill} is outside the ${sampler.timesteps.length}-entry schedule`);
  const [h, w, c] = s.latent;
  const generator = new TorchGenerator(seed);
  const shape = [1, c, h, w];
  const start = tf.tidy(() => tf.mul(tf.tensor4d(nchwToNhwc(generator.randn(shape), shape).data, [1, h, w, c]), sampler.initNoiseSigma));
  const prompt = s.fromContext ?? wordContext(s, word);
  // diffusers' pipeline guides only when the scale is > 1.
  const guidance = s.cfg.start_guidance;
  const context = guidance > 1 ? tf.concat([s.nullContext, prompt], 0) : tf.clone(prompt); // [2,S,D]: uncond, cond
  try {
    const xT = await denoise(s.model, start, { sampler, context, guidance, toStep: runTill, unetScope: s.frozen.scope(), generator });
    return { xT, t };
  } finally {
    start.dispose();
    context.dispose();
  }
}

function wordContext(s: EsdState, word: number): tf.Tensor {
  const ctx = s.wordContexts[word];
  if (ctx === undefined) throw new Error(`concept word ${word} out of range (${s.words.length} words)`);
  return ctx;
}

function preserveContext(s: EsdState, preserve: number): tf.Tensor {
  const ctx = s.preserveContexts[preserve];
  if (ctx === undefined) throw new Error(`preserve prompt ${preserve} out of range (${s.preserveContexts.length} prompts)`);
  return ctx;
}

function trainedContext(s: EsdState, word: number): tf.Tensor {
  return s.cfg.preset === 'esd-2024' && s.fromContext !== undefined ? s.fromContext : wordContext(s, word);
}

function encodePrompt(model: StableDiffusion, prompt: string): tf.Tensor {
  return encodeText(model.text.store, model.text.cfg, [model.tokenizer.encode(prompt)]); // [1,S,D]
}

// Drawn after the official draws, so a run without `preserve` consumes the same random stream.
function drawPreserve(random: TrainRandom, s: EsdState): number | undefined {
  return s.preserveContexts.length === 0 ? undefined : random.randint(s.preserveContexts.length, 1)[0]!;
}

/** NCHW-drawn normals as NHWC (torch's values in torch's order). */
function randnNhwc(random: TrainRandom, h: number, w: number, c: number): tf.Tensor {
  return tf.tensor4d(nchwToNhwc(random.randn([1, c, h, w]), [1, c, h, w]).data, [1, h, w, c]);
}

/**
 * File stem of the outputs, as esd_sd.py names them: `esd-<concept>-from-<from>-<set>`. A long
 * concept (a list of prompts) keeps its first 40 characters plus a hash of the whole, so the
 * name stays within file-system limits and still differs between concepts.
 */
export function esdFileStem(cfg: Pick<EsdConfig, 'concept' | 'erase_from' | 'parameters'>): string {
  const slug = (text: string) => {
    const s = text.replace(/\s+/g, '_').replace(/[^A-Za-z0-9._-]/g, '-').replace(/^[.-]+/, '') || 'concept';
    return s.length <= 48 ? s : `${s.slice(0, 40)}~${createHash('sha256').update(text).digest('hex').slice(0, 7)}`;
  };
  return `esd-${slug(cfg.concept)}-from-${slug(cfg.erase_from ?? cfg.concept)}-${cfg.parameters.replace(/-/g, '')}`;
}

interface Snapshot {
  readonly key: string;
  readonly shape: readonly number[];
  readonly data: Float32Array;
}

async function snapshot(s: EsdState): Promise<Snapshot[]> {
  const out: Snapshot[] = [];
  for (const key of s.keys) {
    const v = s.variables.get(key)!;
    out.push({ key, shape: [...v.shape], data: Float32Array.from(await v.data<'float32'>()) });
  }
  return out;
}

// The run config for file metadata, with local paths cut to their last component.
function shareableConfig(cfg: EsdConfig): EsdConfig {
  return { ...cfg, model: path.basename(cfg.model), output_dir: path.basename(cfg.output_dir) };
}

/** The base model with the trained UNet tensors swapped in, written as a diffusers folder at `target`. */
async function writeFullModel(target: string, s: EsdState, values: readonly Snapshot[]): Promise<void> {
  let base: ComponentTensors;
  let family: 'sd1' | 'sd2' | undefined;
  if ((await stat(s.cfg.model)).isFile()) {
    const single = await readSingleFile(s.cfg.model);
    family = single.detection.family;
    base = single;
  } else {
    base = await readDiffusersFolder(s.cfg.model);
  }
  try {
    const unetRefs = new Map(base.components.unet);
    for (const v of values) {
      const stored = v.shape.length === 4 ? hwioToOihw(v.data, v.shape) : { data: v.data, shape: [...v.shape] };
      unetRefs.set(v.key, float32Ref(stored.data, stored.shape));
    }
    await writeDiffusersFolder(target, { ...base, components: { ...base.components, unet: unetRefs } }, family === undefined ? {} : { family });
  } finally {
    await base.close();
  }
}

function float32Ref(data: Float32Array, shape: readonly number[]): TensorRef {
  const dtype: DType = 'F32';
  return {
    dtype,
    shape,
    readRaw: () => Promise.resolve(new Uint8Array(data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength))),
    readFloat32: () => Promise.resolve(Float32Array.from(data)),
  };
}

/** ESD as a training method. */
export const esd: TrainingMethod<EsdConfig, EsdState, EsdBatch> = {
  id: 'esd',
  description: 'ESD concept erasure (Gandikota et al. 2023): fine-tune the UNet away from a concept; saves a delta of the changed tensors.',
  configSchema: esdConfigSchema,

  async setup(ctx, cfg) {
    const model = await ctx.model();
    const preset = cfg.preset;
    if (preset === 'esd-2023' && model.scheduler.predictionType !== 'epsilon') {
      throw new Error(`esd-2023: the CompVis DDIM sampler of train-esd.py assumes ε-prediction; this model predicts ${model.scheduler.predictionType} (use preset: esd-2024)`);
    }
    const store = model.unet.store;
    const keys = selectParams(store.keys(), esdSelector(preset, cfg.parameters));
    if (keys.length === 0) throw new Error(`parameters: '${cfg.parameters}' selects no parameter of ${store.source}`);
    const words = esdConceptWords(cfg);
    const size = cfg.resolution ?? model.defaultSize.width;
    checkImageSize(model, size, size);
    const f = model.vae.cfg.downscale;

    // θ* and θ: two views over the same loaded tensors; θ overrides the trainable subset.
    const base = new Map<string, tf.Tensor>();
    for (const key of store.keys()) base.set(key, store.get(key)!);
    const frozen = new ParamStore<tf.Tensor>(base, (t) => t.shape, `${store.source} (frozen)`);
    const trained = new ParamStore<tf.Tensor>(base, (t) => t.shape, `${store.source} (trained)`);
    const variables = new Map<string, tf.Variable>();
    for (const key of keys) {
      const v = tf.variable(base.get(key)!, true);
      variables.set(key, v);
      trained.override(key, v);
    }
    const nullContext = encodePrompt(model, '');
    const wordContexts = words.map((w) => encodePrompt(model, w));
    const fromContext = cfg.erase_from === null ? undefined : encodePrompt(model, cfg.erase_from);
    const preserveContexts = esdPreservePrompts(cfg).map((p) => encodePrompt(model, p));
    const count = keys.reduce((a, k) => a + base.get(k)!.size, 0);
    ctx.log(
      `esd (${preset}, ${cfg.parameters}): erasing ${words.length <= 3 ? words.map((w) => JSON.stringify(w)).join(', ') : `${words.length} prompts (${words.slice(0, 2).map((w) => JSON.stringify(w)).join(', ')}, …)`}${cfg.erase_from === null ? '' : ` from "${cfg.erase_from}"`}; ${keys.length} tensors, ${count} trainable values; η ${cfg.negative_guidance}, start guidance ${cfg.start_guidance}, ${cfg.ddim_steps} sampler steps at ${size}×${size}${preserveContexts.length === 0 ? '' : `; preserving ${preserveContexts.length} prompt(s) at weight ${cfg.preserve_weight}`}`,
    );
    return {
      cfg,
      model,
      keys,
      variables,
      frozen,
      trained,
      words,
      nullContext,
      wordContexts,
      fromContext,
      preserveContexts,
      latent: [size / f, size / f, model.unet.cfg.inChannels],
      grid: preset === 'esd-2023' ? compvisDdimGrid(model.scheduler, cfg.ddim_steps) : undefined,
      sampler: preset === 'esd-2024' ? makeSampler(model.scheduler, { kind: defaultSamplerKind(model.scheduler), steps: cfg.ddim_steps }) : undefined,
    };
  },

  trainable: (s) => Object.fromEntries(s.keys.map((k) => [`unet.${k}`, s.variables.get(k)!])),

  async prepare(ctx, s) {
    const { cfg } = s;
    // train-esd.py: random.sample(words, 1), then t_enc, t_ddpm, start_code (esd_sd.py: run_till, seed).
    const word = ctx.random.randint(s.words.length, 1)[0]!;
    if (cfg.preset === 'esd-2023') {
      const tEnc = ctx.random.randint(cfg.ddim_steps, 1)[0]!;
      const [lo, hi] = lossTimestepRange(tEnc, cfg.ddim_steps);
      const t = lo + ctx.random.randint(hi - lo, 1)[0]!;
      const [h, w, c] = s.latent;
      const startCode = randnNhwc(ctx.random, h, w, c);
      let xT: tf.Tensor;
      try {
        xT = await sampleXt2023(s, startCode, tEnc, word);
      } finally {
        startCode.dispose();
      }
      try {
        return esdBatchAt(s, xT, t, word, drawPreserve(ctx.random, s));
      } finally {
        xT.dispose();
      }
    }
    const runTill = ctx.random.randint(cfg.ddim_steps, 1)[0]!;
    const seed = ctx.random.randint(2 ** 15 + 1, 1)[0]!; // random.randint(0, 2**15), inclusive
    const { xT, t } = await sampleXt2024(s, seed, runTill, word);
    try {
      return esdBatchAt(s, xT, t, word, drawPreserve(ctx.random, s));
    } finally {
      xT.dispose();
    }
  },

  loss: (_ctx, s, b) => esdLoss(s, b),

  async artifacts(s, step) {
    const values = await snapshot(s);
    const stem = esdFileStem(s.cfg);
    const info: DeltaInfo = {
      method: 'esd',
      baseModel: s.model.name,
      baseModelHash: s.model.modelHash,
      concept: s.cfg.concept,
      preset: s.cfg.preset,
      parameters: s.cfg.parameters,
      negativeGuidance: s.cfg.negative_guidance,
      step,
      config: JSON.stringify(shareableConfig(s.cfg)),
      ...(s.cfg.erase_from === null ? {} : { extra: { erase_from: s.cfg.erase_from } }),
    };
    const out: Artifact[] = [
      {
        file: `${stem}.safetensors`,
        format: `ESD delta: ${values.length} UNet tensors (${s.cfg.parameters}); apply with sdwb generate --delta`,
        write: async (target) => {
          const overrides: ParamOverride[] = values.map((v) => ({ component: 'unet', key: v.key, value: tf.tensor(v.data, [...v.shape], 'float32') }));
          try {
            await writeDelta(target, overrides, info);
          } finally {
            for (const o of overrides) o.value.dispose();
          }
        },
      },
    ];
    if (s.cfg.save_full_model) {
      out.push({
        file: `${stem}-diffusers`,
        format: 'the whole edited model (diffusers folder)',
        write: (target) => writeFullModel(target, s, values),
      });
    }
    return out;
  },

  generationPatch: (s) => ({ params: s.keys.map((key) => ({ component: 'unet' as const, key, value: s.variables.get(key)! })) }),

  async applyArtifact(model, file) {
    if ((await stat(file).catch(() => undefined))?.isDirectory() === true) {
      throw new Error(`${file}: a full model folder, not a delta; use it as the model itself`);
    }
    return applyDelta(model, file);
  },

  dispose(s) {
    for (const v of s.variables.values()) v.dispose();
    tf.dispose([s.nullContext, ...s.wordContexts, ...s.preserveContexts, ...(s.fromContext === undefined ? [] : [s.fromContext])]);
  },
};
