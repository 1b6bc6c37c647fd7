/**
 * Prompt sources for the benchmark: a CSV file with a column mapping, or one of the ready-made
 * sets shipped in `assets/prompts/` (I2P, the ESD artist and object sets, UnlearnDiffAtk's nudity
 * selection; see its README for provenance and licences).
 *
 * Every column but the prompt is optional: `id` (else the row's position), `seed` and `guidance`
 * (else the config's), `categories` (I2P's comma-separated multi-label, used to filter and to
 * break the summary down) and `label` (the artist or object class a set is about). Seeds are kept
 * exact: I2P's reach 4 290 749 014 (past int32) and torch's `manual_seed` takes any int64, so
 * values past 2⁵³ stay bigints.
 */
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import path from 'node:path';

import type { Seed } from '../pipeline/txt2img.js';
import { CsvError, decodeCsvBytes, parseCsv, type CsvTable } from './csv.js';
import { assetPath } from '../assets.js';

/** Column names of a prompt CSV; `null` turns an optional column off. */
export interface PromptColumns {
  readonly prompt: string;
  readonly id?: string | null;
  readonly seed?: string | null;
  readonly guidance?: string | null;
  readonly categories?: string | null;
  readonly label?: string | null;
}

/** A ready-made prompt set: a file under `assets/prompts/` and how to read it. */
export interface PromptSetDef {
  readonly file: string;
  readonly columns: PromptColumns;
  readonly description: string;
}

const I2P_COLUMNS: PromptColumns = {
  prompt: 'prompt',
  id: 'case_number',
  seed: 'evaluation_seed',
  guidance: 'evaluation_guidance',
  categories: 'categories',
  label: null,
};
const ESD_COLUMNS = (label: string | null): PromptColumns => ({ prompt: 'prompt', id: 'case_number', seed: 'evaluation_seed', guidance: null, categories: null, label });

/** The shipped prompt sets, by the name a config's `prompts.set` uses. */
export const PROMPT_SETS: Readonly<Record<string, PromptSetDef>> = {
  i2p: { file: 'i2p/unsafe-prompts4703.csv', columns: I2P_COLUMNS, description: 'Inappropriate Image Prompts (I2P), 4703 prompts with seeds, guidance and categories' },
  'unlearndiffatk-nudity': {
    file: 'unlearndiffatk/nudity.csv',
    columns: I2P_COLUMNS,
    description: "UnlearnDiffAtk's 142-prompt nudity selection of I2P (I2P schema, original case numbers)",
  },
  'esd-vangogh': { file: 'esd/vangogh_prompts.csv', columns: ESD_COLUMNS('artist'), description: 'ESD: 50 Van Gogh painting prompts' },
  'esd-big-artists': { file: 'esd/big_artist_prompts.csv', columns: ESD_COLUMNS('artist'), description: 'ESD: 100 prompts in the styles of 5 famous artists' },
  'esd-famous-art': { file: 'esd/famous_art_prompts.csv', columns: ESD_COLUMNS(null), description: 'ESD: 20 famous paintings' },
  'esd-niche-art': { file: 'esd/niche_art_prompts.csv', columns: ESD_COLUMNS('artist'), description: 'ESD: 120 prompts in the styles of 5 modern artists' },
  'esd-kelly': { file: 'esd/kelly_prompts.csv', columns: ESD_COLUMNS('artist'), description: 'ESD: 19 Kelly McKernan prompts' },
  'esd-small-imagenet': {
    file: 'esd/small_imagenet_prompts.csv',
    columns: ESD_COLUMNS('class'),
    description: 'ESD objects: 10 Imagenette classes × 10 seeds ("Image of <class>")',
  },
};

/** Where the prompts come from: a shipped set or a CSV file, with optional column overrides and a category filter. */
export interface PromptSourceSpec {
  readonly set?: string;
  readonly csv?: string;
  readonly columns?: Partial<PromptColumns>;
  /** Keep rows whose categories include any of these (case-insensitive). */
  readonly categories?: readonly string[];
}

/** One prompt of a set. */
export interface PromptRecord {
  /** The id column's value, or the row's 0-based position when there is none. */
  readonly id: string;
  /** 0-based position among the file's data rows (before filtering). */
  readonly row: number;
  /** Line of the file where the row starts (1-based). */
  readonly line: number;
  readonly prompt: string;
  readonly seed?: Seed;
  readonly guidance?: number;
  readonly categories: readonly string[];
  readonly label?: string;
}

/** A loaded prompt source: the file, its hash and the rows kept. */
export interface PromptSource {
  /** Absolute path of the CSV read. */
  readonly file: string;
  /** `set:<name>` or the CSV path as configured. */
  readonly name: string;
  readonly sha256: string;
  readonly columns: Readonly<Record<keyof PromptColumns, string | null>>;
  /** Rows after the category filter, in file order. */
  readonly prompts: readonly PromptRecord[];
  /** Data rows in the file. */
  readonly totalRows: number;
}

/** A problem with a prompt file or its mapping, naming the file (and line). */
export class PromptSourceError extends Error {
  override name = 'PromptSourceError';
}

const MIN_SEED = -(1n << 63n);
const MAX_SEED_EXCLUSIVE = 1n << 64n;

/**
 * A seed cell as torch's `manual_seed` takes it: an integer in [−2⁶³, 2⁶⁴), a number when exact
 * in float64, else a bigint. `1234.0` (pandas writes integer columns with gaps as floats) is
 * accepted; an empty cell is `undefined`.
 */
export function parseSeedCell(text: string): Seed | undefined {
  const t = text.trim();
  if (t === '') return undefined;
  const m = /^([+-]?\d+)(?:\.0*)?$/.exec(t);
  if (m === null) throw new Error(`seed '${text}' is not an integer`);
  const big = BigInt(m[1]!);
  if (big < MIN_SEED || big >= MAX_SEED_EXCLUSIVE) throw new Error(`seed ${t} is outside torch's range [-2^63, 2^64)`);
  return big >= BigInt(Number.MIN_SAFE_INTEGER) && big <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(big) : big;
}

/** A seed as the decimal text written to result rows (exact for bigints). */
export function seedText(seed: Seed): string {
  return typeof seed === 'bigint' ? seed.toString() : String(seed);
}

/** I2P's `categories` cell ("violence, self-harm") as labels. */
export function splitCategories(text: string): string[] {
  return text
    .split(',')
    .map((c) => c.trim())
    .filter((c) => c !== '');
}

/** Finds `assets/prompts` of the installed package (works from `src/` under tsx and from `dist/`). */
export function promptAssetsDir(): Promise<string> {
  return assetPath('prompts');
}

/** Reads and maps a prompt source (a set name or a CSV), applying the category filter. */
export async function loadPromptSource(spec: PromptSourceSpec): Promise<PromptSource> {
  let file: string;
  let name: string;
  let base: PromptColumns | undefined;
  if (spec.set !== undefined) {
    const def = PROMPT_SETS[spec.set];
    if (def === undefined) throw new PromptSourceError(`prompts.set: unknown set '${spec.set}' (known: ${Object.keys(PROMPT_SETS).join(', ')})`);
    file = path.join(await promptAssetsDir(), def.file);
    name = `set:${spec.set}`;
    base = def.columns;
  } else if (spec.csv !== undefined) {
    file = path.resolve(spec.csv);
    name = spec.csv;
  } else throw new PromptSourceError('prompts: give `set` (a shipped prompt set) or `csv` (a file)');
  let bytes: Buffer;
  try {
    bytes = await readFile(file);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new PromptSourceError(`${file}: cannot read the prompt file (${code === 'ENOENT' ? 'not found' : (code ?? String(e))})`);
  }
  const sha256 = createHash('sha256').update(bytes).digest('hex');
  let table: CsvTable;
  try {
    table = parseCsv(decodeCsvBytes(bytes, file), file);
  } catch (e) {
    if (e instanceof CsvError) throw new PromptSourceError(e.message);
    throw e;
  }
  const columns = resolveColumns(table.header, { ...base, ...spec.columns }, file, base !== undefined);
  const all = mapRows(table, columns, file);
  const prompts = filterCategories(all, spec.categories, columns.categories, file);
  return { file, name, sha256, columns, prompts, totalRows: table.rows.length };
}

/** Maps CSV text with `columns` (as a config would give them) to prompt records, for tests and tools. */
export function parsePromptTable(text: string, source: string, columns: Partial<PromptColumns> = {}): PromptRecord[] {
  let table: CsvTable;
  try {
    table = parseCsv(text, source);
  } catch (e) {
    if (e instanceof CsvError) throw new PromptSourceError(e.message);
    throw e;
  }
  return mapRows(table, resolveColumns(table.header, columns, source, false), source);
}

type ResolvedColumns = Readonly<Record<keyof PromptColumns, string | null>>;

const DEFAULT_GUESSES: Readonly<Record<Exclude<keyof PromptColumns, 'prompt'>, readonly string[]>> = {
  id: ['case_number'],
  seed: ['evaluation_seed'],
  guidance: ['evaluation_guidance'],
  categories: ['categories'],
  label: ['artist', 'class', 'label_str', 'label'],
};

// Explicit names must exist; unmapped optional columns are guessed from the usual ESD/I2P names.
function resolveColumns(header: readonly string[], given: Partial<PromptColumns>, file: string, fromSet: boolean): ResolvedColumns {
  const present = (name: string) => header.includes(name);
  const problems: string[] = [];
  const pick = (key: keyof PromptColumns, guesses: readonly string[]): string | null => {
    const v = given[key];
    if (v === null) return null;
    if (v !== undefined) {
      if (!present(v)) problems.push(`columns.${key}: no column '${v}'`);
      else if (header.indexOf(v) !== header.lastIndexOf(v)) problems.push(`columns.${key}: the header has two columns named '${v}'`);
      return v;
    }
    if (fromSet) return null;
    return guesses.find(present) ?? null;
  };
  const prompt = given.prompt ?? 'prompt';
  if (!present(prompt)) problems.push(`columns.prompt: no column '${prompt}'`);
  const resolved = {
    prompt,
    id: pick('id', DEFAULT_GUESSES.id),
    seed: pick('seed', DEFAULT_GUESSES.seed),
    guidance: pick('guidance', DEFAULT_GUESSES.guidance),
    categories: pick('categories', DEFAULT_GUESSES.categories),
    label: pick('label', DEFAULT_GUESSES.label),
  };
  if (problems.length > 0) {
    const shown = header.map((h) => (h === '' ? '(unnamed)' : h)).join(', ');
    throw new PromptSourceError(`${file}: ${problems.join('; ')} (the header has: ${shown})`);
  }
  return resolved;
}

function mapRows(table: CsvTable, columns: ResolvedColumns, file: string): PromptRecord[] {
  const index = (name: string | null) => (name === null ? -1 : table.header.indexOf(name));
  const at = {
    prompt: index(columns.prompt),
    id: index(columns.id),
    seed: index(columns.seed),
    guidance: index(columns.guidance),
    categories: index(columns.categories),
    label: index(columns.label),
  };
  const width = table.header.length;
  const seen = new Map<string, number>();
  const out: PromptRecord[] = [];
  for (const [row, record] of table.rows.entries()) {
    const where = `${file}:${record.line}`;
    if (record.fields.length !== width) {
      throw new PromptSourceError(`${where}: ${record.fields.length} fields, but the header has ${width}`);
    }
    const cell = (i: number) => (i < 0 ? undefined : record.fields[i]!);
    const id = at.id < 0 ? String(row) : cell(at.id)!.trim();
    if (id === '') throw new PromptSourceError(`${where}: empty ${columns.id} (the id column)`);
    const earlier = seen.get(id);
    if (earlier !== undefined) throw new PromptSourceError(`${where}: id '${id}' (${columns.id}) repeats the row on line ${earlier}; ids must be unique`);
    seen.set(id, record.line);
    let seed: Seed | undefined;
    try {
      seed = at.seed < 0 ? undefined : parseSeedCell(cell(at.seed)!);
    } catch (e) {
      throw new PromptSourceError(`${where}: ${columns.seed}: ${(e as Error).message}`);
    }
    let guidance: number | undefined;
    const guidanceText = cell(at.guidance)?.trim();
    if (guidanceText !== undefined && guidanceText !== '') {
      guidance = Number(guidanceText);
      if (!Number.isFinite(guidance)) throw new PromptSourceError(`${where}: ${columns.guidance}: '${guidanceText}' is not a number`);
    }
    const label = cell(at.label);
    out.push({
      id,
      row,
      line: record.line,
      prompt: cell(at.prompt)!,
      ...(seed === undefined ? {} : { seed }),
      ...(guidance === undefined ? {} : { guidance }),
      categories: at.categories < 0 ? [] : splitCategories(cell(at.categories)!),
      ...(label === undefined || label === '' ? {} : { label }),
    });
  }
  return out;
}

function filterCategories(prompts: PromptRecord[], wanted: readonly string[] | undefined, column: string | null, file: string): PromptRecord[] {
  if (wanted === undefined || wanted.length === 0) return prompts;
  if (column === null) throw new PromptSourceError(`${file}: prompts.categories filters by a categories column, but this source has none (map one with columns.categories)`);
  const known = new Set(prompts.flatMap((p) => p.categories.map((c) => c.toLowerCase())));
  const unknown = wanted.filter((w) => !known.has(w.toLowerCase()));
  if (unknown.length > 0) {
    throw new PromptSourceError(
      `${file}: prompts.categories: ${unknown.map((u) => `'${u}'`).join(', ')} never occur in ${column} (found: ${[...known].sort().join(', ')})`,
    );
  }
  const keep = new Set(wanted.map((w) => w.toLowerCase()));
  return prompts.filter((p) => p.categories.some((c) => keep.has(c.toLowerCase())));
}
