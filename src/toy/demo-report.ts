/**
 * How `sdwb demo` shows its results: a plain-text table for the terminal and a self-contained
 * `report.html` (the checks, every measured row, sample images of each measurement, links to the
 * eval harness's own reports).
 */
import path from 'node:path';

import { escapeHtml, thumbnailDataUri } from '../eval/report.js';
import { readRowsFile } from '../eval/rows.js';
import { writeTextAtomic } from '../io/atomic.js';
import { layoutText, MIN_IMAGES, type DemoResults } from './demo.js';

const pct = (x: number) => `${(100 * x).toFixed(1)}%`;

function formatValue(id: string, value: number): string {
  return id === 'base.shapes_at_80' ? String(value) : pct(value);
}

/** The checks as an aligned text table. */
export function demoTable(r: DemoResults): string {
  const head = ['check', 'value', 'bar', 'images', 'result'];
  const body = r.checks.map((c) => [c.id, formatValue(c.id, c.value), `${c.op} ${formatValue(c.id, c.threshold)}`, String(c.images), c.pass ? 'pass' : c.met ? `met (< ${MIN_IMAGES} images)` : 'FAIL']);
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i]!.length)));
  const line = (cells: readonly string[]) => cells.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd();
  const verdict = r.pass ? 'all bars met' : r.fast ? `fast run: rows below ${MIN_IMAGES} images, bars not judged (directions only)` : 'NOT all bars met';
  return [line(head), line(widths.map((w) => '-'.repeat(w))), ...body.map(line), '', `${verdict}; ${r.seconds.toFixed(0)} s`].join('\n');
}

/** Writes `report.html` beside `results.json`; returns its path. */
export async function writeDemoReport(out: string, r: DemoResults, samplesPerRow = 12): Promise<string> {
  const checks = r.checks
    .map(
      (c) =>
        `<tr class="${c.pass ? 'pass' : c.met ? 'met' : 'fail'}"><td>${escapeHtml(c.id)}</td><td>${escapeHtml(c.description)}</td><td>${formatValue(c.id, c.value)}</td><td>${c.op} ${formatValue(c.id, c.threshold)}</td><td>${c.images}</td><td>${c.pass ? 'pass' : c.met ? 'met, too few images' : 'fail'}</td></tr>`,
    )
    .join('\n');
  const rowTable = Object.entries(r.rows)
    .map(([k, v]) => `<tr><td>${escapeHtml(k)}</td><td>${escapeHtml(v.what)}</td><td>${pct(v.rate)}</td><td>${v.hits}/${v.images}</td><td>${v.mean_score === undefined ? '' : v.mean_score.toFixed(4)}</td></tr>`)
    .join('\n');
  const sections: string[] = [];
  for (const [name, dir] of Object.entries(r.eval_dirs)) {
    const { rows } = await readRowsFile(path.join(dir, 'rows.jsonl'));
    const byModel = new Map<string, typeof rows>();
    for (const row of rows) byModel.set(row.model, [...(byModel.get(row.model) ?? []), row]);
    const grids: string[] = [];
    for (const [m, list] of byModel) {
      const step = Math.max(1, Math.floor(list.length / samplesPerRow));
      const picks = list.filter((_, i) => i % step === 0).slice(0, samplesPerRow);
      const imgs = await Promise.all(picks.map(async (row) => ({ row, uri: await thumbnailDataUri(path.join(dir, row.file), 64) })));
      grids.push(
        `<h3>${escapeHtml(m)}</h3><div class="grid">${imgs
          .map(({ row, uri }) => (uri === undefined ? '' : `<figure><img src="${uri}" width="64" height="64" alt=""><figcaption>${escapeHtml(row.prompt)}</figcaption></figure>`))
          .join('')}</div>`,
      );
    }
    const rel = path.relative(out, path.join(dir, 'report.html'));
    sections.push(`<section><h2>${escapeHtml(name)}</h2><p><a href="${escapeHtml(rel)}">eval harness report</a> · ${rows.length} images</p>${grids.join('\n')}</section>`);
  }
  const methods = Object.entries(r.methods)
    .map(([k, m]) => `<tr><td>${escapeHtml(k)}</td><td>${m.steps}</td><td>${m.seconds.toFixed(0)} s</td><td>${escapeHtml(path.relative(out, m.file))}</td></tr>`)
    .join('\n');
  const html = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sd-workbench demo</title>
<style>
body{font:14px system-ui,sans-serif;margin:2em;max-width:1100px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
tr.pass td:last-child{background:#d9f2d9}tr.fail td:last-child{background:#f7d4d4}tr.met td:last-child{background:#fff2c8}
.grid{display:flex;flex-wrap:wrap;gap:6px}figure{margin:0;width:96px}figcaption{font-size:10px;color:#555}img{image-rendering:pixelated;width:96px;height:96px}
</style></head><body>
<h1>sd-workbench demo on the toy model</h1>
<p>${r.pass ? '<b>All bars met.</b>' : r.fast ? `Fast run: rows have fewer than ${MIN_IMAGES} images, so bars are not judged; the directions are.` : '<b>Not all bars met.</b>'}
Model <code>${escapeHtml(r.model)}</code>; sampling: ${escapeHtml(r.sampling.sampler)}, ${r.sampling.steps} steps, CFG ${r.sampling.guidance}, per measurement ${escapeHtml(layoutText(r.sampling))}. ${r.seconds.toFixed(0)} s.</p>
<h2>Checks</h2><table><tr><th>id</th><th>what</th><th>value</th><th>bar</th><th>images</th><th>result</th></tr>
${checks}</table>
<h2>Measured rows</h2><table><tr><th>row</th><th>what</th><th>rate</th><th>hits/images</th><th>mean probability of the target</th></tr>
${rowTable}</table>
<h2>Methods</h2><table><tr><th>method</th><th>steps</th><th>time</th><th>file</th></tr>
${methods}</table>
${sections.join('\n')}
</body></html>
`;
  const file = path.join(out, 'report.html');
  await writeTextAtomic(file, html);
  return file;
}
