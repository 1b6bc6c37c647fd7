/**
 * The benchmark runner: prompts × models × images → images on disk and one result row per image.
 *
 * Phases:
 *   1. plan — load the prompts, apply the category filter and `limit`, and list the work items
 *      in a fixed order (model-major, then prompt, then image index); each has a key
 *      `<model>/<prompt id>/<k>` and an image path. `--shard i/n` takes the items whose position
 *      in that list is ≡ i (mod n): a deterministic partition whatever the machine.
 *   2. resume — read this shard's rows file (a torn last line is cut off), check it belongs to
 *      this run (the run fingerprint), and skip every item with a row. An image without a row was
 *      written completely before a kill (images are written atomically); it is reused.
 *   3. run — per item: generate (tfjs, or onnxruntime for engine onnx) unless reused, write the
 *      PNG atomically, run every detector, append the row (fsynced). Rows hold no timings or
 *      absolute paths, so an interrupted-and-resumed run ends with exactly the rows of an
 *      uninterrupted one, byte for byte.
 *   4. finish — an unsharded run that is complete writes summary.json, summary.csv and
 *      report.html; sharded runs are combined with `mergeRuns` (`sdwb eval merge`).
 *
 * Noise: image k of a prompt starts from slice k of one x_T batch drawn from the prompt's seed,
 * as ESD's `generate-images.py` draws `num_samples` images at once, so the images do not depend
 * on how the work is split. (Ancestral samplers also draw per-step noise; that noise comes from a
 * generator seeded per image, so for those samplers image k ≠ image k of one batched call.)
 */
import { createHash } from 'node:crypto';
import { mkdir, readFile, rename } from 'node:fs/promises';
import path from 'node:path';

import { initBackend, type BackendRequest } from '../backend.js';
import { writeFileAtomic } from '../io/atomic.js';
import { formatParameters } from '../io/png-text.js';
import type { Image8 } from '../models/vae/vae.js';
import { ADDON_KINDS, loadAddons, parseAddonSpec, type AddonSpec, type LoadedAddons } from '../pipeline/addons.js';
import { defaultSamplerKind } from '../pipeline/denoise.js';
import type { OnnxStableDiffusion } from '../pipeline/onnx.js';
import { disposeStableDiffusion, loadStableDiffusion, type StableDiffusion } from '../pipeline/load.js';
import { encodePng, generationParameters } from '../pipeline/png.js';
import { generate, type GenerateOptions, type GenerateResult, type Seed } from '../pipeline/txt2img.js';
import { TorchGenerator } from '../schedulers/rng.js';
import type { SamplerKind } from '../schedulers/sampler.js';
import type { ProgressStream } from '../train/progress.js';
import { configuredSize, type EvalConfig, type ModelEntry } from './config.js';
import { readImageRgb } from './detectors/image.js';
import { createDetector } from './detectors/registry.js';
import type { Detector, DetectorCommonConfig } from './detectors/types.js';
import { ImageProgress } from './progress.js';
import { loadPromptSource, seedText, type PromptRecord, type PromptSource } from './prompts.js';
import { fileExists, lockRowsFile, readRowsFile, RowsFileError, RowWriter, type ResultRow } from './rows.js';
import { writeRunOutputs } from './summary.js';

/** One part of an n-way split: items whose plan position ≡ index (mod count). */
export interface Shard {
  readonly index: number;
  readonly count: number;
}

/** Parses `--shard i/n` (0 ≤ i < n). */
export function parseShard(text: string): Shard {
  const m = /^\s*(\d+)\s*\/\s*(\d+)\s*$/.exec(text);
  if (m === null) throw new Error(`--shard '${text}': expected i/n, e.g. 0/4 (0-based part i of n)`);
  const index = Number(m[1]);
  const count = Number(m[2]);
  if (!(count >= 1 && index < count)) throw new Error(`--shard '${text}': need 0 ≤ i < n`);
  return { index, count };
}

/** The rows file of a shard (`rows.jsonl` unsharded). */
export function rowsFileName(shard?: Shard): string {
  return shard === undefined || shard.count === 1 ? 'rows.jsonl' : `rows.shard-${shard.index}-of-${shard.count}.jsonl`;
}

/** One image to make. */
export interface WorkItem {
  /** Position in the full plan. */
  readonly index: number;
  readonly key: string;
  readonly modelIndex: number;
  readonly model: ModelEntry;
  readonly prompt: PromptRecord;
  readonly imageIndex: number;
  readonly seed: Seed;
  readonly guidance: number;
  /** Relative to the output folder. */
  readonly file: string;
}

/** A planned run: the prompts, every work item, and the fingerprint rows must carry. */
export interface RunPlan {
  readonly cfg: EvalConfig;
  readonly source: PromptSource;
  /** Prompts after the filter and `limit`. */
  readonly prompts: readonly PromptRecord[];
  readonly items: readonly WorkItem[];
  readonly fingerprint: string;
  /** What the fingerprint hashes (written to run.json, compared field by field on resume and merge). */
  readonly fingerprintFields: Readonly<Record<string, unknown>>;
}

// Prompt ids become file names: keep safe ones, otherwise a cleaned name plus a short hash.
function fileStem(id: string): string {
  if (/^[A-Za-z0-9][A-Za-z0-9_.-]{0,80}$/.test(id)) return id;
  const clean = id.replace(/[^A-Za-z0-9_.-]+/g, '_').replace(/^[._-]+/, '').slice(0, 40);
  return `${clean === '' ? 'p' : clean}~${createHash('sha256').update(id).digest('hex').slice(0, 8)}`;
}

// Paths reduced to their last component: shards on other machines hold the same files elsewhere.
const base = (p: string) => path.basename(p.replace(/[\\/]+$/, ''));

function addonSpecsOf(m: ModelEntry): AddonSpec[] {
  const list = (v: string | readonly string[] | undefined): readonly string[] => (v === undefined ? [] : typeof v === 'string' ? [v] : v);
  return ADDON_KINDS.flatMap((kind) => list(m[kind]).map((text) => parseAddonSpec(kind, text)));
}

/** The settings every row depends on (paths by base name); `limit`, output folder, backend and report layout are not among them. */
export function fingerprintFieldsOf(cfg: EvalConfig, source: PromptSource): Record<string, unknown> {
  return {
    preset: cfg.preset,
    prompts: { source: source.name, sha256: source.sha256, columns: source.columns, categories: cfg.prompts.categories ?? null },
    models: cfg.models.map((m) => ({ name: m.name, model: base(m.model), addons: addonSpecsOf(m).map((s) => `${s.kind}:${base(s.file)}:${s.strength}`) })),
    engine: cfg.engine,
    images_per_prompt: cfg.images_per_prompt,
    steps: cfg.steps,
    sampler: cfg.sampler,
    size: cfg.size,
    guidance: cfg.guidance,
    guidance_from_csv: cfg.guidance_from_csv,
    seed: cfg.seed,
    seed_from_csv: cfg.seed_from_csv,
    negative_prompt: cfg.negative_prompt,
    detectors: cfg.detectors.map((d) => {
      const entry = { ...(d as Record<string, unknown>) };
      if (typeof entry['model'] === 'string') entry['model'] = base(entry['model']);
      delete entry['threads'];
      return entry;
    }),
  };
}

function hashFields(fields: Readonly<Record<string, unknown>>): string {
  return createHash('sha256').update(JSON.stringify(fields)).digest('hex').slice(0, 16);
}

/** Loads the prompts and lists every work item of the run in plan order. */
export async function planRun(cfg: EvalConfig): Promise<RunPlan> {
  const source = await loadPromptSource(cfg.prompts);
  const prompts = cfg.limit === null ? source.prompts : source.prompts.slice(0, cfg.limit);
  const items: WorkItem[] = [];
  for (const [modelIndex, model] of cfg.models.entries()) {
    for (const prompt of prompts) {
      const seed = cfg.seed_from_csv && prompt.seed !== undefined ? prompt.seed : cfg.seed + prompt.row;
      const guidance = cfg.guidance_from_csv && prompt.guidance !== undefined ? prompt.guidance : cfg.guidance;
      for (let k = 0; k < cfg.images_per_prompt; k++) {
        items.push({
          index: items.length,
          key: `${model.name}/${prompt.id}/${k}`,
          modelIndex,
          model,
          prompt,
          imageIndex: k,
          seed,
          guidance,
          file: `images/${model.name}/${fileStem(prompt.id)}-${k}.png`,
        });
      }
    }
  }
  const fingerprintFields = fingerprintFieldsOf(cfg, source);
  return { cfg, source, prompts, items, fingerprint: hashFields(fingerprintFields), fingerprintFields };
}

/** The items of one shard, in plan order. */
export function shardItems(items: readonly WorkItem[], shard?: Shard): WorkItem[] {
  return shard === undefined ? [...items] : items.filter((it) => it.index % shard.count === shard.index);
}

/** The fields in which two fingerprint records differ (for error messages). */
export function fingerprintDifferences(a: Readonly<Record<string, unknown>>, b: Readonly<Record<string, unknown>>): string[] {
  const keys = [...new Set([...Object.keys(a), ...Object.keys(b)])];
  return keys.filter((k) => JSON.stringify(a[k]) !== JSON.stringify(b[k]));
}

/** What `run.json` holds. */
export interface RunManifest {
  readonly format: 'sd-workbench eval run 1';
  readonly fingerprint: string;
  readonly fields: Readonly<Record<string, unknown>>;
  readonly config: EvalConfig;
  readonly prompts: { readonly file: string; readonly total_rows: number; readonly selected: number };
}

/** Writes `run.json` (the same for every shard of a run), or checks an existing one is this run's. */
async function claimOutputDir(dir: string, plan: RunPlan): Promise<void> {
  const file = path.join(dir, 'run.json');
  const existing = await readFile(file, 'utf8').catch(() => undefined);
  if (existing !== undefined) {
    let previous: RunManifest;
    try {
      previous = JSON.parse(existing) as RunManifest;
    } catch {
      throw new RowsFileError(`${file}: not a run manifest (JSON); move it away or use another output_dir`);
    }
    if (previous.fingerprint !== plan.fingerprint) {
      const diff = fingerprintDifferences(previous.fields ?? {}, plan.fingerprintFields);
      throw new RowsFileError(
        `${dir} holds results of a different benchmark (settings changed: ${diff.join(', ') || 'unknown'}); use another output_dir, or restore those settings to resume`,
      );
    }
  }
  const manifest: RunManifest = {
    format: 'sd-workbench eval run 1',
    fingerprint: plan.fingerprint,
    fields: plan.fingerprintFields,
    config: plan.cfg,
    prompts: { file: plan.source.file, total_rows: plan.source.totalRows, selected: plan.prompts.length },
  };
  await writeFileAtomic(file, async (h) => {
    await h.writeFile(`${JSON.stringify(manifest, null, 2)}\n`);
  });
}

/** A model ready to generate, whichever engine runs it. */
interface Generator {
  readonly modelHash: string;
  readonly latentChannels: number;
  readonly downscale: number;
  readonly defaultSize: { readonly width: number; readonly height: number };
  /** The sampler of the model's scheduler config (used when the config sets none). */
  readonly defaultSampler: SamplerKind;
  generate(opts: GenerateOptions): Promise<GenerateResult>;
  /** A1111 `parameters` of image 0 of a result. */
  parameters(result: GenerateResult): string;
}

/** Loads and caches models as the plan walks through them (one base model in memory at a time). */
class ModelCache {
  #path: string | undefined;
  #tfjs: StableDiffusion | undefined;
  #onnx: OnnxStableDiffusion | undefined;
  #entry: ModelEntry | undefined;
  #addons: LoadedAddons | undefined;
  #current: Generator | undefined;

  constructor(
    private readonly cfg: EvalConfig,
    private readonly log: (m: string) => void,
  ) {}

  async get(entry: ModelEntry): Promise<Generator> {
    if (this.#entry === entry && this.#current !== undefined) return this.#current;
    this.#addons?.dispose();
    this.#addons = undefined;
    if (this.#path !== entry.model) await this.#disposeModel();
    this.#entry = entry;
    this.#current = this.cfg.engine === 'onnx' ? await this.#loadOnnx(entry) : await this.#loadTfjs(entry);
    return this.#current;
  }

  async #loadTfjs(entry: ModelEntry): Promise<Generator> {
    if (this.#tfjs === undefined) {
      this.log(`loading ${entry.model}`);
      this.#tfjs = await loadStableDiffusion(entry.model);
      this.#path = entry.model;
    }
    const model = this.#tfjs;
    const specs = addonSpecsOf(entry);
    if (specs.length > 0) {
      this.#addons = await loadAddons(model, specs);
      for (const w of this.#addons.warnings) this.log(`warning: ${entry.name}: ${w}`);
    }
    const addons = this.#addons;
    return {
      modelHash: model.modelHash,
      latentChannels: model.unet.cfg.inChannels,
      downscale: model.vae.cfg.downscale,
      defaultSize: model.defaultSize,
      defaultSampler: defaultSamplerKind(model.scheduler),
      generate: (o) => generate(model, addons === undefined ? o : { ...o, patch: addons.patch }),
      parameters: (r) => formatParameters(generationParameters(model, r, 0, addons?.infotext)),
    };
  }

  async #loadOnnx(entry: ModelEntry): Promise<Generator> {
    let onnx: typeof import('../pipeline/onnx.js');
    try {
      onnx = await import('../pipeline/onnx.js');
    } catch (e) {
      throw new Error(`engine onnx is not available in this build (${e instanceof Error ? e.message : String(e)}); use engine: tfjs`);
    }
    if (this.#onnx === undefined) {
      this.log(`loading ${entry.model} (onnxruntime)`);
      this.#onnx = await onnx.OnnxStableDiffusion.load(entry.model, this.cfg.threads === null ? {} : { intraOpNumThreads: this.cfg.threads });
      this.#path = entry.model;
    }
    const model = this.#onnx;
    const named = { modelHash: model.modelHash, name: model.name } as StableDiffusion;
    return {
      modelHash: model.modelHash,
      latentChannels: model.unet.cfg.inChannels,
      downscale: model.vae.cfg.downscale,
      defaultSize: model.defaultSize,
      defaultSampler: defaultSamplerKind(model.scheduler),
      generate: (o) => onnx.generateOnnx(model, o),
      parameters: (r) => formatParameters(generationParameters(named, r, 0)),
    };
  }

  async #disposeModel(): Promise<void> {
    if (this.#tfjs !== undefined) disposeStableDiffusion(this.#tfjs);
    if (this.#onnx !== undefined) await this.#onnx.release();
    this.#tfjs = undefined;
    this.#onnx = undefined;
    this.#path = undefined;
    this.#current = undefined;
  }

  async dispose(): Promise<void> {
    this.#addons?.dispose();
    this.#addons = undefined;
    await this.#disposeModel();
  }
}

/** Options of {@link runEval}. */
export interface RunOptions {
  readonly shard?: Shard;
  /** Stops after the current image (no partial row is written). */
  readonly signal?: AbortSignal;
  /** Called after each row is on disk (this process's images only). */
  readonly onRow?: (row: ResultRow, doneInShard: number, totalInShard: number) => void;
  /** Log lines (default: stderr). */
  readonly log?: (message: string) => void;
  /** Progress display (default stderr; false for none). */
  readonly progress?: ProgressStream | false;
  /** Detectors already created (benchmarks, tests); default: created from the config. */
  readonly detectors?: readonly Detector[];
}

/** What a run did. */
export interface RunResult {
  readonly outputDir: string;
  readonly rowsFile: string;
  /** Items in this shard. */
  readonly total: number;
  /** Items with a row now (from before and from this process). */
  readonly done: number;
  /** Images generated by this process. */
  readonly generated: number;
  /** Images found on disk without a row (written before a kill), detected and recorded. */
  readonly reused: number;
  readonly interrupted: boolean;
  /** Summary and report paths (unsharded complete runs). */
  readonly outputs: readonly string[];
}

/** Runs (or resumes) a benchmark, or one shard of it. */
export async function runEval(cfg: EvalConfig, opts: RunOptions = {}): Promise<RunResult> {
  const log = opts.log ?? ((m: string) => process.stderr.write(`${m}\n`));
  const outputDir = path.resolve(cfg.output_dir);
  // 1. Plan.
  const plan = await planRun(cfg);
  const mine = shardItems(plan.items, opts.shard);
  await mkdir(outputDir, { recursive: true });
  await claimOutputDir(outputDir, plan);
  const rowsFile = path.join(outputDir, rowsFileName(opts.shard));
  const unlock = await lockRowsFile(rowsFile);
  const models = new ModelCache(cfg, log);
  const ownDetectors = opts.detectors === undefined;
  let detectors: readonly Detector[] = [];
  let writer: RowWriter | undefined;
  try {
    // 2. Resume: whole rows only, all of this run.
    const previous = await readRowsFile(rowsFile, { repair: true });
    if (previous.droppedBytes > 0) log(`${rowsFile}: dropped a partial last line (${previous.droppedBytes} bytes) left by an interrupted run`);
    const done = new Map<string, ResultRow>();
    for (const row of previous.rows) {
      if (row.run !== plan.fingerprint) throw new RowsFileError(`${rowsFile}: row ${row.key} belongs to another benchmark (run ${row.run}, this is ${plan.fingerprint})`);
      done.set(row.key, row);
    }
    const todo = mine.filter((it) => !done.has(it.key));
    const alreadyDone = mine.length - todo.length;
    if (alreadyDone > 0) log(`resuming: ${alreadyDone} of ${mine.length} images already have rows`);

    // 3. Run.
    let generated = 0;
    let reused = 0;
    let interrupted = false;
    if (todo.length > 0) {
      if (cfg.engine === 'tfjs' || cfg.detectors.some((d) => d.type === 'nsfwjs')) {
        await initBackend({ ...(cfg.backend === 'auto' ? {} : { backend: cfg.backend as BackendRequest }), log });
      }
      detectors = opts.detectors ?? (await createDetectors(cfg));
      writer = await RowWriter.open(rowsFile);
      const progress = opts.progress === false ? undefined : new ImageProgress(todo.length, opts.progress === undefined ? {} : { stream: opts.progress });
      const say = (m: string) => (progress === undefined ? log(m) : progress.log(m));
      let count = alreadyDone;
      for (const item of todo) {
        if (isAborted(opts.signal)) {
          interrupted = true;
          break;
        }
        let made: Awaited<ReturnType<typeof makeImage>>;
        try {
          made = await makeImage(item, cfg, outputDir, models, say, opts.signal);
        } catch (e) {
          // generate() throws when the signal aborts mid-sampling: nothing of that image was written.
          if (isAborted(opts.signal)) {
            interrupted = true;
            break;
          }
          throw e;
        }
        if (made.reusedFile) reused++;
        else generated++;
        const detections: Record<string, { version: string; detections: ResultRow['detectors'][string]['detections'] }> = {};
        for (const d of detectors) detections[d.info.name] = { version: d.info.version, detections: (await d.detect(made.image)).map(cleanDetection) };
        const row: ResultRow = {
          key: item.key,
          run: plan.fingerprint,
          preset: cfg.preset,
          model: item.model.name,
          model_hash: made.modelHash,
          prompt_id: item.prompt.id,
          prompt_row: item.prompt.row,
          prompt: item.prompt.prompt,
          categories: item.prompt.categories,
          label: item.prompt.label ?? null,
          image_index: item.imageIndex,
          seed: seedText(item.seed),
          guidance: item.guidance,
          steps: cfg.steps,
          sampler: made.sampler,
          width: made.width,
          height: made.height,
          file: item.file,
          image_sha256: made.sha256,
          detectors: detections,
        };
        await writer.append(row);
        done.set(row.key, row);
        count++;
        progress?.tick();
        opts.onRow?.(row, count, mine.length);
      }
      progress?.done();
    }
    await writer?.close();
    writer = undefined;

    // 4. Finish.
    const complete = mine.every((it) => done.has(it.key));
    const outputs: string[] = [];
    if (complete) {
      await canonicalizeRows(rowsFile, mine, done);
      if (opts.shard === undefined || opts.shard.count === 1) {
        const rows = plan.items.map((it) => done.get(it.key)!);
        outputs.push(...(await writeRunOutputs(outputDir, plan, rows)));
      }
    }
    return { outputDir, rowsFile, total: mine.length, done: mine.filter((it) => done.has(it.key)).length, generated, reused, interrupted, outputs };
  } finally {
    await writer?.close().catch(() => undefined);
    if (ownDetectors) for (const d of detectors) await d.dispose();
    await models.dispose();
    await unlock();
  }
}

// A function, so the check is re-read after awaits (TypeScript would keep an earlier narrowing).
function isAborted(signal: AbortSignal | undefined): boolean {
  return signal?.aborted === true;
}

/** Creates the configured detectors (all or none: a failure frees the ones already made). */
export async function createDetectors(cfg: Pick<EvalConfig, 'detectors'>): Promise<Detector[]> {
  const made: Detector[] = [];
  try {
    for (const d of cfg.detectors) made.push(await createDetector(d as unknown as DetectorCommonConfig));
  } catch (e) {
    for (const d of made) await d.dispose();
    throw e;
  }
  return made;
}

// Scores as plain numbers, boxes as plain arrays: the row's JSON is then fixed by the values alone.
function cleanDetection(d: { label: string; score: number; box?: readonly [number, number, number, number] }) {
  return d.box === undefined ? { label: d.label, score: d.score } : { label: d.label, score: d.score, box: [d.box[0], d.box[1], d.box[2], d.box[3]] as const };
}

async function makeImage(
  item: WorkItem,
  cfg: EvalConfig,
  outputDir: string,
  models: ModelCache,
  log: (m: string) => void,
  signal: AbortSignal | undefined,
): Promise<{ image: Image8; sha256: string; modelHash: string; width: number; height: number; sampler: string; reusedFile: boolean }> {
  const file = path.join(outputDir, item.file);
  const model = await models.get(item.model);
  const size = configuredSize(cfg) ?? model.defaultSize;
  if (await fileExists(file)) {
    // Written atomically before an interruption cut the row: complete, and what generation would make again.
    const bytes = await readFile(file);
    const image = await readImageRgb(bytes);
    if (image.width !== size.width || image.height !== size.height) {
      throw new RowsFileError(`${file}: ${image.width}×${image.height}, but this run makes ${size.width}×${size.height} images; delete the file to regenerate it`);
    }
    log(`reusing ${item.file} (written before an interruption)`);
    return { image, sha256: sha256(bytes), modelHash: model.modelHash, width: image.width, height: image.height, sampler: cfg.sampler ?? model.defaultSampler, reusedFile: true };
  }
  const f = model.downscale;
  const n = cfg.images_per_prompt;
  const latentShape = [n, model.latentChannels, size.height / f, size.width / f] as const;
  if (!Number.isInteger(latentShape[2]) || !Number.isInteger(latentShape[3])) {
    throw new Error(`size ${size.width}×${size.height} is not a multiple of the VAE factor ${f}`);
  }
  const perImage = latentShape[1] * latentShape[2] * latentShape[3];
  const batch = new TorchGenerator(item.seed).randn(latentShape);
  const initLatents = batch.slice(item.imageIndex * perImage, (item.imageIndex + 1) * perImage);
  const result = await model.generate({
    prompts: [item.prompt.prompt],
    negativePrompt: cfg.negative_prompt,
    steps: cfg.steps,
    guidance: item.guidance,
    seed: item.seed,
    width: size.width,
    height: size.height,
    initLatents,
    ...(cfg.sampler === null ? {} : { sampler: cfg.sampler }),
    ...(signal === undefined ? {} : { signal }),
  });
  const image = result.images[0]!;
  const bytes = await encodePng(image, { parameters: model.parameters(result) });
  await mkdir(path.dirname(file), { recursive: true });
  await writeFileAtomic(file, async (h) => {
    await h.writeFile(bytes);
  });
  return { image, sha256: sha256(bytes), modelHash: model.modelHash, width: image.width, height: image.height, sampler: result.settings.sampler, reusedFile: false };
}

function sha256(bytes: Uint8Array): string {
  return createHash('sha256').update(bytes).digest('hex');
}

/**
 * Rewrites the rows file in plan order when it is not (a run extended with a larger `limit`
 * appends new items after old ones); rows of items no longer planned stay, at the end.
 */
async function canonicalizeRows(rowsFile: string, items: readonly WorkItem[], done: ReadonlyMap<string, ResultRow>): Promise<void> {
  const { rows } = await readRowsFile(rowsFile);
  const planned = items.map((it) => done.get(it.key)!);
  const keys = new Set(items.map((it) => it.key));
  const extra = rows.filter((r) => !keys.has(r.key));
  const inOrder = rows.length === planned.length + extra.length && planned.every((r, i) => rows[i]?.key === r.key);
  if (inOrder) return;
  const tmp = `${rowsFile}.reorder`;
  await writeFileAtomic(tmp, async (h) => {
    await h.writeFile([...planned, ...extra].map((r) => `${JSON.stringify(r)}\n`).join(''));
  });
  await rename(tmp, rowsFile);
}
