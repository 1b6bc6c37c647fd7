/**
 * Memory benchmark of gradient checkpointing (not a test): one UNet forward + backward of the
 * medium UNet (SD's layout at 64/128/256 channels, one layer per block, cross-attention width
 * 256, 32×32 latents, random weights — the model of scripts/bench.ts), with and without
 * recomputing each ResNet/transformer block in the backward pass, for a LoRA (rank 4 on the
 * attention projections, what DreamBooth LoRA trains) and for a full fine-tune (every weight).
 *
 * Usage: tsx scripts/bench-memory.ts [--batch 2] [--backend wasm]   (npm run bench:memory)
 *
 * Each configuration runs in its own process, so the numbers do not share a heap:
 *   peak tensor MB  tfjs' own accounting (`tf.profile` peakBytes) minus what was alive before
 *                   the step (weights, adapters, inputs): the step's activations + gradients;
 *   max RSS MB      the process' peak resident size (`process.resourceUsage().maxRSS`),
 *                   everything included (the wasm heap only grows, so this is its high mark);
 *   step ms         wall time of one forward + backward after a profiled warm-up step.
 */
import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import * as tf from '@tensorflow/tfjs';

import { initBackend, type BackendName } from '../src/backend.js';
import { byModule, createAdapters, findTargets, loraScope, patchedScope, type LoraAdapter } from '../src/methods/lora.js';
import { unet } from '../src/models/unet/unet.js';
import type { Scope } from '../src/ops/scope.js';
import { tfOps } from '../src/ops/tfjs-ops.js';
import { checkpointBlocks } from '../src/train/checkpointing.js';
import { setupRandom } from '../src/train/rng-state.js';
import { mediumUnetConfig, printTable, randomUnet } from './lib/bench-util.js';

const LATENT = 32;

interface Measurement {
  readonly mode: 'lora' | 'full';
  readonly checkpointing: boolean;
  readonly peakBytes: number;
  readonly maxRssBytes: number;
  readonly stepMs: number;
  readonly loss: number;
}

const args = process.argv.slice(2);
const flag = (name: string) => args.find((_, i) => args[i - 1] === name);

/** One configuration, in this process: prints a Measurement as JSON. */
async function child(mode: 'lora' | 'full', checkpointing: boolean, batch: number, backend: BackendName): Promise<void> {
  await initBackend({ backend, log: () => {} });
  const cfg = mediumUnetConfig('medium UNet (bench-memory)');
  const store = randomUnet(cfg).unet.store;
  let scope: Scope<tf.Tensor>;
  let trained: tf.Variable[];
  let paramsUnder: (path: string) => tf.Tensor[];
  if (mode === 'lora') {
    const adapters = createAdapters(findTargets(store, 'unet', ['to_q', 'to_k', 'to_v', 'to_out.0']), { rank: 4, alpha: 4, init: 'gaussian' }, setupRandom(0));
    scope = loraScope(store.scope(), byModule(adapters as LoraAdapter<tf.Tensor>[]));
    trained = adapters.flatMap((a) => [a.down, a.up]);
    paramsUnder = (p) => adapters.filter((a) => a.module.startsWith(`${p}.`)).flatMap((a) => [a.down, a.up]);
  } else {
    const vars = new Map([...store.keys()].map((k) => [k, tf.variable(store.get(k)!, true)]));
    scope = patchedScope(store.scope(), (key) => vars.get(key));
    trained = [...vars.values()];
    paramsUnder = (p) => [...vars].filter(([k]) => k.startsWith(`${p}.`)).map(([, v]) => v);
  }
  const sample = tf.randomNormal([batch, LATENT, LATENT, 4], 0, 1, 'float32', 1);
  const target = tf.randomNormal([batch, LATENT, LATENT, 4], 0, 1, 'float32', 2);
  const context = tf.randomNormal([batch, 77, 256], 0, 1, 'float32', 3);
  const timesteps = tf.tensor1d(Array.from({ length: batch }, (_, i) => 100 + 300 * i), 'float32');
  const opts = checkpointing ? { wrapBlock: checkpointBlocks(paramsUnder) } : {};
  let loss = NaN;
  const step = () => {
    const { value, grads } = tf.variableGrads(() => tf.mean(tf.square(tf.sub(unet(tfOps, scope, sample, timesteps, context, cfg, {}, opts), target))) as tf.Scalar, trained);
    loss = value.dataSync()[0]!;
    for (const g of Object.values(grads)) g.dataSync();
    tf.dispose([value, ...Object.values(grads)]);
  };
  const before = tf.memory().numBytes;
  const info = await tf.profile(step);
  const t0 = performance.now();
  step();
  const stepMs = performance.now() - t0;
  const m: Measurement = { mode, checkpointing, peakBytes: info.peakBytes - before, maxRssBytes: process.resourceUsage().maxRSS * 1024, stepMs, loss };
  process.stdout.write(`${JSON.stringify(m)}\n`);
}

async function main(): Promise<void> {
  const batch = Number(flag('--batch') ?? 2);
  const backend = (flag('--backend') ?? 'wasm') as BackendName;
  const mode = flag('--child');
  if (mode !== undefined) {
    await child(mode === 'lora' || mode === 'lora+ckpt' ? 'lora' : 'full', mode.endsWith('+ckpt'), batch, backend);
    return;
  }
  const run = promisify(execFile);
  const self = fileURLToPath(import.meta.url);
  const rows: Measurement[] = [];
  for (const m of ['lora', 'lora+ckpt', 'full', 'full+ckpt']) {
    process.stderr.write(`bench-memory: ${m}, batch ${batch}, ${backend}…\n`);
    const r = await run(process.execPath, ['--import', 'tsx', self, '--child', m, '--batch', String(batch), '--backend', backend], { maxBuffer: 1 << 24 });
    rows.push(JSON.parse(r.stdout.trim().split('\n').pop()!) as Measurement);
  }
  const mb = (b: number) => (b / 2 ** 20).toFixed(1);
  const header = ['trains', 'checkpointing', 'peak tensor MB', 'max RSS MB', 'step ms', 'loss'];
  const lines = rows.map((r) => [r.mode, r.checkpointing ? 'yes' : 'no', mb(r.peakBytes), mb(r.maxRssBytes), r.stepMs.toFixed(0), r.loss.toFixed(6)]);
  console.log(`Medium UNet (64/128/256, 1 layer per block, cross-attention 256), ${LATENT}×${LATENT} latents, batch ${batch}, ${backend}; one forward + backward\n`);
  printTable(header, lines);
  for (const mode of ['lora', 'full'] as const) {
    const [off, on] = [rows.find((r) => r.mode === mode && !r.checkpointing)!, rows.find((r) => r.mode === mode && r.checkpointing)!];
    console.log(
      `${mode}: checkpointing keeps ${((100 * on.peakBytes) / off.peakBytes).toFixed(0)}% of the peak tensor memory at ${(on.stepMs / off.stepMs).toFixed(2)}× the step time`,
    );
  }
}

await main();
