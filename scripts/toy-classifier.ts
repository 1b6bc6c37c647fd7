/**
 * Trains the toy concept classifier on fresh scenes of every concept and reports per-head
 * accuracy on a held-apart seed; saves safetensors (≈580 KB) for the `toy` concept detector:
 *   tsx scripts/toy-classifier.ts [--steps 1500] [--batch 64] [--lr 3e-3] [--out assets/toy-sd/classifier.safetensors]
 */
import { parseArgs } from 'node:util';

import { initBackend } from '../src/backend.js';
import { DEFAULT_CLASSIFIER, evaluateClassifier, saveClassifier, trainClassifier } from '../src/toy/classifier.js';

const { values } = parseArgs({
  options: {
    steps: { type: 'string', default: '1500' },
    batch: { type: 'string', default: '64' },
    lr: { type: 'string', default: '3e-3' },
    seed: { type: 'string', default: '0' },
    'test-seed': { type: 'string', default: '1000' },
    'test-count': { type: 'string', default: '2000' },
    out: { type: 'string', default: 'assets/toy-sd/classifier.safetensors' },
  },
});
await initBackend({ backend: 'wasm' });
const steps = Number(values.steps);
const started = Date.now();
const w = trainClassifier(DEFAULT_CLASSIFIER, {
  seed: Number(values.seed),
  steps,
  batchSize: Number(values.batch),
  learningRate: Number(values.lr),
  onStep: (step, loss) => {
    if (step % 100 === 0 || step === steps) process.stderr.write(`step ${step}/${steps} loss ${loss.toFixed(4)} (${((Date.now() - started) / 1000).toFixed(0)} s)\n`);
  },
});
const accuracy = evaluateClassifier(w, { seed: Number(values['test-seed']), split: 'all', count: Number(values['test-count']) });
const seconds = (Date.now() - started) / 1000;
console.log(`accuracy on ${values['test-count']} fresh scenes (seed ${values['test-seed']}): ${JSON.stringify(accuracy)}; ${seconds.toFixed(0)} s`);
await saveClassifier(values.out, w, {
  'sd_workbench.accuracy': JSON.stringify(accuracy),
  'sd_workbench.training': JSON.stringify({ steps, batch: Number(values.batch), lr: Number(values.lr), seed: Number(values.seed), seconds: Math.round(seconds) }),
});
console.log(`wrote ${values.out}`);
