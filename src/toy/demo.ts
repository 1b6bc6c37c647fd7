/**
 * `sdwb demo`: on the toy model, trains each concept method on toy data the base model never saw
 * (textual inversion of the held-out shape, a hypernetwork for the held-out style, a
 * DreamBooth-LoRA of one specific object) or erases a concept it knows (ESD-x of "circle"), then
 * measures base vs tuned through the eval harness with the toy classifier and judges each effect
 * against its bar. Everything lands in one folder and is resumable: a finished method or
 * measurement is reused by the next run.
 */
import { mkdir, readdir, readFile, rm, stat } from 'node:fs/promises';
import { availableParallelism } from 'node:os';
import path from 'node:path';

import { z } from 'zod';

import { writeTextAtomic } from '../io/atomic.js';
import { trainingConfigSchema } from '../methods/registry.js';
import { embeddingFileStem } from '../methods/textual-inversion.js';
import { parseTrainingConfig, type RawConfig } from '../train/config.js';
import { train } from '../train/loop.js';
import type { ProgressStream } from '../train/progress.js';
import type { ResultRow } from '../eval/rows.js';
import { runSdwbChild } from './child.js';
import { writeToyDataset } from './dataset.js';
import { accuracyOf, groupRows, headHit, labelRate, meanScore, rowHits, runToyEval, scenePrompts, TOY_DETECTOR, type Accuracy, type ToyEvalModel, type ToyPrompt } from './eval.js';
import { captionOf, GENERIC_SHAPE_WORD, HELD_OUT, NAMED_SHAPES, NAMED_STYLES, type Scene, type Shape, type Style } from './world.js';

/** The toy model's sampling defaults (`assets/toy-sd/toy.json`, written by `npm run toy:train`). */
export const toyDefaultsSchema = z.object({
  guidance: z.number().min(0),
  steps: z.number().int().min(1),
  sampler: z.string(),
  size: z.number().int().min(8),
});
export type ToyDefaults = z.infer<typeof toyDefaultsSchema>;

/** The folder the demo uses when no model is given. */
export const DEFAULT_TOY_MODEL = 'assets/toy-sd';

/** The shape the demo erases with ESD-x. */
export const ERASED_SHAPE: Shape = 'circle';
/** The specific object the DreamBooth-LoRA binds to "sks". */
export const DREAMBOOTH_OBJECT = { shape: 'triangle', colour: 'green', style: 'solid' } as const;
export const TI_TOKEN = '<toy-heart>';
/** What prompts write to use the saved embedding: A1111 matches an embedding by its file's stem, not the placeholder. */
export const TI_TRIGGER = embeddingFileStem({ placeholder_token: TI_TOKEN });
export const DREAMBOOTH_PROMPT = 'a sks shape';

/** The smallest row the bars are judged on (issue #9: ≥ 50 generated images per row). */
export const MIN_IMAGES = 50;

/** How big a demo run is. */
export interface DemoScale {
  /** Training steps per method. */
  readonly steps: { readonly ti: number; readonly esd: number; readonly hypernetwork: number; readonly dreambooth: number };
  /** Prompts per row and images per prompt (rows = prompts × images). */
  readonly prompts: number;
  readonly images: number;
  /** Training images per method dataset. */
  readonly dataImages: number;
}

/** Full demo: every row ≥ 50 images. */
export const FULL_SCALE: DemoScale = { steps: { ti: 100, esd: 600, hypernetwork: 300, dreambooth: 1000 }, prompts: 10, images: 5, dataImages: 200 };
/** `--fast`: the same pipeline with short training and small rows (directions only, not the bars). */
export const FAST_SCALE: DemoScale = { steps: { ti: 60, esd: 40, hypernetwork: 60, dreambooth: 60 }, prompts: 4, images: 3, dataImages: 64 };

/** Settings of a demo run. */
export interface DemoOptions {
  readonly model: string;
  readonly out: string;
  readonly scale: DemoScale;
  readonly fast: boolean;
  readonly backend?: 'auto' | 'wasm' | 'cpu';
  readonly seed?: number;
  readonly log?: (line: string) => void;
  readonly progress?: ProgressStream | false;
  readonly signal?: AbortSignal;
  /** Processes to use (default: 2 when the machine has 2+ cores; wasm uses one core each). */
  readonly workers?: number;
}

/** One judged number. */
export interface DemoCheck {
  readonly id: string;
  readonly description: string;
  readonly value: number;
  readonly op: '>=' | '<=';
  readonly threshold: number;
  /** Generated images behind the value (the smallest row it is computed from). */
  readonly images: number;
  /** The value meets the threshold. */
  readonly met: boolean;
  /** The value meets the threshold on ≥ MIN_IMAGES images per row. */
  readonly pass: boolean;
}

/** Per measurement, prompts × images per prompt (one line for the report and docs/results.md). */
export function layoutText(sampling: DemoResults['sampling']): string {
  return Object.entries(sampling.measurements)
    .map(([name, m]) => `${name} ${m.prompts} prompts × ${m.images_per_prompt} image${m.images_per_prompt === 1 ? '' : 's'}`)
    .join(', ');
}

/** What `results.json` holds. */
export interface DemoResults {
  /** 2: `sampling.measurements` gives prompts × images per measurement (1 had one layout for all rows). */
  readonly version: 2;
  readonly model: string;
  readonly fast: boolean;
  /** Sampler settings, and per measurement how many prompts and images per prompt its rows have. */
  readonly sampling: ToyDefaults & { readonly measurements: Readonly<Record<string, { readonly prompts: number; readonly images_per_prompt: number }>> };
  readonly seeds: { readonly training: number; readonly prompts: number; readonly note: string };
  readonly methods: Readonly<Record<string, { readonly steps: number; readonly seconds: number; readonly file: string; readonly config: RawConfig }>>;
  readonly rows: Readonly<Record<string, Accuracy & { readonly model: string; readonly what: string; readonly mean_score?: number }>>;
  readonly checks: readonly DemoCheck[];
  readonly pass: boolean;
  readonly seconds: number;
  readonly eval_dirs: Readonly<Record<string, string>>;
}

const exists = (p: string) => stat(p).then(() => true, () => false);

/** Reads `toy.json` of a toy model folder. */
export async function readToyDefaults(model: string): Promise<ToyDefaults> {
  const file = path.join(model, 'toy.json');
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch {
    throw new Error(`${file}: not found — the demo needs a toy model folder made by npm run toy:train (default ${DEFAULT_TOY_MODEL})`);
  }
  const parsed = toyDefaultsSchema.safeParse(JSON.parse(text));
  if (!parsed.success) throw new Error(`${file}: ${parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
  return parsed.data;
}

async function writeJson(file: string, value: unknown): Promise<void> {
  const text = `${JSON.stringify(value, null, 2)}\n`;
  await writeTextAtomic(file, text);
}

/** A caption without the style word: what the hypernetwork trains on and is measured with. */
export const stylelessCaption = (s: Partial<Record<'colour' | 'shape' | 'background', string>>) => `a ${s.colour} ${s.shape} on a ${s.background} background`;

/** Where the demo's training images are. */
type DemoData = Record<'ti' | 'hypernetwork' | 'dreambooth' | 'dreamboothReg', string>;

/** A pretraining scene with every attribute a named one (held-out ones replaced, picked by position), fully captioned. */
const namedScene = (s: Scene): Scene => ({
  ...s,
  shape: s.shape === HELD_OUT.shape ? NAMED_SHAPES[Math.floor(s.cx * 7) % NAMED_SHAPES.length]! : s.shape,
  style: s.style === HELD_OUT.style ? NAMED_STYLES[Math.floor(s.cy * 7) % NAMED_STYLES.length]! : s.style,
  shapeNamed: true,
  styleWord: 'named',
});

/** The training datasets: held-out shape, held-out style, one specific object and its regularisation images. */
async function writeDemoData(out: string, count: number): Promise<DemoData> {
  const dirs = { ti: path.join(out, 'data', 'ti'), hypernetwork: path.join(out, 'data', 'hypernetwork'), dreambooth: path.join(out, 'data', 'dreambooth'), dreamboothReg: path.join(out, 'data', 'dreambooth-reg') };
  const sets = [
    { dir: dirs.ti, split: 'heldout-shape' as const, count, caption: (s: Scene) => captionOf(s).replace(HELD_OUT.shape, TI_TOKEN) },
    { dir: dirs.hypernetwork, split: 'heldout-style' as const, count, caption: stylelessCaption },
    { dir: dirs.dreambooth, split: 'pretrain' as const, count: Math.min(count, 40), scene: (s: Scene): Scene => ({ ...s, ...DREAMBOOTH_OBJECT }), caption: () => DREAMBOOTH_PROMPT },
    { dir: dirs.dreamboothReg, split: 'pretrain' as const, count, scene: namedScene, caption: captionOf },
  ];
  for (const s of sets) {
    if (await exists(path.join(s.dir, 'dataset.json'))) continue;
    await writeToyDataset({ seed: 11, size: 32, ...s });
  }
  return dirs;
}

/** The four method configs of the demo (raw, as a user would write them in YAML). */
export function demoConfigs(o: { model: string; out: string; data: DemoData; scale: DemoScale; defaults: ToyDefaults; seed: number; backend: string }): Record<'ti' | 'esd' | 'hypernetwork' | 'dreambooth', RawConfig> {
  const common = { model: o.model, seed: o.seed, backend: o.backend, save_every: 100_000 };
  const circleCaptions = scenePrompts({ shapes: [ERASED_SHAPE], perShape: 24, styles: NAMED_STYLES, seed: 3 }).map((p) => p.prompt);
  const keptCaptions = scenePrompts({ shapes: NAMED_SHAPES.filter((s) => s !== ERASED_SHAPE), perShape: 6, styles: NAMED_STYLES, seed: 6 }).map((p) => p.prompt);
  return {
    ti: {
      ...common,
      method: 'textual_inversion',
      output_dir: path.join(o.out, 'ti'),
      steps: o.scale.steps.ti,
      batch_size: 8,
      gradient_accumulation_steps: 1,
      // One vector from "shape", briefly: on the session-5 model (24 images) 100 steps at 5e-3 drew
      // hearts 100 % (the initializer alone 92 %), while 300 steps at 1e-2 on an earlier checkpoint
      // drifted to 71 % — longer or faster runs move the vector off what the UNet draws as a heart.
      learning_rate: 5e-3,
      num_vectors: 1,
      placeholder_token: TI_TOKEN,
      initializer_token: GENERIC_SHAPE_WORD,
      template: 'none',
      save_formats: ['a1111_safetensors'],
      data: { dir: o.data.ti, resolution: 32 },
    },
    esd: {
      ...common,
      method: 'esd',
      output_dir: path.join(o.out, 'esd'),
      preset: 'esd-2024',
      // ESD-x on K/V only (esd_sd.py's esd-x-strict), with preserve prompts. Plain ESD-x found no
      // setting meeting both bars on any toy model (the toy text encoder's states for captions of
      // different shapes are close, so erasing one drags the rest; sweeps in docs/results.md). With
      // captions of the other shapes kept (30 images per shape, 600 steps at 2e-3): η 8, weight 1:
      // circles 97 → 10 %, others −34 points; weight 3: 20 % / −12; weight 6: 10 % / −8.5; η 12,
      // weight 6: 17 % / −7.5.
      parameters: 'esd-x-strict',
      concept: circleCaptions.join('|'),
      preserve: keptCaptions.join('|'),
      preserve_weight: 6,
      separator: '|',
      steps: o.scale.steps.esd,
      learning_rate: 2e-3,
      negative_guidance: 8,
      start_guidance: o.defaults.guidance,
      ddim_steps: o.defaults.steps,
      resolution: 32,
    },
    hypernetwork: {
      ...common,
      method: 'hypernetwork',
      output_dir: path.join(o.out, 'hypernetwork'),
      hypernetwork_name: 'checkered',
      enable_sizes: [32, 64],
      // Chosen on 200 style-less prompts the demo never measures (seed 21, CFG 3, paired seeds):
      // A1111's default linear [1, 2, 1] 68.5 %; relu 68.5 %; relu [1, 4, 1] 72.5 %, [1, 8, 1]
      // 71.5 %, [1, 4, 1] for 600 steps 68.5 %; caption dropout alone 0.1 69.5 %, 0.25 63.5 %;
      // relu [1, 4, 1] with caption dropout 0.1 76.5 % (19 prompts gained, 3 lost against the
      // default). The dropped captions train the empty prompt's prediction with the hypernetwork
      // in place, which classifier-free guidance extrapolates from.
      layer_structure: [1, 4, 1],
      activation_func: 'relu',
      steps: o.scale.steps.hypernetwork,
      batch_size: 8,
      gradient_accumulation_steps: 1,
      learning_rate: 1e-3,
      data: { dir: o.data.hypernetwork, resolution: 32, caption_dropout_rate: 0.1 },
    },
    dreambooth: {
      ...common,
      method: 'dreambooth',
      output_dir: path.join(o.out, 'dreambooth'),
      adapter: 'lora',
      rank: 8,
      // UNet and text-encoder adapters: with the UNet alone, 300 steps bound "sks" to the colour
      // only (21 %); with both, 500 steps reached 92 % colour on a 2,000-step toy model. On the session-2
      // model, 1,000 steps drew the whole object 29 % of the time against 16 % for 500.
      train_text_encoder: true,
      steps: o.scale.steps.dreambooth,
      batch_size: 4,
      learning_rate: 2e-3,
      // Prior preservation with captioned regularisation images of every named concept, not the
      // class prompt "a shape": in this world "shape" is the word pretraining used for hearts, so
      // its generated class images are hearts. A quarter of them train with the empty caption:
      // without that, captions without the identifier fell 42 points at CFG 3 (98 → 56 %) but
      // only 6 at CFG 1 (80 → 74 %) — the adapters had moved the unconditional prediction and
      // guidance magnified it. With it (session-6 model, 50 images): 98 → 94 %, the object 98 %.
      with_prior_preservation: true,
      class_captions: 'sidecar',
      class_data_dir: o.data.dreamboothReg,
      num_class_images: o.scale.dataImages,
      class_caption_dropout_rate: 0.25,
      save_formats: ['kohya'],
      output_name: 'sks-shape',
      data: { dir: o.data.dreambooth, resolution: 32, instance_prompt: DREAMBOOTH_PROMPT },
    },
  };
}

/** The measurements that use each method's artifact. */
const MEASURED_WITH: Record<'ti' | 'esd' | 'hypernetwork' | 'dreambooth', readonly string[]> = {
  ti: ['textual-inversion'],
  esd: ['shapes'],
  hypernetwork: ['hypernetwork'],
  dreambooth: ['dreambooth', 'dreambooth-class'],
};

const ARTIFACT_EXT: Record<string, RegExp> = {
  ti: /\.safetensors$/,
  esd: /\.safetensors$/,
  hypernetwork: /\.pt$/,
  dreambooth: /\.safetensors$/,
};

/** Trains one method (or reuses a finished run), here or in a `sdwb train` child, and returns its artifact file. */
async function trainMethod(id: string, raw: RawConfig, o: DemoOptions, log: (m: string) => void, child: boolean): Promise<{ file: string; seconds: number; steps: number; fresh: boolean }> {
  const config = parseTrainingConfig(raw, trainingConfigSchema(), `demo ${id} config`);
  const dir = path.resolve(config.output_dir);
  const marker = path.join(dir, 'demo-done.json');
  const configText = JSON.stringify(raw);
  if (await exists(marker)) {
    const done = JSON.parse(await readFile(marker, 'utf8')) as { file: string; seconds: number; steps: number; config?: string };
    if (done.config === configText && (await exists(done.file))) {
      log(`${id}: reusing ${done.file}`);
      return { ...done, fresh: false };
    }
    // Another config: start over (a checkpoint of other settings must not be resumed).
    await rm(dir, { recursive: true, force: true });
  }
  const t0 = Date.now();
  const hasCheckpoint = (await exists(dir)) && (await readdir(dir)).some((f) => f.startsWith('checkpoint-'));
  let file: string | undefined;
  if (child) {
    await mkdir(dir, { recursive: true });
    const cfgFile = path.join(dir, 'demo-config.json');
    const json = JSON.stringify(raw, null, 2);
    await writeTextAtomic(cfgFile, json);
    const logFile = path.join(dir, 'train.log');
    log(`${id}: training ${config.steps} steps in a child process → ${dir} (log ${logFile})`);
    await runSdwbChild(['train', cfgFile, ...(hasCheckpoint ? ['--resume'] : [])], logFile, o.signal);
    if (o.signal?.aborted === true) throw new DemoInterrupted(`${id} interrupted`);
    const found = (await readdir(dir)).filter((f) => ARTIFACT_EXT[id]!.test(f));
    if (found.length === 1) file = path.join(dir, found[0]!);
  } else {
    log(`${id}: training ${config.steps} steps → ${dir}`);
    const result = await train(config, {
      ...(hasCheckpoint ? { resume: 'latest' } : {}),
      log,
      ...(o.progress === undefined ? {} : { progress: o.progress }),
      ...(o.signal === undefined ? {} : { signal: o.signal }),
    });
    if (result.interrupted) throw new DemoInterrupted(`${id} interrupted at step ${result.step}`);
    file = result.outputs.find((f) => ARTIFACT_EXT[id]!.test(f));
  }
  if (file === undefined) throw new Error(`${id}: training left no single ${ARTIFACT_EXT[id]} file in ${dir}`);
  const done = { file, seconds: (Date.now() - t0) / 1000, steps: config.steps, config: configText };
  await writeJson(marker, done);
  return { ...done, fresh: true };
}

/**
 * Readies a measurement's folder for `settings`: kept (so the harness resumes it) when it was made
 * with the same settings, emptied otherwise — the harness refuses to resume a run of other prompts
 * or models, and a demo of an earlier version or scale must not stop on that.
 */
export async function measurementDir(dir: string, settings: string): Promise<void> {
  const marker = path.join(dir, 'demo-measurement.json');
  const previous = (await exists(marker)) ? await readFile(marker, 'utf8') : undefined;
  if (previous !== settings) await rm(dir, { recursive: true, force: true });
  await mkdir(dir, { recursive: true });
  await writeTextAtomic(marker, settings);
}

/** Raised when the signal stops the demo (everything finished so far is kept). */
export class DemoInterrupted extends Error {
  override name = 'DemoInterrupted';
}

function withToken(prompts: readonly ToyPrompt[], word: string, token: string): ToyPrompt[] {
  return prompts.map((p) => ({ ...p, prompt: p.prompt.replace(word, token) }));
}

/** Runs the demo end to end and writes `results.json` (the report is written by the caller). */
export async function runDemo(o: DemoOptions): Promise<DemoResults> {
  const t0 = Date.now();
  const log = o.log ?? ((m: string) => process.stderr.write(`${m}\n`));
  const out = path.resolve(o.out);
  const model = path.resolve(o.model);
  const seed = o.seed ?? 0;
  const backend = o.backend ?? 'wasm';
  const defaults = await readToyDefaults(model);
  const workers = o.workers ?? Math.min(2, availableParallelism());
  await mkdir(out, { recursive: true });

  // 1. Data and training.
  const data = await writeDemoData(out, o.scale.dataImages);
  const configs = demoConfigs({ model, out, data, scale: o.scale, defaults, seed, backend });
  const methods: Record<string, { steps: number; seconds: number; file: string; config: RawConfig }> = {};
  // Two lanes when there are two workers: this process and one `sdwb train` child at a time.
  const lanes: (readonly ('ti' | 'esd' | 'hypernetwork' | 'dreambooth')[])[] = workers > 1 ? [['ti', 'hypernetwork'], ['esd', 'dreambooth']] : [['ti', 'esd', 'hypernetwork', 'dreambooth']];
  await Promise.all(
    lanes.map(async (ids, lane) => {
      for (const id of ids) {
        const { fresh, file, seconds, steps } = await trainMethod(id, configs[id], o, log, lane > 0);
        methods[id] = { file, seconds, steps, config: configs[id] };
        // Measurements of an earlier artifact of this method are stale now.
        if (fresh) for (const name of MEASURED_WITH[id]) await rm(path.join(out, 'eval', name), { recursive: true, force: true });
      }
    }),
  );

  // 2. Measurements through the eval harness.
  const n = o.scale.prompts;
  const evalBase = { imagesPerPrompt: o.scale.images, guidance: defaults.guidance, steps: defaults.steps, backend: backend as 'wasm', log, progress: o.progress !== false, ...(o.signal === undefined ? {} : { signal: o.signal }) };
  const evalDirs: Record<string, string> = {};
  const layout: Record<string, { prompts: number; images_per_prompt: number }> = {};
  const measure = async (name: string, models: ToyEvalModel[], prompts: ToyPrompt[], imagesPerPrompt = o.scale.images): Promise<ResultRow[]> => {
    const dir = (evalDirs[name] = path.join(out, 'eval', name));
    layout[name] = { prompts: prompts.length, images_per_prompt: imagesPerPrompt };
    await measurementDir(dir, JSON.stringify({ models, prompts, imagesPerPrompt, guidance: evalBase.guidance, steps: evalBase.steps }));
    log(`measuring ${name}: ${models.map((m) => m.name).join(', ')} × ${prompts.length} prompts × ${imagesPerPrompt} images`);
    const { rows, interrupted } = await runToyEval({ ...evalBase, imagesPerPrompt, models, prompts, outputDir: dir, workers });
    if (interrupted) throw new DemoInterrupted(`measurement ${name} interrupted`);
    return rows;
  };
  // Rows across the named shapes draw one image from each of as many prompts as a per-shape row
  // has images: images of one prompt share its failures (one prompt's miss moved a 10-prompt row
  // by 10 points), and with 2 prompts per shape the colours cycled through red and green only.
  const acrossShapes = (styles: readonly Style[], seed: number) => scenePrompts({ shapes: NAMED_SHAPES, perShape: Math.ceil((n * o.scale.images) / NAMED_SHAPES.length), styles, seed });
  const base: ToyEvalModel = { name: 'base', model };
  const shapeRows = await measure('shapes', [base, { name: 'esd-x', model, delta: methods['esd']!.file }], scenePrompts({ shapes: NAMED_SHAPES, perShape: n, styles: NAMED_STYLES, seed: 1 }));
  const heartPrompts = scenePrompts({ shapes: [HELD_OUT.shape], perShape: n, styles: NAMED_STYLES, seed: 2 });
  const tiRows = await measure('textual-inversion', [base, { name: 'ti', model, embedding: methods['ti']!.file }], withToken(heartPrompts, HELD_OUT.shape, TI_TRIGGER));
  // What the initializer word alone draws: pretraining captioned hearts (and some other shapes) "shape".
  const genericRows = await measure('generic-shape', [base], withToken(heartPrompts, HELD_OUT.shape, GENERIC_SHAPE_WORD));
  const styleless = acrossShapes([HELD_OUT.style], 4).map((p) => ({ ...p, prompt: stylelessCaption(p.target) }));
  const hnRows = await measure('hypernetwork', [
    base,
    { name: 'hypernetwork-1', model, hypernetwork: `${methods['hypernetwork']!.file}:1` },
    { name: 'hypernetwork-0', model, hypernetwork: `${methods['hypernetwork']!.file}:0` },
  ], styleless, 1);
  const sksPrompts: ToyPrompt[] = Array.from({ length: n }, (_, i) => ({ id: `sks-${i}`, prompt: DREAMBOOTH_PROMPT, target: { ...DREAMBOOTH_OBJECT }, seed: 500_000 + i }));
  const dbRows = await measure('dreambooth', [base, { name: 'dreambooth-lora', model, lora: methods['dreambooth']!.file }], sksPrompts);
  const classRows = await measure('dreambooth-class', [base, { name: 'dreambooth-lora', model, lora: methods['dreambooth']!.file }], acrossShapes(NAMED_STYLES, 5), 1);

  // 3. Rows and checks.
  const byModel = (rows: readonly ResultRow[], m: string) => rows.filter((r) => r.model === m);
  const shapeOf = (r: ResultRow) => /shape=(\w+)/.exec(r.label ?? '')?.[1] ?? '?';
  const rows: Record<string, Accuracy & { model: string; what: string; mean_score?: number }> = {};
  const put = (key: string, modelName: string, what: string, a: Accuracy, score?: number) => (rows[key] = { ...a, model: modelName, what, ...(score === undefined ? {} : { mean_score: score }) });
  for (const [m, label] of [['base', 'base'], ['esd-x', 'esd']] as const) {
    for (const [shape, g] of groupRows(byModel(shapeRows, m), shapeOf)) put(`${label}.shape.${shape}`, m, `"${shape}" captions drawn as ${shape}`, accuracyOf(g, TOY_DETECTOR, (r) => headHit(r, TOY_DETECTOR, 'shape')));
    put(`${label}.colour`, m, 'captions drawn in the requested colour', accuracyOf(byModel(shapeRows, m), TOY_DETECTOR, (r) => headHit(r, TOY_DETECTOR, 'colour')));
  }
  const others = (label: string) => {
    const list = NAMED_SHAPES.filter((s) => s !== ERASED_SHAPE).map((s) => rows[`${label}.shape.${s}`]!);
    return { rate: list.reduce((a, b) => a + b.rate, 0) / list.length, images: Math.min(...list.map((x) => x.images)) };
  };
  for (const [m, label] of [['base', 'base.ti_prompts'], ['ti', 'ti.shape']] as const) {
    put(label, m, `"${TI_TRIGGER}" captions drawn as ${HELD_OUT.shape}${m === 'base' ? ' (no embedding: the tokenizer splits the word into pieces)' : ''}`, accuracyOf(byModel(tiRows, m), TOY_DETECTOR, (r) => headHit(r, TOY_DETECTOR, 'shape')), meanScore(byModel(tiRows, m), TOY_DETECTOR, 'shape', HELD_OUT.shape));
  }
  put('base.generic.shape', 'base', `"${GENERIC_SHAPE_WORD}" captions (the embedding's initializer word) drawn as ${HELD_OUT.shape}`, accuracyOf(genericRows, TOY_DETECTOR, (r) => headHit(r, TOY_DETECTOR, 'shape')), meanScore(genericRows, TOY_DETECTOR, 'shape', HELD_OUT.shape));
  put('base.hn_prompts.style', 'base', `style-less captions drawn ${HELD_OUT.style} (no hypernetwork)`, labelRate(byModel(hnRows, 'base'), TOY_DETECTOR, 'style', HELD_OUT.style), meanScore(byModel(hnRows, 'base'), TOY_DETECTOR, 'style', HELD_OUT.style));
  put('hypernetwork-1.style', 'hypernetwork-1', `style-less captions drawn ${HELD_OUT.style} (strength 1)`, labelRate(byModel(hnRows, 'hypernetwork-1'), TOY_DETECTOR, 'style', HELD_OUT.style), meanScore(byModel(hnRows, 'hypernetwork-1'), TOY_DETECTOR, 'style', HELD_OUT.style));
  put('hypernetwork-0.style', 'hypernetwork-0', `style-less captions drawn ${HELD_OUT.style} (strength 0)`, labelRate(byModel(hnRows, 'hypernetwork-0'), TOY_DETECTOR, 'style', HELD_OUT.style), meanScore(byModel(hnRows, 'hypernetwork-0'), TOY_DETECTOR, 'style', HELD_OUT.style));
  for (const [m, label] of [['base', 'base.identifier'], ['dreambooth-lora', 'dreambooth.identifier']] as const) {
    put(label, m, `"${DREAMBOOTH_PROMPT}" drawn as a ${DREAMBOOTH_OBJECT.colour} ${DREAMBOOTH_OBJECT.style} ${DREAMBOOTH_OBJECT.shape}`, accuracyOf(byModel(dbRows, m), TOY_DETECTOR, (r) => rowHits(r, TOY_DETECTOR)));
  }
  for (const m of ['base', 'dreambooth-lora']) {
    put(`${m}.class`, m, 'captions without the identifier drawn with the requested shape and colour', accuracyOf(byModel(classRows, m), TOY_DETECTOR, (r) => headHit(r, TOY_DETECTOR, 'shape') && headHit(r, TOY_DETECTOR, 'colour')));
  }

  const checks: DemoCheck[] = [];
  const check = (id: string, description: string, value: number, op: '>=' | '<=', threshold: number, images: number) => {
    const met = op === '>=' ? value >= threshold : value <= threshold;
    checks.push({ id, description, value, op, threshold, images, met, pass: met && images >= MIN_IMAGES });
  };
  const baseShapes = NAMED_SHAPES.map((s) => rows[`base.shape.${s}`]!);
  check('base.shapes_at_80', 'base model: shapes drawn correctly for ≥ 80% of their captions', baseShapes.filter((r) => r.rate >= 0.8).length, '>=', 3, Math.min(...baseShapes.map((r) => r.images)));
  check('base.colour', 'base model: requested colour', rows['base.colour']!.rate, '>=', 0.8, rows['base.colour']!.images);
  check('esd.erased', `ESD-x: "${ERASED_SHAPE}" captions still drawn as ${ERASED_SHAPE}`, rows[`esd.shape.${ERASED_SHAPE}`]!.rate, '<=', 0.2, rows[`esd.shape.${ERASED_SHAPE}`]!.images);
  const ob = others('base');
  const oe = others('esd');
  check('esd.others_drop', 'ESD-x: fall of the other shapes\' mean accuracy (points/100)', ob.rate - oe.rate, '<=', 0.1, Math.min(ob.images, oe.images));
  check('ti.heldout_shape', `textual inversion: "${TI_TRIGGER}" drawn as ${HELD_OUT.shape}`, rows['ti.shape']!.rate, '>=', 0.7, rows['ti.shape']!.images);
  check('hypernetwork.strength_1', `hypernetwork at strength 1: ${HELD_OUT.style} style`, rows['hypernetwork-1.style']!.rate, '>=', 0.7, rows['hypernetwork-1.style']!.images);
  check('hypernetwork.strength_0', `hypernetwork at strength 0: ${HELD_OUT.style} style`, rows['hypernetwork-0.style']!.rate, '<=', 0.1, rows['hypernetwork-0.style']!.images);
  check('dreambooth.identifier', `DreamBooth-LoRA: "${DREAMBOOTH_PROMPT}" shows the object's shape, colour and style`, rows['dreambooth.identifier']!.rate, '>=', 0.7, rows['dreambooth.identifier']!.images);
  const classDrop = Math.abs(rows['base.class']!.rate - rows['dreambooth-lora.class']!.rate);
  check('dreambooth.class_change', 'DreamBooth-LoRA: change of accuracy on captions without the identifier (points/100)', classDrop, '<=', 0.1, Math.min(rows['base.class']!.images, rows['dreambooth-lora.class']!.images));

  const results: DemoResults = {
    version: 2,
    model,
    fast: o.fast,
    sampling: { ...defaults, measurements: layout },
    seeds: { training: seed, prompts: 1, note: "each prompt's seed is in its row (eval/<measurement>/rows.jsonl); image k is slice k of one noise batch drawn from it" },
    methods,
    rows,
    checks,
    pass: checks.every((c) => c.pass),
    seconds: (Date.now() - t0) / 1000,
    eval_dirs: evalDirs,
  };
  await writeJson(path.join(out, 'results.json'), results);
  return results;
}
