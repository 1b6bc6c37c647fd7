// Reader and writer for the safetensors format (https://huggingface.co/docs/safetensors):
//   [8 bytes: little-endian u64 N][N bytes: UTF-8 JSON header][data section]
// The reader treats every byte as hostile: the whole header is validated before any tensor is
// read, and the data section must be covered exactly once by the tensors, as the spec requires.
// Tensors are read one at a time with positioned reads, so files larger than memory work.
// The writer reproduces the Rust/Python library byte for byte (ordering, JSON layout, padding).
//
// Compared with the reference reader (safetensors' Rust crate, used by Python), this one accepts
// exactly the same data layouts — offsets must tile [0, data size) with no hole, overlap or
// trailing byte — and is stricter about the JSON: duplicate keys (serde keeps the last one of a
// map silently), unknown fields in a tensor entry (serde ignores them), lone surrogate escapes
// and `"__metadata__": null` are rejected here. Sub-byte and complex dtypes (F4, F6_*, C64, …)
// are rejected as unsupported.

import { open, type FileHandle } from 'node:fs/promises';

import { writeFileAtomic } from './atomic.js';
import { describeError, oneLine, quote } from './messages.js';
import {
  DTYPES,
  DTYPE_BYTES,
  UNSUPPORTED_SAFETENSORS_DTYPES,
  bf16ToF32Array,
  dtypeRank,
  f16ToF32Array,
  f32ToBf16Array,
  f32ToF16Array,
  f8ToF32Array,
  isDType,
  type DType,
} from './dtypes.js';

export type { DType } from './dtypes.js';
export { DTYPES, DTYPE_BYTES } from './dtypes.js';

/** Largest header accepted, the same limit as the reference Rust implementation. */
export const MAX_HEADER_BYTES = 100_000_000;

const LENGTH_PREFIX_BYTES = 8;
const METADATA_KEY = '__metadata__';
const TENSOR_FIELDS = ['dtype', 'shape', 'data_offsets'] as const;
// Reads and conversions go through buffers of this size so a float16 → float32 load needs only
// the float32 result plus one small scratch buffer, never a second full-size copy.
const CHUNK_BYTES = 8 * 1024 * 1024;
// Tensors up to this size are converted through their own small buffer instead of a pooled one.
const SMALL_SCRATCH_BYTES = 256 * 1024;
// Concurrent reads each need a scratch buffer; more than this many are not kept between reads.
const MAX_POOLED_SCRATCH = 2;
// fs reads and writes are limited to 2 GiB - 1 per call.
const MAX_IO_BYTES = 1 << 30;

const HOST_IS_LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** One tensor's entry in the header; `start`/`end` are absolute byte offsets in the file. */
export interface TensorInfo {
  readonly name: string;
  readonly dtype: DType;
  readonly shape: readonly number[];
  readonly start: number;
  readonly end: number;
}

/** The validated content of a safetensors header. */
export interface SafetensorsHeader {
  /** N, the byte length of the JSON header (including its padding). */
  readonly headerLength: number;
  /** Absolute offset of the data section (8 + N). */
  readonly dataStart: number;
  /** Byte length of the data section. */
  readonly dataLength: number;
  readonly metadata: Readonly<Record<string, string>>;
  /** In header order. */
  readonly tensors: readonly TensorInfo[];
}

/** Any problem with a safetensors file or with tensors given to the writer; the message is one line. */
export class SafetensorsError extends Error {
  readonly file: string;
  readonly tensor?: string;

  constructor(file: string, message: string, tensor?: string, options?: { cause?: unknown }) {
    const where = tensor === undefined ? '' : `tensor ${quote(tensor)}: `;
    super(oneLine(`${file}: ${where}${message}`), options);
    this.name = 'SafetensorsError';
    this.file = file;
    if (tensor !== undefined) this.tensor = tensor;
  }
}

// =============================================================================================
// Header parsing

const utf8Decoder = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
const utf8Encoder = new TextEncoder();

/**
 * Parses and fully validates a header. `bytes` starts at the beginning of the file and holds at
 * least the length prefix and the header; `fileSize` is the size of the whole file.
 */
export function parseSafetensorsHeader(bytes: Uint8Array, fileSize: number, fileName: string): SafetensorsHeader {
  const error = (message: string, tensor?: string): SafetensorsError => new SafetensorsError(fileName, message, tensor);

  if (!Number.isSafeInteger(fileSize) || fileSize < 0) {
    throw error(`file size: expected a non-negative integer, found ${String(fileSize)}`);
  }
  if (fileSize < LENGTH_PREFIX_BYTES) {
    throw error(`file too short: expected at least 8 bytes (the header length), found ${fileSize}`);
  }
  if (bytes.length < LENGTH_PREFIX_BYTES) {
    throw error(`header bytes: expected at least 8 bytes, given ${bytes.length}`);
  }
  const declared = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength).getBigUint64(0, true);
  if (declared > BigInt(MAX_HEADER_BYTES)) {
    throw error(`header length: expected at most ${MAX_HEADER_BYTES} bytes, found ${declared}`);
  }
  const headerLength = Number(declared);
  if (headerLength < 2) {
    throw error(`header length: expected at least 2 bytes (the empty header "{}"), found ${headerLength}`);
  }
  const dataStart = LENGTH_PREFIX_BYTES + headerLength;
  if (dataStart > fileSize) {
    throw error(`header length: expected the header to end within the ${fileSize}-byte file, found it ends at byte ${dataStart}`);
  }
  if (bytes.length < dataStart) {
    throw error(`header bytes: expected ${dataStart} bytes, given ${bytes.length}`);
  }
  const dataLength = fileSize - dataStart;

  let text: string;
  try {
    text = utf8Decoder.decode(bytes.subarray(LENGTH_PREFIX_BYTES, dataStart));
  } catch {
    throw error('header: expected UTF-8 text, found invalid UTF-8');
  }
  let root: unknown;
  try {
    root = JSON.parse(text);
  } catch (cause) {
    throw error(`header: expected JSON, found a syntax error (${cause instanceof Error ? cause.message : String(cause)})`);
  }
  if (!isJsonObject(root)) throw error(`header: expected a JSON object, found ${jsonKind(root)}`);

  // JSON.parse keeps the last of duplicate keys silently, and reorders integer-like keys; this scan
  // of the (already valid) text finds duplicates and gives the true header order.
  const scan = scanJsonKeys(text);
  if (scan.duplicate !== undefined) {
    const { key, parent } = scan.duplicate;
    throw error(`header: expected unique keys, found ${quote(key)} twice ${parent === undefined ? 'at the top level' : `in ${quote(parent)}`}`);
  }

  let metadata: Readonly<Record<string, string>> = Object.freeze(Object.create(null) as Record<string, string>);
  const entries: { info: TensorInfo; begin: number; end: number }[] = [];
  for (const name of scan.topLevelKeys) {
    const value = root[name];
    if (name === METADATA_KEY) {
      metadata = parseMetadata(value, error);
      continue;
    }
    entries.push(parseTensorEntry(name, value, dataStart, dataLength, error));
  }

  checkCoverage(entries, dataLength, error);
  return Object.freeze({
    headerLength,
    dataStart,
    dataLength,
    metadata,
    tensors: Object.freeze(entries.map((e) => e.info)),
  });
}

type ErrorFactory = (message: string, tensor?: string) => SafetensorsError;

function parseMetadata(value: unknown, error: ErrorFactory): Readonly<Record<string, string>> {
  if (!isJsonObject(value)) throw error(`__metadata__: expected an object of strings, found ${jsonKind(value)}`);
  // Null prototype: a "__proto__" key must stay data, not change the object's prototype.
  const metadata = Object.create(null) as Record<string, string>;
  for (const [key, item] of Object.entries(value)) {
    if (typeof item !== 'string') {
      throw error(`__metadata__[${quote(key)}]: expected a string, found ${jsonKind(item)}`);
    }
    if (!isWellFormed(key) || !isWellFormed(item)) {
      throw error(`__metadata__[${quote(key)}]: expected well-formed Unicode, found a lone surrogate escape`);
    }
    metadata[key] = item;
  }
  return Object.freeze(metadata);
}

function parseTensorEntry(
  name: string,
  value: unknown,
  dataStart: number,
  dataLength: number,
  error: ErrorFactory,
): { info: TensorInfo; begin: number; end: number } {
  if (!isWellFormed(name)) throw error('name: expected well-formed Unicode, found a lone surrogate escape', name);
  if (!isJsonObject(value)) throw error(`entry: expected an object {dtype, shape, data_offsets}, found ${jsonKind(value)}`, name);
  for (const field of Object.keys(value)) {
    if (!(TENSOR_FIELDS as readonly string[]).includes(field)) {
      throw error(`entry: expected only the fields dtype, shape, data_offsets, found ${quote(field)}`, name);
    }
  }
  for (const field of TENSOR_FIELDS) {
    if (!Object.hasOwn(value, field)) throw error(`entry: expected the field "${field}", found it missing`, name);
  }

  const dtype = value['dtype'];
  if (typeof dtype !== 'string') throw error(`dtype: expected a string, found ${jsonKind(dtype)}`, name);
  if (!isDType(dtype)) {
    const known = UNSUPPORTED_SAFETENSORS_DTYPES.includes(dtype) ? ' (a safetensors dtype that sd-workbench does not support)' : '';
    throw error(`dtype: expected one of ${DTYPES.join(', ')}, found ${quote(dtype)}${known}`, name);
  }

  const rawShape = value['shape'];
  if (!Array.isArray(rawShape)) throw error(`shape: expected an array of non-negative integers, found ${jsonKind(rawShape)}`, name);
  const shape: number[] = [];
  for (let i = 0; i < rawShape.length; i++) {
    const dim: unknown = rawShape[i];
    if (typeof dim !== 'number' || !Number.isSafeInteger(dim) || dim < 0) {
      throw error(`shape[${i}]: expected a non-negative integer, found ${jsonPreview(dim)}`, name);
    }
    shape.push(dim + 0); // + 0 turns a JSON "-0" into 0
  }

  const offsets = value['data_offsets'];
  if (!Array.isArray(offsets) || offsets.length !== 2) {
    throw error(`data_offsets: expected [begin, end], found ${jsonPreview(offsets)}`, name);
  }
  const [rawBegin, rawEnd] = offsets as unknown[];
  for (const [label, offset] of [['begin', rawBegin], ['end', rawEnd]] as const) {
    if (typeof offset !== 'number' || !Number.isSafeInteger(offset) || offset < 0) {
      throw error(`data_offsets ${label}: expected a non-negative integer, found ${jsonPreview(offset)}`, name);
    }
  }
  const begin = (rawBegin as number) + 0;
  const end = (rawEnd as number) + 0;
  if (begin > end) throw error(`data_offsets: expected begin <= end, found [${begin}, ${end}]`, name);
  if (end > dataLength) {
    throw error(`data_offsets: expected end <= ${dataLength} (the data section size), found ${end}`, name);
  }

  const itemBytes = DTYPE_BYTES[dtype];
  const span = end - begin;
  const needed = byteSize(shape, itemBytes);
  if (needed !== span) {
    const expected = needed === undefined ? 'more than 2^53 - 1 bytes' : `${needed} bytes`;
    throw error(`byte size: expected ${expected} for shape ${formatShape(shape)} of ${dtype}, found data_offsets [${begin}, ${end}] spanning ${span}`, name);
  }

  const info: TensorInfo = Object.freeze({
    name,
    dtype,
    shape: Object.freeze(shape),
    start: dataStart + begin,
    end: dataStart + end,
  });
  return { info, begin, end };
}

// Element count × item size, or undefined once it passes 2^53 - 1: with no zero dimension the
// product only grows, so stopping there keeps absurd shapes cheap and the arithmetic exact.
function byteSize(shape: readonly number[], itemBytes: number): number | undefined {
  if (shape.includes(0)) return 0;
  let bytes = itemBytes;
  for (const dim of shape) {
    bytes *= dim;
    if (bytes > Number.MAX_SAFE_INTEGER) return undefined;
  }
  return bytes;
}

// The spec: "the byte buffer needs to be entirely indexed, and cannot contain holes". The Rust
// library enforces exactly this (sorted by offsets, each tensor starting where the previous ended,
// the last one ending at the end of the file), so we do too: holes could hide data, overlaps
// make two tensors alias the same bytes.
function checkCoverage(entries: readonly { info: TensorInfo; begin: number; end: number }[], dataLength: number, error: ErrorFactory): void {
  const sorted = [...entries].sort((a, b) => a.begin - b.begin || a.end - b.end);
  let cursor = 0;
  let previous: { info: TensorInfo; begin: number; end: number } | undefined;
  for (const entry of sorted) {
    if (entry.begin > cursor) {
      throw error(`data_offsets: expected the data section to have no holes, found bytes [${cursor}, ${entry.begin}) before this tensor not covered by any tensor`, entry.info.name);
    }
    if (entry.begin < cursor && previous !== undefined) {
      throw error(`data_offsets: expected no overlap, found [${entry.begin}, ${entry.end}] overlapping tensor ${quote(previous.info.name)} at [${previous.begin}, ${previous.end}]`, entry.info.name);
    }
    cursor = entry.end;
    previous = entry;
  }
  if (cursor !== dataLength) {
    const after = previous === undefined ? 'with no tensors' : `after the last tensor ${quote(previous.info.name)}`;
    throw error(`data section: expected it to be fully covered by tensors, found bytes [${cursor}, ${dataLength}) ${after} not covered`);
  }
}

interface KeyScan {
  topLevelKeys: string[];
  duplicate?: { key: string; parent: string | undefined };
}

// Walks JSON text that JSON.parse has already accepted, recording the keys of every object.
// Iterative, so deeply nested input cannot overflow the stack.
function scanJsonKeys(text: string): KeyScan {
  interface Frame {
    readonly keys: Set<string> | undefined; // undefined for arrays
    readonly label: string | undefined;
    expectKey: boolean;
    lastKey: string | undefined;
  }
  const topLevelKeys: string[] = [];
  const stack: Frame[] = [];
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 0x22 /* " */) {
      let j = i + 1;
      while (text.charCodeAt(j) !== 0x22) j += text.charCodeAt(j) === 0x5c /* \ */ ? 2 : 1;
      const frame = stack[stack.length - 1];
      if (frame?.keys !== undefined && frame.expectKey) {
        const key = JSON.parse(text.slice(i, j + 1)) as string;
        if (frame.keys.has(key)) return { topLevelKeys, duplicate: { key, parent: frame.label } };
        frame.keys.add(key);
        frame.expectKey = false;
        frame.lastKey = key;
        if (stack.length === 1) topLevelKeys.push(key);
      }
      i = j;
    } else if (c === 0x7b /* { */ || c === 0x5b /* [ */) {
      const parent = stack[stack.length - 1];
      const label = parent === undefined ? undefined : parent.keys !== undefined ? parent.lastKey : parent.label;
      stack.push({ keys: c === 0x7b ? new Set() : undefined, label, expectKey: c === 0x7b, lastKey: undefined });
    } else if (c === 0x7d /* } */ || c === 0x5d /* ] */) {
      stack.pop();
    } else if (c === 0x2c /* , */) {
      const frame = stack[stack.length - 1];
      if (frame?.keys !== undefined) frame.expectKey = true;
    }
  }
  return { topLevelKeys };
}

// =============================================================================================
// Reading tensors

// Where tensor bytes come from: a file handle, or memory (tests and the fuzz target).
interface ByteSource {
  read(target: Uint8Array, position: number): Promise<number>;
  close(): Promise<void>;
}

class FileSource implements ByteSource {
  constructor(private readonly handle: FileHandle) {}

  async read(target: Uint8Array, position: number): Promise<number> {
    let done = 0;
    while (done < target.length) {
      const want = Math.min(target.length - done, MAX_IO_BYTES);
      const { bytesRead } = await this.handle.read(target, done, want, position + done);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
    return done;
  }

  close(): Promise<void> {
    return this.handle.close();
  }
}

class MemorySource implements ByteSource {
  constructor(private readonly bytes: Uint8Array) {}

  read(target: Uint8Array, position: number): Promise<number> {
    const available = this.bytes.subarray(Math.min(position, this.bytes.length), Math.min(position + target.length, this.bytes.length));
    target.set(available);
    return Promise.resolve(available.length);
  }

  close(): Promise<void> {
    return Promise.resolve();
  }
}

// Converts `count` elements held in `chunk` (a fresh, aligned buffer) into `out` at `offset`.
type FloatConverter = (chunk: ArrayBuffer, count: number, out: Float32Array, offset: number) => void;

const FLOAT_CONVERTERS: Readonly<Record<Exclude<DType, 'F32'>, FloatConverter>> = {
  F64: (b, n, out, at) => out.set(new Float64Array(b, 0, n), at),
  F16: (b, n, out, at) => f16ToF32Array(new Uint16Array(b, 0, n), out, at),
  BF16: (b, n, out, at) => bf16ToF32Array(new Uint16Array(b, 0, n), out, at),
  F8_E4M3: (b, n, out, at) => f8ToF32Array('F8_E4M3', new Uint8Array(b, 0, n), out, at),
  F8_E5M2: (b, n, out, at) => f8ToF32Array('F8_E5M2', new Uint8Array(b, 0, n), out, at),
  // 64-bit integers go through float64 first; above 2^53 that can differ from one direct rounding.
  I64: (b, n, out, at) => {
    const src = new BigInt64Array(b, 0, n);
    for (let i = 0; i < n; i++) out[at + i] = Number(src[i]!);
  },
  U64: (b, n, out, at) => {
    const src = new BigUint64Array(b, 0, n);
    for (let i = 0; i < n; i++) out[at + i] = Number(src[i]!);
  },
  I32: (b, n, out, at) => out.set(new Int32Array(b, 0, n), at),
  U32: (b, n, out, at) => out.set(new Uint32Array(b, 0, n), at),
  I16: (b, n, out, at) => out.set(new Int16Array(b, 0, n), at),
  U16: (b, n, out, at) => out.set(new Uint16Array(b, 0, n), at),
  I8: (b, n, out, at) => out.set(new Int8Array(b, 0, n), at),
  U8: (b, n, out, at) => out.set(new Uint8Array(b, 0, n), at),
  BOOL: (b, n, out, at) => {
    const src = new Uint8Array(b, 0, n);
    for (let i = 0; i < n; i++) out[at + i] = src[i] === 0 ? 0 : 1;
  },
};

// Integer conversions return the index of the first value that does not fit, or -1.
type IntConverter<T> = (chunk: ArrayBuffer, count: number, out: T, offset: number) => number;
type IntegerDType = 'I64' | 'U64' | 'I32' | 'U32' | 'I16' | 'U16' | 'I8' | 'U8' | 'BOOL';

const INT32_CONVERTERS: Readonly<Record<IntegerDType, IntConverter<Int32Array>>> = {
  I64: (b, n, out, at) => {
    const src = new BigInt64Array(b, 0, n);
    for (let i = 0; i < n; i++) {
      const v = src[i]!;
      if (v < -2147483648n || v > 2147483647n) return i;
      out[at + i] = Number(v);
    }
    return -1;
  },
  U64: (b, n, out, at) => {
    const src = new BigUint64Array(b, 0, n);
    for (let i = 0; i < n; i++) {
      const v = src[i]!;
      if (v > 2147483647n) return i;
      out[at + i] = Number(v);
    }
    return -1;
  },
  I32: (b, n, out, at) => (out.set(new Int32Array(b, 0, n), at), -1),
  U32: (b, n, out, at) => {
    const src = new Uint32Array(b, 0, n);
    for (let i = 0; i < n; i++) {
      const v = src[i]!;
      if (v > 2147483647) return i;
      out[at + i] = v;
    }
    return -1;
  },
  I16: (b, n, out, at) => (out.set(new Int16Array(b, 0, n), at), -1),
  U16: (b, n, out, at) => (out.set(new Uint16Array(b, 0, n), at), -1),
  I8: (b, n, out, at) => (out.set(new Int8Array(b, 0, n), at), -1),
  U8: (b, n, out, at) => (out.set(new Uint8Array(b, 0, n), at), -1),
  BOOL: (b, n, out, at) => {
    const src = new Uint8Array(b, 0, n);
    for (let i = 0; i < n; i++) out[at + i] = src[i] === 0 ? 0 : 1;
    return -1;
  },
};

const BIGINT64_CONVERTERS: Readonly<Record<IntegerDType, IntConverter<BigInt64Array>>> = {
  I64: (b, n, out, at) => (out.set(new BigInt64Array(b, 0, n), at), -1),
  U64: (b, n, out, at) => {
    const src = new BigUint64Array(b, 0, n);
    for (let i = 0; i < n; i++) {
      const v = src[i]!;
      if (v > 9223372036854775807n) return i;
      out[at + i] = v;
    }
    return -1;
  },
  I32: (b, n, out, at) => widenToBigInt(new Int32Array(b, 0, n), out, at),
  U32: (b, n, out, at) => widenToBigInt(new Uint32Array(b, 0, n), out, at),
  I16: (b, n, out, at) => widenToBigInt(new Int16Array(b, 0, n), out, at),
  U16: (b, n, out, at) => widenToBigInt(new Uint16Array(b, 0, n), out, at),
  I8: (b, n, out, at) => widenToBigInt(new Int8Array(b, 0, n), out, at),
  U8: (b, n, out, at) => widenToBigInt(new Uint8Array(b, 0, n), out, at),
  BOOL: (b, n, out, at) => {
    const src = new Uint8Array(b, 0, n);
    for (let i = 0; i < n; i++) out[at + i] = src[i] === 0 ? 0n : 1n;
    return -1;
  },
};

function widenToBigInt(src: ArrayLike<number>, out: BigInt64Array, at: number): number {
  for (let i = 0; i < src.length; i++) out[at + i] = BigInt(src[i]!);
  return -1;
}

function isIntegerDType(d: DType): d is IntegerDType {
  return Object.hasOwn(INT32_CONVERTERS, d);
}

/** A safetensors file opened for lazy reading: the header is validated, tensors are read on demand. */
export class SafetensorsFile {
  /** The path given to `open` (or the name given to `fromBytes`). */
  readonly path: string;
  readonly metadata: Readonly<Record<string, string>>;
  /** Tensors in header order. */
  readonly tensors: ReadonlyMap<string, TensorInfo>;
  /** Byte length of the JSON header, N. */
  readonly headerLength: number;
  /** Size of the file in bytes. */
  readonly size: number;
  #source: ByteSource | undefined;
  #scratchPool: Uint8Array<ArrayBuffer>[] = [];

  private constructor(path: string, source: ByteSource, size: number, header: SafetensorsHeader) {
    this.path = path;
    this.#source = source;
    this.size = size;
    this.headerLength = header.headerLength;
    this.metadata = header.metadata;
    this.tensors = new Map(header.tensors.map((t) => [t.name, t]));
  }

  /** Opens a file and validates its whole header before returning. */
  static async open(path: string): Promise<SafetensorsFile> {
    assertLittleEndianHost(path);
    let handle: FileHandle;
    try {
      handle = await open(path, 'r');
    } catch (cause) {
      throw new SafetensorsError(path, `cannot open: ${describeError(cause)}`, undefined, { cause });
    }
    try {
      const { size } = await handle.stat();
      const source = new FileSource(handle);
      const prefix = new Uint8Array(Math.min(LENGTH_PREFIX_BYTES, size));
      await readExactly(source, prefix, 0, path);
      // Validate the declared length before allocating anything for it.
      const headerLength = probeHeaderLength(prefix, size, path);
      const headerBytes = new Uint8Array(LENGTH_PREFIX_BYTES + headerLength);
      headerBytes.set(prefix);
      await readExactly(source, headerBytes.subarray(LENGTH_PREFIX_BYTES), LENGTH_PREFIX_BYTES, path);
      const header = parseSafetensorsHeader(headerBytes, size, path);
      return new SafetensorsFile(path, source, size, header);
    } catch (cause) {
      await handle.close().catch(() => undefined);
      if (cause instanceof SafetensorsError) throw cause;
      throw new SafetensorsError(path, `cannot read: ${describeError(cause)}`, undefined, { cause });
    }
  }

  /** Parses a whole safetensors file held in memory (the bytes are not copied). */
  static fromBytes(bytes: Uint8Array, name = '<memory>'): SafetensorsFile {
    assertLittleEndianHost(name);
    const header = parseSafetensorsHeader(bytes, bytes.length, name);
    return new SafetensorsFile(name, new MemorySource(bytes), bytes.length, header);
  }

  /** Tensor names in header order. */
  keys(): string[] {
    return [...this.tensors.keys()];
  }

  /** The header entry of a tensor; throws if the file has no such tensor. */
  info(name: string): TensorInfo {
    const info = this.tensors.get(name);
    if (info === undefined) {
      throw new SafetensorsError(this.path, `not found: expected one of the file's ${this.tensors.size} tensors, found no such name`, name);
    }
    return info;
  }

  /** Number of elements of a tensor. */
  elementCount(name: string): number {
    const info = this.info(name);
    return (info.end - info.start) / DTYPE_BYTES[info.dtype];
  }

  /** The tensor's bytes exactly as stored (little-endian). */
  async readRaw(name: string): Promise<Uint8Array> {
    const info = this.info(name);
    const out = this.allocate(info, () => new Uint8Array(info.end - info.start));
    await readExactly(this.source(), out, info.start, this.path);
    return out;
  }

  /**
   * The tensor as float32: floats are rounded to nearest, integers converted, BOOL gives 0/1.
   * With `out` (exactly the element count long), writes there instead of allocating.
   */
  async readFloat32(name: string, out?: Float32Array): Promise<Float32Array> {
    const info = this.info(name);
    const count = this.elementCount(name);
    const target = out ?? this.allocate(info, () => new Float32Array(count));
    if (target.length !== count) {
      throw new SafetensorsError(this.path, `output array: expected ${count} elements, found ${target.length}`, name);
    }
    if (info.dtype === 'F32') {
      await readExactly(this.source(), new Uint8Array(target.buffer, target.byteOffset, count * 4), info.start, this.path);
      return target;
    }
    const convert = FLOAT_CONVERTERS[info.dtype];
    await this.readChunked(info, (chunk, n, at) => convert(chunk, n, target, at));
    return target;
  }

  /** An integer (or BOOL) tensor as int32; throws if a value does not fit. */
  async readInt(name: string): Promise<Int32Array> {
    const info = this.info(name);
    const dtype = info.dtype;
    if (!isIntegerDType(dtype)) {
      throw new SafetensorsError(this.path, `readInt: expected an integer dtype, found ${dtype} (use readFloat32)`, name);
    }
    const count = this.elementCount(name);
    const target = this.allocate(info, () => new Int32Array(count));
    if (dtype === 'I32') {
      await readExactly(this.source(), new Uint8Array(target.buffer, 0, count * 4), info.start, this.path);
      return target;
    }
    const convert = INT32_CONVERTERS[dtype];
    await this.readChunked(info, (chunk, n, at) => {
      const bad = convert(chunk, n, target, at);
      if (bad >= 0) {
        const value = readElementForMessage(chunk, dtype, bad);
        throw new SafetensorsError(this.path, `readInt: expected values within int32, found ${value} at element ${at + bad}`, name);
      }
    });
    return target;
  }

  /** An integer (or BOOL) tensor as exact int64 values. */
  async readBigInt64(name: string): Promise<BigInt64Array> {
    const info = this.info(name);
    const dtype = info.dtype;
    if (!isIntegerDType(dtype)) {
      throw new SafetensorsError(this.path, `readBigInt64: expected an integer dtype, found ${dtype} (use readFloat32)`, name);
    }
    const count = this.elementCount(name);
    const target = this.allocate(info, () => new BigInt64Array(count));
    if (dtype === 'I64') {
      await readExactly(this.source(), new Uint8Array(target.buffer, 0, count * 8), info.start, this.path);
      return target;
    }
    const convert = BIGINT64_CONVERTERS[dtype];
    await this.readChunked(info, (chunk, n, at) => {
      const bad = convert(chunk, n, target, at);
      if (bad >= 0) {
        const value = readElementForMessage(chunk, dtype, bad);
        throw new SafetensorsError(this.path, `readBigInt64: expected values within int64, found ${value} at element ${at + bad}`, name);
      }
    });
    return target;
  }

  /** Releases the file handle; later reads fail. Safe to call twice. */
  async close(): Promise<void> {
    const source = this.#source;
    this.#source = undefined;
    this.#scratchPool = [];
    await source?.close();
  }

  private source(): ByteSource {
    if (this.#source === undefined) throw new SafetensorsError(this.path, 'read: expected an open file, found it closed');
    return this.#source;
  }

  private allocate<T>(info: TensorInfo, make: () => T): T {
    try {
      return make();
    } catch (cause) {
      throw new SafetensorsError(this.path, `cannot allocate memory for ${info.end - info.start} stored bytes: ${describeError(cause)}`, info.name, { cause });
    }
  }

  // Reads the tensor in chunks of whole elements into a scratch buffer. Large scratch buffers are
  // pooled: a fresh 8 MiB buffer per tensor costs ~2000 page faults each time, which adds up to
  // seconds of system time over a full checkpoint.
  private async readChunked(info: TensorInfo, consume: (chunk: ArrayBuffer, count: number, elementOffset: number) => void): Promise<void> {
    const itemBytes = DTYPE_BYTES[info.dtype];
    const total = info.end - info.start;
    const pooled = total > SMALL_SCRATCH_BYTES;
    const scratch = pooled ? (this.#scratchPool.pop() ?? new Uint8Array(CHUNK_BYTES)) : new Uint8Array(total);
    const chunkBytes = Math.min(total, Math.floor(scratch.length / itemBytes) * itemBytes);
    try {
      for (let done = 0; done < total; ) {
        const bytes = Math.min(chunkBytes, total - done);
        await readExactly(this.source(), scratch.subarray(0, bytes), info.start + done, this.path);
        consume(scratch.buffer, bytes / itemBytes, done / itemBytes);
        done += bytes;
      }
    } finally {
      if (pooled && this.#scratchPool.length < MAX_POOLED_SCRATCH) this.#scratchPool.push(scratch);
    }
  }
}

function readElementForMessage(chunk: ArrayBuffer, dtype: IntegerDType, index: number): string {
  switch (dtype) {
    case 'I64':
      return String(new BigInt64Array(chunk, index * 8, 1)[0]);
    case 'U64':
      return String(new BigUint64Array(chunk, index * 8, 1)[0]);
    case 'U32':
      return String(new Uint32Array(chunk, index * 4, 1)[0]);
    default:
      return '?';
  }
}

// Checks only what is needed before allocating the header buffer; parseSafetensorsHeader repeats
// these checks with the same messages so the pure function stays complete on its own.
function probeHeaderLength(prefix: Uint8Array, fileSize: number, path: string): number {
  if (prefix.length < LENGTH_PREFIX_BYTES) return parseSafetensorsHeader(prefix, fileSize, path).headerLength; // throws
  const declared = new DataView(prefix.buffer, prefix.byteOffset, LENGTH_PREFIX_BYTES).getBigUint64(0, true);
  if (declared < 2n || declared > BigInt(MAX_HEADER_BYTES) || Number(declared) + LENGTH_PREFIX_BYTES > fileSize) {
    parseSafetensorsHeader(prefix, fileSize, path); // throws the precise message
  }
  return Number(declared);
}

async function readExactly(source: ByteSource, target: Uint8Array, position: number, path: string): Promise<void> {
  const got = await source.read(target, position);
  if (got !== target.length) {
    throw new SafetensorsError(path, `read: expected ${target.length} bytes at offset ${position}, found ${got} (the file shrank after it was opened?)`);
  }
}

// =============================================================================================
// Writing

/** The dtypes the writer produces. */
export type WritableDType = 'F32' | 'F16' | 'BF16' | 'I64' | 'I32' | 'U8' | 'BOOL';

/** Typed arrays accepted as tensor data. */
export type TensorData = Float32Array | Int32Array | BigInt64Array | Uint8Array | Uint16Array;

/**
 * A tensor to write. F32: Float32Array. F16/BF16: Float32Array (rounded to nearest even) or
 * Uint16Array (raw bits). I64: BigInt64Array or Int32Array. I32: Int32Array. U8/BOOL: Uint8Array
 * (BOOL values must be 0 or 1).
 */
export interface TensorToWrite {
  dtype: WritableDType;
  shape: readonly number[];
  data: TensorData;
}

/** Name, dtype and shape of a tensor the streaming writer will ask for. */
export interface TensorEntry {
  name: string;
  dtype: WritableDType;
  shape: readonly number[];
}

/** Supplies one tensor's data to the streaming writer. */
export type TensorProducer = (name: string, entry: TensorEntry) => TensorData | Promise<TensorData>;

const WRITABLE_DTYPES: readonly string[] = ['F32', 'F16', 'BF16', 'I64', 'I32', 'U8', 'BOOL'];

interface PlannedTensor extends TensorEntry {
  readonly count: number;
  readonly begin: number;
  readonly end: number;
}

interface Layout {
  /** Length prefix + padded JSON header. */
  readonly head: Uint8Array;
  /** In file order. */
  readonly tensors: readonly PlannedTensor[];
  readonly totalSize: number;
}

/**
 * Writes a safetensors file without holding it in memory: `produce` is called once per tensor,
 * in file order (Python's order: descending dtype alignment, then name), and its data is written
 * before the next call. Atomic: on any error nothing is left at `path`.
 */
export async function writeSafetensorsStreaming(
  path: string,
  entries: readonly TensorEntry[],
  metadata: Readonly<Record<string, string>> | undefined,
  produce: TensorProducer,
): Promise<void> {
  assertLittleEndianHost(path);
  const layout = planLayout(path, entries, metadata);
  await writeFileAtomic(path, async (handle) => {
    const out = new BufferedWriter(handle);
    await out.write(layout.head);
    for (const tensor of layout.tensors) {
      const data = await produce(tensor.name, { name: tensor.name, dtype: tensor.dtype, shape: tensor.shape });
      for (const chunk of encodeTensor(path, tensor, data)) await out.write(chunk);
    }
    await out.flush();
    if (out.position !== layout.totalSize) {
      throw new SafetensorsError(path, `write: expected ${layout.totalSize} bytes, found ${out.position} written`);
    }
  });
}

/** Writes tensors (and optional `__metadata__`) to `path` atomically, byte-identical to Python's `save_file`. */
export async function writeSafetensors(
  path: string,
  tensors: Readonly<Record<string, TensorToWrite>> | Iterable<readonly [string, TensorToWrite]>,
  metadata?: Readonly<Record<string, string>>,
): Promise<void> {
  const { entries, byName } = collectTensors(path, tensors);
  await writeSafetensorsStreaming(path, entries, metadata, (name) => byName.get(name)!.data);
}

/** Serializes tensors to an in-memory safetensors file (for small files and tests). */
export function serializeSafetensors(
  tensors: Readonly<Record<string, TensorToWrite>> | Iterable<readonly [string, TensorToWrite]>,
  metadata?: Readonly<Record<string, string>>,
): Uint8Array {
  const file = '<memory>';
  assertLittleEndianHost(file);
  const { entries, byName } = collectTensors(file, tensors);
  const layout = planLayout(file, entries, metadata);
  const out = new Uint8Array(layout.totalSize);
  out.set(layout.head, 0);
  let position = layout.head.length;
  for (const tensor of layout.tensors) {
    for (const chunk of encodeTensor(file, tensor, byName.get(tensor.name)!.data)) {
      out.set(chunk, position);
      position += chunk.length;
    }
  }
  return out;
}

function collectTensors(
  file: string,
  tensors: Readonly<Record<string, TensorToWrite>> | Iterable<readonly [string, TensorToWrite]>,
): { entries: TensorEntry[]; byName: Map<string, TensorToWrite> } {
  const pairs: Iterable<readonly [string, TensorToWrite]> = isIterable(tensors) ? tensors : Object.entries(tensors);
  const byName = new Map<string, TensorToWrite>();
  const entries: TensorEntry[] = [];
  for (const [name, tensor] of pairs) {
    if (byName.has(name)) throw new SafetensorsError(file, 'name: expected unique tensor names, found this one twice', name);
    if (typeof tensor !== 'object' || tensor === null) {
      throw new SafetensorsError(file, `expected {dtype, shape, data}, found ${jsonKind(tensor)}`, name);
    }
    byName.set(name, tensor);
    entries.push({ name, dtype: tensor.dtype, shape: tensor.shape });
  }
  return { entries, byName };
}

function isIterable(value: object): value is Iterable<readonly [string, TensorToWrite]> {
  return typeof (value as { [Symbol.iterator]?: unknown })[Symbol.iterator] === 'function';
}

// Mirrors `prepare` in safetensors' Rust crate: sort by dtype (descending alignment), then by
// name as UTF-8 bytes; offsets are contiguous; JSON has __metadata__ first, then the tensors in
// file order with fields dtype, shape, data_offsets; the header is space-padded to a multiple of 8.
function planLayout(file: string, entries: readonly TensorEntry[], metadata: Readonly<Record<string, string>> | undefined): Layout {
  const seen = new Set<string>();
  const checked: { entry: TensorEntry; nameBytes: Uint8Array; count: number; bytes: number }[] = [];
  for (const entry of entries) {
    const { name, dtype, shape } = entry;
    if (typeof name !== 'string') throw new SafetensorsError(file, `tensor name: expected a string, found ${jsonKind(name)}`);
    if (name === METADATA_KEY) throw new SafetensorsError(file, 'name: expected a tensor name, found the reserved key', name);
    if (!isWellFormed(name)) throw new SafetensorsError(file, 'name: expected well-formed Unicode, found a lone surrogate', name);
    if (seen.has(name)) throw new SafetensorsError(file, 'name: expected unique tensor names, found this one twice', name);
    seen.add(name);
    if (typeof dtype !== 'string' || !WRITABLE_DTYPES.includes(dtype)) {
      throw new SafetensorsError(file, `dtype: expected one of ${WRITABLE_DTYPES.join(', ')}, found ${jsonPreview(dtype)}`, name);
    }
    if (!Array.isArray(shape)) throw new SafetensorsError(file, `shape: expected an array, found ${jsonKind(shape)}`, name);
    let count = 1;
    for (let i = 0; i < shape.length; i++) {
      const dim: unknown = shape[i];
      if (typeof dim !== 'number' || !Number.isSafeInteger(dim) || dim < 0) {
        throw new SafetensorsError(file, `shape[${i}]: expected a non-negative integer, found ${jsonPreview(dim)}`, name);
      }
      count *= dim;
    }
    const bytes = count * DTYPE_BYTES[dtype];
    if (!Number.isSafeInteger(bytes)) {
      throw new SafetensorsError(file, `shape: expected at most 2^53 - 1 bytes, found shape ${formatShape(shape)}`, name);
    }
    checked.push({ entry: { name, dtype, shape: [...shape] }, nameBytes: utf8Encoder.encode(name), count, bytes });
  }
  checked.sort((a, b) => dtypeRank(b.entry.dtype) - dtypeRank(a.entry.dtype) || compareBytes(a.nameBytes, b.nameBytes));

  const jsonParts: string[] = [];
  if (metadata !== undefined) jsonParts.push(`"${METADATA_KEY}":${metadataJson(file, metadata)}`);
  const tensors: PlannedTensor[] = [];
  let offset = 0;
  for (const { entry, count, bytes } of checked) {
    const begin = offset;
    offset += bytes;
    if (!Number.isSafeInteger(offset)) throw new SafetensorsError(file, 'data section: expected at most 2^53 - 1 bytes in total, found more');
    tensors.push({ ...entry, count, begin, end: offset });
    jsonParts.push(`${JSON.stringify(entry.name)}:{"dtype":"${entry.dtype}","shape":[${entry.shape.join(',')}],"data_offsets":[${begin},${offset}]}`);
  }
  const json = utf8Encoder.encode(`{${jsonParts.join(',')}}`);
  const headerLength = Math.ceil(json.length / 8) * 8;
  if (headerLength > MAX_HEADER_BYTES) {
    throw new SafetensorsError(file, `header: expected at most ${MAX_HEADER_BYTES} bytes, found ${headerLength} (too many or too long names)`);
  }
  const head = new Uint8Array(LENGTH_PREFIX_BYTES + headerLength).fill(0x20);
  new DataView(head.buffer).setBigUint64(0, BigInt(headerLength), true);
  head.set(json, LENGTH_PREFIX_BYTES);
  return { head, tensors, totalSize: head.length + offset };
}

function metadataJson(file: string, metadata: Readonly<Record<string, string>>): string {
  if (typeof metadata !== 'object' || metadata === null || Array.isArray(metadata)) {
    throw new SafetensorsError(file, `metadata: expected an object of strings, found ${jsonKind(metadata)}`);
  }
  // Python's order here is a Rust HashMap's, i.e. random per process; sorting makes our output
  // deterministic and matches files whose metadata happened to be written sorted.
  const pairs = Object.entries(metadata).map(([key, value]) => {
    if (typeof value !== 'string') throw new SafetensorsError(file, `metadata[${quote(key)}]: expected a string, found ${jsonKind(value)}`);
    if (!isWellFormed(key) || !isWellFormed(value)) {
      throw new SafetensorsError(file, `metadata[${quote(key)}]: expected well-formed Unicode, found a lone surrogate`);
    }
    return { key, keyBytes: utf8Encoder.encode(key), value };
  });
  pairs.sort((a, b) => compareBytes(a.keyBytes, b.keyBytes));
  return `{${pairs.map((p) => `${JSON.stringify(p.key)}:${JSON.stringify(p.value)}`).join(',')}}`;
}

// Yields the tensor's little-endian bytes. Views into caller data are yielded without copying;
// converted data goes through one reused scratch buffer, so the consumer must finish with each
// chunk before asking for the next.
function* encodeTensor(file: string, tensor: PlannedTensor, data: TensorData): Generator<Uint8Array> {
  const { name, dtype, count } = tensor;
  const found = typedArrayName(data);
  const expect = (allowed: string): never => {
    throw new SafetensorsError(file, `data: expected ${allowed} for ${dtype}, found ${found}`, name);
  };
  if (typeof data !== 'object' || data === null || !ArrayBuffer.isView(data)) expect('a typed array');
  if (data.length !== count) {
    throw new SafetensorsError(file, `data: expected ${count} elements for shape ${formatShape(tensor.shape)}, found ${data.length}`, name);
  }
  const bytesOf = (view: ArrayBufferView): Uint8Array => new Uint8Array(view.buffer, view.byteOffset, view.byteLength);
  switch (dtype) {
    case 'F32':
      if (!(data instanceof Float32Array)) return expect('Float32Array');
      yield bytesOf(data);
      return;
    case 'F16':
    case 'BF16': {
      if (data instanceof Uint16Array) {
        yield bytesOf(data);
        return;
      }
      if (!(data instanceof Float32Array)) return expect('Float32Array or Uint16Array (raw bits)');
      const convert = dtype === 'F16' ? f32ToF16Array : f32ToBf16Array;
      const scratch = new Uint16Array(Math.min(count, CHUNK_BYTES / 2));
      for (let at = 0; at < count; at += scratch.length) {
        const part = data.subarray(at, Math.min(count, at + scratch.length));
        convert(part, scratch);
        yield new Uint8Array(scratch.buffer, 0, part.length * 2);
      }
      return;
    }
    case 'I64': {
      if (data instanceof BigInt64Array) {
        yield bytesOf(data);
        return;
      }
      if (!(data instanceof Int32Array)) return expect('BigInt64Array or Int32Array');
      const scratch = new BigInt64Array(Math.min(count, CHUNK_BYTES / 8));
      for (let at = 0; at < count; at += scratch.length) {
        const n = Math.min(scratch.length, count - at);
        for (let i = 0; i < n; i++) scratch[i] = BigInt(data[at + i]!);
        yield new Uint8Array(scratch.buffer, 0, n * 8);
      }
      return;
    }
    case 'I32':
      if (!(data instanceof Int32Array)) return expect('Int32Array');
      yield bytesOf(data);
      return;
    case 'U8':
      if (!(data instanceof Uint8Array)) return expect('Uint8Array');
      yield bytesOf(data);
      return;
    case 'BOOL': {
      if (!(data instanceof Uint8Array)) return expect('Uint8Array of 0/1');
      const bad = data.findIndex((v) => v > 1);
      if (bad >= 0) throw new SafetensorsError(file, `data: expected 0 or 1 for BOOL, found ${data[bad]} at element ${bad}`, name);
      yield bytesOf(data);
      return;
    }
  }
}

// Batches small tensors into few writes; large chunks go straight to the file without a copy.
class BufferedWriter {
  position = 0;
  private readonly buffer = new Uint8Array(CHUNK_BYTES);
  private filled = 0;

  constructor(private readonly handle: FileHandle) {}

  async write(chunk: Uint8Array): Promise<void> {
    if (chunk.length <= this.buffer.length - this.filled) {
      this.buffer.set(chunk, this.filled);
      this.filled += chunk.length;
      return;
    }
    await this.flush();
    if (chunk.length < this.buffer.length) {
      this.buffer.set(chunk, 0);
      this.filled = chunk.length;
    } else {
      await this.writeFully(chunk);
    }
  }

  async flush(): Promise<void> {
    if (this.filled === 0) return;
    await this.writeFully(this.buffer.subarray(0, this.filled));
    this.filled = 0;
  }

  private async writeFully(bytes: Uint8Array): Promise<void> {
    for (let done = 0; done < bytes.length; ) {
      const { bytesWritten } = await this.handle.write(bytes, done, Math.min(bytes.length - done, MAX_IO_BYTES), this.position);
      done += bytesWritten;
      this.position += bytesWritten;
    }
  }
}

// =============================================================================================
// Small helpers

function assertLittleEndianHost(file: string): void {
  if (!HOST_IS_LITTLE_ENDIAN) throw new SafetensorsError(file, 'host: expected a little-endian machine, found big-endian (unsupported)');
}

function compareBytes(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    if (a[i] !== b[i]) return a[i]! - b[i]!;
  }
  return a.length - b.length;
}

function isJsonObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function jsonKind(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  if (typeof value === 'object') return 'an object';
  if (typeof value === 'string') return `the string ${quote(value)}`;
  if (value === undefined) return 'nothing';
  return `${typeof value} ${String(value)}`;
}

function jsonPreview(value: unknown): string {
  if (value === undefined) return 'nothing';
  let text: string;
  try {
    text = JSON.stringify(value) ?? String(value);
  } catch {
    text = String(value);
  }
  return text.length > 60 ? `${text.slice(0, 60)}…` : text;
}

function formatShape(shape: readonly number[]): string {
  return shape.length > 12 ? `[${shape.slice(0, 12).join(', ')}, … (${shape.length} dims)]` : `[${shape.join(', ')}]`;
}

function isWellFormed(text: string): boolean {
  return !/\p{Surrogate}/u.test(text);
}

function typedArrayName(value: unknown): string {
  if (typeof value !== 'object' || value === null) return jsonKind(value);
  const name = (value as { constructor?: { name?: unknown } }).constructor?.name;
  return typeof name === 'string' ? name : 'an object';
}
