/**
 * Trains the toy model from scratch with the workbench's own trainer, in one command:
 *   npm run toy:train [-- --work tmp/toy --out assets/toy-sd]
 * Stages (each skipped when its output exists; an interrupted training stage resumes from its
 * last checkpoint): procedural data → from-scratch init → VAE (`configs/toy/vae.yaml`) → UNet +
 * text encoder on its latents (`configs/toy/finetune.yaml`), while a child process on the second
 * core continues the VAE on every concept (`configs/toy/vae-all.yaml`) and then fine-tunes that
 * VAE's decoder (`configs/toy/vae-decoder.yaml`) → the UNet + text encoder continued on the
 * all-concepts VAE's latents (`configs/toy/finetune-adapt.yaml`) → classifier measurements (VAE
 * reconstructions, accuracy of every stage-2 checkpoint, CFG scale choice, final base accuracy) →
 * the diffusers folder `assets/toy-sd/` with `toy.json` (sampling defaults) and `summary.json`.
 * Budget and reasoning: docs/toy-plan.md; results: docs/results.md.
 */
import { cp, mkdir, readdir, readFile, rename, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import { parseArgs } from 'node:util';

import * as tf from '@tensorflow/tfjs';

import { initBackend } from '../src/backend.js';
import { writeTextAtomic } from '../src/io/atomic.js';
import { imageToTensor, tensorToImage, vaeDecode, vaeEncode } from '../src/models/vae/vae.js';
import { tfOps } from '../src/ops/tfjs-ops.js';
import { disposeStableDiffusion, loadStableDiffusion } from '../src/pipeline/load.js';
import { trainingConfigSchema } from '../src/methods/registry.js';
import { loadTrainingConfig } from '../src/train/config.js';
import { train } from '../src/train/loop.js';
import { runSdwbChild } from '../src/toy/child.js';
import { classifyBatch, HEAD_NAMES, HEADS, loadClassifier, type Head } from '../src/toy/classifier.js';
import { writeToyDataset, toySamples } from '../src/toy/dataset.js';
import { DEFAULT_CLASSIFIER_FILE } from '../src/toy/detector.js';
import { groupRows, headHit, parseTargetLabel, runToyEval, scenePrompts, TOY_DETECTOR, type ToyPrompt } from '../src/toy/eval.js';
import { readToyModelSpec, writeScratchModel } from '../src/toy/model.js';
import { COLOUR_NAMES, HELD_OUT, NAMED_SHAPES, SHAPES, NAMED_STYLES, STYLES } from '../src/toy/world.js';

const { values } = parseArgs({
  options: {
    work: { type: 'string', default: 'tmp/toy' },
    out: { type: 'string', default: 'assets/toy-sd' },
    spec: { type: 'string', default: 'configs/toy/model.yaml' },
    'vae-config': { type: 'string', default: 'configs/toy/vae.yaml' },
    'vae-all-config': { type: 'string', default: 'configs/toy/vae-all.yaml' },
    'finetune-config': { type: 'string', default: 'configs/toy/finetune.yaml' },
    'adapt-config': { type: 'string', default: 'configs/toy/finetune-adapt.yaml' },
    'decoder-config': { type: 'string', default: 'configs/toy/vae-decoder.yaml' },
    count: { type: 'string', default: '20000' },
    'per-shape': { type: 'string', default: '12' },
    images: { type: 'string', default: '5' },
    guidances: { type: 'string', default: '3,5,7.5,10' },
    'skip-curve': { type: 'boolean', default: false },
    // Measures the finetune checkpoints written so far (while another process trains) and exits.
    'measure-checkpoints': { type: 'boolean', default: false },
  },
});
const work = values.work;
const started = Date.now();
const log = (m: string) => process.stderr.write(`[toy:train ${((Date.now() - started) / 60_000).toFixed(1)} min] ${m}\n`);
const exists = (p: string) => stat(p).then(() => true, () => false);

const SAMPLE_STEPS = 25;

await initBackend({ backend: 'wasm', log });

// 1. Data and the from-scratch folder.
const dataDir = path.join(work, 'data');
const count = Number(values.count);
if (!(await exists(path.join(dataDir, 'dataset.json')))) {
  log(`data: ${count} pretraining scenes → ${dataDir}`);
  await writeToyDataset({ dir: dataDir, seed: 0, split: 'pretrain', size: 32, count });
}
const dataAllDir = path.join(work, 'data-all');
if (!(await exists(path.join(dataAllDir, 'dataset.json')))) {
  log(`data: ${count} scenes of every concept (VAE stages 1b and decoder) → ${dataAllDir}`);
  await writeToyDataset({ dir: dataAllDir, seed: 1, split: 'all', size: 32, count });
}
const scratch = path.join(work, 'scratch');
if (!(await exists(path.join(scratch, 'model_index.json')))) {
  log(`init: ${values.spec} → ${scratch}`);
  await writeScratchModel(scratch, await readToyModelSpec(values.spec), 0, { overwrite: true });
}

// 2. The two training stages (resumable).
async function stage(configFile: string, overrides: readonly string[]): Promise<{ dir: string; model: string; steps: number; seconds: number }> {
  const { config } = await loadTrainingConfig(configFile, overrides, trainingConfigSchema());
  const dir = path.resolve(config.output_dir);
  const model = path.join(dir, 'model');
  const t0 = Date.now();
  if (!(await exists(path.join(model, 'model_index.json')))) {
    const hasCheckpoint = (await exists(dir)) && (await readdir(dir)).some((f) => f.startsWith('checkpoint-'));
    log(`${config.method}: ${config.steps} steps → ${dir}${hasCheckpoint ? ' (resuming)' : ''}`);
    const result = await train(config, hasCheckpoint ? { resume: 'latest' } : {});
    if (result.interrupted) throw new Error(`${config.method} interrupted at step ${result.step}: run npm run toy:train again to resume`);
  }
  return { dir, model, steps: config.steps, seconds: (Date.now() - t0) / 1000 };
}
const measureOnly = values['measure-checkpoints'];
const firstVaeModel = path.join(work, 'vae', 'model');
const vaeAllModel = path.join(work, 'vae-all', 'model');
const decoderDir = path.join(work, 'vae-decoder');
const decoderModel = path.join(decoderDir, 'model');
let firstVaeSteps = 0;
let vaeAllSteps = 0;
let fine: { dir: string; model: string; steps: number };
let adapt: { dir: string; model: string; steps: number } | undefined;
if (measureOnly) {
  fine = { dir: path.join(work, 'finetune'), model: path.join(work, 'finetune', 'model'), steps: 0 };
  if (!(await exists(path.join(firstVaeModel, 'model_index.json')))) throw new Error(`--measure-checkpoints: ${firstVaeModel} is not there yet`);
} else {
  const first = await stage(values['vae-config'], [`model=${scratch}`, `output_dir=${path.join(work, 'vae')}`, `data.dir=${dataDir}`]);
  firstVaeSteps = first.steps;
  // The VAE stages after the first only need it: they run in a child process (wasm uses one core)
  // while the UNet trains here.
  const vaeAllSets = [`model=${first.model}`, `output_dir=${path.join(work, 'vae-all')}`, `data.dir=${dataAllDir}`];
  const decoderSets = [`model=${vaeAllModel}`, `output_dir=${decoderDir}`, `data.dir=${dataAllDir}`];
  const childLane = (async () => {
    for (const [config, sets, model, logName] of [
      [values['vae-all-config'], vaeAllSets, vaeAllModel, 'vae-all.log'],
      [values['decoder-config'], decoderSets, decoderModel, 'vae-decoder.log'],
    ] as const) {
      if (await exists(path.join(model, 'model_index.json'))) continue;
      const code = await runChildStage(config, sets, path.join(work, logName));
      if (code !== 0) return `${config} failed (exit ${code}); see ${path.join(work, logName)}; run npm run toy:train again to resume`;
    }
    return undefined;
  })();
  fine = await stage(values['finetune-config'], [`model=${first.model}`, `output_dir=${path.join(work, 'finetune')}`, `data.dir=${dataDir}`]);
  const childError = await childLane;
  if (childError !== undefined) throw new Error(childError);
  vaeAllSteps = (await loadTrainingConfig(values['vae-all-config'], vaeAllSets, trainingConfigSchema())).config.steps;
  const adaptBase = await withVae(fine.model, vaeAllModel, path.join(work, 'adapt-base'));
  adapt = await stage(values['adapt-config'], [`model=${adaptBase}`, `output_dir=${path.join(work, 'finetune-adapt')}`, `data.dir=${dataDir}`]);
}

/** A model folder made of `model` with the VAE of `vaeModel` (written once, by rename). */
async function withVae(model: string, vaeModel: string, target: string): Promise<string> {
  if (await exists(path.join(target, 'model_index.json'))) return target;
  const staging = `${target}.staging`;
  await rm(staging, { recursive: true, force: true });
  await cp(model, staging, { recursive: true });
  await rm(path.join(staging, 'vae'), { recursive: true });
  await cp(path.join(vaeModel, 'vae'), path.join(staging, 'vae'), { recursive: true });
  await rename(staging, target);
  return target;
}

/** `sdwb train <config>` in a child process (resuming when checkpoints exist); resolves to its exit code. */
async function runChildStage(configFile: string, sets: readonly string[], logFile: string): Promise<number> {
  const dir = sets.find((x) => x.startsWith('output_dir='))!.slice('output_dir='.length);
  const resume = (await exists(dir)) && (await readdir(dir)).some((f) => f.startsWith('checkpoint-'));
  log(`child: sdwb train ${configFile} (log ${logFile})`);
  return runSdwbChild(['train', configFile, ...sets.flatMap((x) => ['--set', x]), ...(resume ? ['--resume'] : [])], logFile).then(
    () => 0,
    (e: unknown) => {
      log(String(e));
      return 1;
    },
  );
}

// 3. Measurements with the toy classifier.
const classifier = await loadClassifier(DEFAULT_CLASSIFIER_FILE);

/** Reconstruction MSE and classifier accuracy on VAE round trips of fresh scenes of every concept. */
async function vaeCheck(model: string, n: number): Promise<Record<string, number>> {
  const sd = await loadStableDiffusion(model);
  const samples = toySamples({ seed: 7, split: 'all', size: 32, count: n });
  const t = imageToTensor(samples.map((s) => s.image));
  // In chunks: the wasm heap (4 GB) does not hold 512 images' activations at once.
  const per = t.data.length / n;
  const data = new Float32Array(t.data.length);
  for (let at = 0; at < n; at += 32) {
    const k = Math.min(32, n - at);
    const recon = tf.tidy(() => {
      const x = tf.tensor4d(t.data.subarray(at * per, (at + k) * per), [k, t.shape[1], t.shape[2], t.shape[3]]);
      const post = vaeEncode(tfOps, sd.vae.store.scope(), x, sd.vae.cfg);
      return vaeDecode(tfOps, sd.vae.store.scope(), post.mean, sd.vae.cfg);
    });
    data.set(recon.dataSync(), at * per);
    recon.dispose();
  }
  let se = 0;
  for (let i = 0; i < data.length; i++) se += (Math.max(-1, Math.min(1, data[i]!)) - t.data[i]!) ** 2;
  const images = tensorToImage(data, t.shape);
  const probs = classifyBatch(classifier, images);
  const out: Record<string, number> = { mse: se / data.length, images: n };
  for (const h of HEAD_NAMES) {
    const labels = HEADS[h] as readonly string[];
    out[`${h}_accuracy`] = samples.filter((s, i) => {
      const p = probs[h][i]!;
      return labels[p.indexOf(Math.max(...p))] === s.scene[h];
    }).length / n;
  }
  // Per style: textures are what a blurry VAE loses first.
  const styles = HEADS.style as readonly string[];
  for (const st of styles) {
    const idx = samples.map((s, i) => [s, i] as const).filter(([s]) => s.scene.style === st);
    out[`style_${st}_accuracy`] = idx.filter(([, i]) => {
      const p = probs.style[i]!;
      return styles[p.indexOf(Math.max(...p))] === st;
    }).length / idx.length;
  }
  disposeStableDiffusion(sd);
  return out;
}

interface BaseAccuracy {
  readonly guidance: number;
  readonly images: number;
  readonly shape: Record<string, { rate: number; images: number }>;
  readonly colour: Record<string, { rate: number; images: number }>;
  readonly shapes_at_80: number;
  readonly mean_shape: number;
  readonly mean_colour: number;
}

/** Shape accuracy per shape and colour accuracy per colour of a model's images of full captions. */
async function baseAccuracy(model: string, outDir: string, guidance: number, perShape: number, images: number): Promise<BaseAccuracy> {
  const prompts: ToyPrompt[] = scenePrompts({ shapes: NAMED_SHAPES, perShape, styles: NAMED_STYLES, seed: 1 });
  const { rows } = await runToyEval({ models: [{ name: 'base', model }], prompts, outputDir: outDir, imagesPerPrompt: images, guidance, steps: SAMPLE_STEPS, backend: 'wasm', log, workers: measureOnly ? 1 : 2 });
  const rate = (head: Head) =>
    Object.fromEntries(
      [...groupRows(rows, (r) => parseTargetLabel(r.label ?? '')[head] ?? '?')].map(([k, g]) => [
        k,
        { rate: g.filter((r) => headHit(r, TOY_DETECTOR, head)).length / g.length, images: g.length },
      ]),
    );
  const shape = rate('shape');
  const colour = rate('colour');
  const mean = (o: Record<string, { rate: number }>) => Object.values(o).reduce((a, b) => a + b.rate, 0) / Object.values(o).length;
  return {
    guidance,
    images: rows.length,
    shape,
    colour,
    shapes_at_80: Object.values(shape).filter((s) => s.rate >= 0.8).length,
    mean_shape: mean(shape),
    mean_colour: mean(colour),
  };
}

const evalDir = path.join(work, 'eval');
const summaryFile = path.join(work, 'summary.json');
const previous = (await exists(summaryFile)) ? (JSON.parse(await readFile(summaryFile, 'utf8')) as Record<string, unknown>) : {};
const save = async (s: Record<string, unknown>) => {
  await mkdir(work, { recursive: true });
  const text = `${JSON.stringify(s, null, 2)}\n`;
  await writeTextAtomic(summaryFile, text);
};
const summary: Record<string, unknown> = { ...previous };

for (const [key, model] of [['vae_check', firstVaeModel], ['vae_all_check', vaeAllModel], ['vae_decoder_check', decoderModel]] as const) {
  if (summary[key] === undefined) {
    if (measureOnly) continue;
    log(`${key}: reconstructions of 512 fresh scenes (held-out concepts included)`);
    summary[key] = await vaeCheck(model, 512);
    await save(summary);
  }
  log(`${key}: ${JSON.stringify(summary[key])}`);
}

const perShape = Number(values['per-shape']);
const images = Number(values.images);
const guidances = values.guidances.split(',').map(Number);
const defaultGuidance = 4;

// Accuracy against training steps, from the stage-2 checkpoints' model folders (their own VAE,
// whose latents they were trained on).
if (!values['skip-curve']) {
  const curve = (summary['curve'] as Record<string, BaseAccuracy> | undefined) ?? {};
  const checkpoints = (await readdir(fine.dir)).filter((f) => /^checkpoint-\d+$/.test(f)).sort((a, b) => Number(a.slice(11)) - Number(b.slice(11)));
  for (const c of checkpoints) {
    const step = c.slice(11);
    if (curve[step] !== undefined) continue;
    log(`curve: ${c} at CFG ${defaultGuidance}`);
    const model = path.join(fine.dir, c, 'model');
    curve[step] = await baseAccuracy(model, path.join(evalDir, `curve-${step}`), defaultGuidance, Math.max(2, Math.round(perShape / 4)), images);
    summary['curve'] = curve;
    await save(summary);
  }
}

if (measureOnly || adapt === undefined) process.exit(0);
const final = await withVae(adapt.model, decoderModel, path.join(work, 'final'));

// CFG scale: the one with the best mean shape accuracy (ties: the smaller scale).
const byGuidance = (summary['guidance_search'] as Record<string, BaseAccuracy> | undefined) ?? {};
for (const g of guidances) {
  if (byGuidance[String(g)] !== undefined) continue;
  log(`guidance search: CFG ${g}`);
  byGuidance[String(g)] = await baseAccuracy(final, path.join(evalDir, `cfg-${g}`), g, Math.max(2, Math.round(perShape / 4)), images);
  summary['guidance_search'] = byGuidance;
  await save(summary);
}
const best = Object.values(byGuidance).reduce((a, b) => (b.mean_shape + b.mean_colour > a.mean_shape + a.mean_colour ? b : a));
log(`chosen CFG scale ${best.guidance} (mean shape ${best.mean_shape.toFixed(3)}, colour ${best.mean_colour.toFixed(3)})`);
if ((summary['base'] as BaseAccuracy | undefined)?.guidance !== best.guidance) {
  summary['base'] = await baseAccuracy(final, path.join(evalDir, `base-${best.guidance}`), best.guidance, perShape, images);
  await save(summary);
}

// 4. The committed folder: the finetuned diffusers model + sampling defaults + summary.
const out = path.resolve(values.out);
const staging = `${out}.staging`;
await rm(staging, { recursive: true, force: true });
await cp(final, staging, { recursive: true });
for (const keep of ['classifier.safetensors']) if (await exists(path.join(out, keep))) await cp(path.join(out, keep), path.join(staging, keep));
const toy = { guidance: best.guidance, steps: SAMPLE_STEPS, sampler: 'ddim', size: 32, held_out: HELD_OUT, shapes: SHAPES, colours: COLOUR_NAMES, styles: STYLES };
const files: [string, string][] = [
  ['toy.json', `${JSON.stringify(toy, null, 2)}\n`],
  ['summary.json', `${JSON.stringify({ ...summary, vae_stage: { steps: firstVaeSteps, all_concepts_steps: vaeAllSteps }, finetune_stage: { steps: fine.steps, adapt_steps: adapt.steps }, reproduce: 'npm run toy:train' }, null, 2)}\n`],
  ['model.yaml', await readFile(values.spec, 'utf8')],
  ['vae.yaml', await readFile(values['vae-config'], 'utf8')],
  ['vae-all.yaml', await readFile(values['vae-all-config'], 'utf8')],
  ['vae-decoder.yaml', await readFile(values['decoder-config'], 'utf8')],
  ['finetune.yaml', await readFile(values['finetune-config'], 'utf8')],
  ['finetune-adapt.yaml', await readFile(values['adapt-config'], 'utf8')],
];
for (const [name, text] of files) await writeTextAtomic(path.join(staging, name), text);
await rm(out, { recursive: true, force: true });
await rename(staging, out);
log(`wrote ${out}`);
