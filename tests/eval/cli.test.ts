/** `sdwb eval` on the command line: dry runs, config errors (exit 2, one line per field), listings. */
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

import { describe, expect, it } from 'vitest';
import { runSdwb, type CliResult } from '../helpers/cli.js';


const sdwb = (...args: string[]): Promise<CliResult> => runSdwb(args, { timeoutMs: 120_000 });

describe('sdwb eval', () => {
  it('--dry-run resolves the preset and counts the images, per shard', async () => {
    const r = await sdwb('eval', 'configs/bench/esd-2023-nudity.yaml', '--set', 'limit=10', '--shard', '1/3', '--dry-run');
    expect(r.code).toBe(0);
    expect(r.stdout).toContain('sampler: lms');
    expect(r.stdout).toContain('type: nudenet-v2');
    expect(r.stdout).toMatch(/# 10 prompts \(of 4703 rows in .*unsafe-prompts4703\.csv\) × 2 models × 1 = 20 images; shard 1\/3: 7; run [0-9a-f]{16}/);
  });

  it('reports config errors one per line with exit code 2', async () => {
    const r = await sdwb('eval', 'configs/bench/mace-i2p.yaml', '--set', 'stesp=3', '--set', 'engine=torch');
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('invalid benchmark config');
    expect(r.stderr).toContain("  stesp: unknown field (did you mean 'steps'?)");
    expect(r.stderr).toContain('  engine: expected one of "tfjs", "onnx"; found "torch"');
  });

  it('says where to put a missing NudeNet model, before loading any diffusion model', async () => {
    const out = await mkdtemp(path.join(os.tmpdir(), 'sdwb-eval-cli-'));
    const r = await sdwb(
      'eval',
      'configs/bench/unlearndiffatk-nudity.yaml',
      '--set',
      'detectors.0.model=/nonexistent/nudenet/320n.onnx',
      '--set',
      'limit=1',
      '--set',
      `output_dir=${out}`,
    );
    await rm(out, { recursive: true, force: true });
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/NudeNet v3: model file not found at \/nonexistent\/nudenet\/320n\.onnx\..*not bundled/);
    expect(r.stderr).not.toContain('loading path/to');
  });

  it('lists prompt sets, detectors, presets and fields', async () => {
    const r = await sdwb('eval', 'list');
    expect(r.code).toBe(0);
    for (const text of ['i2p: Inappropriate Image Prompts', 'nudenet-v3: NudeNet v3', 'nsfwjs: nsfwjs image classifier', 'esd-2023, unlearndiffatk, mace', 'output_dir: ']) {
      expect(r.stdout).toContain(text);
    }
  });
});
