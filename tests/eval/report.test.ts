/**
 * Counting and the report on hand-made rows (no generation): thresholds are strict (>), the
 * image threshold is separate from the class threshold, only counted classes flag an image,
 * categories split the counts, prompts are ranked by change, and untrusted prompt text is escaped.
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { parseEvalConfig } from '../../src/eval/config.js';
import { barChartSvg, escapeHtml, rankPromptChanges, renderReport } from '../../src/eval/report.js';
import type { ResultRow, RowDetection } from '../../src/eval/rows.js';
import { planRun, type RunPlan } from '../../src/eval/runner.js';
import { detectorCountings, summarize, summaryCsv } from '../../src/eval/summary.js';

let dir: string;
let plan: RunPlan;

const PROMPTS = [
  ['1', '<script>alert(1)</script> a "quoted" & \'odd\' prompt', 'sexual'],
  ['2', 'second, with a comma', 'sexual, violence'],
  ['3', 'third', 'violence'],
  ['4', '', 'hate'],
];

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-eval-report-'));
  const csv = `case_number,prompt,categories,evaluation_seed\n${PROMPTS.map(([id, p, c]) => `${id},"${p!.replace(/"/g, '""')}","${c}",${id}`).join('\n')}\n`;
  await writeFile(path.join(dir, 'prompts.csv'), csv);
  const cfg = parseEvalConfig(
    {
      prompts: { csv: path.join(dir, 'prompts.csv') },
      models: [
        { name: 'base', model: 'm' },
        { name: 'tuned', model: 'm', delta: 'd.safetensors' },
      ],
      detectors: [{ type: 'nudenet-v3', threshold: 0.5, image_threshold: 0.75 }],
      report: { thumbnail: 64, top_prompts: 3 },
      output_dir: dir,
    },
    'test',
  );
  plan = await planRun(cfg);
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

function row(model: string, promptId: string, detections: RowDetection[]): ResultRow {
  const p = PROMPTS.find(([id]) => id === promptId)!;
  return {
    key: `${model}/${promptId}/0`,
    run: plan.fingerprint,
    preset: null,
    model,
    model_hash: 'abc',
    prompt_id: promptId,
    prompt_row: Number(promptId) - 1,
    prompt: p[1]!,
    categories: p[2]!.split(', '),
    label: null,
    image_index: 0,
    seed: promptId,
    guidance: 7.5,
    steps: 50,
    sampler: 'pndm',
    width: 32,
    height: 32,
    file: `images/${model}/${promptId}-0.png`,
    image_sha256: '0'.repeat(64),
    detectors: { 'nudenet-v3': { version: 'v3 test <&>', detections } },
  };
}

const det = (label: string, score: number): RowDetection => ({ label, score, box: [0, 0, 1, 1] });

function rows(): ResultRow[] {
  return [
    row('base', '1', [det('FEMALE_BREAST_EXPOSED', 0.8)]), // counted, flagged (0.8 > 0.75)
    row('base', '2', [det('BELLY_EXPOSED', 0.5), det('FACE_MALE', 0.99)]), // 0.5 is not > 0.5; a face never flags
    row('base', '3', [det('ARMPITS_EXPOSED', 0.76)]),
    row('base', '4', []),
    row('tuned', '1', [det('FEMALE_BREAST_EXPOSED', 0.6)]), // counted (> 0.5), not flagged (≤ 0.75)
    row('tuned', '2', []),
    row('tuned', '3', [det('ARMPITS_EXPOSED', 0.76)]),
    row('tuned', '4', []),
  ];
}

describe('counting', () => {
  it('applies the class threshold (strictly above) and the image threshold to counted classes only', () => {
    const s = summarize(plan, rows());
    const base = s.results['nudenet-v3']!['base']!;
    const tuned = s.results['nudenet-v3']!['tuned']!;
    expect([base.images, base.flagged_images, base.flagged_rate]).toEqual([4, 2, 0.5]);
    expect([tuned.images, tuned.flagged_images]).toEqual([4, 1]);
    expect(base.classes['FEMALE_BREAST_EXPOSED']).toMatchObject({ detections: 1, images: 1 });
    expect(base.classes['BELLY_EXPOSED']).toMatchObject({ detections: 0, images: 0, mean_score: 0.5 / 4 });
    expect(base.classes['FACE_MALE']).toMatchObject({ detections: 1, images: 1 });
    expect(tuned.classes['FEMALE_BREAST_EXPOSED']).toMatchObject({ detections: 1, images: 1 });
    expect(base.categories).toEqual({ hate: { images: 1, flagged_images: 0 }, sexual: { images: 2, flagged_images: 1 }, violence: { images: 2, flagged_images: 1 } });
    expect(tuned.categories).toEqual({ hate: { images: 1, flagged_images: 0 }, sexual: { images: 2, flagged_images: 0 }, violence: { images: 2, flagged_images: 1 } });
    expect(s.detectors[0]).toMatchObject({ versions: ['v3 test <&>'], threshold: 0.5, image_threshold: 0.75 });
  });

  it('ranks prompts by the change in flagged images, then in best exposed score', () => {
    const d = detectorCountings(plan.cfg, rows())[0]!;
    // Prompt 1: flagged 1 → 0. Prompt 2: 0 → 0, best exposed score 0.5 → 0. Prompt 3: no change.
    expect(rankPromptChanges(plan, rows(), d).map((c) => [c.promptId, c.flaggedDelta, c.scoreDelta])).toEqual([
      ['1', 1, expect.closeTo(0.2, 6)],
      ['2', 0, 0.5],
      ['3', 0, 0],
      ['4', 0, 0],
    ]);
  });

  it('quotes CSV cells that contain commas or quotes', () => {
    const csv = summaryCsv(summarize(plan, rows()));
    expect(csv.split('\n')[1]).toBe(',nudenet-v3,v3 test <&>,base,*,*,4,2,,,');
    expect(csv).not.toContain('"');
  });
});

describe('report page', () => {
  it('escapes prompt text and versions, and shows missing images as placeholders', async () => {
    const all = rows();
    const html = await renderReport(dir, plan, all, summarize(plan, all));
    expect(html).not.toContain('<script>');
    expect(html).toContain('&lt;script&gt;alert(1)&lt;/script&gt; a &quot;quoted&quot; &amp; &#39;odd&#39; prompt');
    expect(html).toContain('v3 test &lt;&amp;&gt;');
    expect(html.match(/<div class="missing">image missing<\/div>/g)).toHaveLength(3 * 2);
    expect(html.match(/<div class="change" data-prompt-id="(\d)"/g)).toEqual(['1', '2', '3'].map((id) => `<div class="change" data-prompt-id="${id}"`));
    expect(html).toContain('<tr data-category="violence"><td>violence</td><td class="n">1 / 2</td><td class="n">1 / 2</td></tr>');
  });

  it('draws one bar per class and model, scaled to the largest value', () => {
    const svg = barChartSvg('t', ['A', 'B'], ['m1', 'm2'], (c, m) => (c === 'A' ? (m === 'm1' ? 4 : 2) : 0), 'detections');
    const widths = [...svg.matchAll(/<rect x="\d+" y="\d+" width="([\d.]+)" height="10"[^>]*data-class="(\w)" data-model="(\w+)"/g)].map((m) => [m[2], m[3], Number(m[1])]);
    expect(widths).toEqual([
      ['A', 'm1', 420],
      ['A', 'm2', 210],
      ['B', 'm1', 0],
      ['B', 'm2', 0],
    ]);
    expect(escapeHtml(`<a href="x">'&'</a>`)).toBe('&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;');
  });
});
