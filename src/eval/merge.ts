/**
 * Combining the shards of a run (`sdwb eval merge <dirs…> --out <dir>`): every input must be the
 * same benchmark (same run fingerprint), rows seen twice must be identical, every planned image
 * must have a row and an image file whose sha256 matches it. The output holds the images,
 * `rows.jsonl` in plan order — byte-for-byte what one unsharded run writes — the summary and the
 * report.
 */
import { createHash } from 'node:crypto';
import { copyFile, mkdir, readdir, readFile, rename } from 'node:fs/promises';
import path from 'node:path';

import { writeFileAtomic } from '../io/atomic.js';
import { parseEvalConfig } from './config.js';
import { readRowsFile, rowLine, RowsFileError, type ResultRow } from './rows.js';
import { fingerprintDifferences, planRun, type RunManifest } from './runner.js';
import { writeRunOutputs } from './summary.js';

/** What a merge produced. */
export interface MergeResult {
  readonly outputDir: string;
  readonly rows: number;
  readonly copiedImages: number;
  readonly outputs: readonly string[];
  /** Notes: torn lines ignored, rows outside the plan dropped. */
  readonly notes: readonly string[];
}

async function readManifest(dir: string): Promise<RunManifest> {
  const file = path.join(dir, 'run.json');
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch {
    throw new RowsFileError(`${dir}: no run.json — not the output folder of an sdwb eval run`);
  }
  try {
    return JSON.parse(text) as RunManifest;
  } catch {
    throw new RowsFileError(`${file}: not valid JSON`);
  }
}

/** Merges the shard folders `dirs` into `outDir` (which may be one of them). */
export async function mergeRuns(dirs: readonly string[], outDir: string): Promise<MergeResult> {
  if (dirs.length === 0) throw new Error('merge: give at least one run folder');
  const inputs = dirs.map((d) => path.resolve(d));
  const out = path.resolve(outDir);
  const notes: string[] = [];

  // 1. One benchmark.
  const manifests = await Promise.all(inputs.map(readManifest));
  const first = manifests[0]!;
  manifests.forEach((m, i) => {
    if (m.fingerprint !== first.fingerprint) {
      const diff = fingerprintDifferences(first.fields, m.fields);
      throw new RowsFileError(`${inputs[i]} is a different benchmark from ${inputs[0]} (settings differ: ${diff.join(', ') || 'unknown'})`);
    }
  });
  const cfg = parseEvalConfig({ ...(first.config as unknown as Record<string, unknown>), output_dir: out }, path.join(inputs[0]!, 'run.json'));
  const plan = await planRun(cfg);
  if (plan.fingerprint !== first.fingerprint) {
    const diff = fingerprintDifferences(first.fields, plan.fingerprintFields);
    throw new RowsFileError(`the runs were made with other settings than their config gives here (${diff.join(', ')}): was the prompt file changed?`);
  }

  // 2. Rows from every rows file, each key once.
  const found = new Map<string, { row: ResultRow; dir: string; line: string }>();
  for (const dir of inputs) {
    const names = (await readdir(dir)).filter((n) => /^rows(\.shard-\d+-of-\d+)?\.jsonl$/.test(n)).sort();
    if (names.length === 0) notes.push(`${dir}: no rows file`);
    for (const name of names) {
      const file = path.join(dir, name);
      const { rows, droppedBytes } = await readRowsFile(file);
      if (droppedBytes > 0) notes.push(`${file}: ignored a torn last line (${droppedBytes} bytes) of an interrupted run`);
      for (const row of rows) {
        if (row.run !== plan.fingerprint) throw new RowsFileError(`${file}: row ${row.key} belongs to run ${row.run}, not ${plan.fingerprint}`);
        const line = rowLine(row);
        const seen = found.get(row.key);
        if (seen !== undefined && seen.line !== line) {
          throw new RowsFileError(`row ${row.key} differs between ${seen.dir} and ${dir}: the runs did not produce the same result (different engine, backend or model files?)`);
        }
        if (seen === undefined) found.set(row.key, { row, dir, line });
      }
    }
  }

  // 3. Completeness.
  const planned = new Set(plan.items.map((it) => it.key));
  const missing = plan.items.filter((it) => !found.has(it.key));
  if (missing.length > 0) {
    const shown = missing.slice(0, 5).map((it) => `${it.key} (plan position ${it.index})`);
    throw new RowsFileError(
      `merge: ${missing.length} of ${plan.items.length} planned images have no row (${shown.join(', ')}${missing.length > 5 ? ', …' : ''}); finish those shards (re-run them to resume) and merge again`,
    );
  }
  const extra = [...found.keys()].filter((k) => !planned.has(k));
  if (extra.length > 0) notes.push(`dropped ${extra.length} rows outside the plan (a run with a larger limit?)`);

  // 4. Images, checked against their rows, copied into the output.
  await mkdir(out, { recursive: true });
  let copied = 0;
  for (const it of plan.items) {
    const { row, dir } = found.get(it.key)!;
    const source = path.join(dir, row.file);
    let bytes: Buffer;
    try {
      bytes = await readFile(source);
    } catch {
      throw new RowsFileError(`${source}: the image of row ${row.key} is missing`);
    }
    if (createHash('sha256').update(bytes).digest('hex') !== row.image_sha256) throw new RowsFileError(`${source}: does not match the sha256 in its row ${row.key}`);
    const target = path.join(out, row.file);
    if (path.resolve(source) !== target) {
      await mkdir(path.dirname(target), { recursive: true });
      const tmp = `${target}.merge-tmp`;
      await copyFile(source, tmp);
      await rename(tmp, target);
      copied++;
    }
  }

  // 5. Manifest, rows in plan order, summary and report.
  const rows = plan.items.map((it) => found.get(it.key)!.row);
  const manifest: RunManifest = { ...first, config: cfg };
  await writeFileAtomic(path.join(out, 'run.json'), async (h) => {
    await h.writeFile(`${JSON.stringify(manifest, null, 2)}\n`);
  });
  await writeFileAtomic(path.join(out, 'rows.jsonl'), async (h) => {
    await h.writeFile(rows.map(rowLine).join(''));
  });
  const outputs = await writeRunOutputs(out, plan, rows);
  return { outputDir: out, rows: rows.length, copiedImages: copied, outputs, notes };
}

/** Regenerates summary.json, summary.csv and report.html of a complete run folder from its rows. */
export async function rebuildReport(dir: string): Promise<readonly string[]> {
  const result = await mergeRuns([dir], dir);
  return result.outputs;
}
