/**
 * The training-method plugin interface. A method says which variables it trains, how a raw batch
 * becomes model inputs (`prepare`: async, no gradients), what its loss is (`loss`: synchronous,
 * pure, differentiable), what files it produces and how they apply at generation time. The
 * training loop (`src/train/loop.ts`) calls nothing else, so adding a method touches only
 * `src/methods/` (one file + one registry line) and `configs/`.
 *
 * Memory: the loop owns it. Tensors that `prepare` returns are freed by the loop after the step;
 * intermediates of `prepare` that are not returned are freed too (it runs in a tfjs scope); the
 * `loss` forward runs inside the loop's gradient tape, which frees its intermediates. So a method
 * never disposes per-step tensors — only what it created in `setup`, in `dispose`.
 */
import type * as tf from '@tensorflow/tfjs';
import type { z } from 'zod';

import type { TemplateKind } from '../data/captions.js';
import type { UnetHooks } from '../models/unet/unet.js';
import type { StableDiffusion } from '../pipeline/load.js';
import type { MethodConfig } from '../train/config.js';
import type { TrainRandom } from '../train/rng-state.js';

/** What `setup` gets from the loop. */
export interface SetupCtx {
  /** The base model, loaded once per run and shared with the loop's sample images. */
  model(): Promise<StableDiffusion>;
  /** Randomness for initial weights (seeded by the config's seed). */
  readonly random: TrainRandom;
  /** A line for the run log. */
  log(message: string): void;
}

/** What `prepare` and `loss` get for one micro-batch. */
export interface StepCtx {
  /** The optimizer step this micro-batch belongs to (0-based). */
  readonly step: number;
  /** Micro-batch index within the step (gradient accumulation), 0-based. */
  readonly micro: number;
  /** This micro-batch's randomness: timesteps, noise, posterior samples (keyed by step and micro). */
  readonly random: TrainRandom;
}

/** Images of one micro-batch, when the config has a `data:` section. */
export interface ImageBatch {
  readonly captions: readonly string[];
  readonly count: number;
  /** Image size in pixels. */
  readonly height: number;
  readonly width: number;
  /** float32 NHWC [count, height, width, 3] in [−1, 1]; absent when `latents` is given. */
  readonly pixels?: Float32Array;
  /**
   * With `data.cache_latents`: each sample's VAE posterior, NHWC [count, h, w, C] (the model's
   * latent size), in place of pixels. Draw z = mean + std·ε per step as for encoded pixels.
   */
  readonly latents?: { readonly mean: Float32Array; readonly std: Float32Array };
}

/** The loop's raw input to `prepare`. */
export interface RawBatch {
  readonly step: number;
  readonly micro: number;
  readonly images?: ImageBatch;
}

/** Variables a method trains, by the name they are saved under in checkpoints. */
export type NamedVariables = Readonly<Record<string, tf.Variable>>;

/** A file a method produces, with its writer. */
export interface Artifact {
  /** File name inside the output folder (no folders), e.g. `my-cat.safetensors`. */
  readonly file: string;
  /** What the file is and what reads it, for the run log. */
  readonly format: string;
  /** Writes the file at `target` (the loop passes a temporary name and renames it). */
  write(target: string): Promise<void>;
}

/**
 * How trained state changes generation: token embeddings (textual inversion), UNet hooks
 * (hypernetworks), parameter overrides (fine-tunes, edits). All optional; tensors stay owned by
 * whoever made the patch.
 */
export interface ModelPatch {
  /** Replaces the text encoder's token-embedding lookup: int32 ids [B, S] → [B, S, width]. */
  readonly tokenEmbeddings?: (ids: tf.Tensor) => tf.Tensor;
  /** Rewrites a prompt before tokenizing (e.g. a multi-vector token `<t>` → `<t> <t>_1 <t>_2`). */
  readonly rewritePrompt?: (prompt: string) => string;
  readonly unetHooks?: UnetHooks<tf.Tensor>;
  /** Parameter overrides, by component and key relative to it (`unet` + `conv_in.weight`). */
  readonly params?: readonly ParamOverride[];
}

/** One parameter override of a {@link ModelPatch}. */
export interface ParamOverride {
  readonly component: 'unet' | 'text' | 'vae';
  readonly key: string;
  readonly value: tf.Tensor;
}

/** How strongly an artifact applies (methods without a strength ignore it). */
export interface ApplyOptions {
  readonly strength?: number;
}

/** A saved artifact applied to a loaded model, with its trigger words. */
export interface AppliedArtifact {
  readonly patch: ModelPatch;
  /** Words that invoke it in a prompt (textual inversion: the token). */
  readonly triggers: readonly string[];
  /** Frees the tensors the patch holds. */
  dispose(): void;
}

/** Data-pipeline settings that come from the method rather than the `data:` section. */
export interface DatasetHooks {
  /** Text that replaces `{}` in the prompt templates (textual inversion: its token(s)). */
  readonly placeholderToken?: string;
  /** Prompt templates to use instead of `data.template`. */
  readonly template?: TemplateKind;
}

/**
 * A training method. `C`: its parsed config; `S`: its state after setup (variables, frozen model
 * pieces); `B`: a prepared micro-batch (tensors, numbers).
 */
export interface TrainingMethod<C extends MethodConfig = MethodConfig, S = unknown, B extends tf.TensorContainer = tf.TensorContainer> {
  /** The `method:` value of its configs; also used in file metadata. */
  readonly id: string;
  /** One line for `sdwb train --methods`. */
  readonly description: string;
  /**
   * zod schema of the whole config: a strict object with `method: z.literal(id)` and the common
   * fields (`commonFields()` from `src/train/config.ts`); joined into the registry's union.
   */
  readonly configSchema: z.ZodType<C> & z.core.$ZodTypeDiscriminable;
  /** Loads what it needs and creates the variables it trains. */
  setup(ctx: SetupCtx, cfg: C): Promise<S>;
  /** The trained variables by checkpoint name (stable across runs: resume matches by name). */
  trainable(s: S): NamedVariables;
  /** Data settings the method decides (only called when the config has `data:`). */
  datasetOptions?(s: S): DatasetHooks;
  /** Raw batch → model inputs, no gradients; may await. Randomness only from `ctx.random`. */
  prepare(ctx: StepCtx, s: S, raw: RawBatch): Promise<B>;
  /** The scalar loss of a prepared batch: synchronous, pure and differentiable in `trainable(s)`. */
  loss(ctx: StepCtx, s: S, batch: B): tf.Scalar;
  /** The files to save for the current weights after `step` steps. */
  artifacts(s: S, step: number): Promise<readonly Artifact[]>;
  /** How the current (in-training) state applies when generating sample images. */
  generationPatch(s: S): ModelPatch;
  /**
   * Applies a file this method saved to a loaded model (adds tokens, overrides weights, …);
   * `strength` scales add-ons that have one (hypernetwork strength, LoRA weight).
   */
  applyArtifact(model: StableDiffusion, file: string, options?: ApplyOptions): Promise<AppliedArtifact>;
  /** Frees what `setup` created. */
  dispose(s: S): void;
}

/**
 * A method with its types erased, as the registry and the loop hold it. The loop only hands each
 * method values that method produced (state from its `setup`, batches from its `prepare`), which
 * method-syntax parameter bivariance lets TypeScript accept without casts.
 */
export type AnyTrainingMethod = TrainingMethod<MethodConfig, unknown, tf.TensorContainer>;
