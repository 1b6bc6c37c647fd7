/**
 * `report.html`: one self-contained page — inline CSS and SVG, images as small data-URI
 * thumbnails, no script, and a Content-Security-Policy that forbids loading anything — so it can
 * be mailed or archived as one file and opened offline.
 *
 * Contents: the setup (prompts, models, generation settings, detectors with versions and
 * thresholds); per detector an overview table, a bar chart per class with one bar per model (as
 * the ESD paper's nudity figure: detection counts per exposed class; classifiers show the mean
 * probability per class), and flagged images per prompt category; then side-by-side image grids
 * for the prompts whose results changed most between the baseline (the first model) and the
 * others, ranked by the first detector.
 *
 * Prompts are untrusted text (I2P is scraped from lexica.art): everything is escaped.
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';

import sharp from 'sharp';

import type { ResultRow } from './rows.js';
import type { RunPlan } from './runner.js';
import { countedDetections, isFlagged, type DetectorCounting, type Summary } from './summary.js';

/** Escapes text for HTML content and attribute values. */
export function escapeHtml(text: string): string {
  return text.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]!);
}

/** Model colours (colour-blind-safe Okabe–Ito order). */
const PALETTE = ['#0072B2', '#E69F00', '#009E73', '#CC79A7', '#56B4E9', '#D55E00', '#F0E442', '#000000'];


/** One prompt's change between the baseline and the other models, under one detector. */
export interface PromptChange {
  readonly promptId: string;
  /** Largest |Δ flagged images| against the baseline. */
  readonly flaggedDelta: number;
  /** Largest |Δ Σ best counted-class score| against the baseline. */
  readonly scoreDelta: number;
}

// The best counted-class score of an image (0 when none).
function topCountedScore(row: ResultRow, d: DetectorCounting): number {
  let best = 0;
  for (const x of row.detectors[d.name]?.detections ?? []) if (d.counted_classes.includes(x.label)) best = Math.max(best, x.score);
  return best;
}

/**
 * Prompts ranked by how much their images changed between the baseline and any other model:
 * first by flagged images, then by summed best counted-class score; ties keep prompt order.
 * With one model, prompts rank by their own flagged count and score.
 */
export function rankPromptChanges(plan: RunPlan, rows: readonly ResultRow[], d: DetectorCounting): PromptChange[] {
  const models = plan.cfg.models.map((m) => m.name);
  const byPrompt = new Map<string, Map<string, { flagged: number; score: number }>>();
  for (const row of rows) {
    const perModel = byPrompt.get(row.prompt_id) ?? new Map<string, { flagged: number; score: number }>();
    byPrompt.set(row.prompt_id, perModel);
    const s = perModel.get(row.model) ?? { flagged: 0, score: 0 };
    s.flagged += isFlagged(row, d) ? 1 : 0;
    s.score += topCountedScore(row, d);
    perModel.set(row.model, s);
  }
  const changes: PromptChange[] = [];
  for (const p of plan.prompts) {
    const perModel = byPrompt.get(p.id);
    if (perModel === undefined) continue;
    const base = perModel.get(models[0]!) ?? { flagged: 0, score: 0 };
    let flaggedDelta = models.length === 1 ? base.flagged : 0;
    let scoreDelta = models.length === 1 ? base.score : 0;
    for (const m of models.slice(1)) {
      const other = perModel.get(m) ?? { flagged: 0, score: 0 };
      flaggedDelta = Math.max(flaggedDelta, Math.abs(base.flagged - other.flagged));
      scoreDelta = Math.max(scoreDelta, Math.abs(base.score - other.score));
    }
    changes.push({ promptId: p.id, flaggedDelta, scoreDelta });
  }
  // Array.prototype.sort is stable: equal changes keep prompt order.
  return changes.sort((a, b) => b.flaggedDelta - a.flaggedDelta || b.scoreDelta - a.scoreDelta);
}

/** An inline SVG grouped bar chart: one group per class, one bar per model; `digits` decimals on the value labels. */
export function barChartSvg(
  title: string,
  classes: readonly string[],
  models: readonly string[],
  value: (cls: string, model: string) => number,
  unit: string,
  digits = 0,
): string {
  const fmt = (x: number) => x.toFixed(digits);
  const barH = 12;
  const gap = 8;
  const labelW = 210;
  const chartW = 420;
  const groupH = models.length * barH + gap;
  const top = 28;
  const legendH = 22;
  const height = top + classes.length * groupH + legendH + 24;
  const max = Math.max(0, ...classes.flatMap((c) => models.map((m) => value(c, m))));
  const scale = max > 0 ? chartW / max : 0;
  const parts: string[] = [];
  parts.push(
    `<svg xmlns="http://www.w3.org/2000/svg" class="bars" role="img" width="${labelW + chartW + 70}" height="${height}" viewBox="0 0 ${labelW + chartW + 70} ${height}" aria-label="${escapeHtml(title)}">`,
  );
  parts.push(`<text x="0" y="16" class="t">${escapeHtml(title)}</text>`);
  classes.forEach((cls, ci) => {
    const y0 = top + ci * groupH;
    parts.push(`<text x="${labelW - 8}" y="${y0 + (models.length * barH) / 2 + 4}" text-anchor="end" class="l">${escapeHtml(cls)}</text>`);
    models.forEach((m, mi) => {
      const v = value(cls, m);
      const w = v * scale;
      const y = y0 + mi * barH;
      parts.push(
        `<rect x="${labelW}" y="${y}" width="${w.toFixed(1)}" height="${barH - 2}" fill="${PALETTE[mi % PALETTE.length]}" data-class="${escapeHtml(cls)}" data-model="${escapeHtml(m)}" data-value="${v}"><title>${escapeHtml(`${m} · ${cls}: ${fmt(v)} ${unit}`)}</title></rect>`,
      );
      parts.push(`<text x="${labelW + w + 4}" y="${y + barH - 3}" class="v">${fmt(v)}</text>`);
    });
  });
  const axisY = top + classes.length * groupH;
  parts.push(`<line x1="${labelW}" y1="${top - 4}" x2="${labelW}" y2="${axisY}" class="axis"/>`);
  if (max === 0) parts.push(`<text x="${labelW + 60}" y="${top + 10}" class="note">no ${escapeHtml(unit)} above the threshold</text>`);
  let lx = labelW;
  models.forEach((m, mi) => {
    parts.push(`<rect x="${lx}" y="${axisY + 10}" width="10" height="10" fill="${PALETTE[mi % PALETTE.length]}"/>`);
    parts.push(`<text x="${lx + 14}" y="${axisY + 19}" class="l">${escapeHtml(m)}</text>`);
    lx += 24 + m.length * 7;
  });
  parts.push('</svg>');
  return parts.join('');
}

/** A PNG file as a data URI thumbnail (longest side ≤ `size`, never enlarged), or undefined when unreadable. */
export async function thumbnailDataUri(file: string, size: number): Promise<string | undefined> {
  try {
    const bytes = await readFile(file);
    const thumb = await sharp(bytes).resize({ width: size, height: size, fit: 'inside', withoutEnlargement: true }).png({ compressionLevel: 9 }).toBuffer();
    return `data:image/png;base64,${thumb.toString('base64')}`;
  } catch {
    return undefined;
  }
}

const STYLE = `
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1120px;color:#1d1d1f;padding:0 16px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}h3{font-size:15px;margin:16px 0 6px}
.meta{color:#555;margin:0 0 12px}code{font:12px ui-monospace,Menlo,Consolas,monospace;background:#f3f3f5;padding:1px 4px;border-radius:3px;word-break:break-all}
table{border-collapse:collapse;margin:6px 0 12px}th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f6f6f8}td.n{text-align:right;font-variant-numeric:tabular-nums}
svg.bars text{font:12px system-ui,sans-serif;fill:#333}svg.bars .t{font-weight:600}svg.bars .v{fill:#555;font-size:11px}svg.bars .note{fill:#888;font-style:italic}svg.bars .axis{stroke:#999}
.change{border:1px solid #e2e2e6;border-radius:6px;padding:8px 10px;margin:10px 0}.prompt{margin:0 0 6px;white-space:pre-wrap;word-break:break-word}
.pid{color:#666;font-size:12px}.grid{display:flex;gap:12px;flex-wrap:wrap}.cell{flex:1 1 0;min-width:150px}.cell h4{margin:2px 0 4px;font-size:13px}
.imgs{display:flex;gap:4px;flex-wrap:wrap}.imgs figure{margin:0}.imgs img{display:block;image-rendering:pixelated;border:2px solid #ccc;background:#eee}
.imgs img.flagged{border-color:#c62828}.imgs figcaption{font-size:11px;color:#444;max-width:160px}.missing{width:96px;height:96px;display:flex;align-items:center;justify-content:center;background:#eee;color:#888;font-size:11px}
.swatch{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:baseline}footer{margin-top:32px;color:#777;font-size:12px}`;

/** Renders the report page for a complete run. */
export async function renderReport(outputDir: string, plan: RunPlan, rows: readonly ResultRow[], summary: Summary): Promise<string> {
  const cfg = plan.cfg;
  const models = cfg.models.map((m) => m.name);
  const thumb = cfg.report.thumbnail;
  const h: string[] = [];
  const title = `Safety benchmark — ${summary.prompts.source}${cfg.preset === null ? '' : ` (${cfg.preset})`}`;
  h.push('<!doctype html><html lang="en"><head><meta charset="utf-8">');
  h.push(`<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">`);
  h.push(`<meta name="viewport" content="width=device-width, initial-scale=1"><title>${escapeHtml(title)}</title><style>${STYLE}</style></head><body>`);
  h.push(`<header><h1>${escapeHtml(title)}</h1>`);
  h.push(
    `<p class="meta">preset <b>${escapeHtml(cfg.preset ?? 'none')}</b> · ${summary.prompts.count} prompts × ${models.length} models × ${cfg.images_per_prompt} images = ${rows.length} images · run <code>${summary.run}</code></p></header>`,
  );

  // 1. Setup.
  h.push('<section id="setup"><h2>Setup</h2><table><tr><th>model</th><th>source</th><th>add-ons</th><th>hash</th></tr>');
  cfg.models.forEach((m, i) => {
    const addons = (['embedding', 'hypernetwork', 'lora', 'delta'] as const)
      .flatMap((k) => {
        const v = m[k];
        return v === undefined ? [] : (typeof v === 'string' ? [v] : v).map((f) => `${k} ${path.basename(f)}`);
      })
      .join(', ');
    const hash = summary.models[i]?.model_hash ?? '';
    h.push(
      `<tr data-model="${escapeHtml(m.name)}"><td><span class="swatch" style="background:${PALETTE[i % PALETTE.length]}"></span>${escapeHtml(m.name)}${i === 0 ? ' (baseline)' : ''}</td><td><code>${escapeHtml(path.basename(m.model))}</code></td><td>${escapeHtml(addons || '—')}</td><td><code>${escapeHtml(hash)}</code></td></tr>`,
    );
  });
  h.push('</table>');
  const g = summary.generation;
  const size = g.size === null ? 'model default' : typeof g.size === 'number' ? `${g.size}²` : `${g.size[0]}×${g.size[1]}`;
  h.push(
    `<p>prompts <code>${escapeHtml(summary.prompts.source)}</code>${summary.prompts.categories_filter === null ? '' : ` (categories: ${escapeHtml(summary.prompts.categories_filter.join(', '))})`} · engine ${escapeHtml(g.engine)} · sampler ${escapeHtml(g.sampler ?? 'model default')} · ${g.steps} steps · CFG ${g.guidance}${g.guidance_from_csv ? ' (CSV where given)' : ''} · seeds ${g.seed_from_csv ? 'from the CSV' : 'from the config'} · ${escapeHtml(size)}</p>`,
  );
  h.push('<table><tr><th>detector</th><th>version</th><th>threshold</th><th>image threshold</th><th>counted classes</th></tr>');
  for (const d of summary.detectors) {
    h.push(
      `<tr data-detector="${escapeHtml(d.name)}"><td>${escapeHtml(d.name)}</td><td><code>${escapeHtml(d.versions.join(' | ') || '—')}</code></td><td class="n">${d.threshold}</td><td class="n">${d.image_threshold}</td><td>${escapeHtml(d.counted_classes.join(', '))}</td></tr>`,
    );
  }
  h.push('</table></section>');

  // 2. Per detector: overview, chart, categories.
  for (const d of summary.detectors) {
    const res = summary.results[d.name] ?? {};
    h.push(`<section class="detector" data-detector="${escapeHtml(d.name)}"><h2>${escapeHtml(d.name)}</h2>`);
    h.push('<table class="overview"><tr><th>model</th><th>images</th><th>flagged</th><th>flagged rate</th></tr>');
    for (const m of models) {
      const s = res[m];
      if (s === undefined) continue;
      h.push(
        `<tr data-model="${escapeHtml(m)}"><td>${escapeHtml(m)}</td><td class="n">${s.images}</td><td class="n">${s.flagged_images}</td><td class="n">${(100 * s.flagged_rate).toFixed(1)}%</td></tr>`,
      );
    }
    h.push('</table>');
    if (d.kind === 'detector') {
      h.push(
        `<figure class="chart">${barChartSvg(`Detections per class (score > ${d.threshold})`, d.counted_classes, models, (c, m) => res[m]?.classes[c]?.detections ?? 0, 'detections')}</figure>`,
      );
    } else {
      h.push(
        `<figure class="chart">${barChartSvg('Mean probability per class', d.classes, models, (c, m) => res[m]?.classes[c]?.mean_score ?? 0, 'mean probability', 3)}</figure>`,
      );
      h.push(
        `<figure class="chart">${barChartSvg(`Images per class (probability > ${d.threshold})`, d.counted_classes, models, (c, m) => res[m]?.classes[c]?.images ?? 0, 'images')}</figure>`,
      );
    }
    const categories = [...new Set(models.flatMap((m) => Object.keys(res[m]?.categories ?? {})))].sort();
    if (categories.length > 0) {
      h.push(`<h3>Flagged images per prompt category</h3><table class="categories"><tr><th>category</th>${models.map((m) => `<th>${escapeHtml(m)}</th>`).join('')}</tr>`);
      for (const c of categories) {
        h.push(
          `<tr data-category="${escapeHtml(c)}"><td>${escapeHtml(c)}</td>${models
            .map((m) => {
              const v = res[m]?.categories[c];
              return `<td class="n">${v === undefined ? '—' : `${v.flagged_images} / ${v.images}`}</td>`;
            })
            .join('')}</tr>`,
        );
      }
      h.push('</table>');
    }
    h.push('</section>');
  }

  // 3. Largest changes.
  const first = summary.detectors[0];
  if (first !== undefined && cfg.report.top_prompts > 0) {
    const ranked = rankPromptChanges(plan, rows, first).slice(0, cfg.report.top_prompts);
    h.push(
      `<section id="changes"><h2>${models.length > 1 ? 'Prompts with the largest change' : 'Prompts with the most flagged images'}</h2><p class="meta">ranked by ${escapeHtml(first.name)}: flagged images, then summed best score of a counted class; red frame = flagged</p>`,
    );
    const byKey = new Map(rows.map((r) => [`${r.model}/${r.prompt_id}/${r.image_index}`, r]));
    const promptById = new Map(plan.prompts.map((p) => [p.id, p]));
    for (const change of ranked) {
      const p = promptById.get(change.promptId)!;
      const text = p.prompt.length > 400 ? `${p.prompt.slice(0, 400)}…` : p.prompt;
      h.push(
        `<div class="change" data-prompt-id="${escapeHtml(p.id)}"><p class="prompt">${escapeHtml(text) || '<i>(empty prompt)</i>'}</p><p class="pid">id ${escapeHtml(p.id)}${p.categories.length > 0 ? ` · ${escapeHtml(p.categories.join(', '))}` : ''} · Δ flagged ${change.flaggedDelta} · Δ score ${change.scoreDelta.toFixed(3)}</p><div class="grid">`,
      );
      for (const m of models) {
        h.push(`<div class="cell" data-model="${escapeHtml(m)}"><h4>${escapeHtml(m)}</h4><div class="imgs">`);
        for (let k = 0; k < cfg.images_per_prompt; k++) {
          const row = byKey.get(`${m}/${p.id}/${k}`);
          if (row === undefined) continue;
          const uri = await thumbnailDataUri(path.join(outputDir, row.file), thumb);
          const hits = countedDetections(row, first)
            .filter((x) => first.counted_classes.includes(x.label))
            .map((x) => `${x.label} ${x.score.toFixed(2)}`);
          const flagged = isFlagged(row, first);
          const alt = `${m}, image ${k}, seed ${row.seed}`;
          const shown = Math.min(thumb, Math.max(row.width, row.height) < 96 ? 96 : thumb);
          h.push(
            `<figure>${uri === undefined ? `<div class="missing">image missing</div>` : `<img src="${uri}" width="${shown}" alt="${escapeHtml(alt)}" title="${escapeHtml(`${row.file} · seed ${row.seed}`)}"${flagged ? ' class="flagged"' : ''}>`}<figcaption>${escapeHtml(hits.join(', ') || 'nothing counted')}</figcaption></figure>`,
          );
        }
        h.push('</div></div>');
      }
      h.push('</div></div>');
    }
    h.push('</section>');
  }
  h.push(`<footer>sd-workbench eval · ${rows.length} rows · summary.json and summary.csv beside this file hold every count</footer></body></html>\n`);
  return h.join('\n');
}
