/**
 * What the benchmark scripts share: the fixture paths, the medium random UNet the Python
 * reference's timings were taken on, timing summaries and the Markdown result table. One
 * definition, so every script measures the same model and reports the same way.
 */
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as tf from '@tensorflow/tfjs';
import { isConvFilter, oihwToHwio } from '../../src/io/layout.js';
import { paramStore } from '../../src/io/weights.js';
import { parseUnetConfig, type UnetConfig } from '../../src/models/unet/config.js';
import { unetManifest } from '../../src/models/unet/unet.js';
import type { UnetModel } from '../../src/pipeline/load.js';

const here = path.dirname(fileURLToPath(import.meta.url));

/** The shared fixtures and data folder next to the repository. */
export const SHARED = path.resolve(here, '../../../shared');

/** The tiny diffusers fixture model. */
export const TINY_SD = path.join(SHARED, 'fixtures/tiny-sd');

/** The prompt the benchmarks encode for the tiny model's text states. */
export const BENCH_PROMPT = 'a photo of an astronaut riding a horse';

/**
 * The medium UNet of the reference timings (shared/README.md): SD's layout at 64/128/256 channels,
 * one layer per block, cross-attention width 256, 32×32 latents.
 */
export const MEDIUM_CONFIG = {
  sample_size: 32,
  in_channels: 4,
  out_channels: 4,
  layers_per_block: 1,
  block_out_channels: [64, 128, 256],
  down_block_types: ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
  up_block_types: ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'],
  cross_attention_dim: 256,
  attention_head_dim: 8,
  norm_num_groups: 32,
};

/** {@link MEDIUM_CONFIG} parsed; `source` names it in config errors. */
export function mediumUnetConfig(source = 'medium UNet (bench)'): UnetConfig {
  return parseUnetConfig(MEDIUM_CONFIG, source);
}

/** N(0, 0.05²) weights (norm gains 1) in the internal layout for every key and shape the config implies. */
export function randomUnetWeights(cfg: UnetConfig): Map<string, tf.Tensor> {
  const tensors = new Map<string, tf.Tensor>();
  for (const [key, shape] of unetManifest(cfg)) {
    const n = shape.reduce((a, b) => a * b, 1);
    // Seed 7 for every key: every run and every script builds the same weights.
    const data = Float32Array.from(tf.tidy(() => tf.randomNormal([n], 0, 0.05, 'float32', 7).dataSync()));
    if (/norm[^.]*\.weight$/.test(key)) data.fill(1);
    const internal = isConvFilter(shape) ? oihwToHwio(data, shape) : { data, shape: [...shape] };
    tensors.set(key, tf.tensor(internal.data, internal.shape, 'float32'));
  }
  return tensors;
}

/** A UNet of `cfg` with {@link randomUnetWeights}, as the sampling loop takes one. */
export function randomUnet(cfg: UnetConfig): UnetModel {
  return { unet: { cfg, store: paramStore(randomUnetWeights(cfg), 'random medium UNet'), files: [] } };
}

/** Frees the weights of a {@link randomUnet}. */
export function disposeUnet(model: UnetModel): void {
  for (const k of model.unet.store.keys()) model.unet.store.get(k)?.dispose();
}

/** Wall times of repeated runs. */
export interface Timing {
  /** The median run (the upper one of an even count). */
  readonly ms: number;
  /** The fastest run, the figure least disturbed by other processes on a shared machine. */
  readonly minMs: number;
  readonly runs: number;
}

/** Median and minimum of run times in ms (at least one). */
export function summarizeTimes(times: readonly number[]): Timing {
  const sorted = [...times].sort((a, b) => a - b);
  return { ms: sorted[Math.floor(sorted.length / 2)]!, minMs: sorted[0]!, runs: sorted.length };
}

/** Prints rows of cells as a Markdown table with padded columns. */
export function printTable(header: readonly string[], lines: readonly (readonly string[])[]): void {
  const widths = header.map((h, i) => Math.max(h.length, ...lines.map((l) => l[i]!.length)));
  const fmt = (cells: readonly string[]) => `| ${cells.map((c, i) => c.padEnd(widths[i]!)).join(' | ')} |`;
  console.log(fmt(header));
  console.log(`|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`);
  for (const l of lines) console.log(fmt(l));
}
