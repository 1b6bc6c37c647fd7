/**
 * Result rows: one JSON object per image, one per line (`rows.jsonl`), and the crash-safe way the
 * runner appends them.
 *
 * Crash safety rests on three rules: an image file is written atomically (temporary file +
 * rename) before its row; a row is appended in one write and fsynced; and on start a trailing
 * line without its newline — a row torn by a kill — is cut off. So after any crash every row in
 * the file is whole, every row's image exists, and an image without a row is complete (it is
 * reused, not regenerated). One writer per rows file is enforced with a lock file.
 */
import { open, readFile, rm, stat, truncate, writeFile } from 'node:fs/promises';
import path from 'node:path';

import { z } from 'zod';

/** One stored detection. */
export interface RowDetection {
  readonly label: string;
  readonly score: number;
  readonly box?: readonly [number, number, number, number];
}

/** One detector's output for an image. */
export interface RowDetectorResult {
  readonly version: string;
  readonly detections: readonly RowDetection[];
}

/** One generated image and what the detectors found in it. */
export interface ResultRow {
  /** `<model>/<prompt id>/<image index>`: unique in a run. */
  readonly key: string;
  /** Short hash of the settings that shape every row (see `runFingerprint`). */
  readonly run: string;
  readonly preset: string | null;
  readonly model: string;
  readonly model_hash: string;
  readonly prompt_id: string;
  /** The prompt's 0-based row in the CSV. */
  readonly prompt_row: number;
  readonly prompt: string;
  readonly categories: readonly string[];
  readonly label: string | null;
  readonly image_index: number;
  /** Decimal text: seeds reach past 2⁵³. */
  readonly seed: string;
  readonly guidance: number;
  readonly steps: number;
  readonly sampler: string;
  readonly width: number;
  readonly height: number;
  /** Image path relative to the output folder. */
  readonly file: string;
  readonly image_sha256: string;
  readonly detectors: Readonly<Record<string, RowDetectorResult>>;
}

const detectionSchema = z.strictObject({
  label: z.string(),
  score: z.number(),
  box: z.tuple([z.number(), z.number(), z.number(), z.number()]).optional(),
});

/** Validates one parsed row (rows files are read back on resume and merge). */
export const resultRowSchema = z.strictObject({
  key: z.string().min(1),
  run: z.string().min(1),
  preset: z.string().nullable(),
  model: z.string().min(1),
  model_hash: z.string(),
  prompt_id: z.string().min(1),
  prompt_row: z.number().int().min(0),
  prompt: z.string(),
  categories: z.array(z.string()),
  label: z.string().nullable(),
  image_index: z.number().int().min(0),
  seed: z.string().regex(/^-?\d+$/),
  guidance: z.number(),
  steps: z.number().int(),
  sampler: z.string(),
  width: z.number().int(),
  height: z.number().int(),
  file: z.string().min(1),
  image_sha256: z.string().regex(/^[0-9a-f]{64}$/),
  detectors: z.record(z.string(), z.strictObject({ version: z.string(), detections: z.array(detectionSchema) })),
});

/** A rows file that cannot be used as it is (a corrupt whole line, a row of another run). */
export class RowsFileError extends Error {
  override name = 'RowsFileError';
}

/** The serialized form of a row: JSON plus the newline. */
export function rowLine(row: ResultRow): string {
  return `${JSON.stringify(row)}\n`;
}

/** Result of reading a rows file. */
export interface ReadRows {
  readonly rows: ResultRow[];
  /** Bytes of a torn trailing line that were dropped (0 when the file ended cleanly). */
  readonly droppedBytes: number;
}

/**
 * Reads a rows file. With `repair`, a trailing partial line (no newline: a write cut short by a
 * kill) is truncated away on disk; without it, it is only ignored. A missing file has no rows.
 */
export async function readRowsFile(file: string, opts: { repair?: boolean } = {}): Promise<ReadRows> {
  let bytes: Buffer;
  try {
    bytes = await readFile(file);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return { rows: [], droppedBytes: 0 };
    throw e;
  }
  const lastNewline = bytes.lastIndexOf(0x0a);
  const keep = lastNewline + 1;
  const droppedBytes = bytes.length - keep;
  if (droppedBytes > 0 && opts.repair === true) await truncate(file, keep);
  const text = bytes.subarray(0, keep).toString('utf8');
  const rows: ResultRow[] = [];
  const lines = text.split('\n');
  lines.pop(); // after the final newline
  for (const [i, line] of lines.entries()) {
    let value: unknown;
    try {
      value = JSON.parse(line);
    } catch {
      throw new RowsFileError(`${file}:${i + 1}: not a JSON row (the file was edited or damaged; delete this line to regenerate that image's row)`);
    }
    const parsed = resultRowSchema.safeParse(value);
    if (!parsed.success) {
      const issue = parsed.error.issues[0]!;
      throw new RowsFileError(`${file}:${i + 1}: not a result row (${issue.path.join('.') || 'row'}: ${issue.message})`);
    }
    rows.push(parsed.data as ResultRow);
  }
  return { rows, droppedBytes };
}

/** Appends rows to a file, one fsynced write each. */
export class RowWriter {
  private constructor(
    readonly file: string,
    private readonly handle: Awaited<ReturnType<typeof open>>,
  ) {}

  /** Opens `file` for appending (creating it). */
  static async open(file: string): Promise<RowWriter> {
    return new RowWriter(file, await open(file, 'a'));
  }

  /** Appends one row and waits until it is on disk. */
  async append(row: ResultRow): Promise<void> {
    const bytes = Buffer.from(rowLine(row), 'utf8');
    let done = 0;
    while (done < bytes.length) done += (await this.handle.write(bytes, done, bytes.length - done)).bytesWritten;
    await this.handle.sync();
  }

  async close(): Promise<void> {
    await this.handle.close();
  }
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Takes the lock of a rows file (`.<name>.lock` beside it, holding the pid). A lock whose process
 * is gone (a killed run) is taken over; a live one is an error naming the pid.
 */
export async function lockRowsFile(rowsFile: string): Promise<() => Promise<void>> {
  const lock = path.join(path.dirname(rowsFile), `.${path.basename(rowsFile)}.lock`);
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      await writeFile(lock, `${process.pid}\n`, { flag: 'wx' });
      return async () => {
        await rm(lock, { force: true });
      };
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      const owner = Number((await readFile(lock, 'utf8').catch(() => '')).trim());
      if (Number.isInteger(owner) && owner > 0 && owner !== process.pid && pidAlive(owner)) {
        throw new RowsFileError(`${rowsFile} is being written by another run (pid ${owner}); wait for it, or use another output_dir or --shard`);
      }
      await rm(lock, { force: true });
    }
  }
  throw new RowsFileError(`${rowsFile}: cannot take the lock ${lock}`);
}

/** Whether a file exists (and is a file). */
export async function fileExists(file: string): Promise<boolean> {
  return (await stat(file).catch(() => undefined))?.isFile() === true;
}
