/**
 * The event file is read back independently of the writer: TFRecord framing parsed here, both
 * masked CRCs recomputed, and each record decoded with a small protobuf wire-format reader keyed by
 * the field numbers of tensorflow's event.proto / summary.proto (not by the writer's schema).
 */
import { mkdtemp, readFile, readdir, rm } from 'node:fs/promises';
import { hostname, tmpdir } from 'node:os';
import path from 'node:path';

import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { crc32c } from '../../src/train/crc32c.js';
import { EventWriter, FILE_VERSION, pngInfo } from '../../src/train/tensorboard.js';

// --- independent readers -----------------------------------------------------------------------

function mask(crc: number): number {
  return ((((crc >>> 15) | (crc << 17)) >>> 0) + 0xa282ead8) >>> 0;
}

/** Splits a TFRecord file into records, checking both CRCs of each. */
function readRecords(buf: Uint8Array): Uint8Array[] {
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const out: Uint8Array[] = [];
  let off = 0;
  while (off < buf.length) {
    const len = Number(view.getBigUint64(off, true));
    expect(view.getUint32(off + 8, true), `length CRC at ${off}`).toBe(mask(crc32c(buf.subarray(off, off + 8))));
    const data = buf.subarray(off + 12, off + 12 + len);
    expect(view.getUint32(off + 12 + len, true), `data CRC at ${off}`).toBe(mask(crc32c(data)));
    out.push(data);
    off += 12 + len + 4;
  }
  expect(off).toBe(buf.length);
  return out;
}

type Field =
  | { no: number; wire: 0; value: bigint }
  | { no: number; wire: 1 | 5; bytes: Uint8Array }
  | { no: number; wire: 2; bytes: Uint8Array };

/** Protobuf wire format (varint, 64-bit, length-delimited, 32-bit) into a flat field list. */
function decodeFields(b: Uint8Array): Field[] {
  let i = 0;
  const varint = (): bigint => {
    let result = 0n;
    let shift = 0n;
    for (;;) {
      const byte = b[i++]!;
      result |= BigInt(byte & 0x7f) << shift;
      if ((byte & 0x80) === 0) return result;
      shift += 7n;
    }
  };
  const fields: Field[] = [];
  while (i < b.length) {
    const key = Number(varint());
    const no = key >>> 3;
    const wire = key & 7;
    if (wire === 0) fields.push({ no, wire, value: varint() });
    else if (wire === 1 || wire === 5) {
      const n = wire === 1 ? 8 : 4;
      fields.push({ no, wire, bytes: b.subarray(i, i + n) });
      i += n;
    } else if (wire === 2) {
      const n = Number(varint());
      fields.push({ no, wire, bytes: b.subarray(i, i + n) });
      i += n;
    } else throw new Error(`unexpected wire type ${wire}`);
  }
  return fields;
}

function one(fields: Field[], no: number): Field | undefined {
  const f = fields.filter((x) => x.no === no);
  expect(f.length).toBeLessThanOrEqual(1);
  return f[0];
}
function f64(f: Field | undefined): number {
  if (f === undefined || f.wire !== 1) throw new Error('expected a fixed64 field');
  return new DataView(f.bytes.buffer, f.bytes.byteOffset, 8).getFloat64(0, true);
}
function f32(f: Field | undefined): number {
  if (f === undefined || f.wire !== 5) throw new Error('expected a fixed32 field');
  return new DataView(f.bytes.buffer, f.bytes.byteOffset, 4).getFloat32(0, true);
}
function int(f: Field | undefined): number {
  if (f === undefined) return 0; // proto3 default
  if (f.wire !== 0) throw new Error('expected a varint field');
  return Number(f.value);
}
function bytes(f: Field | undefined): Uint8Array {
  if (f === undefined || f.wire !== 2) throw new Error('expected a length-delimited field');
  return f.bytes;
}
const text = (f: Field | undefined): string => new TextDecoder().decode(bytes(f));

interface DecodedValue {
  tag: string;
  simple?: number;
  image?: { height: number; width: number; colorspace: number; png: Uint8Array };
}
interface DecodedEvent {
  wallTime: number;
  step: number;
  fileVersion?: string;
  values?: DecodedValue[];
}

// Event: wall_time = 1 (double), step = 2 (int64), file_version = 3, summary = 5.
// Summary: value = 1 (repeated). Value: tag = 1, simple_value = 2 (float), image = 4.
// Image: height = 1, width = 2, colorspace = 3, encoded_image_string = 4.
function decodeEvent(data: Uint8Array): DecodedEvent {
  const ev = decodeFields(data);
  const out: DecodedEvent = { wallTime: f64(one(ev, 1)), step: int(one(ev, 2)) };
  const fv = one(ev, 3);
  if (fv !== undefined) out.fileVersion = text(fv);
  const summary = one(ev, 5);
  if (summary !== undefined) {
    out.values = decodeFields(bytes(summary))
      .filter((f) => f.no === 1)
      .map((vf) => {
        const v = decodeFields(bytes(vf));
        const dv: DecodedValue = { tag: text(one(v, 1)) };
        if (one(v, 2) !== undefined) dv.simple = f32(one(v, 2));
        const img = one(v, 4);
        if (img !== undefined) {
          const im = decodeFields(bytes(img));
          dv.image = {
            height: int(one(im, 1)),
            width: int(one(im, 2)),
            colorspace: int(one(im, 3)),
            png: bytes(one(im, 4)),
          };
        }
        return dv;
      });
  }
  return out;
}

// --- tests ----------------------------------------------------------------------------------------

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'sdwb-tb-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function png(width: number, height: number, channels: 1 | 3 | 4): Promise<Uint8Array> {
  const raw = Buffer.alloc(width * height * channels);
  for (let i = 0; i < raw.length; i++) raw[i] = (i * 37) & 0xff;
  let img = sharp(raw, { raw: { width, height, channels } });
  // sharp would expand a 1-channel input to RGB unless told to keep it grey.
  if (channels === 1) img = img.toColourspace('b-w');
  return new Uint8Array(await img.png().toBuffer());
}

describe('EventWriter', () => {
  it('writes a TensorBoard-readable event file: version record, scalars, images', async () => {
    const logDir = path.join(dir, 'run1', 'logs');
    const t0 = 1_700_000_000_250; // ms
    let clock = t0;
    const w = EventWriter.open(logDir, { now: () => clock });
    const rgb = await png(5, 3, 3);
    const rgba = await png(2, 7, 4);
    clock += 1000;
    w.addScalar('loss', 0.125, 1);
    w.addScalars({ lr: 1e-4, 'grad/norm': 3.5 }, 2);
    w.addImage('samples/0', rgb, 2);
    clock += 500;
    w.addImage('samples/1', rgba, 10);
    w.addScalar('loss', Number.NaN, 11);
    w.close();
    w.close(); // idempotent
    expect(() => w.addScalar('loss', 1, 12)).toThrow(/closed/);

    const files = await readdir(logDir);
    expect(files).toHaveLength(1);
    const name = files[0]!;
    // events.out.tfevents.<10-digit seconds>.<hostname>[.<pid>.<n>]
    expect(name.startsWith(`events.out.tfevents.1700000000.${hostname()}.`)).toBe(true);
    expect(w.path).toBe(path.join(logDir, name));

    const events = readRecords(new Uint8Array(await readFile(w.path))).map(decodeEvent);
    expect(events).toHaveLength(6);

    expect(events[0]).toEqual({ wallTime: 1_700_000_000.25, step: 0, fileVersion: FILE_VERSION });
    expect(FILE_VERSION).toBe('brain.Event:2');

    expect(events[1]).toEqual({ wallTime: 1_700_000_001.25, step: 1, values: [{ tag: 'loss', simple: 0.125 }] });
    expect(events[2]!.step).toBe(2);
    expect(events[2]!.values!.map((v) => v.tag)).toEqual(['lr', 'grad/norm']);
    expect(events[2]!.values![0]!.simple).toBe(Math.fround(1e-4)); // simple_value is a float32
    expect(events[2]!.values![1]!.simple).toBe(3.5);

    const img1 = events[3]!.values![0]!;
    expect(events[3]!.step).toBe(2);
    expect(img1.tag).toBe('samples/0');
    expect(img1.image).toMatchObject({ height: 3, width: 5, colorspace: 3 });
    expect(Buffer.from(img1.image!.png).equals(Buffer.from(rgb))).toBe(true);

    const img2 = events[4]!.values![0]!;
    expect(events[4]!.step).toBe(10);
    expect(events[4]!.wallTime).toBe(1_700_000_001.75);
    expect(img2.image).toMatchObject({ height: 7, width: 2, colorspace: 4 });
    // The PNG round-trips to the same pixels.
    const back = await sharp(Buffer.from(img2.image!.png)).raw().toBuffer({ resolveWithObject: true });
    expect(back.info).toMatchObject({ width: 2, height: 7, channels: 4 });

    expect(events[5]!.values![0]!.simple).toBeNaN();
  });

  it('appends: each write reaches the file immediately (no buffering until close)', async () => {
    const w = EventWriter.open(path.join(dir, 'run2'));
    const sizeAfter = async (): Promise<number> => (await readFile(w.path)).length;
    const s0 = await sizeAfter();
    w.addScalar('loss', 1, 1);
    const s1 = await sizeAfter();
    expect(s1).toBeGreaterThan(s0);
    expect(readRecords(new Uint8Array(await readFile(w.path)))).toHaveLength(2);
    w.close();
  });

  it('two writers in the same second get different files', () => {
    const now = (): number => 1_700_000_000_000;
    const a = EventWriter.open(path.join(dir, 'run3'), { now });
    const b = EventWriter.open(path.join(dir, 'run3'), { now });
    expect(a.path).not.toBe(b.path);
    a.close();
    b.close();
  });

  it('rejects non-PNG images and bad steps with the file and tag', async () => {
    const w = EventWriter.open(path.join(dir, 'run4'));
    expect(() => w.addImage('samples/x', new Uint8Array([1, 2, 3]), 1)).toThrow(
      /image 'samples\/x' at step 1: not a PNG/,
    );
    expect(() => w.addScalar('loss', 1, -1)).toThrow(/non-negative integer/);
    w.close();
  });
});

describe('pngInfo', () => {
  it('reads IHDR dimensions and maps PNG colour types to TensorBoard colorspaces', async () => {
    expect(pngInfo(await png(4, 2, 1))).toEqual({ width: 4, height: 2, colorspace: 1 });
    expect(pngInfo(await png(3, 2, 3))).toEqual({ width: 3, height: 2, colorspace: 3 });
    expect(pngInfo(await png(1, 1, 4))).toEqual({ width: 1, height: 1, colorspace: 4 });
  });
});
