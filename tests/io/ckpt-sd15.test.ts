/**
 * A full SD 1.5-shaped `.ckpt` in torch's zip+pickle layout, assembled by hand with the pickle
 * opcodes: every manifest tensor (fp16) is a view of one shared zero storage, as torch allows, so
 * the archive stays small while every name and shape is the real one.
 */
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { inspectModel } from '../../src/io/inspect.js';
import { readTorchCheckpoint, stateDict } from '../../src/io/torch-pickle.js';
import { SHARED } from '../helpers/fixtures.js';
import { contiguous, dict, int, pickle, storage, str, tensorV2, torchZip, type Part } from './torch-pickle.helpers.js';

interface Manifest {
  components: Record<string, { num_parameters: number; tensors: { diffusers: string; shape: number[]; ldm: string; ldm_shape?: number[] }[] }>;
}

let tmp: string;
let file: string;
let manifest: Manifest;

beforeAll(async () => {
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'sdwb-ckpt-sd15-'));
  manifest = JSON.parse(await fs.readFile(path.join(SHARED, 'fixtures/manifests/sd15.json'), 'utf8')) as Manifest;
  const tensors = Object.values(manifest.components).flatMap((c) => c.tensors.map((t) => ({ name: t.ldm, shape: t.ldm_shape ?? t.shape })));
  const largest = Math.max(...tensors.map((t) => t.shape.reduce((a, b) => a * b, 1)));
  const shared = storage('HalfStorage', '0', largest);
  const sdEntries: [Part, Part][] = tensors.map((t) => [str(t.name), tensorV2(shared, 0, t.shape, contiguous(t.shape))]);
  const root = dict([str('state_dict'), dict(...sdEntries)], [str('global_step'), int(840000)]);
  file = path.join(tmp, 'v1-5-shaped.ckpt');
  await fs.writeFile(file, torchZip(pickle(root), { '0': new Uint8Array(largest * 2) }));
});

afterAll(async () => {
  await fs.rm(tmp, { recursive: true, force: true });
});

describe('an SD 1.5-shaped .ckpt written in torch layout', () => {
  it('is read safely with every manifest key and shape', async () => {
    const ckpt = await readTorchCheckpoint(file);
    try {
      const sd = stateDict(ckpt);
      const expected = Object.values(manifest.components).flatMap((c) => c.tensors);
      expect(sd.size).toBe(expected.length);
      for (const t of expected) expect(sd.get(t.ldm)?.shape, t.ldm).toEqual(t.ldm_shape ?? t.shape);
    } finally {
      await ckpt.close();
    }
  });

  it('is detected as SD 1.x and maps with no missing or unexpected keys', async () => {
    const report = await inspectModel(file);
    expect(report.architecture).toMatch(/SD 1\.x/);
    expect(report.problems).toEqual([]);
    for (const c of report.components) {
      expect(c.missingKeys, c.name).toEqual([]);
      expect(c.unexpectedKeys, c.name).toEqual([]);
      expect(c.shapeMismatches, c.name).toEqual([]);
      const published = manifest.components[c.name]!.num_parameters;
      expect(c.stats?.parameters, c.name).toBe(published);
      expect(c.stats?.dtypes, c.name).toEqual({ F16: c.stats?.tensors });
    }
  });
});
