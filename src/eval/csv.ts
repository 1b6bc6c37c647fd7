/**
 * A CSV reader for prompt sets, written as a parser of untrusted input.
 *
 * Dialect: what Python's `csv` module (and so pandas' `to_csv`) writes and reads by default —
 * RFC 4180 with its usual leniencies:
 * - fields separated by `,`; records end at `\r\n`, `\n` or a lone `\r` outside quotes;
 * - a field that starts with `"` is quoted: it runs to the next `"` not followed by another `"`
 *   (`""` inside it is one quote), and may hold delimiters and line breaks verbatim;
 * - a `"` inside an unquoted field is an ordinary character (`5" tall`), as Python reads it;
 * - text between a closing quote and the next delimiter is appended to the field (`"ab"c` →
 *   `abc`), as Python's non-strict reader does;
 * - a UTF-8 byte-order mark at the start is dropped; blank lines are skipped (pandas'
 *   `skip_blank_lines`); a missing final line break is fine.
 *
 * Refused, with the line number: a quoted field still open at the end of the input (a truncated
 * or corrupt file — silently swallowing the rest of the file into one prompt would be worse), NUL
 * characters, invalid UTF-8, and inputs past the size limits (which bound memory and time: the
 * parser is one linear pass).
 */

/** A malformed or oversized CSV input; `line` is 1-based. */
export class CsvError extends Error {
  override name = 'CsvError';
  constructor(
    readonly source: string,
    readonly line: number,
    readonly reason: string,
  ) {
    super(`${source}:${line}: ${reason}`);
  }
}

/** Bounds on what one CSV may hold. */
export interface CsvLimits {
  /** Characters of input (default 256 Mi). */
  readonly maxChars?: number;
  /** Records, header included (default 10 M). */
  readonly maxRecords?: number;
  /** Fields in one record (default 10 000). */
  readonly maxFields?: number;
  /** Characters in one field (default 1 Mi). */
  readonly maxFieldChars?: number;
}

/** One record: its fields and the line it starts on (1-based). */
export interface CsvRecord {
  readonly fields: readonly string[];
  readonly line: number;
}

/** A parsed table: the first record as header, the others as rows (fields not yet checked against it). */
export interface CsvTable {
  readonly header: readonly string[];
  readonly rows: readonly CsvRecord[];
}

const DEFAULT_LIMITS: Required<CsvLimits> = {
  maxChars: 256 * 1024 * 1024,
  maxRecords: 10_000_000,
  maxFields: 10_000,
  maxFieldChars: 1024 * 1024,
};

const QUOTE = 0x22;
const COMMA = 0x2c;
const CR = 0x0d;
const LF = 0x0a;

/** Decodes CSV bytes as UTF-8 (fatal on invalid sequences, BOM dropped). */
export function decodeCsvBytes(bytes: Uint8Array, source: string): string {
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  } catch {
    const bad = firstInvalidUtf8(bytes);
    let line = 1;
    for (let i = 0; i < bad; i++) if (bytes[i] === LF) line++;
    throw new CsvError(source, line, `not valid UTF-8 at byte ${bad}; save the file as UTF-8`);
  }
}

// Offset of the first byte that does not start or continue a well-formed UTF-8 sequence
// (overlong forms, surrogates and code points past U+10FFFF count as invalid, as TextDecoder has it).
function firstInvalidUtf8(b: Uint8Array): number {
  let i = 0;
  while (i < b.length) {
    const c = b[i]!;
    let need: number;
    let lo = 0x80;
    let hi = 0xbf;
    if (c < 0x80) need = 0;
    else if (c >= 0xc2 && c <= 0xdf) need = 1;
    else if (c >= 0xe0 && c <= 0xef) {
      need = 2;
      if (c === 0xe0) lo = 0xa0;
      if (c === 0xed) hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      need = 3;
      if (c === 0xf0) lo = 0x90;
      if (c === 0xf4) hi = 0x8f;
    } else return i;
    for (let k = 1; k <= need; k++) {
      const d = b[i + k];
      const min = k === 1 ? lo : 0x80;
      const max = k === 1 ? hi : 0xbf;
      if (d === undefined || d < min || d > max) return i;
    }
    i += need + 1;
  }
  return b.length;
}

/** Parses CSV text into records (see the module comment for the dialect). */
export function parseCsvRecords(text: string, source = 'csv', limits: CsvLimits = {}): CsvRecord[] {
  const lim = { ...DEFAULT_LIMITS, ...limits };
  if (text.length > lim.maxChars) throw new CsvError(source, 1, `${text.length} characters exceed the limit of ${lim.maxChars}`);
  const nul = text.indexOf('\0');
  if (nul >= 0) throw new CsvError(source, 1 + countLineBreaks(text, 0, nul), 'contains a NUL character (not a text CSV file?)');
  const start = text.charCodeAt(0) === 0xfeff ? 1 : 0;
  const records: CsvRecord[] = [];
  const n = text.length;
  let i = start;
  let line = 1;
  while (i < n) {
    // A blank line (pandas skips them; a quoted empty field `""` is a record, not a blank line).
    const first = text.charCodeAt(i);
    if (first === LF || first === CR) {
      i += first === CR && i + 1 < n && text.charCodeAt(i + 1) === LF ? 2 : 1;
      line++;
      continue;
    }
    // One record.
    const recordLine = line;
    const fields: string[] = [];
    let atRecordEnd = false;
    while (!atRecordEnd) {
      let field: string;
      if (i < n && text.charCodeAt(i) === QUOTE) {
        // Quoted field: collect chunks between doubled quotes.
        const openLine = line;
        i++;
        const parts: string[] = [];
        let length = 0;
        let chunkStart = i;
        for (;;) {
          const q = text.indexOf('"', i);
          if (q < 0) {
            throw new CsvError(source, openLine, 'a quoted field opened here is never closed (truncated file, or a stray " in a quoted field)');
          }
          line += countLineBreaks(text, i, q);
          if (q + 1 < n && text.charCodeAt(q + 1) === QUOTE) {
            parts.push(text.slice(chunkStart, q + 1));
            length += q + 1 - chunkStart;
            i = q + 2;
            chunkStart = i;
          } else {
            parts.push(text.slice(chunkStart, q));
            length += q - chunkStart;
            i = q + 1;
            break;
          }
          if (length > lim.maxFieldChars) throw new CsvError(source, openLine, `a field is longer than ${lim.maxFieldChars} characters`);
        }
        // Python's non-strict reader keeps text between the closing quote and the delimiter.
        const tailEnd = unquotedEnd(text, i);
        if (tailEnd > i) {
          parts.push(text.slice(i, tailEnd));
          length += tailEnd - i;
          i = tailEnd;
        }
        if (length > lim.maxFieldChars) throw new CsvError(source, openLine, `a field is longer than ${lim.maxFieldChars} characters`);
        field = parts.join('');
      } else {
        const end = unquotedEnd(text, i);
        if (end - i > lim.maxFieldChars) throw new CsvError(source, line, `a field is longer than ${lim.maxFieldChars} characters`);
        field = text.slice(i, end);
        i = end;
      }
      fields.push(field);
      if (fields.length > lim.maxFields) throw new CsvError(source, recordLine, `more than ${lim.maxFields} fields in one record`);
      // i is at a delimiter, a line break or the end.
      if (i >= n) atRecordEnd = true;
      else {
        const c = text.charCodeAt(i);
        if (c === COMMA) i++;
        else {
          // CR, LF or CRLF.
          i += c === CR && i + 1 < n && text.charCodeAt(i + 1) === LF ? 2 : 1;
          line++;
          atRecordEnd = true;
        }
      }
      // A delimiter right before the end of input still opens one more (empty) field.
      if (!atRecordEnd && i >= n) {
        fields.push('');
        atRecordEnd = true;
      }
    }
    records.push({ fields, line: recordLine });
    if (records.length > lim.maxRecords) throw new CsvError(source, recordLine, `more than ${lim.maxRecords} records`);
  }
  return records;
}

/** Parses CSV text and splits off the header (the first record); an input with no records is an error. */
export function parseCsv(text: string, source = 'csv', limits: CsvLimits = {}): CsvTable {
  const records = parseCsvRecords(text, source, limits);
  const first = records[0];
  if (first === undefined) throw new CsvError(source, 1, 'the file is empty (expected a header line)');
  return { header: first.fields, rows: records.slice(1) };
}

// End of an unquoted run: the next delimiter, line break or the end of the input.
function unquotedEnd(text: string, from: number): number {
  const n = text.length;
  let i = from;
  while (i < n) {
    const c = text.charCodeAt(i);
    if (c === COMMA || c === LF || c === CR) return i;
    i++;
  }
  return n;
}

function countLineBreaks(text: string, from: number, to: number): number {
  let count = 0;
  for (let i = from; i < to; i++) {
    const c = text.charCodeAt(i);
    if (c === LF) count++;
    else if (c === CR && (i + 1 >= to || text.charCodeAt(i + 1) !== LF)) count++;
  }
  return count;
}

