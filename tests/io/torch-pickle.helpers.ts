// Shared by the torch-pickle and zip tests: a tiny pickle assembler (opcodes written by hand, no
// Python needed) and a zip assembler that can also build broken archives.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { crc32, deflateRawSync } from 'node:zlib';

/** Pickle opcodes by name (see CPython Lib/pickletools.py). */
export const OP = {
  MARK: 0x28,
  STOP: 0x2e,
  POP: 0x30,
  POP_MARK: 0x31,
  DUP: 0x32,
  FLOAT: 0x46,
  INT: 0x49,
  BININT: 0x4a,
  BININT1: 0x4b,
  LONG: 0x4c,
  BININT2: 0x4d,
  NONE: 0x4e,
  PERSID: 0x50,
  BINPERSID: 0x51,
  REDUCE: 0x52,
  STRING: 0x53,
  BINSTRING: 0x54,
  SHORT_BINSTRING: 0x55,
  UNICODE: 0x56,
  BINUNICODE: 0x58,
  APPEND: 0x61,
  BUILD: 0x62,
  GLOBAL: 0x63,
  DICT: 0x64,
  EMPTY_DICT: 0x7d,
  APPENDS: 0x65,
  GET: 0x67,
  BINGET: 0x68,
  INST: 0x69,
  LONG_BINGET: 0x6a,
  LIST: 0x6c,
  EMPTY_LIST: 0x5d,
  OBJ: 0x6f,
  PUT: 0x70,
  BINPUT: 0x71,
  LONG_BINPUT: 0x72,
  SETITEM: 0x73,
  TUPLE: 0x74,
  EMPTY_TUPLE: 0x29,
  SETITEMS: 0x75,
  BINFLOAT: 0x47,
  PROTO: 0x80,
  NEWOBJ: 0x81,
  EXT1: 0x82,
  EXT2: 0x83,
  EXT4: 0x84,
  TUPLE1: 0x85,
  TUPLE2: 0x86,
  TUPLE3: 0x87,
  NEWTRUE: 0x88,
  NEWFALSE: 0x89,
  LONG1: 0x8a,
  LONG4: 0x8b,
  BINBYTES: 0x42,
  SHORT_BINBYTES: 0x43,
  SHORT_BINUNICODE: 0x8c,
  BINUNICODE8: 0x8d,
  BINBYTES8: 0x8e,
  EMPTY_SET: 0x8f,
  ADDITEMS: 0x90,
  FROZENSET: 0x91,
  NEWOBJ_EX: 0x92,
  STACK_GLOBAL: 0x93,
  MEMOIZE: 0x94,
  FRAME: 0x95,
  BYTEARRAY8: 0x96,
  NEXT_BUFFER: 0x97,
  READONLY_BUFFER: 0x98,
} as const;

/** A piece of pickle: an opcode, raw bytes, or nested pieces. */
export type Part = number | Uint8Array | readonly Part[];

/** Concatenates parts into bytes (no PROTO/STOP added). */
export function raw(...parts: Part[]): Uint8Array {
  const out: number[] = [];
  const add = (p: Part): void => {
    if (typeof p === 'number') out.push(p);
    else if (p instanceof Uint8Array) for (const b of p) out.push(b);
    else for (const q of p) add(q);
  };
  for (const p of parts) add(p);
  return Uint8Array.from(out);
}

/** PROTO 2, the parts, STOP. */
export function pickle(...parts: Part[]): Uint8Array {
  return raw(OP.PROTO, 2, ...parts, OP.STOP);
}

export const ascii = (text: string): Uint8Array => new TextEncoder().encode(text);

export function u32(n: number): Uint8Array {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, n, true);
  return b;
}

export function u64(n: bigint): Uint8Array {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, n, true);
  return b;
}

/** BINUNICODE. */
export function str(text: string): Part {
  const data = ascii(text);
  return [OP.BINUNICODE, u32(data.length), data];
}

/** The smallest int opcode for n, as CPython chooses. */
export function int(n: number | bigint): Part {
  const v = BigInt(n);
  if (v >= 0n && v < 256n) return [OP.BININT1, Number(v)];
  if (v >= 0n && v < 65536n) return [OP.BININT2, Number(v) & 0xff, Number(v) >> 8];
  if (v >= -(2n ** 31n) && v < 2n ** 31n) return [OP.BININT, u32(Number(BigInt.asUintN(32, v)))];
  const bytes: number[] = [];
  let x = v;
  for (;;) {
    bytes.push(Number(BigInt.asUintN(8, x)));
    x >>= 8n;
    const top = bytes[bytes.length - 1]!;
    if ((x === 0n && (top & 0x80) === 0) || (x === -1n && (top & 0x80) !== 0)) break;
  }
  return [OP.LONG1, bytes.length, Uint8Array.from(bytes)];
}

export function float(x: number): Part {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setFloat64(0, x, false);
  return [OP.BINFLOAT, b];
}

export const bool = (b: boolean): Part => (b ? OP.NEWTRUE : OP.NEWFALSE);

/** GLOBAL module\nname\n. */
export function global(module: string, name: string): Part {
  return [OP.GLOBAL, ascii(`${module}\n${name}\n`)];
}

/** SHORT_BINUNICODE module, SHORT_BINUNICODE name, STACK_GLOBAL (protocol 4 style). */
export function stackGlobal(module: string, name: string): Part {
  const m = ascii(module);
  const n = ascii(name);
  return [OP.SHORT_BINUNICODE, m.length, m, OP.SHORT_BINUNICODE, n.length, n, OP.STACK_GLOBAL];
}

/** A tuple of parts with the opcode CPython uses for its length. */
export function tuple(...items: Part[]): Part {
  if (items.length === 0) return OP.EMPTY_TUPLE;
  if (items.length <= 3) return [...items, [OP.TUPLE1, OP.TUPLE2, OP.TUPLE3][items.length - 1]!];
  return [OP.MARK, ...items, OP.TUPLE];
}

export const ints = (values: readonly number[]): Part => tuple(...values.map((v) => int(v)));

/** A dict from [key, value] part pairs. */
export function dict(...entries: [Part, Part][]): Part {
  if (entries.length === 0) return OP.EMPTY_DICT;
  return [OP.EMPTY_DICT, OP.MARK, ...entries.flat(), OP.SETITEMS];
}

export function list(...items: Part[]): Part {
  if (items.length === 0) return OP.EMPTY_LIST;
  return [OP.EMPTY_LIST, OP.MARK, ...items, OP.APPENDS];
}

/** collections.OrderedDict() filled by SETITEMS, as torch state dicts are pickled. */
export function orderedDict(...entries: [Part, Part][]): Part {
  const base: Part = [global('collections', 'OrderedDict'), OP.EMPTY_TUPLE, OP.REDUCE];
  if (entries.length === 0) return base;
  return [base, OP.MARK, ...entries.flat(), OP.SETITEMS];
}

/** BINPERSID of ('storage', torch.<cls>, key, location, numel). */
export function storage(cls: string, key: string, numel: number | bigint, location = 'cpu', module = 'torch'): Part {
  return [OP.MARK, str('storage'), global(module, cls), str(key), str(location), int(numel), OP.TUPLE, OP.BINPERSID];
}

/** _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, OrderedDict()). */
export function tensorV2(storagePart: Part, offset: number, shape: readonly number[], stride: readonly number[], requiresGrad = false): Part {
  return [global('torch._utils', '_rebuild_tensor_v2'), OP.MARK, storagePart, int(offset), ints(shape), ints(stride), bool(requiresGrad), orderedDict(), OP.TUPLE, OP.REDUCE];
}

/** _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, OrderedDict(), torch.<dtype>). */
export function tensorV3(storagePart: Part, offset: number, shape: readonly number[], stride: readonly number[], dtype: string): Part {
  return [global('torch._utils', '_rebuild_tensor_v3'), OP.MARK, storagePart, int(offset), ints(shape), ints(stride), bool(false), orderedDict(), global('torch', dtype), OP.TUPLE, OP.REDUCE];
}

/** _rebuild_parameter(tensor, requires_grad, OrderedDict()). */
export function parameter(tensorPart: Part, requiresGrad = true): Part {
  return [global('torch._utils', '_rebuild_parameter'), tensorPart, bool(requiresGrad), orderedDict(), OP.TUPLE3, OP.REDUCE];
}

/** Row-major strides. */
export function contiguous(shape: readonly number[]): number[] {
  const stride = new Array<number>(shape.length);
  let step = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    stride[i] = step;
    step *= Math.max(1, shape[i]!);
  }
  return stride;
}

export function f32Bytes(values: readonly number[]): Uint8Array {
  return new Uint8Array(Float32Array.from(values).buffer);
}

// ---------------------------------------------------------------------------------------------
// Zip assembly

export interface ZipMember {
  name: string;
  data: Uint8Array;
  /** Deflate the data (method 8). */
  deflate?: boolean;
  /** Override the declared uncompressed size. */
  size?: number;
  /** Override the CRC-32. */
  crc?: number;
  /** Write only this many bytes of the (compressed) data while declaring the full length. */
  truncateTo?: number;
  /** Use a data descriptor like torch (flag bit 3, zero CRC/sizes in the local header). */
  descriptor?: boolean;
  /** Extra general-purpose flags. */
  flags?: number;
  method?: number;
}

/** Assembles a zip archive; options allow breaking it in specific ways. */
export function buildZip(members: readonly ZipMember[], options: { zip64?: boolean; comment?: Uint8Array } = {}): Uint8Array {
  const parts: Uint8Array[] = [];
  const central: Uint8Array[] = [];
  let offset = 0;
  const push = (b: Uint8Array): void => {
    parts.push(b);
    offset += b.length;
  };
  for (const m of members) {
    const name = ascii(m.name);
    const stored = m.deflate === true ? new Uint8Array(deflateRawSync(m.data)) : m.data;
    const size = m.size ?? m.data.length;
    const crc = m.crc ?? crc32(m.data) >>> 0;
    const method = m.method ?? (m.deflate === true ? 8 : 0);
    const flags = (m.flags ?? 0) | (m.descriptor === true ? 8 : 0);
    const headerOffset = offset;
    const local = new Uint8Array(30 + name.length);
    const lv = new DataView(local.buffer);
    lv.setUint32(0, 0x04034b50, true);
    lv.setUint16(4, 20, true);
    lv.setUint16(6, flags, true);
    lv.setUint16(8, method, true);
    if (m.descriptor !== true) {
      lv.setUint32(14, crc, true);
      lv.setUint32(18, stored.length, true);
      lv.setUint32(22, size, true);
    }
    lv.setUint16(26, name.length, true);
    local.set(name, 30);
    push(local);
    push(stored.subarray(0, m.truncateTo ?? stored.length));
    if (m.descriptor === true) {
      const dd = new Uint8Array(16);
      const dv = new DataView(dd.buffer);
      dv.setUint32(0, 0x08074b50, true);
      dv.setUint32(4, crc, true);
      dv.setUint32(8, stored.length, true);
      dv.setUint32(12, size, true);
      push(dd);
    }
    const wide = options.zip64 === true;
    const extra = wide ? 28 : 0;
    const c = new Uint8Array(46 + name.length + extra);
    const cv = new DataView(c.buffer);
    cv.setUint32(0, 0x02014b50, true);
    cv.setUint16(4, 45, true);
    cv.setUint16(6, 20, true);
    cv.setUint16(8, flags, true);
    cv.setUint16(10, method, true);
    cv.setUint32(16, crc, true);
    cv.setUint32(20, wide ? 0xffffffff : stored.length, true);
    cv.setUint32(24, wide ? 0xffffffff : size, true);
    cv.setUint16(28, name.length, true);
    cv.setUint16(30, extra, true);
    cv.setUint32(42, wide ? 0xffffffff : headerOffset, true);
    c.set(name, 46);
    if (wide) {
      const p = 46 + name.length;
      cv.setUint16(p, 1, true);
      cv.setUint16(p + 2, 24, true);
      cv.setBigUint64(p + 4, BigInt(size), true);
      cv.setBigUint64(p + 12, BigInt(stored.length), true);
      cv.setBigUint64(p + 20, BigInt(headerOffset), true);
    }
    central.push(c);
  }
  const cdOffset = offset;
  for (const c of central) push(c);
  const cdSize = offset - cdOffset;
  if (options.zip64 === true) {
    const rec = new Uint8Array(56 + 20);
    const v = new DataView(rec.buffer);
    v.setUint32(0, 0x06064b50, true);
    v.setBigUint64(4, 44n, true);
    v.setUint16(12, 45, true);
    v.setUint16(14, 45, true);
    v.setBigUint64(24, BigInt(members.length), true);
    v.setBigUint64(32, BigInt(members.length), true);
    v.setBigUint64(40, BigInt(cdSize), true);
    v.setBigUint64(48, BigInt(cdOffset), true);
    v.setUint32(56, 0x07064b50, true);
    v.setBigUint64(64, BigInt(offset), true);
    v.setUint32(72, 1, true);
    push(rec);
  }
  const comment = options.comment ?? new Uint8Array(0);
  const eocd = new Uint8Array(22 + comment.length);
  const ev = new DataView(eocd.buffer);
  ev.setUint32(0, 0x06054b50, true);
  const wide = options.zip64 === true;
  ev.setUint16(8, wide ? 0xffff : members.length, true);
  ev.setUint16(10, wide ? 0xffff : members.length, true);
  ev.setUint32(12, wide ? 0xffffffff : cdSize, true);
  ev.setUint32(16, wide ? 0xffffffff : cdOffset, true);
  ev.setUint16(20, comment.length, true);
  eocd.set(comment, 22);
  push(eocd);
  const out = new Uint8Array(offset);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** A torch-layout zip: <top>/data.pkl, <top>/data/<key> for each storage, <top>/version. */
export function torchZip(pickleBytes: Uint8Array, storages: Readonly<Record<string, Uint8Array>> = {}, options: { top?: string; extra?: ZipMember[]; zip64?: boolean; descriptor?: boolean } = {}): Uint8Array {
  const top = options.top ?? 'archive';
  const d = options.descriptor;
  return buildZip(
    [
      { name: `${top}/data.pkl`, data: pickleBytes, ...(d === undefined ? {} : { descriptor: d }) },
      ...Object.entries(storages).map(([key, data]) => ({ name: `${top}/data/${key}`, data, ...(d === undefined ? {} : { descriptor: d }) })),
      { name: `${top}/version`, data: ascii('3\n') },
      ...(options.extra ?? []),
    ],
    options.zip64 === undefined ? {} : { zip64: options.zip64 },
  );
}

/** Runs `fn` with a fresh temporary folder that is removed afterwards. */
export async function withTempDir<T>(fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await mkdtemp(join(tmpdir(), 'sdwb-torch-pickle-'));
  try {
    return await fn(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
