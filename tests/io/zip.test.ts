// The zip reader and stored-entry writer on their own: round trips, layout details torch relies
// on, and structural damage the reader must name precisely.
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

import { ZipArchive, ZipError, ZipWriter, memorySource, type ZipReadOptions } from '../../src/io/zip.js';
import { ascii, buildZip, raw, withTempDir } from './torch-pickle.helpers.js';

async function write(entries: [string, Uint8Array | Uint8Array[]][], options: { align?: number; forceZip64?: boolean } = {}): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  const writer = new ZipWriter((c) => {
    chunks.push(c.slice());
  }, options);
  for (const [name, data] of entries) await writer.add(name, data);
  const size = await writer.finish();
  const out = raw(...chunks);
  expect(out.length).toBe(size);
  return out;
}

const open = (bytes: Uint8Array, options?: ZipReadOptions): Promise<ZipArchive> => ZipArchive.fromSource(memorySource(bytes, 'z.zip'), options);

async function zipError(bytes: Uint8Array, options?: ZipReadOptions): Promise<string> {
  try {
    await open(bytes, options);
  } catch (error) {
    expect(error).toBeInstanceOf(ZipError);
    expect((error as Error).message).not.toMatch(/[\r\n]/);
    return (error as Error).message;
  }
  throw new Error('expected the archive to be rejected');
}

describe('zip writer → reader', () => {
  it('round-trips stored entries with 64-byte aligned data, with and without zip64 records', async () => {
    for (const forceZip64 of [false, true]) {
      const bytes = await write(
        [
          ['a/data.pkl', ascii('hello')],
          ['a/ü/ñ', [Uint8Array.of(1, 2), Uint8Array.of(3)]],
          ['a/empty', new Uint8Array(0)],
          ['a/big', new Uint8Array(100_000).map((_, i) => i & 0xff)],
        ],
        { forceZip64 },
      );
      const zip = await open(bytes);
      expect([...zip.entries.keys()]).toEqual(['a/data.pkl', 'a/ü/ñ', 'a/empty', 'a/big']);
      for (const e of zip.entries.values()) expect(e.dataOffset % 64).toBe(0);
      expect(new TextDecoder().decode(await zip.read(zip.get('a/data.pkl')!))).toBe('hello');
      expect([...(await zip.read(zip.get('a/ü/ñ')!))]).toEqual([1, 2, 3]);
      expect((await zip.read(zip.get('a/empty')!)).length).toBe(0);
      expect([...(await zip.readRange(zip.get('a/big')!, 300, 4))]).toEqual([44, 45, 46, 47]);
    }
  });

  it('writes without padding when alignment is 1, and refuses duplicate names', async () => {
    const bytes = await write([['x', ascii('1')]], { align: 1 });
    expect((await open(bytes)).get('x')!.dataOffset).toBe(30 + 1);
    const writer = new ZipWriter(() => undefined);
    await writer.add('x', ascii('1'));
    await expect(writer.add('x', ascii('2'))).rejects.toThrow(/duplicate entry name "x"/);
  });

  it('reads a file on disk with positioned reads', async () => {
    await withTempDir(async (dir) => {
      const path = join(dir, 'a.zip');
      await writeFile(path, await write([['a/b', ascii('content')]]));
      const zip = await ZipArchive.open(path);
      expect(zip.name).toBe(path);
      expect(new TextDecoder().decode(await zip.readRange(zip.get('a/b')!, 1, 3))).toBe('ont');
      await zip.close();
      await expect(zip.read(zip.get('a/b')!)).rejects.toThrow(/read: expected an open file, found it closed/);
      await expect(ZipArchive.open(join(dir, 'missing.zip'))).rejects.toThrow(/cannot open/);
    });
  });
});

describe('zip reader', () => {
  it('inflates deflated entries (also through readRange) and honours an archive comment', async () => {
    const text = ascii('abc'.repeat(1000));
    const bytes = buildZip([{ name: 'd', data: text, deflate: true }, { name: 's', data: ascii('stored') }], { comment: ascii('PK\u0005\u0006 looks like a signature') });
    const zip = await open(bytes);
    expect(zip.get('d')!.method).toBe('deflated');
    expect(await zip.read(zip.get('d')!)).toEqual(text);
    expect(new TextDecoder().decode(await zip.readRange(zip.get('d')!, 3, 3))).toBe('abc');
  });

  it('rejects out-of-range reads', async () => {
    const zip = await open(buildZip([{ name: 's', data: ascii('stored') }]));
    await expect(zip.readRange(zip.get('s')!, 4, 3)).rejects.toThrow('z.zip: entry "s": read range: expected [start, start + length) within the 6 bytes of the entry, found start 4, length 3');
  });

  it('names structural damage precisely', async () => {
    const good = buildZip([{ name: 'a', data: ascii('1') }, { name: 'b', data: ascii('2') }]);
    const cd = new DataView(good.buffer).getUint32(good.length - 6, true);
    // Copies the archive with little-endian fields overwritten: [offset, value, byte width].
    const patch = (...fields: [number, number, 2 | 4][]): Uint8Array => {
      const copy = good.slice();
      const v = new DataView(copy.buffer);
      for (const [at, value, width] of fields) {
        if (width === 2) v.setUint16(at, value, true);
        else v.setUint32(at, value, true);
      }
      return copy;
    };
    const eocd = good.length - 22;
    expect(await zipError(patch([eocd + 4, 2, 2]))).toBe('z.zip: end of central directory: multi-disk (split) archives are not supported');
    expect(await zipError(patch([eocd + 8, 0xffff, 2]))).toBe('z.zip: end of central directory: multi-disk (split) archives are not supported');
    expect(await zipError(patch([eocd + 8, 3, 2], [eocd + 10, 3, 2]))).toBe(`z.zip: central directory: ${eocd - cd} bytes cannot hold the 3 declared entries`);
    expect(await zipError(patch([eocd + 16, cd - 1, 4]))).toBe(`z.zip: central directory: declared at [${cd - 1}, ${eocd - 1}) but the end records start at ${eocd} (truncated, or data before/inside the archive)`);
    expect(await zipError(patch([cd, 0x12345678, 4]))).toBe(`z.zip: central directory entry 0: no central header signature at offset ${cd}`);
    expect(await zipError(patch([cd + 28, 200, 2]))).toBe('z.zip: central directory entry 0: name, extra field and comment run past the end of the central directory');
    expect(await zipError(patch([cd + 34, 1, 2]))).toBe('z.zip: entry "a": central directory entry 0: on disk 1; multi-disk (split) archives are not supported');
    expect(await zipError(patch([0, 0, 4]))).toBe('z.zip: entry "a": no local header signature at offset 0 (truncated or corrupt archive)');
    expect(await zipError(buildZip([{ name: 'a', data: ascii('1') }, { name: 'a', data: ascii('2') }]))).toBe('z.zip: entry "a": duplicate entry name in the central directory');
    expect(await zipError(buildZip([{ name: 'a', data: ascii('1') }, { name: 'b', data: ascii('2') }]), { maxEntries: 1 })).toBe('z.zip: central directory: declares 2 entries, more than the limit of 1');
    expect(await zipError(good, { maxCentralDirectoryBytes: 10 })).toMatch(/^z\.zip: central directory: declares \d+ bytes, more than the limit of 10$/);
    const invalidName = good.slice();
    invalidName[cd + 46] = 0xff;
    expect(await zipError(invalidName)).toBe('z.zip: central directory entry 0: name is not valid UTF-8');
  });

  it('checks zip64 records against the classic end record', async () => {
    const z64 = buildZip([{ name: 'a', data: ascii('1') }], { zip64: true });
    expect([...(await open(z64)).entries.keys()]).toEqual(['a']);
    // Classic record with a real (non-sentinel) entry count that disagrees with the zip64 record.
    const bad = z64.slice();
    new DataView(bad.buffer).setUint16(bad.length - 12, 5, true);
    expect(await zipError(bad)).toBe('z.zip: end of central directory: the classic and zip64 records disagree on the central directory');
    // Locator pointing at garbage.
    const lost = z64.slice();
    new DataView(lost.buffer).setBigUint64(lost.length - 22 - 20 + 8, 0n, true);
    expect(await zipError(lost)).toBe('z.zip: zip64 end of central directory: no record signature at offset 0');
    // Sentinels without a zip64 locator.
    const classic = buildZip([{ name: 'a', data: ascii('1') }]);
    new DataView(classic.buffer).setUint32(classic.length - 6, 0xffffffff, true);
    expect(await zipError(classic)).toBe('z.zip: end of central directory: zip64 values are flagged but the zip64 locator is missing');
  });

  it('rejects a deflated entry that is not deflate data', async () => {
    const bytes = buildZip([{ name: 'd', data: ascii('xxxx'), method: 8, size: 4 }]);
    const zip = await open(bytes);
    await expect(zip.read(zip.get('d')!)).rejects.toThrow(/^z\.zip: entry "d": corrupt deflated data: /);
  });
});
