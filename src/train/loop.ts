/**
 * The training loop: flat and identical for every method. It knows the method only through the
 * `TrainingMethod` interface (setup, trainable, prepare, loss, artifacts, generationPatch).
 *
 * Per optimizer step k (0-based), for micro-batch j = 0 … N−1 (N = gradient_accumulation_steps):
 *   raw   = the next batch_size images (data order state {epoch, index})
 *   batch = await method.prepare(ctx(k, j), raw)       no gradients; randomness keyed by (seed, k, j)
 *   g_j   = ∇ method.loss(ctx(k, j), batch)            over the method's variables only
 * then ḡ = (1/N) Σ g_j; if the loss or ḡ is NaN/Inf the step is skipped (and counted);
 * otherwise ḡ is clipped to max_grad_norm and AdamW updates with lr = lr₀ · λ(k).
 *
 * Determinism and resume: every random draw is keyed by (seed, step, micro) or by the data
 * position, so a run resumed from `checkpoint-<k>/` (variables, AdamW moments, data position,
 * skip counters) computes exactly the losses of an uninterrupted run from step k on.
 *
 * Memory: per-step tensors (prepared batches, gradients) are freed every step; only the model,
 * the method's variables and the optimizer moments persist.
 */
import { mkdir, rename, rm, stat } from 'node:fs/promises';
import path from 'node:path';

import * as tf from '@tensorflow/tfjs';
import sharp from 'sharp';

import { initBackend, type BackendRequest } from '../backend.js';
import { ImageFolderDataset, type DataState } from '../data/image-folder.js';
import { hashFile, LatentCache, latentBatches, type EncodeFn } from '../data/latent-cache.js';
import type { DataConfig } from '../data/config.js';
import { writeFileAtomic } from '../io/atomic.js';
import { loadSingleFile } from '../io/single-file.js';
import { getMethod } from '../methods/registry.js';
import type { AnyTrainingMethod, Artifact, ImageBatch, ModelPatch, RawBatch, StepCtx } from '../methods/types.js';
import { vaeEncode, type Image8 } from '../models/vae/vae.js';
import { tfOps } from '../ops/tfjs-ops.js';
import { generate } from '../pipeline/txt2img.js';
import { disposeStableDiffusion, loadStableDiffusion, type StableDiffusion } from '../pipeline/load.js';
import {
  latestCheckpoint,
  pruneCheckpoints,
  readCheckpoint,
  removeStaleTemporaries,
  writeCheckpoint,
  type LoadedCheckpoint,
  type SavedTensor,
} from './checkpoint.js';
import { effectiveLearningRate, lrScheduleOf, type MethodConfig } from './config.js';
import { clipGradNorm, disposeGrads, GradAccumulator, gradStats, NonFiniteGuard, type Grads } from './grad-utils.js';
import { lrLambda } from './lr-schedule.js';
import { MetricsWriter, readMetrics } from './metrics.js';
import { AdamOptimizer, type OptimizerState } from './optimizer.js';
import { ProgressReporter, type ProgressStream } from './progress.js';
import { checkRngState, setupRandom, stepRandom, type RngState } from './rng-state.js';
import { EventWriter } from './tensorboard.js';

/** Options of {@link train} that are not part of the config. */
export interface TrainOptions {
  /** Continue from a checkpoint folder, or 'latest' (the newest `checkpoint-<step>` in output_dir). */
  readonly resume?: string;
  /** Stops training at the next step boundary, after saving a checkpoint (Ctrl-C). */
  readonly signal?: AbortSignal;
  /** Run-log lines (default: stderr). */
  readonly log?: (line: string) => void;
  /** Progress display; false for none (default: stderr). */
  readonly progress?: ProgressStream | false;
  /** Called after every optimizer step. */
  readonly onStep?: (report: StepReport) => void;
  /** Use this method instead of the registry's (tests). */
  readonly method?: AnyTrainingMethod;
  /** Loads the base model (default `loadStableDiffusion(cfg.model)`); the loop disposes what it returns. */
  readonly loadModel?: (model: string) => Promise<StableDiffusion>;
}

/** What one optimizer step did. */
export interface StepReport {
  /** Steps completed, 1-based. */
  readonly step: number;
  /** Mean loss over the step's micro-batches (NaN/Inf when skipped for that reason). */
  readonly loss: number;
  readonly lr: number;
  /** Global gradient norm before clipping. */
  readonly gradNorm: number;
  readonly skipped: boolean;
}

/** The outcome of {@link train}. */
export interface TrainResult {
  /** Steps completed (including any before a resume). */
  readonly step: number;
  /** True when stopped by the signal before `steps`. */
  readonly interrupted: boolean;
  /** Steps of this run, in order. */
  readonly steps: readonly StepReport[];
  /** Files written to output_dir at the end (absent when interrupted). */
  readonly outputs: readonly string[];
  /** The last checkpoint folder written. */
  readonly checkpoint: string | undefined;
  /** Steps skipped as non-finite over the whole run (resumes included). */
  readonly skippedSteps: number;
}

/** Thrown for problems with `--resume`. */
export class ResumeError extends Error {
  override name = 'ResumeError';
}

// Config fields that change what the steps after a resume compute; other fields (steps, logging,
// sampling, saving) may differ between the original run and the resumed one.
const RESUME_INVARIANT_FIELDS = [
  'method',
  'seed',
  'batch_size',
  'gradient_accumulation_steps',
  'learning_rate',
  'scale_lr',
  'lr_scheduler',
  'lr_warmup_steps',
  'adam_beta1',
  'adam_beta2',
  'adam_epsilon',
  'adam_weight_decay',
  'max_grad_norm',
  'noise_offset',
  'prediction_type',
  'fixed_noise',
] as const;

function defaultLog(line: string): void {
  process.stderr.write(`${line}\n`);
}

/** Trains `cfg` (a parsed config) to `cfg.steps` steps, or to the signal. */
export async function train(cfg: MethodConfig, opts: TrainOptions = {}): Promise<TrainResult> {
  const log = opts.log ?? defaultLog;
  const method = opts.method ?? getMethod(cfg.method);
  const outputDir = path.resolve(cfg.output_dir);

  // 1. Backend, output folder, resume point.
  await initBackend({ ...(cfg.backend === 'auto' ? {} : { backend: cfg.backend as BackendRequest }), log });
  await mkdir(outputDir, { recursive: true });
  await removeStaleTemporaries(outputDir);
  const resumed = opts.resume === undefined ? undefined : await openResume(opts.resume, outputDir, cfg, log);
  const startStep = resumed?.state.step ?? 0;
  if (startStep > cfg.steps) throw new ResumeError(`${resumed!.dir}: is at step ${startStep}, past steps: ${cfg.steps}; raise steps to continue`);

  // 2. Model (loaded once, shared by the method and the sample images) and the method's state.
  let model: StableDiffusion | undefined;
  const loadModel = opts.loadModel ?? loadBaseModel;
  const ctxModel = async (): Promise<StableDiffusion> => (model ??= await loadModel(cfg.model));
  const cleanup: (() => void)[] = [];
  try {
    const state = await method.setup({ model: ctxModel, random: setupRandom(cfg.seed), log }, cfg);
    cleanup.push(() => method.dispose(state));
    const named = method.trainable(state);
    const variables = Object.values(named);
    // Variable names are unique per tfjs engine, checkpoint names per method: translate both ways.
    const nameOfVariable = new Map(Object.entries(named).map(([name, v]) => [v.name, name]));
    const variableName = new Map(Object.entries(named).map(([name, v]) => [name, v.name]));
    const optimizer = new AdamOptimizer(variables, {
      kind: 'adamw',
      lr: effectiveLearningRate(cfg),
      betas: [cfg.adam_beta1, cfg.adam_beta2],
      eps: cfg.adam_epsilon,
      weightDecay: cfg.adam_weight_decay,
    });
    cleanup.push(() => optimizer.dispose());
    const schedule = lrScheduleOf(cfg);
    const guard = new NonFiniteGuard({ maxConsecutive: cfg.max_nonfinite_steps });
    let data: DataState = { epoch: 0, index: 0 };
    if (resumed !== undefined) {
      restoreVariables(resumed, named);
      optimizer.loadState(renameOptimizerState(resumed.optimizer, variableName, resumed.dir));
      restoreGuard(guard, resumed.state.nonfinite.skipped, resumed.state.nonfinite.consecutive);
      data = resumed.state.data ?? data;
      log(`resumed from ${resumed.dir} at step ${startStep}`);
    }

    // 3. Data: the method only sees raw batches.
    const dataConfig = (cfg as { data?: DataConfig }).data;
    let dataset: ImageFolderDataset | undefined;
    if (dataConfig !== undefined) {
      const hooks = method.datasetOptions?.(state) ?? {};
      dataset = await ImageFolderDataset.open(
        { ...dataConfig, ...(hooks.template === undefined ? {} : { template: hooks.template }) },
        { seed: cfg.seed, ...(hooks.placeholderToken === undefined ? {} : { placeholderToken: hooks.placeholderToken }) },
      );
      for (const w of dataset.warnings) log(`data: ${w}`);
      log(`data: ${dataset.images.length} image(s) × ${dataset.config.repeats} repeat(s) = ${dataset.epochLength} samples per epoch, ${dataset.width}×${dataset.height}`);
    }
    const batches = dataset === undefined ? undefined : await imageBatches(dataset, cfg.batch_size, data, outputDir, ctxModel, log);
    cleanup.push(() => void batches?.return(undefined));

    // 4. Logs.
    const metricsFile = path.join(outputDir, 'metrics.jsonl');
    await truncateMetrics(metricsFile, startStep);
    const metrics = MetricsWriter.open(metricsFile);
    cleanup.push(() => metrics.close());
    const events = EventWriter.open(path.join(outputDir, 'logs'));
    cleanup.push(() => events.close());
    await writeJsonAtomic(path.join(outputDir, 'config.json'), cfg);
    const progress = opts.progress === false ? undefined : new ProgressReporter({ total: cfg.steps, startStep, ...(opts.progress === undefined ? {} : { stream: opts.progress }) });

    const accumulator = new GradAccumulator(cfg.gradient_accumulation_steps);
    const reports: StepReport[] = [];
    let lastCheckpoint: string | undefined;
    let interrupted = false;
    const saveCheckpoint = async (completed: number): Promise<string> => {
      const dir = await writeCheckpoint(outputDir, {
        state: {
          step: completed,
          method: method.id,
          data: dataset === undefined ? null : data,
          rng: { scheme: 'counter-v1', seed: cfg.seed, nextStep: completed } satisfies RngState,
          nonfinite: { skipped: guard.skipped, consecutive: guard.consecutive },
        },
        config: cfg,
        trainable: await snapshotVariables(named),
        optimizer: renameOptimizerState(optimizer.state(), nameOfVariable, 'optimizer'),
        artifacts: await method.artifacts(state, completed),
      });
      if (cfg.keep_checkpoints !== null) await pruneCheckpoints(outputDir, cfg.keep_checkpoints);
      return dir;
    };

    // 5. The loop.
    for (let step = startStep; step < cfg.steps; step++) {
      const losses: number[] = [];
      for (let micro = 0; micro < cfg.gradient_accumulation_steps; micro++) {
        let images: ImageBatch | undefined;
        if (batches !== undefined) {
          const next = await batches.next();
          if (next.done === true) throw new Error('data: the image stream ended (it should repeat epochs forever)');
          images = next.value.images;
          data = next.value.next;
        }
        const raw: RawBatch = { step, micro, ...(images === undefined ? {} : { images }) };
        const ctx: StepCtx = cfg.fixed_noise
          ? { step, micro, random: stepRandom(cfg.seed, 0, 0) }
          : { step, micro, random: stepRandom(cfg.seed, step, micro) };
        const batch = await prepareInScope(method, ctx, state, raw);
        let value: tf.Scalar;
        let grads: tf.NamedTensorMap;
        try {
          ({ value, grads } = tf.variableGrads(() => method.loss(ctx, state, batch), variables));
        } finally {
          tf.dispose(batch);
        }
        losses.push(value.dataSync()[0]!);
        value.dispose();
        accumulator.add(grads);
      }
      const grads = accumulator.take();
      const loss = losses.reduce((a, b) => a + b, 0) / losses.length;
      const lr = schedule.baseLr * lrLambda(step, schedule);
      const stats = gradStats(grads);
      const apply = guard.check(step + 1, loss, stats.finite);
      if (apply) {
        applyUpdate(optimizer, grads, cfg.max_grad_norm, lrLambda(step, schedule));
      } else {
        disposeGrads(grads);
        progress?.log(`step ${step + 1}: loss ${loss}, gradients ${stats.finite ? 'finite' : 'non-finite'}: step skipped (${guard.consecutive} in a row)`);
      }
      const completed = step + 1;
      const report: StepReport = { step: completed, loss, lr, gradNorm: stats.globalNorm, skipped: !apply };
      reports.push(report);
      if (completed % cfg.log_every === 0 || completed === cfg.steps) {
        metrics.write({ step: completed, loss, lr, grad_norm: stats.globalNorm, skipped: guard.skipped });
        events.addScalars({ 'train/loss': loss, 'train/lr': lr, 'train/grad_norm': stats.globalNorm }, completed);
      }
      progress?.update({ step: completed, loss, lr, skipped: guard.skipped });
      opts.onStep?.(report);
      // Let signals (Ctrl-C) and output through: every await above may resolve without ever
      // returning to the event loop.
      await new Promise<void>((resolve) => setImmediate(resolve));

      const stopping = opts.signal?.aborted === true && completed < cfg.steps;
      if (cfg.sample_every !== null && (completed % cfg.sample_every === 0 || completed === cfg.steps)) {
        const m = await ctxModel();
        const png = await sampleGrid(m, method.generationPatch(state), cfg, dataConfig);
        await mkdir(path.join(outputDir, 'samples'), { recursive: true });
        await writeBytesAtomic(path.join(outputDir, 'samples', `step-${String(completed).padStart(6, '0')}.png`), png);
        events.addImage('samples', png, completed);
      }
      if (completed % cfg.save_every === 0 || completed === cfg.steps || stopping) {
        lastCheckpoint = await saveCheckpoint(completed);
        progress?.log(`saved ${displayPath(lastCheckpoint)}`);
      }
      if (stopping) {
        interrupted = true;
        break;
      }
    }
    metrics.flush();
    events.flush();
    progress?.done();

    // 6. The trained files.
    const outputs: string[] = [];
    const finalStep = reports.length > 0 ? reports[reports.length - 1]!.step : startStep;
    if (!interrupted) {
      for (const artifact of await method.artifacts(state, finalStep)) {
        outputs.push(await writeArtifact(outputDir, artifact));
        log(`wrote ${outputs[outputs.length - 1]}: ${artifact.format}`);
      }
    } else {
      log(`stopped at step ${finalStep}; checkpoint ${lastCheckpoint}; continue with --resume latest`);
    }
    return {
      step: finalStep,
      interrupted,
      steps: reports,
      outputs,
      checkpoint: lastCheckpoint,
      skippedSteps: guard.skipped,
    };
  } finally {
    for (const f of cleanup.reverse()) f();
    if (model !== undefined) disposeStableDiffusion(model);
  }
}

/** A diffusers folder or a single-file checkpoint (`.safetensors`, `.ckpt`), by what the path is. */
export async function loadBaseModel(model: string): Promise<StableDiffusion> {
  const info = await stat(model).catch(() => undefined);
  return info?.isFile() === true ? loadSingleFile(model) : loadStableDiffusion(model);
}

/** Runs `prepare` in a tfjs scope: tensors it returns are kept (the loop frees them after the step), the rest freed now. */
async function prepareInScope(method: AnyTrainingMethod, ctx: StepCtx, state: unknown, raw: RawBatch): Promise<tf.TensorContainer> {
  const engine = tf.engine();
  engine.startScope('prepare');
  let batch: tf.TensorContainer;
  try {
    batch = await method.prepare(ctx, state, raw);
    for (const t of tensorsIn(batch)) tf.keep(t);
  } finally {
    engine.endScope();
  }
  return batch;
}

function tensorsIn(container: tf.TensorContainer): tf.Tensor[] {
  if (container instanceof tf.Tensor) return [container];
  if (container === null || typeof container !== 'object' || ArrayBuffer.isView(container)) return [];
  return Object.values(container as Record<string, tf.TensorContainer>).flatMap(tensorsIn);
}

function applyUpdate(optimizer: AdamOptimizer, grads: Grads, maxNorm: number | null, lrScale: number): void {
  if (maxNorm === null) {
    optimizer.step(grads, { lrScale });
    disposeGrads(grads);
    return;
  }
  const clipped = clipGradNorm(grads, maxNorm);
  disposeGrads(grads);
  optimizer.step(clipped.grads, { lrScale });
  disposeGrads(clipped.grads);
}

/** A path relative to the current folder when it lies inside it, else absolute. */
function displayPath(p: string): string {
  const rel = path.relative(process.cwd(), p);
  return rel === '' || rel.startsWith('..') || path.isAbsolute(rel) ? p : rel;
}

/** One micro-batch of images (or cached latents) and the data position after it. */
interface DataStep {
  readonly images: ImageBatch;
  readonly next: DataState;
}

/**
 * The image stream from `from` on: pixels, or with `data.cache_latents` the VAE posterior (mean,
 * std) from the on-disk cache in `<output_dir>/latent-cache`, keyed by the VAE weights' hash.
 */
async function imageBatches(
  dataset: ImageFolderDataset,
  batchSize: number,
  from: DataState,
  outputDir: string,
  model: () => Promise<StableDiffusion>,
  log: (line: string) => void,
): Promise<AsyncGenerator<DataStep, void, undefined>> {
  const { width, height } = dataset;
  if (!dataset.config.cache_latents) {
    const pixels = dataset.batches(batchSize, from);
    return (async function* () {
      for await (const b of pixels) {
        yield { images: { captions: b.captions, pixels: b.pixels, count: b.samples.length, height, width }, next: b.next };
      }
    })();
  }
  const m = await model();
  const hashes: string[] = [];
  for (const file of m.vae.files) hashes.push(await hashFile(file));
  const cache = new LatentCache(path.join(outputDir, 'latent-cache'), hashes.join('+'));
  log(`data: caching VAE latents in ${cache.dir}`);
  const encode: EncodeFn = async (pixels, h, w) => {
    const [mean, std] = tf.tidy(() => {
      const posterior = vaeEncode(tfOps, m.vae.store.scope(), tf.tensor4d(pixels, [1, h, w, 3]), m.vae.cfg);
      return [posterior.mean, posterior.std];
    });
    const out = { mean: Float32Array.from(await mean!.data<'float32'>()), std: Float32Array.from(await std!.data<'float32'>()) };
    tf.dispose([mean!, std!]);
    return out;
  };
  const latents = latentBatches(dataset, cache, encode, batchSize, from);
  return (async function* () {
    for await (const b of latents) {
      yield { images: { captions: b.captions, latents: { mean: b.mean, std: b.std }, count: b.samples.length, height, width }, next: b.next };
    }
  })();
}

// =============================================================================================
// Checkpoints and resume

async function openResume(resume: string, outputDir: string, cfg: MethodConfig, log: (line: string) => void): Promise<LoadedCheckpoint> {
  const dir = resume === 'latest' ? await latestCheckpoint(outputDir) : path.resolve(resume);
  if (dir === undefined) throw new ResumeError(`--resume latest: no checkpoint-<step>/ folder in ${outputDir}`);
  const ckpt = await readCheckpoint(dir);
  if (ckpt.state.method !== cfg.method) {
    throw new ResumeError(`${dir}: is a '${ckpt.state.method}' checkpoint, the config trains '${cfg.method}'`);
  }
  checkRngState(ckpt.state.rng, cfg.seed, dir);
  const saved = (ckpt.config ?? {}) as Record<string, unknown>;
  const current = cfg as unknown as Record<string, unknown>;
  const changed = RESUME_INVARIANT_FIELDS.filter((k) => JSON.stringify(saved[k] ?? null) !== JSON.stringify(current[k] ?? null));
  const dataChanged = JSON.stringify(saved['data'] ?? null) !== JSON.stringify(current['data'] ?? null);
  if (changed.length > 0 || dataChanged) {
    log(
      `warning: resuming with settings that differ from the checkpoint's (${[...changed, ...(dataChanged ? ['data'] : [])].join(', ')}): the steps after the resume will not match an uninterrupted run`,
    );
  }
  return ckpt;
}

function restoreVariables(ckpt: LoadedCheckpoint, named: Readonly<Record<string, tf.Variable>>): void {
  const names = Object.keys(named);
  const saved = [...ckpt.trainable.keys()];
  const missing = names.filter((n) => !ckpt.trainable.has(n));
  const extra = saved.filter((n) => !(n in named));
  if (missing.length > 0 || extra.length > 0) {
    throw new ResumeError(
      `${ckpt.dir}: trainable.safetensors does not match the method's variables (missing: ${missing.join(', ') || 'none'}; unexpected: ${extra.join(', ') || 'none'})`,
    );
  }
  for (const [name, v] of Object.entries(named)) {
    const t = ckpt.trainable.get(name)!;
    if (t.shape.length !== v.shape.length || t.shape.some((d, i) => d !== v.shape[i])) {
      throw new ResumeError(`${ckpt.dir}: '${name}' has shape [${t.shape.join(', ')}], the method's variable is [${v.shape.join(', ')}]`);
    }
    tf.tidy(() => v.assign(tf.tensor(t.data, [...t.shape], 'float32')));
  }
}

async function snapshotVariables(named: Readonly<Record<string, tf.Variable>>): Promise<Map<string, SavedTensor>> {
  const out = new Map<string, SavedTensor>();
  for (const [name, v] of Object.entries(named)) out.set(name, { shape: [...v.shape], data: Float32Array.from(await v.data<'float32'>()) });
  return out;
}

function renameOptimizerState(s: OptimizerState, names: ReadonlyMap<string, string>, where: string): OptimizerState {
  const rename = <V>(r: Readonly<Record<string, V>>): Record<string, V> => {
    const out: Record<string, V> = {};
    for (const [k, v] of Object.entries(r)) {
      const to = names.get(k);
      if (to === undefined) throw new ResumeError(`${where}: optimizer state for '${k}', which is not a trained variable`);
      out[to] = v;
    }
    return out;
  };
  return { step: s.step, paramSteps: rename(s.paramSteps), m: rename(s.m), v: rename(s.v) };
}

/**
 * Brings a fresh guard to `skipped` total and `consecutive` trailing skips by replaying checks
 * (NonFiniteGuard has no state setter). Pairs of (skip, ok) add to the total without a streak.
 */
function restoreGuard(guard: NonFiniteGuard, skipped: number, consecutive: number): void {
  for (let i = 0; i < skipped - consecutive; i++) {
    guard.check(0, NaN, true);
    guard.check(0, 0, true);
  }
  for (let i = 0; i < consecutive; i++) guard.check(0, NaN, true);
}

/** Drops metrics of steps after `step` (written before a crash, about to be recomputed). */
async function truncateMetrics(file: string, step: number): Promise<void> {
  let records;
  try {
    records = await readMetrics(file);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw e;
  }
  const kept = records.filter((r) => r.step <= step);
  if (kept.length === records.length) return;
  await writeBytesAtomic(file, Buffer.from(kept.map((r) => `${JSON.stringify(r)}\n`).join(''), 'utf8'));
}

async function writeJsonAtomic(file: string, value: unknown): Promise<void> {
  await writeBytesAtomic(file, Buffer.from(`${JSON.stringify(value, null, 2)}\n`, 'utf8'));
}

async function writeBytesAtomic(file: string, bytes: Uint8Array): Promise<void> {
  await writeFileAtomic(file, async (h) => {
    await h.writeFile(bytes);
  });
}

/** Writes an artifact under a temporary name and renames it into `dir`. */
async function writeArtifact(dir: string, artifact: Artifact): Promise<string> {
  const target = path.join(dir, artifact.file);
  const temp = path.join(dir, `.${artifact.file}.${process.pid}.tmp`);
  try {
    await artifact.write(temp);
    await rename(temp, target);
  } catch (e) {
    await rm(temp, { force: true }).catch(() => undefined);
    throw e;
  }
  return target;
}

// =============================================================================================
// Sample images

/** Sample images of the current state: one per prompt (seed sample_seed + i), as a PNG grid. */
async function sampleGrid(model: StableDiffusion, patch: ModelPatch, cfg: MethodConfig, data: DataConfig | undefined): Promise<Uint8Array> {
  const width = data?.width ?? data?.resolution ?? cfg.resolution ?? model.defaultSize.width;
  const height = data?.height ?? data?.resolution ?? cfg.resolution ?? model.defaultSize.height;
  const images: Image8[] = [];
  for (const [i, prompt] of cfg.sample_prompts.entries()) {
    images.push(await sampleImage(model, patch, prompt, cfg, cfg.sample_seed + i, width, height));
  }
  return pngGrid(images);
}

// One sample through the generation pipeline with the method's patch (the same path as
// `sdwb generate` with add-ons): the sampler of the model's scheduler, seeded x_T.
async function sampleImage(
  model: StableDiffusion,
  patch: ModelPatch,
  prompt: string,
  cfg: MethodConfig,
  seed: number,
  width: number,
  height: number,
): Promise<Image8> {
  const result = await generate(model, {
    prompts: [prompt],
    negativePrompt: cfg.sample_negative_prompt,
    steps: cfg.sample_steps,
    guidance: cfg.sample_guidance_scale,
    seed,
    width,
    height,
    patch,
  });
  return result.images[0]!;
}

/** Images side by side (up to 4 per row) as one PNG. */
export async function pngGrid(images: readonly Image8[]): Promise<Uint8Array> {
  const first = images[0];
  if (first === undefined) throw new Error('sample grid: no images');
  const cols = Math.min(4, images.length);
  const rows = Math.ceil(images.length / cols);
  const png = await sharp({ create: { width: cols * first.width, height: rows * first.height, channels: 3, background: '#000000' } })
    .composite(
      images.map((img, i) => ({
        input: Buffer.from(img.data.buffer, img.data.byteOffset, img.data.byteLength),
        raw: { width: img.width, height: img.height, channels: img.channels as 3 },
        left: (i % cols) * first.width,
        top: Math.floor(i / cols) * first.height,
      })),
    )
    .png()
    .toBuffer();
  return new Uint8Array(png.buffer, png.byteOffset, png.byteLength);
}
