/**
 * Writes a toy-world image folder with sidecar captions (independent of sdwb):
 *   tsx scripts/toy-data.ts --out tmp/toy/data --split pretrain --count 20000 --size 32 --seed 0
 * Splits: pretrain (no held-out concepts), heldout-shape, heldout-style, all (see src/toy/world.ts).
 */
import { parseArgs } from 'node:util';

import { writeToyDataset } from '../src/toy/dataset.js';
import { HELD_OUT, SPLITS, type Split } from '../src/toy/world.js';

const { values } = parseArgs({
  options: {
    out: { type: 'string', default: 'tmp/toy/data' },
    split: { type: 'string', default: 'pretrain' },
    count: { type: 'string', default: '20000' },
    size: { type: 'string', default: '32' },
    seed: { type: 'string', default: '0' },
  },
});
const split = values.split as Split;
if (!SPLITS.includes(split)) throw new Error(`--split: expected one of ${SPLITS.join(', ')}, found '${values.split}'`);
const count = Number(values.count);
const size = Number(values.size);
const seed = Number(values.seed);
if (!Number.isInteger(count) || count < 1) throw new Error(`--count: expected a positive integer, found '${values.count}'`);
if (!Number.isInteger(size) || size < 16 || size % 8 !== 0) throw new Error(`--size: expected a multiple of 8 ≥ 16, found '${values.size}'`);
if (!Number.isInteger(seed) || seed < 0) throw new Error(`--seed: expected a non-negative integer, found '${values.seed}'`);

const started = Date.now();
await writeToyDataset({
  dir: values.out,
  seed,
  split,
  size,
  count,
  onProgress: (n) => process.stderr.write(`\r${n}/${count}`),
});
process.stderr.write(`\rwrote ${count} ${size}×${size} ${split} images to ${values.out} in ${((Date.now() - started) / 1000).toFixed(1)} s (pretraining draws ${HELD_OUT.shape} unnamed and never ${HELD_OUT.style})\n`);
