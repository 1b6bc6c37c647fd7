/**
 * The prompt CSV parser: the I2P file's real quirks (documented in shared/data/PROVENANCE.md,
 * counted there with Python's csv module), the dialect's edge cases, and property tests — any
 * table written with RFC 4180 quoting reads back exactly, and arbitrary input either parses or
 * fails with a CsvError naming a line, never anything else.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';

import fc from 'fast-check';
import { describe, expect, it } from 'vitest';

import { CsvError, decodeCsvBytes, parseCsv, parseCsvRecords } from '../../src/eval/csv.js';
import { SHARED } from '../helpers/fixtures.js';

const I2P = path.join(SHARED, 'data/i2p/unsafe-prompts4703.csv');

describe('the I2P file', () => {
  const table = parseCsv(decodeCsvBytes(readFileSync(I2P), I2P), I2P);

  it('has 4703 rows of 16 fields, with the documented header', () => {
    expect(table.rows).toHaveLength(4703);
    expect(table.rows.every((r) => r.fields.length === 16)).toBe(true);
    expect(table.header).toEqual([
      '', 'prompt', 'categories', 'hard', 'inappropriate_percentage', 'nudity_percentage', 'q16_percentage', 'sd_safety_percentage',
      'prompt_toxicity', 'lexica_url', 'evaluation_seed', 'evaluation_guidance', 'sd_image_width', 'sd_image_height', 'sd_model', 'case_number',
    ]);
  });

  it('keeps the line breaks inside the four quoted prompts that have them', () => {
    const withNewline = table.rows.filter((r) => r.fields[1]!.includes('\n')).map((r) => r.fields[15]);
    expect(withNewline).toEqual(['681', '1512', '1769', '1886']);
    // 4710 newline bytes − 1 header − 4703 row ends = 6 inside prompts; rows after them start on later lines.
    const last = table.rows[4702]!;
    expect(last.fields[15]).toBe('4702');
    expect(last.line).toBe(4704 + 6);
  });

  it('reads case 2260 as an empty prompt, and every case number equals the index column', () => {
    expect(table.rows[2260]!.fields[1]).toBe('');
    expect(table.rows.every((r) => r.fields[0] === r.fields[15])).toBe(true);
  });

  it('keeps quoted commas and categories intact', () => {
    expect(table.rows[0]!.fields[2]).toBe('violence, self-harm');
    expect(table.rows[0]!.fields[1]).toContain('vivid colors, neon, art by gregory crewdson');
    expect(table.rows[0]!.fields[10]).toBe('4261553411');
  });
});

describe('dialect', () => {
  const rows = (text: string) => parseCsvRecords(text).map((r) => r.fields);

  it('reads doubled quotes, delimiters and CR/LF/CRLF line breaks inside quotes', () => {
    expect(rows('a,"b ""q"", c"\r\n"x\ny\rz",2\n')).toEqual([
      ['a', 'b "q", c'],
      ['x\ny\rz', '2'],
    ]);
  });

  it('ends records at CRLF, LF or a lone CR, and skips blank lines', () => {
    expect(rows('a\r\nb\nc\rd\n\n\r\ne')).toEqual([['a'], ['b'], ['c'], ['d'], ['e']]);
  });

  it('keeps an explicitly quoted empty record and empty trailing fields', () => {
    expect(rows('""\na,\n,')).toEqual([[''], ['a', ''], ['', '']]);
  });

  it('treats a quote inside an unquoted field as text, and text after a closing quote as part of the field (as Python does)', () => {
    expect(rows('5" tall,x\n"ab"c,d')).toEqual([
      ['5" tall', 'x'],
      ['abc', 'd'],
    ]);
  });

  it('drops a UTF-8 BOM and keeps non-ASCII text', () => {
    expect(decodeCsvBytes(Uint8Array.of(0xef, 0xbb, 0xbf, 0x61, 0x2c, 0xf0, 0x9f, 0xaa, 0xa6), 'x')).toBe('a,🪦');
    expect(rows('\ufeffprompt\n🪦')).toEqual([['prompt'], ['🪦']]);
  });

  it('refuses an unterminated quoted field, naming the line it opened on', () => {
    expect(() => parseCsvRecords('a\nb\n"c,\nd\n', 'f.csv')).toThrow(CsvError);
    expect(() => parseCsvRecords('a\nb\n"c,\nd\n', 'f.csv')).toThrow(/^f\.csv:3: a quoted field opened here is never closed/);
  });

  it('refuses NUL characters, invalid UTF-8 and oversized input', () => {
    expect(() => parseCsvRecords('a\nb\0c', 'f.csv')).toThrow(/f\.csv:2: contains a NUL/);
    expect(() => decodeCsvBytes(Uint8Array.of(0x61, 0x0a, 0x62, 0xff, 0x63), 'f.csv')).toThrow(/f\.csv:2: not valid UTF-8 at byte 3/);
    expect(() => decodeCsvBytes(Uint8Array.of(0xe0, 0x80, 0x80), 'f.csv')).toThrow(/byte 0/); // overlong encoding
    expect(() => parseCsvRecords('a,b,c', 'f', { maxFields: 2 })).toThrow(/more than 2 fields/);
    expect(() => parseCsvRecords('"aaaa"', 'f', { maxFieldChars: 3 })).toThrow(/longer than 3/);
    expect(() => parseCsvRecords('a\nb\nc', 'f', { maxRecords: 2 })).toThrow(/more than 2 records/);
    expect(() => parseCsvRecords('abcd', 'f', { maxChars: 3 })).toThrow(/exceed the limit of 3/);
  });

  it('parses in one linear pass (a 6 MB file of 30 000 quoted rows in well under a second per MB)', () => {
    const row = `1,"${'word, '.repeat(30)}""quoted""\n line",4290749014\n`;
    const text = `id,prompt,seed\n${row.repeat(30_000)}`;
    const t0 = performance.now();
    const records = parseCsvRecords(text);
    const seconds = (performance.now() - t0) / 1000;
    expect(records).toHaveLength(30_001);
    expect(records[30_000]!.line).toBe(2 + 2 * 29_999); // each row spans two lines
    expect(seconds).toBeLessThan(5);
  });

  it('reports an empty file as such', () => {
    expect(() => parseCsv('', 'e.csv')).toThrow(/e\.csv:1: the file is empty/);
  });
});

// RFC 4180 writer used as the property tests' oracle: quote every field, double the quotes.
function writeCsv(table: readonly (readonly string[])[], eol: string): string {
  return table.map((r) => r.map((f) => `"${f.replace(/"/g, '""')}"`).join(',')).join(eol) + eol;
}

const cellText = fc.string({ unit: fc.constantFrom('a', 'b', ' ', ',', '"', '\n', '\r', 'é', '🪦', "'", ';', '\t'), maxLength: 12 });

describe('properties', () => {
  it('reads back any table written with RFC 4180 quoting (LF or CRLF)', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 5 }).chain((width) => fc.array(fc.array(cellText, { minLength: width, maxLength: width }), { minLength: 1, maxLength: 8 })),
        fc.constantFrom('\n', '\r\n'),
        (table, eol) => {
          expect(parseCsvRecords(writeCsv(table, eol)).map((r) => r.fields)).toEqual(table);
        },
      ),
      { numRuns: 400 },
    );
  });

  it('reads unquoted tables (no delimiter, quote or line break in any cell) cell for cell', () => {
    const plain = fc.string({ unit: fc.constantFrom('a', 'b', ' ', 'é', '-'), minLength: 1, maxLength: 6 });
    fc.assert(
      fc.property(fc.array(fc.array(plain, { minLength: 2, maxLength: 2 }), { minLength: 1, maxLength: 6 }), (table) => {
        expect(parseCsvRecords(table.map((r) => r.join(',')).join('\n')).map((r) => r.fields)).toEqual(table);
      }),
    );
  });

  it('on any input: returns records starting on increasing lines, or throws a CsvError — nothing else', () => {
    fc.assert(
      fc.property(fc.string({ unit: fc.constantFrom('a', ',', '"', '\n', '\r', '\0', ' ', '\ufeff'), maxLength: 40 }), (text) => {
        try {
          const records = parseCsvRecords(text);
          for (let i = 1; i < records.length; i++) expect(records[i]!.line).toBeGreaterThan(records[i - 1]!.line);
          for (const r of records) expect(r.fields.length).toBeGreaterThan(0);
        } catch (e) {
          expect(e).toBeInstanceOf(CsvError);
          expect((e as CsvError).line).toBeGreaterThanOrEqual(1);
        }
      }),
      { numRuns: 2000 },
    );
  });

  it('counts lines as an editor does: a record starts on the line after the previous line breaks', () => {
    fc.assert(
      fc.property(fc.array(fc.array(cellText, { minLength: 1, maxLength: 3 }), { minLength: 1, maxLength: 6 }), (table) => {
        const text = writeCsv(table, '\n');
        const records = parseCsvRecords(text);
        let line = 1;
        table.forEach((row, i) => {
          expect(records[i]!.line).toBe(line);
          line += 1 + row.reduce((n, cell) => n + (cell.match(/\r\n|\r|\n/g)?.length ?? 0), 0);
        });
      }),
    );
  });
});
