/**
 * Training benchmark (not a test): optimizer steps per second of textual inversion and of a
 * hypernetwork on the tiny fixture model — wasm backend, batch 1, 32×32 images, no gradient
 * accumulation — through the real loop (`train`: data pipeline, prepare, loss + gradients, AdamW,
 * metrics), and the peak RSS of each run.
 *
 * Usage: tsx scripts/bench-train.ts [--steps N] [--methods textual_inversion,hypernetwork]
 *
 * Each method runs in its own child process so its peak RSS (`process.resourceUsage().maxRSS`)
 * is its own. Steps/s is 1 / the median step time after 3 warm-up steps (the wall time between
 * consecutive `onStep` reports, so data loading and the optimizer are included).
 */
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import sharp from 'sharp';

import { trainingConfigSchema } from '../src/methods/registry.js';
import { loadTrainingConfig } from '../src/train/config.js';
import { train } from '../src/train/loop.js';
import { SHARED, TINY_SD } from './lib/bench-util.js';

const IMAGES = path.join(SHARED, 'data/images_cc0');
const WARMUP = 3;

const args = process.argv.slice(2);
const argAfter = (flag: string) => args.find((_, i) => args[i - 1] === flag);
const steps = Number(argAfter('--steps') ?? 30);
const METHOD_SETS: Readonly<Record<string, readonly string[]>> = {
  textual_inversion: ['placeholder_token=<bench>', 'initializer_token=cat', 'learning_rate=5e-3', 'save_formats=[a1111_safetensors]'],
  hypernetwork: ['enable_sizes=[32, 64]', 'learning_rate=1e-4', 'data.template=none', 'data.instance_prompt=a photo of a thing'],
};

/** One method's run, in this (child) process: JSON with step times and the peak RSS. */
async function child(method: string): Promise<void> {
  const work = await mkdtemp(path.join(os.tmpdir(), 'sdwb-bench-train-'));
  try {
    const images = path.join(work, 'images');
    await mkdir(images);
    for (const name of ['chelsea.png', 'coffee.png', 'rocket.jpg']) {
      await sharp(path.join(IMAGES, name)).resize(48, 48).png().toFile(path.join(images, `${path.parse(name).name}.png`));
    }
    const { config } = await loadTrainingConfig(
      undefined,
      [
        `method=${method}`,
        `model=${TINY_SD}`,
        `output_dir=${path.join(work, 'out')}`,
        `data.dir=${images}`,
        'data.resolution=32',
        'backend=wasm',
        'batch_size=1',
        'gradient_accumulation_steps=1',
        `steps=${steps + WARMUP}`,
        `save_every=${steps + WARMUP}`,
        ...METHOD_SETS[method]!,
      ],
      trainingConfigSchema(),
    );
    const times: number[] = [];
    let last = performance.now();
    await train(config, {
      progress: false,
      log: () => {},
      onStep: () => {
        const now = performance.now();
        times.push(now - last);
        last = now;
      },
    });
    process.stdout.write(`${JSON.stringify({ method, stepMs: times.slice(WARMUP), maxRssKb: process.resourceUsage().maxRSS })}\n`);
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

interface ChildResult {
  readonly method: string;
  readonly stepMs: readonly number[];
  readonly maxRssKb: number;
}

const median = (xs: readonly number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 === 1 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

async function main(): Promise<void> {
  const only = argAfter('--child');
  if (only !== undefined) return child(only);
  const methods = (argAfter('--methods') ?? 'textual_inversion,hypernetwork').split(',');
  const rows: ChildResult[] = [];
  for (const method of methods) {
    if (METHOD_SETS[method] === undefined) throw new Error(`--methods: unknown '${method}' (known: ${Object.keys(METHOD_SETS).join(', ')})`);
    process.stderr.write(`${method}: ${steps} steps after ${WARMUP} warm-up …\n`);
    const { stdout } = await promisify(execFile)(process.execPath, ['--import', 'tsx', fileURLToPath(import.meta.url), '--child', method, '--steps', String(steps)], {
      maxBuffer: 1 << 24,
    });
    rows.push(JSON.parse(stdout.trim().split('\n').pop()!) as ChildResult);
  }
  console.log('\n| method | steps/s (median) | ms/step median | ms/step min | peak RSS |');
  console.log('|---|---|---|---|---|');
  for (const r of rows) {
    const med = median(r.stepMs);
    console.log(`| ${r.method} | ${(1000 / med).toFixed(2)} | ${med.toFixed(1)} | ${Math.min(...r.stepMs).toFixed(1)} | ${(r.maxRssKb / 1024).toFixed(0)} MB |`);
  }
  console.log(`\ntiny fixture model, wasm, batch 1, 32×32, ${steps} timed steps; node ${process.version}`);
}

await main();
