/**
 * `sdwb train configs/uce-artists.yaml` end to end on the tiny model: the example config (the
 * reference call's concepts, λ and scales) writes a delta equal to the official UCE output.
 */
import { mkdtemp, readdir } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

import { describe, expect, it } from 'vitest';

import { SafetensorsFile } from '../../src/io/safetensors.js';
import { diff, ERASURE_REF, readRef, TINY_SD } from '../helpers/fixtures.js';
import { runSdwb, type CliResult } from '../helpers/cli.js';

const ROOT = path.resolve(import.meta.dirname, '../..');
const CONFIG = path.join(ROOT, 'configs/uce-artists.yaml');

const sdwb = (args: readonly string[]): Promise<CliResult> => runSdwb(args);

describe('sdwb train configs/uce-artists.yaml', () => {
  it('writes the UCE delta of the tiny model, equal to the official output', async () => {
    const out = await mkdtemp(path.join(os.tmpdir(), 'sdwb-uce-cli-'));
    const r = await sdwb(['train', CONFIG, '--set', `model=${TINY_SD}`, '--set', `output_dir=${out}`, '--set', 'backend=wasm']);
    expect(r.code, r.stderr).toBe(0);
    const delta = path.join(out, 'uce-Van_Gogh-and-1-more.safetensors');
    expect(r.stdout.trim().split('\n')).toEqual([delta]);
    expect(r.stderr).toMatch(/uce: 2 erase prompt\(s\) toward "art", 2 preserved; λ 0\.5/);
    // No optimizer steps, so no checkpoint folders.
    expect((await readdir(out)).filter((f) => f.startsWith('checkpoint-'))).toEqual([]);

    const ref = await readRef(path.join(ERASURE_REF, 'uce.safetensors'));
    const file = await SafetensorsFile.open(delta);
    try {
      expect([...file.keys()].sort()).toEqual([...ref.keys()].sort());
      for (const [key, expected] of ref) expect(diff(await file.readFloat32(key), expected.data).rel, key).toBeLessThanOrEqual(1e-4);
    } finally {
      await file.close();
    }
  });

  it('reports a config asking for optimizer steps, naming the field', async () => {
    const r = await sdwb(['train', CONFIG, '--set', `model=${TINY_SD}`, '--set', 'output_dir=/tmp/unused', '--set', 'steps=100']);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/steps: UCE is a closed-form edit with no optimizer steps/);
  });
});
