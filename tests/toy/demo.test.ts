/**
 * `sdwb demo --fast` on the bundled toy model: the reduced demo (short training, small rows)
 * must move every effect in its direction — ESD-x lowers the erased shape, the embedding raises
 * the held-out shape, the hypernetwork at strength 1 raises the held-out style over strength 0,
 * the LoRA makes "a sks shape" the trained object — and write results.json and report.html.
 * The bars themselves (≥ 50 images per row) are the full demo's job: docs/results.md.
 */
import { mkdtemp, readdir, readFile, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

import sharp from 'sharp';
import { describe, expect, it } from 'vitest';

import { readRowsFile } from '../../src/eval/rows.js';
import { measurementDir, type DemoResults } from '../../src/toy/demo.js';
import { runSdwb } from '../helpers/cli.js';

describe('sdwb demo', () => {
  it('--fast: every effect moves in its direction; results.json and report.html are written', async () => {
    const out = await mkdtemp(path.join(os.tmpdir(), 'sdwb-demo-'));
    const r = await runSdwb(['demo', '--fast', '--json', '--out', out], { timeoutMs: 900_000 });
    expect(r.code, r.stderr).toBe(0);
    const printed = JSON.parse(r.stdout) as DemoResults;
    const saved = JSON.parse(await readFile(path.join(out, 'results.json'), 'utf8')) as DemoResults;
    expect(saved.checks).toEqual(printed.checks);
    expect((await stat(path.join(out, 'report.html'))).size).toBeGreaterThan(1000);

    const rate = (k: string) => {
      const row = saved.rows[k];
      expect(row, k).toBeDefined();
      expect(row!.images).toBeGreaterThan(0);
      return row!.rate;
    };
    expect(rate('esd.shape.circle')).toBeLessThan(rate('base.shape.circle'));
    // The embedding moves the images toward the held-out shape: on this toy model the top label
    // rarely flips (docs/results.md), so the direction is read from the classifier's probability.
    expect(saved.rows['ti.shape']!.mean_score!).toBeGreaterThan(saved.rows['base.ti_prompts']!.mean_score!);
    // The hypernetwork at strength 0 is the base model, image for image; at strength 1 it changes them.
    const hn = (await readRowsFile(path.join(saved.eval_dirs['hypernetwork']!, 'rows.jsonl'))).rows;
    // (Pixels, not file hashes: each PNG's parameters chunk names its add-ons.)
    const pixels = async (m: string) =>
      Promise.all(hn.filter((x) => x.model === m).map(async (x) => (await sharp(path.join(saved.eval_dirs['hypernetwork']!, x.file)).raw().toBuffer()).toString('base64')));
    const base = await pixels('base');
    expect(base.length).toBeGreaterThan(0);
    expect(await pixels('hypernetwork-0')).toEqual(base);
    expect((await pixels('hypernetwork-1')).filter((p, i) => p !== base[i]).length).toBeGreaterThan(base.length / 2);
    expect(rate('dreambooth.identifier')).toBeGreaterThan(rate('base.identifier'));

    // A fast run's rows are below the 50-image floor, so it never claims the bars.
    expect(saved.fast).toBe(true);
    expect(saved.pass).toBe(false);
    expect(saved.checks.map((c) => c.id)).toEqual([
      'base.shapes_at_80',
      'base.colour',
      'esd.erased',
      'esd.others_drop',
      'ti.heldout_shape',
      'hypernetwork.strength_1',
      'hypernetwork.strength_0',
      'dreambooth.identifier',
      'dreambooth.class_change',
    ]);
    for (const c of saved.checks) {
      expect(c.images).toBeGreaterThan(0);
      // A check passes only when its value meets the bar on at least 50 images.
      expect(c.pass).toBe(c.met && c.images >= 50);
    }
    expect(saved.checks.some((c) => c.met && !c.pass)).toBe(true);
  }, 900_000);

  it('a measurement folder is kept for the same settings and emptied for others', async () => {
    const dir = path.join(await mkdtemp(path.join(os.tmpdir(), 'sdwb-demo-m-')), 'eval', 'hypernetwork');
    await measurementDir(dir, '{"prompts":1}');
    await writeFile(path.join(dir, 'rows.jsonl'), 'done\n');
    await measurementDir(dir, '{"prompts":1}');
    expect(await readFile(path.join(dir, 'rows.jsonl'), 'utf8')).toBe('done\n');
    await measurementDir(dir, '{"prompts":2}');
    expect(await readdir(dir)).toEqual(['demo-measurement.json']);
    expect(await readFile(path.join(dir, 'demo-measurement.json'), 'utf8')).toBe('{"prompts":2}');
  });

  it('a folder without toy.json is refused with one clear line', async () => {
    const out = await mkdtemp(path.join(os.tmpdir(), 'sdwb-demo-bad-'));
    const r = await runSdwb(['demo', '--model', out, '--out', path.join(out, 'o')]);
    expect(r.code).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toContain('toy.json: not found');
  });
});
