/**
 * The toy classifier: training on one repeated batch drives its loss down (it can fit the labels), a
 * saved and reloaded classifier gives the same probabilities, and the detector adapter scores
 * every concept (backgrounds named "<x> background") with per-head probabilities summing to 1.
 */
import { mkdtemp } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

import { beforeAll, describe, expect, it } from 'vitest';

import { initBackend } from '../../src/backend.js';
import { classifyBatch, loadClassifier, saveClassifier, trainClassifier } from '../../src/toy/classifier.js';
import { toySamples } from '../../src/toy/dataset.js';
import { registerToyClassifier, TOY_CONCEPTS, toyConceptClassifier } from '../../src/toy/detector.js';
import { COLOUR_NAMES, SHAPES } from '../../src/toy/world.js';

beforeAll(async () => {
  await initBackend({ backend: 'wasm', log: () => {} });
});

describe('toy classifier', () => {
  it('learns: the loss falls over a few steps; save/load keeps its outputs; the detector scores every concept', async () => {
    const losses: number[] = [];
    const w = trainClassifier({ imageSize: 32, channels: [8, 16, 16] }, { seed: 0, steps: 40, batchSize: 32, learningRate: 3e-3, fixedBatch: true, onStep: (_s, l) => losses.push(l) });
    const head = losses.slice(0, 5).reduce((a, b) => a + b) / 5;
    const tail = losses.slice(-5).reduce((a, b) => a + b) / 5;
    expect(tail).toBeLessThan(head * 0.8);

    const file = path.join(await mkdtemp(path.join(os.tmpdir(), 'sdwb-toy-cls-')), 'c.safetensors');
    await saveClassifier(file, w);
    const back = await loadClassifier(file);
    const images = toySamples({ seed: 9, split: 'all', size: 32, count: 4 }).map((s) => s.image);
    const a = classifyBatch(w, images);
    const b = classifyBatch(back, images);
    for (const h of ['shape', 'colour'] as const) for (let i = 0; i < 4; i++) expect(b[h][i]).toEqual(a[h][i]);

    registerToyClassifier();
    registerToyClassifier(); // idempotent
    const classifier = await toyConceptClassifier.create({ model: file });
    const scores = await classifier.classify(images[0]!);
    expect(Object.keys(scores).sort()).toEqual([...TOY_CONCEPTS].sort());
    expect(TOY_CONCEPTS).toContain('white background');
    const sum = (names: readonly string[]) => names.reduce((acc, n) => acc + scores[n]!, 0);
    expect(sum(SHAPES)).toBeCloseTo(1, 5);
    expect(sum(COLOUR_NAMES)).toBeCloseTo(1, 5);
    await classifier.dispose?.();
  }, 60_000);
});
