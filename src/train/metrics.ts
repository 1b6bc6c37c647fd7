/**
 * `metrics.jsonl`: one JSON object per line — `step`, `loss`, `lr`, `time` and any extra numbers.
 *
 * Crash safety: each line (with its `\n`) goes to the OS in one `write` call on a file opened for
 * appending, so after `kill -9` the file holds whole lines plus at most one partial last line
 * (only if the kill landed inside that call). The reader ignores such a tail; reopening a file for
 * appending cuts it off first, so the next line never glues onto a fragment.
 */
import { ftruncateSync, fstatSync, readSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { AppendFile } from './append-file.js';

/** One line of metrics.jsonl. Non-finite numbers are written as `null` (JSON has no NaN). */
export interface MetricsRecord {
  readonly step: number;
  readonly loss: number | null;
  readonly lr: number | null;
  /** Unix time in seconds. */
  readonly time: number;
  readonly [extra: string]: number | null;
}

/** What a caller passes for one line; `time` defaults to now. */
export interface MetricsInput {
  readonly step: number;
  readonly loss: number;
  readonly lr: number;
  readonly time?: number;
  readonly [extra: string]: number | undefined;
}

/** Appends records to a metrics.jsonl file, one whole line per write. */
export class MetricsWriter {
  readonly #file: AppendFile;
  readonly #now: () => number;

  private constructor(file: AppendFile, now: () => number) {
    this.#file = file;
    this.#now = now;
  }

  /** Absolute path of the metrics file. */
  get path(): string {
    return this.#file.path;
  }

  /**
   * Opens (creating folders and file as needed) `file` for appending. A partial last line left by
   * a killed run is cut off first.
   */
  static open(file: string, opts: { now?: () => number } = {}): MetricsWriter {
    return new MetricsWriter(AppendFile.open(file, 'metrics writer', dropPartialTail), opts.now ?? Date.now);
  }

  /** Appends one record as a single line. */
  write(record: MetricsInput): void {
    if (!Number.isSafeInteger(record.step)) {
      throw new Error(`${this.path}: step must be an integer, got ${record.step}`);
    }
    const { step, loss, lr, time, ...extra } = record;
    const line: Record<string, number | null> = {
      step,
      loss: finiteOrNull(loss),
      lr: finiteOrNull(lr),
      time: time ?? this.#now() / 1000,
    };
    for (const [k, v] of Object.entries(extra)) {
      if (v !== undefined) line[k] = finiteOrNull(v);
    }
    this.#file.append(Buffer.from(`${JSON.stringify(line)}\n`, 'utf8'));
  }

  /** Forces written lines to stable storage. */
  flush(): void {
    this.#file.flush();
  }

  /** Flushes and closes; idempotent. */
  close(): void {
    this.#file.close();
  }
}

function finiteOrNull(x: number): number | null {
  return Number.isFinite(x) ? x : null;
}

// Truncates the file after its last '\n' (or to empty when it has none).
function dropPartialTail(fd: number): void {
  const size = fstatSync(fd).size;
  if (size === 0) return;
  const chunk = Buffer.alloc(Math.min(size, 64 * 1024));
  let end = size;
  while (end > 0) {
    const start = Math.max(0, end - chunk.length);
    const n = readSync(fd, chunk, 0, end - start, start);
    const nl = chunk.subarray(0, n).lastIndexOf(0x0a);
    if (nl >= 0) {
      const keep = start + nl + 1;
      if (keep !== size) ftruncateSync(fd, keep);
      return;
    }
    end = start;
  }
  ftruncateSync(fd, 0);
}

/** Parses metrics.jsonl text; a last line without its `\n` (a crash mid-write) is ignored. */
export function parseMetrics(text: string, file = 'metrics.jsonl'): MetricsRecord[] {
  const lines = text.split('\n');
  // After split, the element past the final '\n' is '' for a complete file, a fragment otherwise.
  lines.pop();
  const out: MetricsRecord[] = [];
  lines.forEach((line, i) => {
    if (line.trim() === '') return;
    let value: unknown;
    try {
      value = JSON.parse(line);
    } catch (e) {
      throw new Error(`${file}: line ${i + 1} is not valid JSON (${(e as Error).message})`);
    }
    out.push(checkRecord(value, file, i + 1));
  });
  return out;
}

/** Reads every complete record of a metrics.jsonl file. */
export async function readMetrics(file: string): Promise<MetricsRecord[]> {
  return parseMetrics(await readFile(file, 'utf8'), file);
}

function checkRecord(value: unknown, file: string, line: number): MetricsRecord {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new Error(`${file}: line ${line}: expected a JSON object`);
  }
  const rec = value as Record<string, unknown>;
  for (const [k, v] of Object.entries(rec)) {
    if (v !== null && typeof v !== 'number') {
      throw new Error(`${file}: line ${line}: field '${k}' should be a number or null, found ${JSON.stringify(v)}`);
    }
  }
  if (typeof rec['step'] !== 'number' || typeof rec['time'] !== 'number') {
    throw new Error(`${file}: line ${line}: 'step' and 'time' must be numbers`);
  }
  if (!('loss' in rec) || !('lr' in rec)) {
    throw new Error(`${file}: line ${line}: missing 'loss' or 'lr'`);
  }
  return rec as MetricsRecord;
}
