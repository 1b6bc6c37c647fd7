/**
 * Toy-world measurements through the eval harness: prompt CSVs whose `label` column names the
 * concepts each prompt asks for ("shape=circle colour=red"), and the accuracy of generated images
 * read back from the harness's rows (the toy classifier's argmax per head against the label).
 */
import { mkdir } from 'node:fs/promises';
import path from 'node:path';

import { parseEvalConfig, type EvalConfig, type ModelEntry } from '../eval/config.js';
import { readRowsFile, type ResultRow } from '../eval/rows.js';
import { mergeRuns } from '../eval/merge.js';
import { runEval } from '../eval/runner.js';
import { writeTextAtomic } from '../io/atomic.js';
import { HEAD_NAMES, HEADS, type Head } from './classifier.js';
import { SeededRandom } from '../data/rng.js';
import { runSdwbChild } from './child.js';
import { bundledClassifierFile, conceptName, registerToyClassifier } from './detector.js';
import { BACKGROUND_NAMES, captionOf, COLOUR_NAMES, type Background, type Colour, type Shape, type Style } from './world.js';

/** The concepts a prompt asks for, by classifier head. */
export type ToyTarget = Partial<Record<Head, string>>;

/** One prompt of a toy measurement. */
export interface ToyPrompt {
  readonly id: string;
  readonly prompt: string;
  readonly target: ToyTarget;
  readonly seed: number;
}

/** `shape=circle colour=red`: the CSV label of a target (heads in classifier order). */
export function targetLabel(target: ToyTarget): string {
  return HEAD_NAMES.filter((h) => target[h] !== undefined)
    .map((h) => `${h}=${target[h]}`)
    .join(' ');
}

/** The inverse of {@link targetLabel}; throws on anything else. */
export function parseTargetLabel(label: string): ToyTarget {
  const target: ToyTarget = {};
  for (const part of label.trim().split(/\s+/)) {
    const m = /^(\w+)=(\w+)$/.exec(part);
    const head = m?.[1] as Head | undefined;
    if (m === null || head === undefined || !HEAD_NAMES.includes(head) || !(HEADS[head] as readonly string[]).includes(m[2]!)) {
      throw new Error(`toy target label '${label}': expected head=value pairs over ${HEAD_NAMES.join(', ')}, found '${part}'`);
    }
    target[head] = m[2]!;
  }
  return target;
}

function csvCell(text: string): string {
  return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

/** A prompt CSV for the eval harness (columns case_number, prompt, label, evaluation_seed). */
export function promptsCsv(prompts: readonly ToyPrompt[]): string {
  const lines = ['case_number,prompt,label,evaluation_seed'];
  for (const p of prompts) lines.push([p.id, p.prompt, targetLabel(p.target), String(p.seed)].map(csvCell).join(','));
  return `${lines.join('\n')}\n`;
}

/** The classifier's top label of a head for one row (scores stored by the concept detector). */
export function predictedLabel(row: ResultRow, detector: string, head: Head): string {
  const result = row.detectors[detector];
  if (result === undefined) throw new Error(`row ${row.key}: no results of detector '${detector}'`);
  let best: string | undefined;
  let bestScore = -Infinity;
  for (const label of HEADS[head] as readonly string[]) {
    const d = result.detections.find((x) => x.label === conceptName(head, label));
    if (d === undefined) throw new Error(`row ${row.key}: detector '${detector}' stored no score for '${conceptName(head, label)}'`);
    if (d.score > bestScore) {
      bestScore = d.score;
      best = label;
    }
  }
  return best!;
}

/** Whether a row's image shows every concept its label asks for. */
export function rowHits(row: ResultRow, detector: string): boolean {
  if (row.label === null) throw new Error(`row ${row.key}: no target label`);
  const target = parseTargetLabel(row.label);
  return HEAD_NAMES.every((h) => target[h] === undefined || predictedLabel(row, detector, h) === target[h]);
}

/** Hits over images, with the image count behind the rate. */
export interface Accuracy {
  readonly hits: number;
  readonly images: number;
  readonly rate: number;
}

/** The accuracy of a set of rows. */
export function accuracyOf(rows: readonly ResultRow[], detector: string, hit: (row: ResultRow) => boolean = (r) => rowHits(r, detector)): Accuracy {
  const hits = rows.filter(hit).length;
  return { hits, images: rows.length, rate: rows.length === 0 ? NaN : hits / rows.length };
}

/** Rows grouped by a key (model, a target head's value, …), in first-seen order. */
export function groupRows(rows: readonly ResultRow[], key: (row: ResultRow) => string): Map<string, ResultRow[]> {
  const groups = new Map<string, ResultRow[]>();
  for (const r of rows) {
    const k = key(r);
    const g = groups.get(k);
    if (g === undefined) groups.set(k, [r]);
    else g.push(r);
  }
  return groups;
}

/** The share of rows whose head's top label is `label` (e.g. how often the erased shape still appears). */
export function labelRate(rows: readonly ResultRow[], detector: string, head: Head, label: string): Accuracy {
  return accuracyOf(rows, detector, (r) => predictedLabel(r, detector, head) === label);
}

/** A model of a toy measurement: an eval `models:` entry (folder plus optional add-ons). */
export type ToyEvalModel = ModelEntry;

/** Settings of {@link runToyEval}. */
export interface ToyEvalOptions {
  readonly models: readonly ToyEvalModel[];
  readonly prompts: readonly ToyPrompt[];
  readonly outputDir: string;
  readonly imagesPerPrompt: number;
  readonly guidance: number;
  readonly steps: number;
  readonly classifier?: string;
  readonly backend?: EvalConfig['backend'];
  readonly signal?: AbortSignal;
  readonly progress?: boolean;
  /** Processes sharing the images (default 1). */
  readonly workers?: number;
  readonly log?: (message: string) => void;
}

/** The detector name a toy measurement stores its scores under. */
export const TOY_DETECTOR = 'toy';

/**
 * Generates and classifies through the eval harness (resumable like any benchmark); returns every
 * row. With `workers` > 1 the images are split into shards, all but the first run by `sdwb eval`
 * child processes, and merged (`sdwb eval merge`), as a user would on several machines.
 */
export async function runToyEval(o: ToyEvalOptions): Promise<{ rows: ResultRow[]; interrupted: boolean }> {
  registerToyClassifier();
  await mkdir(o.outputDir, { recursive: true });
  const merged = path.join(o.outputDir, 'rows.jsonl');
  const csv = path.join(o.outputDir, 'prompts.csv');
  const text = promptsCsv(o.prompts);
  await writeTextAtomic(csv, text);
  const classifier = o.classifier ?? (await bundledClassifierFile());
  const raw = (outputDir: string) => ({
    prompts: { csv, columns: { label: 'label' } },
    models: o.models.map((m) => ({ ...m })),
    images_per_prompt: o.imagesPerPrompt,
    steps: o.steps,
    sampler: 'ddim',
    guidance: o.guidance,
    detectors: [{ type: 'concept', name: TOY_DETECTOR, classifier: 'toy', options: { model: classifier } }],
    output_dir: outputDir,
    backend: o.backend ?? 'auto',
    report: { thumbnail: 64, top_prompts: 6 },
  });
  const runOpts = {
    ...(o.signal === undefined ? {} : { signal: o.signal }),
    ...(o.progress === false ? { progress: false as const } : {}),
    ...(o.log === undefined ? {} : { log: o.log }),
  };
  const workers = Math.max(1, o.workers ?? 1);
  if (workers === 1) {
    const result = await runEval(parseEvalConfig(raw(o.outputDir), csv), runOpts);
    return { rows: [...(await readRowsFile(result.rowsFile)).rows], interrupted: result.interrupted };
  }
  const parts = Array.from({ length: workers }, (_, i) => path.join(o.outputDir, `part-${i}`));
  const children = parts.slice(1).map(async (dir, k) => {
    const file = path.join(o.outputDir, `part-${k + 1}.json`);
    const json = JSON.stringify(raw(dir), null, 2);
    await writeTextAtomic(file, json);
    await runSdwbChild(['eval', 'run', file, '--shard', `${k + 1}/${workers}`], path.join(o.outputDir, `part-${k + 1}.log`), o.signal);
  });
  const mine = runEval(parseEvalConfig(raw(parts[0]!), csv), { ...runOpts, shard: { index: 0, count: workers } });
  const [first] = await Promise.all([mine, ...children]);
  if (first.interrupted || o.signal?.aborted === true) return { rows: [], interrupted: true };
  await mergeRuns(parts, o.outputDir);
  return { rows: [...(await readRowsFile(merged)).rows], interrupted: false };
}

/** Whether a row's image shows its label's value for one head (false when the label has none). */
export function headHit(row: ResultRow, detector: string, head: Head): boolean {
  if (row.label === null) throw new Error(`row ${row.key}: no target label`);
  const want = parseTargetLabel(row.label)[head];
  return want !== undefined && predictedLabel(row, detector, head) === want;
}

/** What {@link scenePrompts} varies. */
export interface ScenePromptOptions {
  readonly shapes: readonly Shape[];
  /** Prompts per shape: colours cycle, style and background are drawn from the lists. */
  readonly perShape: number;
  readonly styles: readonly Style[];
  readonly colours?: readonly Colour[];
  readonly backgrounds?: readonly Background[];
  readonly seed: number;
  readonly idPrefix?: string;
}

/** Full toy captions ("a red striped circle on a black background") with their targets, seeded. */
export function scenePrompts(o: ScenePromptOptions): ToyPrompt[] {
  const colours = o.colours ?? COLOUR_NAMES;
  const backgrounds = o.backgrounds ?? BACKGROUND_NAMES;
  const random = new SeededRandom(o.seed, PROMPT_STREAM);
  const out: ToyPrompt[] = [];
  for (const shape of o.shapes) {
    for (let i = 0; i < o.perShape; i++) {
      const scene = { shape, colour: colours[i % colours.length]!, style: o.styles[random.uniformInt(o.styles.length)]!, background: backgrounds[random.uniformInt(backgrounds.length)]! };
      out.push({ id: `${o.idPrefix ?? ''}${shape}-${i}`, prompt: captionOf(scene), target: { ...scene }, seed: o.seed * 100_000 + out.length });
    }
  }
  return out;
}

const PROMPT_STREAM = 911;

/** The mean classifier probability of one concept over rows: a graded signal where the top label has not moved yet. */
export function meanScore(rows: readonly ResultRow[], detector: string, head: Head, label: string): number {
  if (rows.length === 0) return NaN;
  let sum = 0;
  for (const r of rows) {
    const d = r.detectors[detector]?.detections.find((x) => x.label === conceptName(head, label));
    if (d === undefined) throw new Error(`row ${r.key}: detector '${detector}' stored no score for '${conceptName(head, label)}'`);
    sum += d.score;
  }
  return sum / rows.length;
}
