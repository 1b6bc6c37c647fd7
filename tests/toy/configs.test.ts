/** Every configs/toy/*.yaml parses: the run configs with the registry's schema, model.yaml as a toy spec. */
import { readdir } from 'node:fs/promises';
import path from 'node:path';

import { describe, expect, it } from 'vitest';

import { trainingConfigSchema } from '../../src/methods/registry.js';
import { readToyModelSpec, toyDiffusersConfigs } from '../../src/toy/model.js';
import { loadTrainingConfig } from '../../src/train/config.js';

const DIR = path.resolve(import.meta.dirname, '../../configs/toy');

describe('configs/toy', () => {
  it('run configs parse and name the toy methods; the model spec gives an 8×8-latent UNet', async () => {
    const files = (await readdir(DIR)).filter((f) => f.endsWith('.yaml'));
    expect(files.sort()).toEqual(['finetune-adapt.yaml', 'finetune.yaml', 'model.yaml', 'vae-all.yaml', 'vae-decoder.yaml', 'vae.yaml']);
    for (const f of ['vae.yaml', 'vae-all.yaml']) expect((await loadTrainingConfig(path.join(DIR, f), [], trainingConfigSchema())).config.method).toBe('vae');
    const decoder = (await loadTrainingConfig(path.join(DIR, 'vae-decoder.yaml'), [], trainingConfigSchema())).config;
    expect(decoder.method === 'vae' && decoder.train_part).toBe('decoder');
    for (const f of ['finetune.yaml', 'finetune-adapt.yaml']) expect((await loadTrainingConfig(path.join(DIR, f), [], trainingConfigSchema())).config.method).toBe('finetune');
    const spec = await readToyModelSpec(path.join(DIR, 'model.yaml'));
    expect(toyDiffusersConfigs(spec).unet['sample_size']).toBe(8);
  });
});
