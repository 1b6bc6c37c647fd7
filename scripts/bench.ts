/**
 * Inference and training-step benchmark (not a test): the tiny fixture UNet and a medium UNet on
 * each available tfjs backend, against the Python reference's CPU timings in ../shared/README.md.
 *
 * Usage: tsx scripts/bench.ts [--quick] [--backends wasm,cpu,tensorflow] [--no-medium]
 *
 * Measured: wall time, min and median over runs after one warm-up (slow runs: one run, no
 * warm-up). The ratio uses the minimum, the figure least disturbed by other processes on a shared
 * machine:
 *   UNet forward, batch 2 (the CFG batch of one image);
 *   UNet forward + backward, MSE loss, gradients for every UNet parameter — batch 4 (tiny) / 2
 *   (medium), the reference's training-step batches (its step also includes AdamW, ~1% here);
 *   20 DDIM steps with CFG 7.5 from x_T (UNet + scheduler only, text states precomputed).
 */
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { initBackend, type BackendName } from '../src/backend.js';
import { unet } from '../src/models/unet/unet.js';
import { tfOps } from '../src/ops/tfjs-ops.js';
import { denoise, makeSampler } from '../src/pipeline/denoise.js';
import { disposeStableDiffusion, loadStableDiffusion, type UnetModel } from '../src/pipeline/load.js';
import { encodePrompts } from '../src/pipeline/txt2img.js';
import { readSchedulerConfig } from '../src/schedulers/config.js';
import { BENCH_PROMPT, disposeUnet, mediumUnetConfig, printTable, randomUnet, summarizeTimes, TINY_SD, type Timing } from './lib/bench-util.js';

const args = process.argv.slice(2);
const quick = args.includes('--quick');
const medium = !args.includes('--no-medium');
const backendsArg = args.find((a, i) => args[i - 1] === '--backends');
const BACKENDS = (backendsArg?.split(',') ?? ['wasm', 'cpu', 'tensorflow']) as BackendName[];

/** Python reference (shared/README.md): CPU, 2 threads. */
const REFERENCE_MS = {
  tiny: { train: 72.7, loop: 244 },
  medium: { train: 555, loop: 4373 },
} as const;

interface Row extends Timing {
  readonly backend: string;
  readonly model: 'tiny' | 'medium';
  readonly what: string;
  readonly referenceMs?: number;
}

/** Median and minimum ms of `fn` (which must finish its work, e.g. by reading a value back). */
async function timeIt(
  fn: () => Promise<void> | void,
  opts: { warmup: boolean; maxRuns: number; budgetMs: number },
): Promise<Timing> {
  if (opts.warmup) await fn();
  const times: number[] = [];
  const start = performance.now();
  while (times.length < opts.maxRuns && (times.length === 0 || performance.now() - start < opts.budgetMs)) {
    const t0 = performance.now();
    await fn();
    times.push(performance.now() - t0);
  }
  return summarizeTimes(times);
}

async function benchUnet(backend: string, name: 'tiny' | 'medium', model: UnetModel, context1: tf.Tensor, latent: number, slow: boolean): Promise<Row[]> {
  const rows: Row[] = [];
  const cfg = model.unet.cfg;
  const store = model.unet.store;
  const reps = { warmup: !slow, maxRuns: quick ? 3 : 10, budgetMs: quick ? 2_000 : 8_000 };

  // 1. Forward, batch 2.
  const x2 = tf.randomNormal([2, latent, latent, cfg.inChannels], 0, 1, 'float32', 1);
  const t2 = tf.tensor1d([801, 801], 'float32');
  const ctx2 = tf.concat([context1, context1], 0);
  const fwd = await timeIt(() => {
    tf.tidy(() => unet(tfOps, store.scope(), x2, t2, ctx2, cfg).dataSync());
  }, reps);
  rows.push({ backend, model: name, what: 'UNet forward, batch 2', ...fwd });

  // 2. Forward + backward: MSE against noise, gradients for every parameter (fed as overrides).
  const batch = name === 'tiny' ? 4 : 2;
  const xb = tf.randomNormal([batch, latent, latent, cfg.inChannels], 0, 1, 'float32', 2);
  const target = tf.randomNormal([batch, latent, latent, cfg.outChannels], 0, 1, 'float32', 3);
  const tb = tf.tensor1d(Array.from({ length: batch }, (_, i) => 100 + 200 * i), 'float32');
  const ctxb = tf.tile(context1, [batch, 1, 1]);
  const keys = [...store.keys()];
  const params = keys.map((k) => store.get(k)!);
  const train = await timeIt(
    () => {
      tf.tidy(() => {
        const lossOf = (...values: tf.Tensor[]): tf.Scalar => {
          values.forEach((v, i) => store.override(keys[i]!, v));
          return tf.mean(tf.square(tf.sub(unet(tfOps, store.scope(), xb, tb, ctxb, cfg), target)));
        };
        const { value, grads } = tf.valueAndGrads(lossOf)(params);
        store.clearOverrides();
        value.dataSync();
        for (const g of grads) g.dataSync();
      });
    },
    slow ? { warmup: false, maxRuns: 1, budgetMs: 0 } : reps,
  );
  rows.push({ backend, model: name, what: `UNet forward + backward, batch ${batch}`, ...train, referenceMs: REFERENCE_MS[name].train });

  // 3. 20 DDIM steps with CFG, batch 1 (UNet batch 2).
  const scheduler = await readSchedulerConfig(path.join(TINY_SD, 'scheduler'));
  const sampler = makeSampler(scheduler, { kind: 'ddim', steps: 20 });
  const xT = tf.randomNormal([1, latent, latent, cfg.inChannels], 0, 1, 'float32', 4);
  const loop = await timeIt(
    async () => {
      const out = await denoise(model, xT, { sampler, context: ctx2, guidance: 7.5 });
      out.dataSync();
      out.dispose();
    },
    { ...reps, warmup: false, maxRuns: quick || slow ? 1 : 3 },
  );
  rows.push({ backend, model: name, what: '20-step DDIM + CFG loop', ...loop, referenceMs: REFERENCE_MS[name].loop });
  tf.dispose([x2, t2, ctx2, xb, target, tb, ctxb, xT]);
  return rows;
}

function printRows(rows: readonly Row[]): void {
  const header = ['backend', 'UNet', 'measurement', 'min ms', 'median ms', 'runs', 'Python ref ms', 'ratio (min/ref)'];
  const lines = rows.map((r) => [
    r.backend,
    r.model,
    r.what,
    r.minMs.toFixed(1),
    r.ms.toFixed(1),
    String(r.runs),
    r.referenceMs === undefined ? '' : String(r.referenceMs),
    r.referenceMs === undefined ? '' : `${(r.minMs / r.referenceMs).toFixed(2)}×`,
  ]);
  printTable(header, lines);
}

async function main(): Promise<void> {
  const rows: Row[] = [];
  for (const backend of BACKENDS) {
    try {
      const info = await initBackend({ backend, log: () => {} });
      console.error(`backend ${backend}: ${info.kind}${info.threads !== undefined ? `, ${info.threads} thread(s)` : ''}`);
    } catch (e) {
      console.error(`backend ${backend}: skipped (${e instanceof Error ? e.message : String(e)})`);
      continue;
    }
    const slow = backend === 'cpu'; // pure-JS convolution gradients: one run only
    const tiny = await loadStableDiffusion(TINY_SD);
    const { context } = encodePrompts(tiny, [BENCH_PROMPT], [''], 1);
    rows.push(...(await benchUnet(backend, 'tiny', tiny, context, 16, slow)));
    context.dispose();
    disposeStableDiffusion(tiny);

    if (medium && backend !== 'cpu') {
      const model = randomUnet(mediumUnetConfig());
      const ctx = tf.randomNormal([1, 77, 256], 0, 1, 'float32', 5);
      rows.push(...(await benchUnet(backend, 'medium', model, ctx, 32, false)));
      ctx.dispose();
      disposeUnet(model);
    }
  }
  console.log(`\nnode ${process.version}; Python reference: PyTorch CPU, 2 threads (shared/README.md)\n`);
  printRows(rows);
}

await main();
