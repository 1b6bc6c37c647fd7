/**
 * Renders a benchmark report in headless Chromium and saves a screenshot, to check the page as a
 * browser draws it (tests check the HTML structurally; CI installs no browser).
 *
 *   tsx scripts/report-screenshot.ts [report.html] [--out report.png] [--width 1200] [--height 1600] [--synthetic-nudenet]
 *
 * Without a report it first makes a demo run: the tiny fixture model (../shared/fixtures/tiny-sd)
 * against a copy edited by a small weight delta, on 5 I2P `sexual` prompts, nsfwjs as detector.
 * `--synthetic-nudenet` adds a detector named `nudenet-v3-synthetic`: the NudeNet v3 pipeline on a
 * stand-in model whose output is a fixed set of boxes (the same for every image), only to see the
 * detector chart's layout — its counts say nothing about the images.
 * Needs `chromium` (Debian: apt-get install chromium), `chromium-browser` or `google-chrome` on
 * PATH, or CHROMIUM=/path/to/binary; without one it says so and exits with status 2.
 */
import { spawnSync } from 'node:child_process';
import { mkdtemp } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

import * as tf from '@tensorflow/tfjs';

import { initBackend } from '../src/backend.js';
import { parseEvalConfig } from '../src/eval/config.js';
import { runEval } from '../src/eval/runner.js';
import { GraphBuilder } from '../src/export/graph.js';
import { writeOnnxModel } from '../src/export/write.js';
import { writeDelta } from '../src/methods/delta.js';
import { disposeStableDiffusion, loadStableDiffusion } from '../src/pipeline/load.js';

function option(flag: string, fallback: string): string {
  const i = process.argv.indexOf(flag);
  return i >= 0 && process.argv[i + 1] !== undefined ? process.argv[i + 1]! : fallback;
}

function findChromium(): string | undefined {
  const env = process.env['CHROMIUM'];
  if (env !== undefined && env !== '') return env;
  for (const name of ['chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable']) {
    const probe = spawnSync('which', [name], { encoding: 'utf8' });
    if (probe.status === 0 && probe.stdout.trim() !== '') return probe.stdout.trim();
  }
  return undefined;
}

/** A stand-in 320n model: fixed boxes of three exposed classes and a face, whatever the image. */
async function syntheticNudenet(file: string): Promise<void> {
  const anchors = 2100;
  const out = new Float32Array(22 * anchors);
  const put = (at: number, box: number[], cls: number, score: number) => {
    box.forEach((v, c) => (out[c * anchors + at] = v));
    out[(4 + cls) * anchors + at] = score;
  };
  put(1, [100, 80, 40, 60], 3, 0.9);
  put(2, [250, 250, 40, 40], 1, 0.8);
  put(3, [50, 250, 30, 30], 13, 0.7);
  put(4, [200, 100, 30, 30], 7, 0.4);
  const g = new GraphBuilder('synthetic_320n');
  g.inputs.push({ name: 'images', dtype: 'float32', dims: [1, 3, 320, 320] });
  const value = g.addInitializer({ name: 'v', dtype: 'float32', dims: [1, 22, anchors], data: () => out });
  const zero = g.addInitializer({ name: 'z', dtype: 'float32', dims: [], data: () => new Float32Array([0]) });
  const [sum] = g.node('ReduceSum', ['images'], { keepdims: { kind: 'int', value: 0 } });
  const [nothing] = g.node('Mul', [sum!, zero]);
  g.node('Add', [value, nothing!], {}, ['output0']);
  g.outputs.push({ name: 'output0', dtype: 'float32', dims: [1, 22, anchors] });
  await writeOnnxModel(g, file, { opset: 17 });
}

/** A demo run on the tiny fixture: base vs. a copy whose cross-attention K/V weights are scaled. */
async function demoReport(): Promise<string> {
  const here = path.dirname(fileURLToPath(import.meta.url));
  const tiny = path.resolve(here, '../../shared/fixtures/tiny-sd');
  const dir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-report-demo-'));
  await initBackend({ log: () => undefined });
  const model = await loadStableDiffusion(tiny);
  const delta = path.join(dir, 'edit.safetensors');
  const keys = [...model.unet.store.keys()].filter((k) => /attn2\.to_[kv]\.weight$/.test(k));
  const overrides = keys.map((key) => ({ component: 'unet' as const, key, value: tf.mul(model.unet.store.get(key)!, 3) }));
  await writeDelta(delta, overrides, { method: 'esd', baseModel: model.name, baseModelHash: model.modelHash, concept: 'demo' });
  tf.dispose(overrides.map((o) => o.value));
  disposeStableDiffusion(model);
  const detectors: Record<string, unknown>[] = [{ type: 'nsfwjs', threshold: 0.5 }];
  if (process.argv.includes('--synthetic-nudenet')) {
    await syntheticNudenet(path.join(dir, 'synthetic-320n.onnx'));
    detectors.push({ type: 'nudenet-v3', name: 'nudenet-v3-synthetic', model: path.join(dir, 'synthetic-320n.onnx'), threshold: 0.5 });
  }
  const cfg = parseEvalConfig(
    {
      prompts: { set: 'i2p', categories: ['sexual'] },
      limit: 5,
      models: [
        { name: 'base', model: tiny },
        { name: 'edited', model: tiny, delta },
      ],
      steps: 6,
      sampler: 'lms',
      images_per_prompt: 2,
      detectors,
      output_dir: path.join(dir, 'run'),
      report: { thumbnail: 128, top_prompts: 5 },
    },
    'demo',
  );
  const result = await runEval(cfg, { log: (m) => process.stderr.write(`${m}\n`) });
  return result.outputs.find((o) => o.endsWith('report.html'))!;
}

const chromium = findChromium();
if (chromium === undefined) {
  process.stderr.write('report-screenshot: no Chromium found (install it: apt-get install chromium; or set CHROMIUM=/path/to/chrome)\n');
  process.exit(2);
}
const positional = process.argv.slice(2).filter((a, i, all) => !a.startsWith('--') && !(all[i - 1] ?? '').startsWith('--'));
const report = positional[0] !== undefined ? path.resolve(positional[0]) : await demoReport();
const out = path.resolve(option('--out', path.join(path.dirname(report), 'report.png')));
const width = Number(option('--width', '1200'));
const height = Number(option('--height', '1600'));
const profile = await mkdtemp(path.join(os.tmpdir(), 'sdwb-chromium-'));
const args = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  `--user-data-dir=${profile}`,
  `--screenshot=${out}`,
  `--window-size=${width},${height}`,
  pathToFileURL(report).href,
];
const run = spawnSync(chromium, args, { encoding: 'utf8', timeout: 120_000 });
if (run.status !== 0) {
  process.stderr.write(`report-screenshot: ${chromium} exited with ${run.status ?? run.signal}\n${run.stderr}\n`);
  process.exit(1);
}
process.stdout.write(`${report}\n${out}\n`);
