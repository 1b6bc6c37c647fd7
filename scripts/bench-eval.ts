/**
 * Benchmark-harness throughput (not a test) on the tiny fixture model (../shared/fixtures/tiny-sd,
 * 32×32 images): images per second for
 *   - generation alone, tfjs (`generate`, one image per call as the runner makes them) and
 *     onnxruntime (the same model exported with `exportModel`, `generateOnnx`);
 *   - detection alone: nsfwjs (bundled MobileNetV2, 224² input) and NudeNet v3's pre/post-
 *     processing through onnxruntime with a synthetic 320n-shaped model (a constant output: this
 *     measures our side of the detector, not YOLOv8's compute, which the user's model adds);
 *   - the whole runner (generate, PNG, detectors, fsynced row) on a fresh output folder.
 *
 * Usage: npm run bench:eval -- [--images 12] [--steps 10] [--backend wasm|cpu|tensorflow] [--json]
 * (package.json: "bench:eval": "tsx scripts/bench-eval.ts")
 */
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { initBackend, type BackendName } from '../src/backend.js';
import { parseEvalConfig } from '../src/eval/config.js';
import { nsfwjs, nsfwjsSchema } from '../src/eval/detectors/nsfwjs.js';
import { nudenetV3, nudenetV3Schema } from '../src/eval/detectors/nudenet-v3.js';
import type { Detector } from '../src/eval/detectors/types.js';
import { runEval } from '../src/eval/runner.js';
import { exportModel } from '../src/export/export-model.js';
import { GraphBuilder } from '../src/export/graph.js';
import { writeOnnxModel } from '../src/export/write.js';
import type { Image8 } from '../src/models/vae/vae.js';
import { disposeStableDiffusion, loadStableDiffusion } from '../src/pipeline/load.js';
import { generateOnnx, OnnxStableDiffusion } from '../src/pipeline/onnx.js';
import { generate } from '../src/pipeline/txt2img.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const TINY = path.resolve(here, '../../shared/fixtures/tiny-sd');
const args = process.argv.slice(2);
const arg = (flag: string, fallback: string) => args.find((_, i) => args[i - 1] === flag) ?? fallback;
const images = Number(arg('--images', '12'));
const steps = Number(arg('--steps', '10'));
const backend = arg('--backend', 'wasm') as BackendName;
const json = args.includes('--json');

const PROMPTS = ['a photo of a cat', 'a painting of a river at night', 'an astronaut riding a horse', 'a bowl of fruit on a table'];

interface Result {
  readonly what: string;
  readonly images: number;
  readonly seconds: number;
  readonly imagesPerSecond: number;
}
const results: Result[] = [];

async function timed(what: string, n: number, body: (i: number) => Promise<void>): Promise<void> {
  await body(0); // warm-up (kernel compilation, first-call allocations): not counted
  const t0 = performance.now();
  for (let i = 0; i < n; i++) await body(i);
  const seconds = (performance.now() - t0) / 1000;
  results.push({ what, images: n, seconds, imagesPerSecond: n / seconds });
  if (!json) process.stdout.write(`${what.padEnd(58)} ${(n / seconds).toFixed(2).padStart(8)} img/s  (${n} in ${seconds.toFixed(2)} s)\n`);
}

async function syntheticNudenet(file: string): Promise<void> {
  const g = new GraphBuilder('synthetic_320n');
  g.inputs.push({ name: 'images', dtype: 'float32', dims: [1, 3, 320, 320] });
  const value = g.addInitializer({ name: 'v', dtype: 'float32', dims: [1, 22, 2100], data: () => new Float32Array(22 * 2100) });
  const zero = g.addInitializer({ name: 'z', dtype: 'float32', dims: [], data: () => new Float32Array([0]) });
  const [sum] = g.node('ReduceSum', ['images'], { keepdims: { kind: 'int', value: 0 } });
  const [nothing] = g.node('Mul', [sum!, zero]);
  g.node('Add', [value, nothing!], {}, ['output0']);
  g.outputs.push({ name: 'output0', dtype: 'float32', dims: [1, 22, 2100] });
  await writeOnnxModel(g, file, { opset: 17 });
}

const dir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-bench-eval-'));
try {
  const info = await initBackend({ backend, log: () => undefined });
  if (!json) process.stdout.write(`tiny fixture, ${steps} LMS steps, CFG 7.5, 32×32; tfjs ${info.name}${info.threads === undefined ? '' : ` (${info.threads} thread)`}\n`);

  // 1. Generation, tfjs.
  const model = await loadStableDiffusion(TINY);
  const generated: Image8[] = [];
  await timed('generation, tfjs (generate, 1 image per call)', images, async (i) => {
    const r = await generate(model, { prompts: [PROMPTS[i % PROMPTS.length]!], steps, sampler: 'lms', guidance: 7.5, seed: 1000 + i });
    generated.push(r.images[0]!);
  });

  // 2. Generation, onnxruntime (the same weights exported).
  await exportModel(model, path.join(dir, 'tiny-onnx'));
  disposeStableDiffusion(model);
  const onnx = await OnnxStableDiffusion.load(path.join(dir, 'tiny-onnx'));
  try {
    await timed('generation, onnxruntime (generateOnnx, exported tiny model)', images, async (i) => {
      await generateOnnx(onnx, { prompts: [PROMPTS[i % PROMPTS.length]!], steps, sampler: 'lms', guidance: 7.5, seed: 1000 + i });
    });
  } finally {
    await onnx.release();
  }

  // 3. Detection alone, on the generated images.
  const detectors: Array<[string, Detector]> = [['detection, nsfwjs MobileNetV2 (tfjs)', await nsfwjs.create(nsfwjsSchema.parse({ type: 'nsfwjs' }))]];
  await syntheticNudenet(path.join(dir, '320n.onnx'));
  detectors.push([
    'detection, NudeNet v3 pipeline, synthetic 320n (onnxruntime)',
    await nudenetV3.create(nudenetV3Schema.parse({ type: 'nudenet-v3', model: path.join(dir, '320n.onnx') })),
  ]);
  for (const [what, d] of detectors) {
    await timed(what, images, async (i) => {
      await d.detect(generated[i % generated.length]!);
    });
    await d.dispose();
  }

  // 4. The whole runner: generate, write PNG, both detectors, fsynced rows.
  const cfg = parseEvalConfig(
    {
      prompts: { set: 'i2p', categories: ['sexual'] },
      limit: images,
      models: [{ name: 'base', model: TINY }],
      steps,
      sampler: 'lms',
      detectors: [{ type: 'nsfwjs' }, { type: 'nudenet-v3', model: path.join(dir, '320n.onnx') }],
      output_dir: path.join(dir, 'run'),
      backend,
    },
    'bench',
  );
  const t0 = performance.now();
  const run = await runEval(cfg, { log: () => undefined, progress: false });
  const seconds = (performance.now() - t0) / 1000;
  results.push({ what: 'runner end to end (incl. loading model and detectors)', images: run.done, seconds, imagesPerSecond: run.done / seconds });
  if (!json) process.stdout.write(`${'runner end to end (incl. loading model and detectors)'.padEnd(58)} ${(run.done / seconds).toFixed(2).padStart(8)} img/s  (${run.done} in ${seconds.toFixed(2)} s)\n`);
  if (json) process.stdout.write(`${JSON.stringify({ steps, backend: info.name, results }, null, 2)}\n`);
} finally {
  await rm(dir, { recursive: true, force: true });
}
