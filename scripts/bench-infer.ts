/**
 * Sampling benchmark, tfjs vs onnxruntime (not a test): 20 DDIM steps with CFG 7.5 (UNet batch 2)
 * from the same x_T, on the tiny fixture UNet (16×16 latents) and the medium UNet of
 * scripts/bench.ts (64/128/256 channels, one layer per block, cross-attention 256, 32×32
 * latents, random weights). The ORT side runs the exported UNet graph through `sampleLoop`, the
 * pipeline's own loop, so both sides do the same scheduler work; only the UNet engine differs.
 *
 * Usage: tsx scripts/bench-infer.ts [--quick] [--backend wasm] [--threads n] [--layouts nchw,nhwc] [--no-medium]
 *
 * Reported: min and median wall time over rounds after one warm-up (variants alternate within
 * each round, so other load on the machine hits them alike), the final-latent difference between
 * the engines, and tfjs min / ORT min.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import * as ort from 'onnxruntime-node';
import { initBackend, type BackendName } from '../src/backend.js';
import { unetGraph } from '../src/export/components.js';
import { storeSource } from '../src/export/params.js';
import type { LayoutPolicy } from '../src/export/recorder.js';
import { recordGraph } from '../src/export/trace.js';
import { writeOnnxModel } from '../src/export/write.js';
import { applyGuidance, denoise, makeSampler, sampleLoop } from '../src/pipeline/denoise.js';
import { disposeStableDiffusion, loadStableDiffusion, type UnetModel } from '../src/pipeline/load.js';
import { openSession, runUnet } from '../src/pipeline/onnx.js';
import { encodePrompts } from '../src/pipeline/txt2img.js';
import { readSchedulerConfig } from '../src/schedulers/config.js';
import { BENCH_PROMPT, disposeUnet, mediumUnetConfig, printTable, randomUnet, summarizeTimes, TINY_SD, type Timing } from './lib/bench-util.js';

const args = process.argv.slice(2);
const arg = (name: string) => args.find((_, i) => args[i - 1] === name);
const quick = args.includes('--quick');
const medium = !args.includes('--no-medium');
const backend = arg('--backend') as BackendName | undefined;
const threads = Number(arg('--threads') ?? availableParallelism());
const layouts = (arg('--layouts') ?? 'nchw,nhwc').split(',') as LayoutPolicy[];

interface Variant {
  readonly engine: string;
  /** One full sampling run; returns the final latents. */
  readonly run: () => Promise<Float32Array>;
}

/**
 * Times the variants round-robin (one warm-up each, then one run of each per round), so load from
 * other processes on a shared machine hits them alike; min and median per variant.
 */
async function timeVariants(variants: readonly Variant[]): Promise<{ timings: Timing[]; outputs: Float32Array[] }> {
  const outputs: Float32Array[] = [];
  for (const v of variants) outputs.push(await v.run());
  const times: number[][] = variants.map(() => []);
  const rounds = quick ? 2 : 5;
  const budget = quick ? 20_000 : 120_000;
  const start = performance.now();
  for (let r = 0; r < rounds && (r === 0 || performance.now() - start < budget); r++) {
    for (const [i, v] of variants.entries()) {
      const t0 = performance.now();
      await v.run();
      times[i]!.push(performance.now() - t0);
    }
  }
  return { timings: times.map(summarizeTimes), outputs };
}

interface Row {
  readonly model: string;
  readonly engine: string;
  readonly timing: Timing;
  readonly relDiff?: number;
}

async function benchModel(name: string, model: UnetModel, context1: tf.Tensor, latent: number, scratch: string): Promise<Row[]> {
  const rows: Row[] = [];
  const cfg = model.unet.cfg;
  const scheduler = await readSchedulerConfig(path.join(TINY_SD, 'scheduler'));
  const sampler = makeSampler(scheduler, { kind: 'ddim', steps: 20 });
  const xT = tf.randomNormal([1, latent, latent, cfg.inChannels], 0, 1, 'float32', 4);
  const context2 = tf.concat([context1, context1], 0); // [uncond, cond] stand-in

  const variants: Variant[] = [
    {
      engine: `tfjs (${tf.getBackend()})`,
      run: async () => {
        const out = await denoise(model, xT, { sampler, context: context2, guidance: 7.5 });
        const data = (await out.data()) as Float32Array;
        out.dispose();
        return data;
      },
    },
  ];
  const sessions: ort.InferenceSession[] = [];
  const ctx = new ort.Tensor('float32', (await context2.data()) as Float32Array, context2.shape);
  for (const layout of layouts) {
    const file = path.join(scratch, `${name}-${layout}.onnx`);
    await writeOnnxModel(recordGraph(unetGraph(cfg), storeSource(model.unet.store), { opset: 17, layout }), file, { opset: 17 });
    const session = await openSession(file, { intraOpNumThreads: threads }, 'cpu');
    sessions.push(session);
    variants.push({
      engine: `onnxruntime CPU, ${threads} thread(s), ${layout} graph`,
      run: async () => {
        const out = await sampleLoop(
          xT,
          async (xIn, i) => {
            const batch = tf.concat([xIn, xIn], 0);
            const raw = await runUnet(session, batch, sampler.timesteps[i]!, ctx);
            batch.dispose();
            const eps = applyGuidance(raw, 7.5);
            raw.dispose();
            return eps;
          },
          { sampler },
        );
        const data = (await out.data()) as Float32Array;
        out.dispose();
        return data;
      },
    });
  }
  const { timings, outputs } = await timeVariants(variants);
  variants.forEach((v, i) => {
    let maxAbs = 0;
    let scale = 0;
    outputs[0]!.forEach((x, j) => {
      maxAbs = Math.max(maxAbs, Math.abs(x - outputs[i]![j]!));
      scale = Math.max(scale, Math.abs(x));
    });
    rows.push({ model: name, engine: v.engine, timing: timings[i]!, ...(i > 0 ? { relDiff: maxAbs / scale } : {}) });
  });
  for (const s of sessions) await s.release();
  tf.dispose([xT, context2]);
  return rows;
}

function printRows(rows: readonly Row[]): void {
  const tfjsMin = new Map(rows.filter((r) => r.engine.startsWith('tfjs')).map((r) => [r.model, r.timing.minMs]));
  const header = ['UNet', 'engine', 'min ms', 'median ms', 'runs', 'tfjs / this', 'final latents vs tfjs (rel)'];
  const lines = rows.map((r) => [
    r.model,
    r.engine,
    r.timing.minMs.toFixed(1),
    r.timing.ms.toFixed(1),
    String(r.timing.runs),
    r.engine.startsWith('tfjs') ? '' : `${(tfjsMin.get(r.model)! / r.timing.minMs).toFixed(2)}×`,
    r.relDiff === undefined ? '' : r.relDiff.toExponential(1),
  ]);
  printTable(header, lines);
}

async function main(): Promise<void> {
  const info = await initBackend({ ...(backend !== undefined ? { backend } : {}), log: () => {} });
  console.error(`tfjs backend ${info.name}${info.threads !== undefined ? `, ${info.threads} thread(s)` : ''}; onnxruntime ${ort.env.versions.node}`);
  const scratch = mkdtempSync(path.join(tmpdir(), 'sdwb-bench-infer-'));
  const rows: Row[] = [];
  try {
    const tiny = await loadStableDiffusion(TINY_SD);
    const { context } = encodePrompts(tiny, [BENCH_PROMPT], [''], 1);
    rows.push(...(await benchModel('tiny', tiny, context, 16, scratch)));
    context.dispose();
    disposeStableDiffusion(tiny);
    if (medium) {
      const model = randomUnet(mediumUnetConfig());
      const ctx = tf.randomNormal([1, 77, 256], 0, 1, 'float32', 5);
      rows.push(...(await benchModel('medium', model, ctx, 32, scratch)));
      ctx.dispose();
      disposeUnet(model);
    }
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
  console.log(`\nnode ${process.version}; 20 DDIM steps, CFG 7.5 (UNet batch 2), text states precomputed\n`);
  printRows(rows);
}

await main();
