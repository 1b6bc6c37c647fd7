/**
 * `sdwb generate --embedding/--hypernetwork/--lora/--delta` as a user runs it: add-ons change the
 * latents (hypernetwork strength 0 does not), the PNG records them in A1111's keys, and bad flags
 * fail with one line before any model loads.
 */
import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { initBackend } from '../../src/backend.js';
import { parseParameters, readPngText } from '../../src/io/png-text.js';
import { SafetensorsFile, writeSafetensors } from '../../src/io/safetensors.js';
import { hypernetwork, hypernetworkConfigSchema, type HypernetworkState } from '../../src/methods/hypernetwork.js';
import { disposeStableDiffusion, loadStableDiffusion } from '../../src/pipeline/load.js';
import { setupRandom } from '../../src/train/rng-state.js';
import { TINY_SD } from '../helpers/fixtures.js';
import { runSdwb, type CliResult } from '../helpers/cli.js';


const sdwb = (...args: string[]): Promise<CliResult> => runSdwb(args, { backend: 'wasm' });

const errorLines = (stderr: string) =>
  stderr
    .trim()
    .split('\n')
    .filter((l) => l !== '' && !l.startsWith('tfjs backend:') && !l.startsWith('step '));

const sha256 = async (file: string) => createHash('sha256').update(await fs.readFile(file)).digest('hex');

let dir: string;
let hnFile: string;
let embFile: string;
beforeAll(async () => {
  await initBackend({ backend: 'wasm', log: () => {} });
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'sdwb-generate-addons-'));
  const model = await loadStableDiffusion(TINY_SD);
  try {
    const cfg = hypernetworkConfigSchema.parse({
      method: 'hypernetwork',
      model: TINY_SD,
      output_dir: dir,
      data: { dir },
      enable_sizes: [32, 64],
      weight_initialization: 'XavierNormal',
      hypernetwork_name: 'cli-style',
    });
    const s = (await hypernetwork.setup({ model: async () => model, random: setupRandom(2), log: () => {} }, cfg)) as HypernetworkState;
    hnFile = path.join(dir, 'cli-style.pt');
    try {
      await (await hypernetwork.artifacts(s, 5))[0]!.write(hnFile);
    } finally {
      hypernetwork.dispose(s);
    }
  } finally {
    disposeStableDiffusion(model);
  }
  embFile = path.join(dir, 'my-thing.safetensors');
  const data = tf.tidy(() => tf.randomNormal([1, 32], 0, 1, 'float32', 5).dataSync() as Float32Array);
  await writeSafetensors(embFile, { emb_params: { dtype: 'F32', shape: [1, 32], data } });
});
afterAll(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

const PROMPT = 'a photo of my-thing';
const COMMON = ['--model', TINY_SD, '--prompt', PROMPT, '--steps', '3', '--sampler', 'ddim', '--seed', '3'];

async function latentsOf(file: string): Promise<number[]> {
  const f = await SafetensorsFile.open(file);
  try {
    return Array.from(await f.readFloat32('latents'));
  } finally {
    await f.close();
  }
}

describe('sdwb generate with add-ons', () => {
  it('applies an embedding and a hypernetwork, records them in the PNG; strength 0 leaves the hypernetwork out', async () => {
    const base = await sdwb('generate', ...COMMON, '--save-latents', path.join(dir, 'base.safetensors'), '--out', path.join(dir, 'base'));
    expect(base.code, base.stderr).toBe(0);
    const both = await sdwb(
      'generate', ...COMMON, '--embedding', embFile, '--hypernetwork', `${hnFile}:0.5`,
      '--save-latents', path.join(dir, 'both.safetensors'), '--out', path.join(dir, 'both'),
    ); // prettier-ignore
    expect(both.code, both.stderr).toBe(0);
    const zero = await sdwb(
      'generate', ...COMMON, '--embedding', embFile, '--hypernetwork', `${hnFile}:0`,
      '--save-latents', path.join(dir, 'zero.safetensors'), '--out', path.join(dir, 'zero'),
    ); // prettier-ignore
    expect(zero.code, zero.stderr).toBe(0);
    const embOnly = await sdwb('generate', ...COMMON, '--embedding', embFile, '--save-latents', path.join(dir, 'emb.safetensors'), '--out', path.join(dir, 'emb'));
    expect(embOnly.code, embOnly.stderr).toBe(0);

    const [baseL, bothL, zeroL, embL] = await Promise.all(['base', 'both', 'zero', 'emb'].map((n) => latentsOf(path.join(dir, `${n}.safetensors`))));
    expect(embL).not.toEqual(baseL); // the word now means the embedding
    expect(zeroL).toEqual(embL); // hypernetwork at strength 0: no change at all
    expect(bothL).not.toEqual(embL);

    const png = path.join(dir, 'both', (await fs.readdir(path.join(dir, 'both')))[0]!);
    const params = parseParameters(readPngText(await fs.readFile(png))['parameters']!);
    expect(params.prompt).toBe(PROMPT);
    expect(params.settings).toMatchObject({
      Steps: '3',
      Seed: '3',
      'TI hashes': `my-thing: ${(await sha256(embFile)).slice(0, 12)}`,
      Hypernet: 'cli-style',
      'Hypernet hash': (await sha256(hnFile)).slice(0, 10),
      'Hypernet strength': '0.5',
    });
  });

  it('bad add-on flags fail with one line and exit 2', async () => {
    const strength = await sdwb('generate', ...COMMON, '--embedding', `${embFile}:0.5`, '--out', path.join(dir, 'never'));
    expect(strength.code).toBe(2);
    expect(errorLines(strength.stderr)).toEqual([`sdwb generate: --embedding '${embFile}:0.5': embedding files take no strength (':0.5'); give the file alone`]);

    const onnx = await sdwb('generate', ...COMMON, '--engine', 'onnx', '--hypernetwork', hnFile, '--out', path.join(dir, 'never'));
    expect(onnx.code).toBe(2);
    expect(errorLines(onnx.stderr)).toEqual(['sdwb generate: --hypernetwork needs --engine tfjs (an ONNX export is a fixed graph without add-on hooks)']);
  });
});
