/**
 * Writes a from-scratch toy model folder (seeded PyTorch/transformers default inits, real CLIP
 * vocabulary) for `sdwb train` to start from:
 *   tsx scripts/toy-init.ts --spec configs/toy/model.yaml --out tmp/toy/scratch [--seed 0]
 */
import { parseArgs } from 'node:util';

import { readToyModelSpec, toyParameterCounts, writeScratchModel } from '../src/toy/model.js';

const { values } = parseArgs({
  options: {
    spec: { type: 'string', default: 'configs/toy/model.yaml' },
    out: { type: 'string', default: 'tmp/toy/scratch' },
    seed: { type: 'string', default: '0' },
    overwrite: { type: 'boolean', default: true },
  },
});
const spec = await readToyModelSpec(values.spec);
await writeScratchModel(values.out, spec, Number(values.seed), { overwrite: values.overwrite });
console.log(`wrote ${values.out}: parameters ${JSON.stringify(toyParameterCounts(spec))}`);
