/**
 * Per-step cost of toy-world training candidates (not a test): for each candidate architecture, a
 * from-scratch model is written, then `finetune` (UNet + text encoder) and `vae` run a few steps
 * through the real loop (`train`) at batch 32 on the configured backend; the median wall time per
 * optimizer step after warm-up is reported (data loading, VAE encode, forward, backward, AdamW).
 *
 * Usage: tsx scripts/toy-bench.ts [--steps 6] [--batch 32] [--only A,B] [--vae]
 */
import { mkdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { parseArgs } from 'node:util';

import { trainingConfigSchema } from '../src/methods/registry.js';
import { writeToyDataset } from '../src/toy/dataset.js';
import { toyModelSpecSchema, toyParameterCounts, writeScratchModel, type ToyModelSpec } from '../src/toy/model.js';
import { parseTrainingConfig } from '../src/train/config.js';
import { train } from '../src/train/loop.js';

const { values } = parseArgs({
  options: {
    steps: { type: 'string', default: '6' },
    batch: { type: 'string', default: '32' },
    only: { type: 'string' },
    vae: { type: 'boolean', default: false },
    'cache-latents': { type: 'boolean', default: false },
    dir: { type: 'string', default: 'tmp/toy-bench' },
  },
});
const steps = Number(values.steps);
const batch = Number(values.batch);
const WARMUP = 2;

/** The candidates: the calibration size, a wider one, and the wider one at 8×8 latents. */
const CANDIDATES: Readonly<Record<string, Partial<ToyModelSpec>>> = {
  A: { unet_channels: [32, 64], text_width: 32, vae_channels: [32, 64] },
  B: { unet_channels: [64, 128], text_width: 64, vae_channels: [32, 64] },
  C: { unet_channels: [64, 128], text_width: 64, vae_channels: [32, 64, 64] },
  D: { unet_channels: [32, 64, 64], text_width: 64, vae_channels: [32, 64, 64] },
  E: { unet_channels: [64, 128, 128], text_width: 64, vae_channels: [32, 64, 64], unet_attention: [false, true, true] },
  F: { unet_channels: [32, 64], text_width: 32, vae_channels: [32, 64, 64] },
  G: { unet_channels: [64, 128], text_width: 64, vae_channels: [32, 64], unet_attention: [false, true] },
};

const root = path.resolve(values.dir);
const data = path.join(root, 'data');
await rm(root, { recursive: true, force: true });
await mkdir(root, { recursive: true });
await writeToyDataset({ dir: data, seed: 0, split: 'pretrain', size: 32, count: Math.max(256, batch * (steps + 1)) });

const median = (xs: readonly number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

async function timeRun(raw: Record<string, unknown>): Promise<number> {
  const cfg = parseTrainingConfig(raw, trainingConfigSchema(), 'bench');
  const times: number[] = [];
  let last = performance.now();
  await train(cfg, {
    progress: false,
    log: () => undefined,
    onStep: () => {
      const now = performance.now();
      times.push(now - last);
      last = now;
    },
  });
  return median(times.slice(WARMUP)) / 1000;
}

for (const [name, partial] of Object.entries(CANDIDATES)) {
  if (values.only !== undefined && !values.only.split(',').includes(name)) continue;
  const spec = toyModelSpecSchema.parse(partial);
  const model = path.join(root, `model-${name}`);
  await writeScratchModel(model, spec, 0);
  const counts = toyParameterCounts(spec);
  const latent = 32 / 2 ** (spec.vae_channels.length - 1);
  const common = { model, steps, batch_size: batch, save_every: 100000, backend: 'wasm', data: { dir: data, resolution: 32, cache_latents: values['cache-latents'] } };
  const ft = await timeRun({ ...common, method: 'finetune', output_dir: path.join(root, `out-${name}`) });
  let line = `${name}: unet ${JSON.stringify(spec.unet_channels)} attn ${JSON.stringify(spec.unet_attention ?? 'default')} text ${spec.text_width} latent ${latent}×${latent} | params unet ${(counts.unet / 1e6).toFixed(2)}M text ${(counts.text_encoder / 1e6).toFixed(2)}M vae ${(counts.vae / 1e6).toFixed(2)}M | finetune ${ft.toFixed(2)} s/step`;
  if (values.vae) {
    const vae = await timeRun({ ...common, data: { dir: data, resolution: 32 }, method: 'vae', output_dir: path.join(root, `vae-${name}`) });
    line += ` | vae ${vae.toFixed(2)} s/step`;
  }
  console.log(line);
}
