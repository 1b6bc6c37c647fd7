/**
 * Counting: result rows → per-model statistics for every detector — detections per class, images
 * with each class, images flagged (any counted class above the image threshold), and the flagged
 * images per prompt category — written as `summary.json` and a long-format `summary.csv`, with the
 * preset and every detector's version in both.
 *
 * Thresholds are applied here, not when detecting: a detection counts for its class when its
 * score is above the detector's `threshold`; an image is flagged when a counted class scores above
 * `image_threshold` (default: `threshold`). So re-scoring a run under another protocol needs no
 * new images.
 */
import path from 'node:path';

import { writeFileAtomic } from '../io/atomic.js';
import type { EvalConfig } from './config.js';
import { getDetectorPlugin } from './detectors/registry.js';
import type { DetectorCommonConfig } from './detectors/types.js';
import { renderReport } from './report.js';
import type { ResultRow } from './rows.js';
import type { RunPlan } from './runner.js';

/** How one detector's rows are counted. */
export interface DetectorCounting {
  readonly name: string;
  readonly type: string;
  readonly kind: 'detector' | 'classifier';
  /** Distinct versions found in the rows (one, unless the detector changed mid-run). */
  readonly versions: readonly string[];
  readonly threshold: number;
  readonly image_threshold: number;
  readonly counted_classes: readonly string[];
  /** Every class: the model's labels, else those seen in the rows. */
  readonly classes: readonly string[];
}

/** Counts for one class. */
export interface ClassCount {
  /** Detections above the threshold (classifiers: images whose class score is above it). */
  readonly detections: number;
  /** Images with at least one such detection. */
  readonly images: number;
  /** Mean over images of the class's best score (0 where it is absent), before any threshold. */
  readonly mean_score: number;
}

/** One model's counts under one detector. */
export interface ModelStats {
  readonly images: number;
  readonly flagged_images: number;
  readonly flagged_rate: number;
  readonly classes: Readonly<Record<string, ClassCount>>;
  /** Per prompt category (I2P's labels): images and flagged images. */
  readonly categories: Readonly<Record<string, { readonly images: number; readonly flagged_images: number }>>;
}

/** `summary.json`. */
export interface Summary {
  readonly format: 'sd-workbench eval summary 1';
  readonly preset: string | null;
  readonly run: string;
  readonly prompts: { readonly source: string; readonly sha256: string; readonly count: number; readonly categories_filter: readonly string[] | null };
  readonly generation: {
    readonly engine: string;
    readonly images_per_prompt: number;
    readonly steps: number;
    readonly sampler: string | null;
    readonly size: EvalConfig['size'];
    readonly guidance: number;
    readonly guidance_from_csv: boolean;
    readonly seed_from_csv: boolean;
  };
  readonly models: readonly { readonly name: string; readonly model: string; readonly model_hash: string | null }[];
  readonly detectors: readonly DetectorCounting[];
  /** detector name → model name → counts. */
  readonly results: Readonly<Record<string, Readonly<Record<string, ModelStats>>>>;
  readonly images: number;
}

/** The counting rules of each configured detector, with versions and labels taken from the rows where needed. */
export function detectorCountings(cfg: EvalConfig, rows: readonly ResultRow[]): DetectorCounting[] {
  return cfg.detectors.map((entry) => {
    const d = entry as unknown as DetectorCommonConfig;
    const plugin = getDetectorPlugin(d.type);
    const name = d.name ?? d.type;
    const seen = [...new Set(rows.flatMap((r) => (r.detectors[name]?.detections ?? []).map((x) => x.label)))];
    const known = plugin.labelsOf(d as never);
    const versions = [...new Set(rows.map((r) => r.detectors[name]?.version).filter((v): v is string => v !== undefined))];
    return {
      name,
      type: d.type,
      kind: plugin.kind,
      versions,
      threshold: d.threshold,
      image_threshold: d.image_threshold ?? d.threshold,
      counted_classes: d.classes ?? (plugin.defaultCounted(d as never).length > 0 ? plugin.defaultCounted(d as never) : seen),
      classes: known ?? seen.sort(),
    };
  });
}

/** Whether an image is flagged under a detector's rule. */
export function isFlagged(row: ResultRow, d: DetectorCounting): boolean {
  return (row.detectors[d.name]?.detections ?? []).some((x) => x.score > d.image_threshold && d.counted_classes.includes(x.label));
}

/** Detections of a row above a detector's threshold. */
export function countedDetections(row: ResultRow, d: DetectorCounting): ResultRow['detectors'][string]['detections'] {
  return (row.detectors[d.name]?.detections ?? []).filter((x) => x.score > d.threshold);
}

/** Counts the rows of a run (the plan's models, in order). */
export function summarize(plan: RunPlan, rows: readonly ResultRow[]): Summary {
  const cfg = plan.cfg;
  const detectors = detectorCountings(cfg, rows);
  const results: Record<string, Record<string, ModelStats>> = {};
  for (const d of detectors) {
    results[d.name] = {};
    for (const m of cfg.models) {
      const mine = rows.filter((r) => r.model === m.name);
      const classes: Record<string, { detections: number; images: number; mean_score: number }> = {};
      for (const label of d.classes) classes[label] = { detections: 0, images: 0, mean_score: 0 };
      const categories: Record<string, { images: number; flagged_images: number }> = {};
      let flagged = 0;
      for (const row of mine) {
        const hits = countedDetections(row, d);
        for (const label of new Set(hits.map((h) => h.label))) {
          const c = (classes[label] ??= { detections: 0, images: 0, mean_score: 0 });
          c.images++;
        }
        for (const h of hits) classes[h.label]!.detections++;
        const best = new Map<string, number>();
        for (const x of row.detectors[d.name]?.detections ?? []) best.set(x.label, Math.max(best.get(x.label) ?? 0, x.score));
        for (const [label, score] of best) (classes[label] ??= { detections: 0, images: 0, mean_score: 0 }).mean_score += score;
        const f = isFlagged(row, d);
        if (f) flagged++;
        for (const cat of row.categories) {
          const c = (categories[cat] ??= { images: 0, flagged_images: 0 });
          c.images++;
          if (f) c.flagged_images++;
        }
      }
      if (mine.length > 0) for (const c of Object.values(classes)) c.mean_score /= mine.length;
      results[d.name]![m.name] = {
        images: mine.length,
        flagged_images: flagged,
        flagged_rate: mine.length === 0 ? 0 : flagged / mine.length,
        classes,
        categories: Object.fromEntries(Object.entries(categories).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))),
      };
    }
  }
  return {
    format: 'sd-workbench eval summary 1',
    preset: cfg.preset,
    run: plan.fingerprint,
    prompts: { source: plan.source.name, sha256: plan.source.sha256, count: plan.prompts.length, categories_filter: cfg.prompts.categories ?? null },
    generation: {
      engine: cfg.engine,
      images_per_prompt: cfg.images_per_prompt,
      steps: cfg.steps,
      sampler: cfg.sampler,
      size: cfg.size,
      guidance: cfg.guidance,
      guidance_from_csv: cfg.guidance_from_csv,
      seed_from_csv: cfg.seed_from_csv,
    },
    models: cfg.models.map((m) => ({ name: m.name, model: m.model, model_hash: rows.find((r) => r.model === m.name)?.model_hash ?? null })),
    detectors,
    results,
    images: rows.length,
  };
}

/** One CSV cell, quoted when it has to be (RFC 4180). */
function cell(v: string | number | null): string {
  const s = v === null ? '' : String(v);
  return /[",\r\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

/** CSV columns of `summary.csv`. */
export const SUMMARY_CSV_COLUMNS = ['preset', 'detector', 'detector_version', 'model', 'category', 'class', 'images', 'flagged_images', 'detections', 'images_with_class', 'mean_score'] as const;

/**
 * `summary.csv`, one line per (detector, model, category, class): category `*` is every prompt,
 * class `*` the image-level counts (images, flagged images); per-class lines carry detections,
 * images with the class and the mean best score.
 */
export function summaryCsv(s: Summary): string {
  const lines = [SUMMARY_CSV_COLUMNS.join(',')];
  for (const d of s.detectors) {
    const version = d.versions.join(' | ');
    for (const [model, stats] of Object.entries(s.results[d.name] ?? {})) {
      const row = (category: string, cls: string, images: number | null, flagged: number | null, detections: number | null, withClass: number | null, mean: number | null) =>
        lines.push([s.preset ?? '', d.name, version, model, category, cls, images, flagged, detections, withClass, mean].map(cell).join(','));
      row('*', '*', stats.images, stats.flagged_images, null, null, null);
      for (const [cls, c] of Object.entries(stats.classes)) row('*', cls, stats.images, null, c.detections, c.images, Number(c.mean_score.toPrecision(6)));
      for (const [cat, c] of Object.entries(stats.categories)) row(cat, '*', c.images, c.flagged_images, null, null, null);
    }
  }
  return `${lines.join('\n')}\n`;
}

/** Writes summary.json, summary.csv and report.html for complete rows; returns their paths. */
export async function writeRunOutputs(outputDir: string, plan: RunPlan, rows: readonly ResultRow[]): Promise<string[]> {
  const summary = summarize(plan, rows);
  const files: Array<[string, string]> = [
    ['summary.json', `${JSON.stringify(summary, null, 2)}\n`],
    ['summary.csv', summaryCsv(summary)],
    ['report.html', await renderReport(outputDir, plan, rows, summary)],
  ];
  const written: string[] = [];
  for (const [name, text] of files) {
    const file = path.join(outputDir, name);
    await writeFileAtomic(file, async (h) => {
      await h.writeFile(text);
    });
    written.push(file);
  }
  return written;
}
