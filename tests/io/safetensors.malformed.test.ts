// Every header rule the reader enforces, one test each, with the exact one-line message.
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

import { SafetensorsError, SafetensorsFile, parseSafetensorsHeader, serializeSafetensors } from '../../src/io/safetensors.js';
import { rawFile, rawFileFromHeaderBytes, withTempDir } from './safetensors.helpers.js';

const FILE = 'bad.safetensors';

function errorOf(bytes: Uint8Array, fileSize = bytes.length): SafetensorsError {
  try {
    parseSafetensorsHeader(bytes, fileSize, FILE);
  } catch (error) {
    expect(error).toBeInstanceOf(SafetensorsError);
    const e = error as SafetensorsError;
    expect(e.file).toBe(FILE);
    expect(e.message).not.toMatch(/[\n\r]/);
    return e;
  }
  throw new Error('expected the header to be rejected');
}

function expectRejected(bytes: Uint8Array, message: string, tensor?: string): void {
  const e = errorOf(bytes);
  expect(e.message).toBe(`${FILE}: ${message}`);
  expect(e.tensor).toBe(tensor);
}

const f32 = (shape: number[], begin: number, end: number): object => ({ dtype: 'F32', shape, data_offsets: [begin, end] });

describe('safetensors reader rejects malformed files', () => {
  describe('length prefix', () => {
    it('rejects a file shorter than the 8-byte length', () => {
      expectRejected(new Uint8Array(3), 'file too short: expected at least 8 bytes (the header length), found 3');
    });

    it('rejects an empty file', () => {
      expectRejected(new Uint8Array(0), 'file too short: expected at least 8 bytes (the header length), found 0');
    });

    it('rejects a header length beyond the end of the file', () => {
      const bytes = rawFile({}, 0, 1000n);
      expectRejected(bytes, 'header length: expected the header to end within the 10-byte file, found it ends at byte 1008');
    });

    it('rejects a header length over 100 MB', () => {
      expectRejected(rawFile({}, 0, 100_000_001n), 'header length: expected at most 100000000 bytes, found 100000001');
    });

    it('rejects a huge (2^64 - 1) header length without allocating it', () => {
      expectRejected(rawFile({}, 0, 2n ** 64n - 1n), 'header length: expected at most 100000000 bytes, found 18446744073709551615');
    });

    it('rejects header lengths 0 and 1', () => {
      expectRejected(rawFile('{}', 0, 0n), 'header length: expected at least 2 bytes (the empty header "{}"), found 0');
      expectRejected(rawFile('{}', 0, 1n), 'header length: expected at least 2 bytes (the empty header "{}"), found 1');
    });

    it('rejects a buffer that holds less of the header than it declares', () => {
      const bytes = rawFile({});
      expect(errorOf(bytes.subarray(0, 9), bytes.length).message).toBe(`${FILE}: header bytes: expected 10 bytes, given 9`);
    });
  });

  describe('truncated files', () => {
    const valid = serializeSafetensors({
      a: { dtype: 'F32', shape: [2], data: new Float32Array([1, 2]) },
      b: { dtype: 'F32', shape: [3], data: new Float32Array([3, 4, 5]) },
    });

    it('rejects a file cut inside the data section', () => {
      const cut = valid.subarray(0, valid.length - 4);
      expectRejected(cut, 'tensor "b": data_offsets: expected end <= 16 (the data section size), found 20', 'b');
    });

    it('rejects a file cut inside the header', () => {
      const cut = valid.subarray(0, 40);
      const declared = Number(new DataView(valid.buffer).getBigUint64(0, true));
      expectRejected(cut, `header length: expected the header to end within the 40-byte file, found it ends at byte ${8 + declared}`);
    });

    it('rejects a file cut inside the length prefix', () => {
      expectRejected(valid.subarray(0, 5), 'file too short: expected at least 8 bytes (the header length), found 5');
    });

    it('reports truncation through open() as well', async () => {
      await withTempDir(async (dir) => {
        const path = join(dir, 'cut.safetensors');
        await writeFile(path, valid.subarray(0, valid.length - 1));
        await expect(SafetensorsFile.open(path)).rejects.toThrow(
          `${path}: tensor "b": data_offsets: expected end <= 19 (the data section size), found 20`,
        );
      });
    });
  });

  describe('header text', () => {
    it('rejects invalid UTF-8', () => {
      const json = new TextEncoder().encode('{"__metadata__":{"k":"v?"}}');
      json[json.indexOf(0x3f)] = 0xff;
      expectRejected(rawFileFromHeaderBytes(json), 'header: expected UTF-8 text, found invalid UTF-8');
    });

    it('rejects invalid JSON', () => {
      const e = errorOf(rawFile('{"a": }'));
      expect(e.message).toMatch(/^bad\.safetensors: header: expected JSON, found a syntax error \(.+\)$/);
    });

    it('rejects a byte-order mark (serde_json does too)', () => {
      const e = errorOf(rawFile('\uFEFF{}'));
      expect(e.message).toMatch(/^bad\.safetensors: header: expected JSON, found a syntax error/);
    });

    it('rejects NUL padding (only JSON whitespace may pad)', () => {
      expect(errorOf(rawFile('{}\u0000\u0000')).message).toMatch(/expected JSON, found a syntax error/);
    });

    it('accepts space padding after the JSON', () => {
      const header = parseSafetensorsHeader(rawFile('{}      '), 16, FILE);
      expect(header.headerLength).toBe(8);
      expect(header.tensors).toEqual([]);
    });

    it.each([
      ['[]', 'an array'],
      ['null', 'null'],
      ['"x"', 'the string "x"'],
      ['42', 'number 42'],
      ['true', 'boolean true'],
    ])('rejects the non-object header %s', (text, kind) => {
      expectRejected(rawFile(text), `header: expected a JSON object, found ${kind}`);
    });
  });

  describe('duplicate keys (JSON.parse would silently keep the last)', () => {
    it('rejects a duplicated tensor name', () => {
      const text = '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}';
      expectRejected(rawFile(text, 8), 'header: expected unique keys, found "a" twice at the top level');
    });

    it('rejects a duplicated field inside a tensor entry', () => {
      const text = '{"a":{"dtype":"F32","dtype":"I32","shape":[1],"data_offsets":[0,4]}}';
      expectRejected(rawFile(text, 4), 'header: expected unique keys, found "dtype" twice in "a"');
    });

    it('rejects a duplicated metadata key', () => {
      expectRejected(rawFile('{"__metadata__":{"k":"1","k":"2"}}'), 'header: expected unique keys, found "k" twice in "__metadata__"');
    });

    it('rejects two __metadata__ objects', () => {
      expectRejected(rawFile('{"__metadata__":{},"__metadata__":{}}'), 'header: expected unique keys, found "__metadata__" twice at the top level');
    });

    it('sees duplicates written with different escapes', () => {
      const text = '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"\\u0061":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}';
      expectRejected(rawFile(text, 8), 'header: expected unique keys, found "a" twice at the top level');
    });

    it('is not fooled by braces and quotes inside strings', () => {
      const text = '{"__metadata__":{"x":"{\\"a\\":1,\\"a\\":2}"},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}';
      const header = parseSafetensorsHeader(rawFile(text, 1), 8 + text.length + 1, FILE);
      expect(header.metadata['x']).toBe('{"a":1,"a":2}');
    });
  });

  describe('__metadata__', () => {
    it('rejects a non-string value', () => {
      expectRejected(rawFile('{"__metadata__":{"epochs":3}}'), '__metadata__["epochs"]: expected a string, found number 3');
    });

    it('rejects a nested object value', () => {
      expectRejected(rawFile('{"__metadata__":{"cfg":{}}}'), '__metadata__["cfg"]: expected a string, found an object');
    });

    it('rejects a non-object __metadata__', () => {
      expectRejected(rawFile('{"__metadata__":["a"]}'), '__metadata__: expected an object of strings, found an array');
      expectRejected(rawFile('{"__metadata__":null}'), '__metadata__: expected an object of strings, found null');
    });

    it('keeps a "__proto__" key as plain data', () => {
      const bytes = rawFile('{"__metadata__":{"__proto__":"x"}}');
      const header = parseSafetensorsHeader(bytes, bytes.length, FILE);
      expect(Object.getPrototypeOf(header.metadata)).toBe(null);
      expect(header.metadata['__proto__']).toBe('x');
    });
  });

  describe('tensor entries', () => {
    it('rejects an entry that is not an object', () => {
      expectRejected(rawFile('{"a":[1]}'), 'tensor "a": entry: expected an object {dtype, shape, data_offsets}, found an array', 'a');
    });

    it('rejects an extra field', () => {
      expectRejected(
        rawFile({ a: { ...f32([1], 0, 4), offset: 0 } }, 4),
        'tensor "a": entry: expected only the fields dtype, shape, data_offsets, found "offset"',
        'a',
      );
    });

    it('rejects a missing field', () => {
      expectRejected(rawFile({ a: { dtype: 'F32', shape: [1] } }, 4), 'tensor "a": entry: expected the field "data_offsets", found it missing', 'a');
    });

    it('rejects an unknown dtype', () => {
      expectRejected(
        rawFile({ a: { dtype: 'F128', shape: [1], data_offsets: [0, 16] } }, 16),
        'tensor "a": dtype: expected one of BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64, found "F128"',
        'a',
      );
    });

    it('names safetensors dtypes that are known but unsupported', () => {
      expect(errorOf(rawFile({ a: { dtype: 'F4', shape: [2], data_offsets: [0, 1] } }, 1)).message).toMatch(
        /found "F4" \(a safetensors dtype that sd-workbench does not support\)$/,
      );
    });

    it('rejects a lower-case dtype', () => {
      expect(errorOf(rawFile({ a: { dtype: 'f32', shape: [1], data_offsets: [0, 4] } }, 4)).message).toMatch(/found "f32"$/);
    });

    it('rejects a non-string dtype', () => {
      expectRejected(rawFile({ a: { dtype: 4, shape: [1], data_offsets: [0, 4] } }, 4), 'tensor "a": dtype: expected a string, found number 4', 'a');
    });

    it('rejects a negative dimension', () => {
      expectRejected(rawFile({ a: f32([2, -1], 0, 0) }), 'tensor "a": shape[1]: expected a non-negative integer, found -1', 'a');
    });

    it('rejects a non-integer dimension', () => {
      expectRejected(rawFile({ a: f32([2.5], 0, 10) }, 10), 'tensor "a": shape[0]: expected a non-negative integer, found 2.5', 'a');
    });

    it('rejects a string dimension', () => {
      expectRejected(rawFile({ a: { dtype: 'F32', shape: ['2'], data_offsets: [0, 8] } }, 8), 'tensor "a": shape[0]: expected a non-negative integer, found "2"', 'a');
    });

    it('rejects a dimension beyond 2^53', () => {
      expectRejected(rawFile('{"a":{"dtype":"U8","shape":[9007199254740993],"data_offsets":[0,0]}}'), 'tensor "a": shape[0]: expected a non-negative integer, found 9007199254740992', 'a');
    });

    it('rejects a shape that is not an array', () => {
      expectRejected(rawFile({ a: { dtype: 'F32', shape: 4, data_offsets: [0, 16] } }, 16), 'tensor "a": shape: expected an array of non-negative integers, found number 4', 'a');
    });

    it('rejects a shape whose byte size does not match the offsets', () => {
      expectRejected(
        rawFile({ a: f32([2, 3], 0, 20) }, 20),
        'tensor "a": byte size: expected 24 bytes for shape [2, 3] of F32, found data_offsets [0, 20] spanning 20',
        'a',
      );
    });

    it('rejects a shape whose element count overflows, without overflowing', () => {
      const big = Number.MAX_SAFE_INTEGER;
      expectRejected(
        rawFile({ a: f32([big, big, big], 0, 8) }, 8),
        `tensor "a": byte size: expected more than 2^53 - 1 bytes for shape [${big}, ${big}, ${big}] of F32, found data_offsets [0, 8] spanning 8`,
        'a',
      );
    });

    it('handles thousands of dimensions quickly', () => {
      const shape = new Array<number>(100_000).fill(1);
      const header = parseSafetensorsHeader(rawFile({ a: f32(shape, 0, 4) }, 4), 8 + JSON.stringify({ a: f32(shape, 0, 4) }).length + 4, FILE);
      expect(header.tensors[0]?.shape.length).toBe(100_000);
    });

    it('rejects offsets that are not a pair', () => {
      expectRejected(rawFile({ a: { dtype: 'F32', shape: [1], data_offsets: [0, 4, 8] } }, 4), 'tensor "a": data_offsets: expected [begin, end], found [0,4,8]', 'a');
    });

    it('rejects non-integer offsets', () => {
      expectRejected(rawFile({ a: { dtype: 'F32', shape: [1], data_offsets: [0, 4.5] } }, 4), 'tensor "a": data_offsets end: expected a non-negative integer, found 4.5', 'a');
    });

    it('rejects negative offsets', () => {
      expectRejected(rawFile({ a: f32([1], -4, 0) }, 4), 'tensor "a": data_offsets begin: expected a non-negative integer, found -4', 'a');
    });

    it('rejects begin > end', () => {
      expectRejected(rawFile({ a: f32([0], 4, 0) }, 4), 'tensor "a": data_offsets: expected begin <= end, found [4, 0]', 'a');
    });

    it('rejects offsets beyond the data section', () => {
      expectRejected(rawFile({ a: f32([2], 0, 8) }, 4), 'tensor "a": data_offsets: expected end <= 4 (the data section size), found 8', 'a');
    });

    it('rejects a lone surrogate in a name', () => {
      expectRejected(rawFile('{"\\ud800":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}'), 'tensor "\\ud800": name: expected well-formed Unicode, found a lone surrogate escape', '\ud800');
    });

    it('keeps messages on one line whatever the name contains', () => {
      const e = errorOf(rawFile({ 'evil\nname\u2028': f32([1], 0, 8) }, 8));
      expect(e.message).toBe('bad.safetensors: tensor "evil\\nname\\u2028": byte size: expected 4 bytes for shape [1] of F32, found data_offsets [0, 8] spanning 8');
      expect(e.tensor).toBe('evil\nname\u2028');
    });
  });

  describe('data coverage (the spec forbids holes; overlaps would alias bytes)', () => {
    it('rejects overlapping tensors', () => {
      expectRejected(
        rawFile({ a: f32([2], 0, 8), b: f32([2], 4, 12) }, 12),
        'tensor "b": data_offsets: expected no overlap, found [4, 12] overlapping tensor "a" at [0, 8]',
        'b',
      );
    });

    it('rejects two tensors on the same bytes', () => {
      expectRejected(
        rawFile({ a: f32([1], 0, 4), b: f32([1], 0, 4) }, 4),
        'tensor "b": data_offsets: expected no overlap, found [0, 4] overlapping tensor "a" at [0, 4]',
        'b',
      );
    });

    it('rejects a hole between tensors', () => {
      expectRejected(
        rawFile({ a: f32([1], 0, 4), b: f32([1], 8, 12) }, 12),
        'tensor "b": data_offsets: expected the data section to have no holes, found bytes [4, 8) before this tensor not covered by any tensor',
        'b',
      );
    });

    it('rejects a hole at the start', () => {
      expectRejected(
        rawFile({ a: f32([1], 4, 8) }, 8),
        'tensor "a": data_offsets: expected the data section to have no holes, found bytes [0, 4) before this tensor not covered by any tensor',
        'a',
      );
    });

    it('rejects trailing bytes after the last tensor', () => {
      expectRejected(
        rawFile({ a: f32([1], 0, 4) }, 6),
        'data section: expected it to be fully covered by tensors, found bytes [4, 6) after the last tensor "a" not covered',
      );
    });

    it('rejects data with no tensors', () => {
      expectRejected(rawFile({}, 3), 'data section: expected it to be fully covered by tensors, found bytes [0, 3) with no tensors not covered');
    });

    it('accepts tensors listed out of offset order, and zero-size tensors anywhere on the boundary', () => {
      const bytes = rawFile({ b: f32([1], 4, 8), e: f32([0], 4, 4), a: f32([1], 0, 4), z: f32([2, 0], 8, 8) }, 8);
      const header = parseSafetensorsHeader(bytes, bytes.length, FILE);
      expect(header.tensors.map((t) => t.name)).toEqual(['b', 'e', 'a', 'z']);
    });

    it('rejects a zero-size tensor inside another tensor', () => {
      expectRejected(
        rawFile({ a: f32([2], 0, 8), e: f32([0], 4, 4) }, 8),
        'tensor "e": data_offsets: expected no overlap, found [4, 4] overlapping tensor "a" at [0, 8]',
        'e',
      );
    });
  });

  describe('reading', () => {
    const file = SafetensorsFile.fromBytes(
      serializeSafetensors({
        big: { dtype: 'I64', shape: [2], data: new BigInt64Array([1n, 2n ** 40n]) },
        w: { dtype: 'F32', shape: [1], data: new Float32Array([1]) },
      }),
      FILE,
    );

    it('names the file and the key of a missing tensor', () => {
      expect(() => file.info('nope')).toThrow(new SafetensorsError(FILE, "not found: expected one of the file's 2 tensors, found no such name", 'nope'));
      expect(() => file.info('nope')).toThrow('bad.safetensors: tensor "nope": not found');
    });

    it('refuses to narrow an int64 that does not fit int32', async () => {
      await expect(file.readInt('big')).rejects.toThrow('bad.safetensors: tensor "big": readInt: expected values within int32, found 1099511627776 at element 1');
    });

    it('refuses readInt on a float tensor', async () => {
      await expect(file.readInt('w')).rejects.toThrow('bad.safetensors: tensor "w": readInt: expected an integer dtype, found F32 (use readFloat32)');
    });

    it('rejects an output array of the wrong length', async () => {
      await expect(file.readFloat32('w', new Float32Array(2))).rejects.toThrow('bad.safetensors: tensor "w": output array: expected 1 elements, found 2');
    });

    it('wraps a missing file in SafetensorsError', async () => {
      await withTempDir(async (dir) => {
        const path = join(dir, 'missing.safetensors');
        const error = await SafetensorsFile.open(path).catch((e: unknown) => e);
        expect(error).toBeInstanceOf(SafetensorsError);
        expect((error as SafetensorsError).message).toMatch(/missing\.safetensors: cannot open: ENOENT/);
      });
    });

    it('fails reads after close', async () => {
      const closed = SafetensorsFile.fromBytes(serializeSafetensors({ w: { dtype: 'F32', shape: [], data: new Float32Array([1]) } }), FILE);
      await closed.close();
      await closed.close();
      await expect(closed.readRaw('w')).rejects.toThrow('bad.safetensors: read: expected an open file, found it closed');
    });
  });
});
