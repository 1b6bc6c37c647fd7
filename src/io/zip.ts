// A zip reader for PyTorch checkpoints (stored and deflated entries, zip64, data descriptors) and a
// small writer of stored entries. The reader treats every byte as hostile: the central directory,
// every local header and the layout of all entries are validated when the archive is opened, so
// later reads only touch byte ranges already known to lie inside the file. Entry data is read
// with positioned reads, never by loading the archive, so multi-gigabyte .ckpt files work.
// Deflated entries are inflated with a hard cap equal to their declared size.

import { open, type FileHandle } from 'node:fs/promises';
import { promisify } from 'node:util';
import { crc32, inflateRaw } from 'node:zlib';

import { describeError, oneLine, quote } from './messages.js';

/** Any problem with a zip archive; the message is one line. */
export class ZipError extends Error {
  readonly file: string;
  readonly entry?: string;

  constructor(file: string, message: string, entry?: string, options?: { cause?: unknown }) {
    const where = entry === undefined ? '' : `entry ${quote(entry)}: `;
    super(oneLine(`${file}: ${where}${message}`), options);
    this.name = 'ZipError';
    this.file = file;
    if (entry !== undefined) this.entry = entry;
  }
}

// =============================================================================================
// Byte sources

/** Random-access bytes: a file opened for positioned reads, or memory (tests, fuzzing). */
export interface ByteSource {
  /** Name used in error messages (the path for files). */
  readonly name: string;
  readonly size: number;
  /** Reads up to `target.length` bytes at `position`; returns how many were read. */
  read(target: Uint8Array, position: number): Promise<number>;
  close(): Promise<void>;
}

// fs reads are limited to 2 GiB - 1 per call.
const MAX_IO_BYTES = 1 << 30;

class FileSource implements ByteSource {
  #handle: FileHandle | undefined;

  constructor(
    readonly name: string,
    handle: FileHandle,
    readonly size: number,
  ) {
    this.#handle = handle;
  }

  async read(target: Uint8Array, position: number): Promise<number> {
    const handle = this.#handle;
    if (handle === undefined) throw new ZipError(this.name, 'read: expected an open file, found it closed');
    let done = 0;
    while (done < target.length) {
      const want = Math.min(target.length - done, MAX_IO_BYTES);
      const { bytesRead } = await handle.read(target, done, want, position + done);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
    return done;
  }

  async close(): Promise<void> {
    const handle = this.#handle;
    this.#handle = undefined;
    await handle?.close();
  }
}

class MemorySource implements ByteSource {
  constructor(
    readonly name: string,
    private readonly bytes: Uint8Array,
  ) {}

  get size(): number {
    return this.bytes.length;
  }

  read(target: Uint8Array, position: number): Promise<number> {
    const available = this.bytes.subarray(Math.min(position, this.bytes.length), Math.min(position + target.length, this.bytes.length));
    target.set(available);
    return Promise.resolve(available.length);
  }

  close(): Promise<void> {
    return Promise.resolve();
  }
}

/** Opens a file for positioned reads; errors become ZipError. */
export async function openFileSource(path: string): Promise<ByteSource> {
  let handle: FileHandle;
  try {
    handle = await open(path, 'r');
  } catch (cause) {
    throw new ZipError(path, `cannot open: ${describeError(cause)}`, undefined, { cause });
  }
  try {
    const stats = await handle.stat();
    if (!stats.isFile()) throw new ZipError(path, 'cannot read: expected a regular file');
    return new FileSource(path, handle, stats.size);
  } catch (cause) {
    await handle.close().catch(() => undefined);
    if (cause instanceof ZipError) throw cause;
    throw new ZipError(path, `cannot read: ${describeError(cause)}`, undefined, { cause });
  }
}

/** Wraps bytes held in memory (not copied) as a ByteSource. */
export function memorySource(bytes: Uint8Array, name = '<memory>'): ByteSource {
  return new MemorySource(name, bytes);
}

/** Reads exactly `target.length` bytes at `position` or throws a ZipError naming the shortfall. */
export async function readExactly(source: ByteSource, target: Uint8Array, position: number, entry?: string): Promise<void> {
  let got: number;
  try {
    got = await source.read(target, position);
  } catch (cause) {
    if (cause instanceof ZipError) throw cause;
    throw new ZipError(source.name, `read failed at offset ${position}: ${describeError(cause)}`, entry, { cause });
  }
  if (got !== target.length) {
    throw new ZipError(source.name, `read: expected ${target.length} bytes at offset ${position}, found ${got} (the file shrank after it was opened?)`, entry);
  }
}

// =============================================================================================
// Reading

const SIG_LOCAL = 0x04034b50;
const SIG_CENTRAL = 0x02014b50;
const SIG_EOCD = 0x06054b50;
const SIG_ZIP64_EOCD = 0x06064b50;
const SIG_ZIP64_LOCATOR = 0x07064b50;

const LOCAL_HEADER_BYTES = 30;
const CENTRAL_HEADER_BYTES = 46;
const EOCD_BYTES = 22;
const ZIP64_EOCD_BYTES = 56;
const ZIP64_LOCATOR_BYTES = 20;
const MAX_COMMENT_BYTES = 0xffff;
const ZIP64_EXTRA_ID = 0x0001;
const U16_SENTINEL = 0xffff;
const U32_SENTINEL = 0xffffffff;

const FLAG_ENCRYPTED = 0x0001;
const FLAG_DATA_DESCRIPTOR = 0x0008;
const FLAG_STRONG_ENCRYPTION = 0x0040;
const FLAG_UTF8 = 0x0800;

const METHOD_STORED = 0;
const METHOD_DEFLATED = 8;

/** Limits applied while opening and reading an archive. */
export interface ZipReadOptions {
  /** Most entries accepted (default 100,000). */
  readonly maxEntries?: number;
  /** Largest central directory accepted in bytes (default 64 MiB). */
  readonly maxCentralDirectoryBytes?: number;
  /** Largest declared uncompressed size of a deflated entry (default 1 GiB); it is inflated in memory. */
  readonly maxInflatedBytes?: number;
  /** Largest declared size / compressed size of a deflated entry (default 1000; deflate itself tops out near 1032). */
  readonly maxCompressionRatio?: number;
}

const DEFAULT_READ_OPTIONS: Required<ZipReadOptions> = {
  maxEntries: 100_000,
  maxCentralDirectoryBytes: 64 * 1024 * 1024,
  maxInflatedBytes: 1024 * 1024 * 1024,
  maxCompressionRatio: 1000,
};

/** One validated entry; offsets are absolute positions in the archive. */
export interface ZipEntry {
  readonly name: string;
  readonly method: 'stored' | 'deflated';
  /** Uncompressed size in bytes. */
  readonly size: number;
  readonly compressedSize: number;
  /** CRC-32 from the central directory; 0 can mean "not recorded" (torch can skip computing it). */
  readonly crc32: number;
  readonly headerOffset: number;
  /** Where the (possibly compressed) data starts. */
  readonly dataOffset: number;
}

interface CentralRecord {
  name: string;
  nameBytes: Uint8Array;
  flags: number;
  method: number;
  crc32: number;
  compressedSize: number;
  size: number;
  headerOffset: number;
}

interface Directory {
  entryCount: number;
  offset: number;
  size: number;
  /** Where the central directory must end: the zip64 record if there is one, else the classic record. */
  end: number;
}

const utf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
const inflateRawAsync = promisify(inflateRaw);

/** A zip archive opened for reading: directory and local headers validated, data read on demand. */
export class ZipArchive {
  /** Entries by name, in central-directory order. */
  readonly entries: ReadonlyMap<string, ZipEntry>;
  readonly #source: ByteSource;
  readonly #options: Required<ZipReadOptions>;

  private constructor(source: ByteSource, entries: Map<string, ZipEntry>, options: Required<ZipReadOptions>) {
    this.#source = source;
    this.entries = entries;
    this.#options = options;
  }

  /** Opens and validates the archive at `path`. */
  static async open(path: string, options: ZipReadOptions = {}): Promise<ZipArchive> {
    const source = await openFileSource(path);
    try {
      return await ZipArchive.fromSource(source, options);
    } catch (error) {
      await source.close().catch(() => undefined);
      throw error;
    }
  }

  /** Validates the archive held by `source`; the archive takes ownership of it (see close). */
  static async fromSource(source: ByteSource, options: ZipReadOptions = {}): Promise<ZipArchive> {
    const limits = { ...DEFAULT_READ_OPTIONS, ...definedOnly(options) };
    const fail = (message: string, entry?: string): ZipError => new ZipError(source.name, message, entry);
    const directory = await readDirectoryLocation(source, limits, fail);
    const records = await readCentralDirectory(source, directory, limits, fail);
    const entries = new Map<string, ZipEntry>();
    for (const record of records) {
      entries.set(record.name, await readLocalHeader(source, record, fail));
    }
    checkLayout([...entries.values()], directory.offset, fail);
    return new ZipArchive(source, entries, limits);
  }

  /** The file or memory name used in messages. */
  get name(): string {
    return this.#source.name;
  }

  /** The entry called `name`, or undefined. */
  get(name: string): ZipEntry | undefined {
    return this.entries.get(name);
  }

  /**
   * The whole uncompressed content of an entry. Deflated data is inflated with a cap at the
   * declared size; the CRC-32 is checked when the directory records one.
   */
  async read(entry: ZipEntry): Promise<Uint8Array> {
    let data: Uint8Array;
    if (entry.method === 'stored') {
      data = this.allocate(entry, entry.size);
      await readExactly(this.#source, data, entry.dataOffset, entry.name);
    } else {
      data = await this.inflate(entry);
    }
    // A recorded CRC of 0 for non-empty data is how torch marks "not computed"; real zero CRCs
    // are a 1-in-4-billion event, so skipping them costs nothing in practice.
    if (entry.crc32 !== 0 || data.length === 0) {
      const actual = crc32(data) >>> 0;
      if (actual !== entry.crc32) {
        throw new ZipError(this.name, `CRC-32 mismatch: the directory records ${hex32(entry.crc32)}, the data has ${hex32(actual)} (corrupt archive)`, entry.name);
      }
    }
    return data;
  }

  /**
   * `length` bytes starting `start` bytes into the uncompressed content. Stored entries are read
   * directly (no CRC check, since only part is read); deflated entries are inflated whole first.
   */
  async readRange(entry: ZipEntry, start: number, length: number): Promise<Uint8Array> {
    if (!Number.isSafeInteger(start) || !Number.isSafeInteger(length) || start < 0 || length < 0 || start + length > entry.size) {
      throw new ZipError(this.name, `read range: expected [start, start + length) within the ${entry.size} bytes of the entry, found start ${start}, length ${length}`, entry.name);
    }
    if (start === 0 && length === entry.size) return this.read(entry);
    if (entry.method === 'deflated') return (await this.read(entry)).subarray(start, start + length);
    const data = this.allocate(entry, length);
    await readExactly(this.#source, data, entry.dataOffset + start, entry.name);
    return data;
  }

  /** Releases the underlying file; later reads fail. Safe to call twice. */
  async close(): Promise<void> {
    await this.#source.close();
  }

  private async inflate(entry: ZipEntry): Promise<Uint8Array> {
    const compressed = this.allocate(entry, entry.compressedSize);
    await readExactly(this.#source, compressed, entry.dataOffset, entry.name);
    let out: Uint8Array;
    try {
      // maxOutputLength makes zlib stop at the declared size, so a lying size cannot blow up memory.
      out = await inflateRawAsync(compressed, { maxOutputLength: Math.max(1, entry.size) });
    } catch (cause) {
      if (isCode(cause, 'ERR_BUFFER_TOO_LARGE')) {
        throw new ZipError(this.name, `deflated data inflates to more than the declared ${entry.size} bytes (zip bomb or corrupt size)`, entry.name, { cause });
      }
      throw new ZipError(this.name, `corrupt deflated data: ${describeError(cause)}`, entry.name, { cause });
    }
    if (out.length !== entry.size) {
      throw new ZipError(this.name, `deflated data inflates to ${out.length} bytes, but the directory declares ${entry.size}`, entry.name);
    }
    // A plain Uint8Array that owns its memory (zlib may hand back a Buffer inside a shared slab).
    return out.byteOffset === 0 && out.buffer.byteLength === out.length ? new Uint8Array(out.buffer, 0, out.length) : new Uint8Array(out);
  }

  private allocate(entry: ZipEntry, bytes: number): Uint8Array {
    try {
      return new Uint8Array(bytes);
    } catch (cause) {
      throw new ZipError(this.name, `cannot allocate ${bytes} bytes: ${describeError(cause)}`, entry.name, { cause });
    }
  }

  /** Limits in force (with defaults filled in). */
  get options(): Readonly<Required<ZipReadOptions>> {
    return this.#options;
  }
}

type Fail = (message: string, entry?: string) => ZipError;

// Finds the end-of-central-directory record (and its zip64 counterpart) and checks it describes a
// central directory that ends exactly where the records begin.
async function readDirectoryLocation(source: ByteSource, limits: Required<ZipReadOptions>, fail: Fail): Promise<Directory> {
  const size = source.size;
  if (size < EOCD_BYTES) throw fail(`not a zip archive: ${size} bytes is shorter than the 22-byte end-of-central-directory record`);
  const tailLength = Math.min(size, EOCD_BYTES + MAX_COMMENT_BYTES + ZIP64_LOCATOR_BYTES);
  const tailStart = size - tailLength;
  const tail = new Uint8Array(tailLength);
  await readExactly(source, tail, tailStart);
  const view = new DataView(tail.buffer);

  // The record ends the file, followed only by its comment: scanning backwards and requiring the
  // comment length to reach exactly the end avoids matching a signature inside the comment.
  let at = -1;
  for (let i = tailLength - EOCD_BYTES; i >= 0; i--) {
    if (view.getUint32(i, true) === SIG_EOCD && i + EOCD_BYTES + view.getUint16(i + 20, true) === tailLength) {
      at = i;
      break;
    }
  }
  if (at < 0) throw fail('not a zip archive, or truncated: no end-of-central-directory record at the end of the file');
  const eocdOffset = tailStart + at;
  const disk = view.getUint16(at + 4, true);
  const directoryDisk = view.getUint16(at + 6, true);
  const entriesOnDisk = view.getUint16(at + 8, true);
  const entryCount = view.getUint16(at + 10, true);
  const directorySize = view.getUint32(at + 12, true);
  const directoryOffset = view.getUint32(at + 16, true);

  let directory: Directory = { entryCount, offset: directoryOffset, size: directorySize, end: eocdOffset };
  const hasLocator = at >= ZIP64_LOCATOR_BYTES && view.getUint32(at - ZIP64_LOCATOR_BYTES, true) === SIG_ZIP64_LOCATOR;
  if (hasLocator) {
    directory = await readZip64Directory(source, view, at - ZIP64_LOCATOR_BYTES, eocdOffset - ZIP64_LOCATOR_BYTES, fail);
    // Classic fields hold either the sentinel or the same value as the zip64 record.
    const agree = (classic: number, sentinel: number, wide: number): boolean => classic === sentinel || classic === wide;
    if (
      !agree(entryCount, U16_SENTINEL, directory.entryCount) ||
      !agree(entriesOnDisk, U16_SENTINEL, directory.entryCount) ||
      !agree(directorySize, U32_SENTINEL, directory.size) ||
      !agree(directoryOffset, U32_SENTINEL, directory.offset)
    ) {
      throw fail('end of central directory: the classic and zip64 records disagree on the central directory');
    }
  } else {
    if (disk !== 0 || directoryDisk !== 0 || entriesOnDisk !== entryCount) {
      throw fail('end of central directory: multi-disk (split) archives are not supported');
    }
    if (entryCount === U16_SENTINEL || directorySize === U32_SENTINEL || directoryOffset === U32_SENTINEL) {
      throw fail('end of central directory: zip64 values are flagged but the zip64 locator is missing');
    }
  }

  if (directory.entryCount > limits.maxEntries) {
    throw fail(`central directory: declares ${directory.entryCount} entries, more than the limit of ${limits.maxEntries}`);
  }
  if (directory.size > limits.maxCentralDirectoryBytes) {
    throw fail(`central directory: declares ${directory.size} bytes, more than the limit of ${limits.maxCentralDirectoryBytes}`);
  }
  if (directory.offset + directory.size !== directory.end) {
    throw fail(`central directory: declared at [${directory.offset}, ${directory.offset + directory.size}) but the end records start at ${directory.end} (truncated, or data before/inside the archive)`);
  }
  if (directory.size < directory.entryCount * CENTRAL_HEADER_BYTES) {
    throw fail(`central directory: ${directory.size} bytes cannot hold the ${directory.entryCount} declared entries`);
  }
  return directory;
}

async function readZip64Directory(source: ByteSource, tail: DataView, locatorAt: number, locatorOffset: number, fail: Fail): Promise<Directory> {
  const recordDisk = tail.getUint32(locatorAt + 4, true);
  const recordOffset = readU64(tail, locatorAt + 8, 'zip64 locator: record offset', fail);
  const totalDisks = tail.getUint32(locatorAt + 16, true);
  if (recordDisk !== 0 || totalDisks > 1) throw fail('zip64 locator: multi-disk (split) archives are not supported');
  if (recordOffset + ZIP64_EOCD_BYTES > locatorOffset) {
    throw fail(`zip64 locator: points at offset ${recordOffset}, which leaves no room for the 56-byte zip64 record before the locator at ${locatorOffset}`);
  }
  const bytes = new Uint8Array(ZIP64_EOCD_BYTES);
  await readExactly(source, bytes, recordOffset);
  const view = new DataView(bytes.buffer);
  if (view.getUint32(0, true) !== SIG_ZIP64_EOCD) throw fail(`zip64 end of central directory: no record signature at offset ${recordOffset}`);
  const recordSize = readU64(view, 4, 'zip64 record size', fail);
  if (recordOffset + 12 + recordSize !== locatorOffset) {
    throw fail(`zip64 end of central directory: record at ${recordOffset} of ${recordSize} + 12 bytes does not end at the locator (offset ${locatorOffset})`);
  }
  const disk = view.getUint32(16, true);
  const directoryDisk = view.getUint32(20, true);
  const entriesOnDisk = readU64(view, 24, 'zip64 entries on disk', fail);
  const entryCount = readU64(view, 32, 'zip64 entry count', fail);
  const size = readU64(view, 40, 'zip64 central directory size', fail);
  const offset = readU64(view, 48, 'zip64 central directory offset', fail);
  if (disk !== 0 || directoryDisk !== 0 || entriesOnDisk !== entryCount) {
    throw fail('zip64 end of central directory: multi-disk (split) archives are not supported');
  }
  return { entryCount, size, offset, end: recordOffset };
}

async function readCentralDirectory(source: ByteSource, directory: Directory, limits: Required<ZipReadOptions>, fail: Fail): Promise<CentralRecord[]> {
  const bytes = new Uint8Array(directory.size);
  await readExactly(source, bytes, directory.offset);
  const view = new DataView(bytes.buffer);
  const records: CentralRecord[] = [];
  const names = new Set<string>();
  let p = 0;
  for (let index = 0; index < directory.entryCount; index++) {
    const where = `central directory entry ${index}`;
    if (p + CENTRAL_HEADER_BYTES > bytes.length) throw fail(`${where}: truncated (the directory ends at byte ${bytes.length})`);
    if (view.getUint32(p, true) !== SIG_CENTRAL) throw fail(`${where}: no central header signature at offset ${directory.offset + p}`);
    const flags = view.getUint16(p + 8, true);
    const method = view.getUint16(p + 10, true);
    const crc = view.getUint32(p + 16, true);
    let compressedSize = view.getUint32(p + 20, true);
    let size = view.getUint32(p + 24, true);
    const nameLength = view.getUint16(p + 28, true);
    const extraLength = view.getUint16(p + 30, true);
    const commentLength = view.getUint16(p + 32, true);
    let diskStart = view.getUint16(p + 34, true);
    let headerOffset = view.getUint32(p + 42, true);
    const end = p + CENTRAL_HEADER_BYTES + nameLength + extraLength + commentLength;
    if (end > bytes.length) throw fail(`${where}: name, extra field and comment run past the end of the central directory`);
    const nameBytes = bytes.slice(p + CENTRAL_HEADER_BYTES, p + CENTRAL_HEADER_BYTES + nameLength);
    let name: string;
    try {
      name = utf8.decode(nameBytes);
    } catch {
      throw fail(`${where}: name is not valid UTF-8`);
    }
    const extra = new DataView(bytes.buffer, p + CENTRAL_HEADER_BYTES + nameLength, extraLength);

    // Zip64 extra field: present only for the fields whose classic value is the sentinel, in order.
    const zip64 = findExtraField(extra, ZIP64_EXTRA_ID, (message) => fail(`${where}: ${message}`, name));
    if (zip64 !== undefined) {
      let q = 0;
      const next = (label: string): number => {
        if (q + 8 > zip64.byteLength) throw fail(`${where}: zip64 extra field too short for the ${label}`, name);
        const value = readU64(zip64, q, label, fail);
        q += 8;
        return value;
      };
      if (size === U32_SENTINEL) size = next('uncompressed size');
      if (compressedSize === U32_SENTINEL) compressedSize = next('compressed size');
      if (headerOffset === U32_SENTINEL) headerOffset = next('local header offset');
      if (diskStart === U16_SENTINEL) {
        if (q + 4 > zip64.byteLength) throw fail(`${where}: zip64 extra field too short for the disk number`, name);
        diskStart = zip64.getUint32(q, true);
      }
    }

    if (diskStart !== 0) throw fail(`${where}: on disk ${diskStart}; multi-disk (split) archives are not supported`, name);
    if ((flags & (FLAG_ENCRYPTED | FLAG_STRONG_ENCRYPTION)) !== 0) throw fail('encrypted entries are not supported', name);
    if (method !== METHOD_STORED && method !== METHOD_DEFLATED) {
      throw fail(`compression method ${method} is not supported (only 0 stored and 8 deflated)`, name);
    }
    if (method === METHOD_STORED && compressedSize !== size) {
      throw fail(`stored entry: compressed size ${compressedSize} differs from size ${size}`, name);
    }
    if (method === METHOD_DEFLATED) {
      if (size > limits.maxInflatedBytes) {
        throw fail(`deflated entry declares ${size} uncompressed bytes, more than the limit of ${limits.maxInflatedBytes}`, name);
      }
      if (compressedSize > limits.maxInflatedBytes) {
        throw fail(`deflated entry declares ${compressedSize} compressed bytes, more than the limit of ${limits.maxInflatedBytes}`, name);
      }
      if (size > limits.maxCompressionRatio * Math.max(compressedSize, 1)) {
        throw fail(`deflated entry declares ${size} bytes from ${compressedSize} compressed bytes, a ratio above ${limits.maxCompressionRatio} (zip bomb?)`, name);
      }
    }
    if (names.has(name)) throw fail('duplicate entry name in the central directory', name);
    names.add(name);
    records.push({ name, nameBytes, flags, method, crc32: crc, compressedSize, size, headerOffset });
    p = end;
  }
  if (p !== bytes.length) throw fail(`central directory: ${bytes.length - p} unexplained bytes after the ${directory.entryCount} declared entries`);
  return records;
}

// Speculative read size for a local header: torch pads names with an extra field of at most
// 64 + 4 bytes, so one read almost always suffices.
const LOCAL_HEADER_GUESS = LOCAL_HEADER_BYTES + 512;

async function readLocalHeader(source: ByteSource, record: CentralRecord, fail: Fail): Promise<ZipEntry> {
  const { name } = record;
  if (record.headerOffset + LOCAL_HEADER_BYTES > source.size) {
    throw fail(`local header at offset ${record.headerOffset} lies past the end of the ${source.size}-byte file (truncated)`, name);
  }
  let bytes = new Uint8Array(Math.min(LOCAL_HEADER_GUESS + record.nameBytes.length, source.size - record.headerOffset));
  await readExactly(source, bytes, record.headerOffset, name);
  let view = new DataView(bytes.buffer);
  if (view.getUint32(0, true) !== SIG_LOCAL) throw fail(`no local header signature at offset ${record.headerOffset} (truncated or corrupt archive)`, name);
  const flags = view.getUint16(6, true);
  const method = view.getUint16(8, true);
  const crc = view.getUint32(14, true);
  const compressedSize = view.getUint32(18, true);
  const size = view.getUint32(22, true);
  const nameLength = view.getUint16(26, true);
  const extraLength = view.getUint16(28, true);
  const headerLength = LOCAL_HEADER_BYTES + nameLength + extraLength;
  if (record.headerOffset + headerLength > source.size) {
    throw fail(`local header at offset ${record.headerOffset} runs past the end of the file (truncated)`, name);
  }
  if (headerLength > bytes.length) {
    bytes = new Uint8Array(headerLength);
    await readExactly(source, bytes, record.headerOffset, name);
    view = new DataView(bytes.buffer);
  }
  const localName = bytes.subarray(LOCAL_HEADER_BYTES, LOCAL_HEADER_BYTES + nameLength);
  if (!equalBytes(localName, record.nameBytes)) throw fail('local header names a different file than the central directory', name);
  if (method !== record.method) throw fail(`local header says compression method ${method}, the central directory says ${record.method}`, name);
  if ((flags & (FLAG_ENCRYPTED | FLAG_STRONG_ENCRYPTION)) !== 0) throw fail('encrypted entries are not supported', name);
  // Without a data descriptor the local header carries the real CRC and sizes (or zip64 sentinels).
  if ((flags & FLAG_DATA_DESCRIPTOR) === 0) {
    const sizesAgree =
      (compressedSize === U32_SENTINEL || compressedSize === record.compressedSize) && (size === U32_SENTINEL || size === record.size);
    if (crc !== record.crc32 || !sizesAgree) throw fail('local header CRC or sizes disagree with the central directory', name);
  }
  const dataOffset = record.headerOffset + headerLength;
  if (dataOffset + record.compressedSize > source.size) {
    throw fail(`data [${dataOffset}, ${dataOffset + record.compressedSize}) runs past the end of the ${source.size}-byte file (truncated)`, name);
  }
  return Object.freeze({
    name,
    method: record.method === METHOD_STORED ? 'stored' : 'deflated',
    size: record.size,
    compressedSize: record.compressedSize,
    crc32: record.crc32,
    headerOffset: record.headerOffset,
    dataOffset,
  } satisfies ZipEntry);
}

// Entries must not overlap one another or the central directory: overlapping entries are how
// "non-recursive" zip bombs reuse one compressed stream many times.
function checkLayout(entries: readonly ZipEntry[], directoryOffset: number, fail: Fail): void {
  const sorted = [...entries].sort((a, b) => a.headerOffset - b.headerOffset);
  for (let i = 0; i < sorted.length; i++) {
    const entry = sorted[i]!;
    const end = entry.dataOffset + entry.compressedSize;
    const limit = i + 1 < sorted.length ? sorted[i + 1]!.headerOffset : directoryOffset;
    if (end > limit) {
      const what = i + 1 < sorted.length ? `the next entry ${quote(sorted[i + 1]!.name)} at ${limit}` : `the central directory at ${limit}`;
      throw fail(`data [${entry.dataOffset}, ${end}) overlaps ${what}`, entry.name);
    }
  }
}

function findExtraField(extra: DataView, id: number, fail: (message: string) => ZipError): DataView | undefined {
  let found: DataView | undefined;
  let p = 0;
  while (p < extra.byteLength) {
    if (p + 4 > extra.byteLength) throw fail('malformed extra field (truncated field header)');
    const fieldId = extra.getUint16(p, true);
    const length = extra.getUint16(p + 2, true);
    if (p + 4 + length > extra.byteLength) throw fail('malformed extra field (field runs past the extra area)');
    if (fieldId === id) {
      if (found !== undefined) throw fail(`malformed extra field (field 0x${id.toString(16).padStart(4, '0')} appears twice)`);
      found = new DataView(extra.buffer, extra.byteOffset + p + 4, length);
    }
    p += 4 + length;
  }
  return found;
}

function readU64(view: DataView, at: number, label: string, fail: Fail): number {
  const value = view.getBigUint64(at, true);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw fail(`${label}: ${value} exceeds 2^53 - 1`);
  return Number(value);
}

// =============================================================================================
// Writing

/** Options of the stored-entry writer. */
export interface ZipWriterOptions {
  /** Align each entry's data to this many bytes, as torch does (default 64; 1 disables). */
  readonly align?: number;
  /** Write zip64 records and fields even when nothing needs them (tests of the zip64 path). */
  readonly forceZip64?: boolean;
}

interface WrittenEntry {
  readonly nameBytes: Uint8Array;
  readonly utf8: boolean;
  readonly crc: number;
  readonly size: number;
  readonly offset: number;
  readonly zip64Sizes: boolean;
}

// Fixed DOS timestamp 1980-01-01 00:00 so identical inputs give identical archives.
const DOS_TIME = 0;
const DOS_DATE = (1 << 5) | 1;
const PADDING_EXTRA_ID = 0x4246; // "FB", the id torch's writer uses for its alignment padding
const encoder = new TextEncoder();

/** Streams an archive of stored (uncompressed) entries to `sink`, aligning data like torch.save. */
export class ZipWriter {
  readonly #sink: (chunk: Uint8Array) => Promise<void> | void;
  readonly #align: number;
  readonly #forceZip64: boolean;
  readonly #entries: WrittenEntry[] = [];
  readonly #names = new Set<string>();
  #position = 0;
  #finished = false;

  constructor(sink: (chunk: Uint8Array) => Promise<void> | void, options: ZipWriterOptions = {}) {
    const align = options.align ?? 64;
    if (!Number.isSafeInteger(align) || align < 1 || align > 0x8000) throw new RangeError(`zip writer: alignment must be an integer in [1, 32768], got ${align}`);
    this.#sink = sink;
    this.#align = align;
    this.#forceZip64 = options.forceZip64 ?? false;
  }

  /** Bytes written so far. */
  get position(): number {
    return this.#position;
  }

  /** Appends one stored entry whose content is the concatenation of `chunks`. */
  async add(name: string, chunks: Uint8Array | readonly Uint8Array[]): Promise<void> {
    if (this.#finished) throw new Error('zip writer: add after finish');
    if (this.#names.has(name)) throw new Error(`zip writer: duplicate entry name ${quote(name)}`);
    const nameBytes = encoder.encode(name);
    if (nameBytes.length === 0 || nameBytes.length > 0xffff) throw new Error(`zip writer: entry name must be 1..65535 bytes, got ${nameBytes.length}`);
    const parts = chunks instanceof Uint8Array ? [chunks] : chunks;
    let size = 0;
    let crc = 0;
    for (const part of parts) {
      size += part.length;
      crc = crc32(part, crc);
    }
    const offset = this.#position;
    const zip64Sizes = this.#forceZip64 || size >= U32_SENTINEL;
    const utf8Name = nameBytes.some((b) => b >= 0x80);

    const zip64Extra = zip64Sizes ? 20 : 0;
    const unpadded = offset + LOCAL_HEADER_BYTES + nameBytes.length + zip64Extra;
    let padding = (this.#align - (unpadded % this.#align)) % this.#align;
    // The padding is itself an extra field with a 4-byte header, so it needs at least 4 bytes.
    if (padding > 0 && padding < 4) padding += this.#align * Math.ceil((4 - padding) / this.#align);
    const header = new Uint8Array(LOCAL_HEADER_BYTES + nameBytes.length + zip64Extra + padding);
    const view = new DataView(header.buffer);
    view.setUint32(0, SIG_LOCAL, true);
    view.setUint16(4, zip64Sizes ? 45 : 20, true);
    view.setUint16(6, utf8Name ? FLAG_UTF8 : 0, true);
    view.setUint16(8, METHOD_STORED, true);
    view.setUint16(10, DOS_TIME, true);
    view.setUint16(12, DOS_DATE, true);
    view.setUint32(14, crc >>> 0, true);
    view.setUint32(18, zip64Sizes ? U32_SENTINEL : size, true);
    view.setUint32(22, zip64Sizes ? U32_SENTINEL : size, true);
    view.setUint16(26, nameBytes.length, true);
    view.setUint16(28, zip64Extra + padding, true);
    header.set(nameBytes, LOCAL_HEADER_BYTES);
    let p = LOCAL_HEADER_BYTES + nameBytes.length;
    if (zip64Sizes) {
      view.setUint16(p, ZIP64_EXTRA_ID, true);
      view.setUint16(p + 2, 16, true);
      view.setBigUint64(p + 4, BigInt(size), true);
      view.setBigUint64(p + 12, BigInt(size), true);
      p += 20;
    }
    if (padding > 0) {
      view.setUint16(p, PADDING_EXTRA_ID, true);
      view.setUint16(p + 2, padding - 4, true);
      header.fill(0x5a /* Z */, p + 4, p + padding);
    }
    await this.write(header);
    for (const part of parts) if (part.length > 0) await this.write(part);
    this.#names.add(name);
    this.#entries.push({ nameBytes, utf8: utf8Name, crc: crc >>> 0, size, offset, zip64Sizes });
  }

  /** Writes the central directory and end records; returns the archive's total size. */
  async finish(): Promise<number> {
    if (this.#finished) throw new Error('zip writer: finish called twice');
    this.#finished = true;
    const directoryOffset = this.#position;
    for (const entry of this.#entries) await this.write(centralHeader(entry, this.#forceZip64));
    const directorySize = this.#position - directoryOffset;
    const count = this.#entries.length;
    const zip64 = this.#forceZip64 || count >= U16_SENTINEL || directoryOffset >= U32_SENTINEL || directorySize >= U32_SENTINEL;
    if (zip64) {
      const recordOffset = this.#position;
      const record = new DataView(new ArrayBuffer(ZIP64_EOCD_BYTES + ZIP64_LOCATOR_BYTES));
      record.setUint32(0, SIG_ZIP64_EOCD, true);
      record.setBigUint64(4, BigInt(ZIP64_EOCD_BYTES - 12), true);
      record.setUint16(12, 45, true);
      record.setUint16(14, 45, true);
      record.setBigUint64(24, BigInt(count), true);
      record.setBigUint64(32, BigInt(count), true);
      record.setBigUint64(40, BigInt(directorySize), true);
      record.setBigUint64(48, BigInt(directoryOffset), true);
      record.setUint32(56, SIG_ZIP64_LOCATOR, true);
      record.setBigUint64(64, BigInt(recordOffset), true);
      record.setUint32(72, 1, true);
      await this.write(new Uint8Array(record.buffer));
    }
    const eocd = new DataView(new ArrayBuffer(EOCD_BYTES));
    eocd.setUint32(0, SIG_EOCD, true);
    const wide = this.#forceZip64;
    eocd.setUint16(8, wide || count >= U16_SENTINEL ? U16_SENTINEL : count, true);
    eocd.setUint16(10, wide || count >= U16_SENTINEL ? U16_SENTINEL : count, true);
    eocd.setUint32(12, wide || directorySize >= U32_SENTINEL ? U32_SENTINEL : directorySize, true);
    eocd.setUint32(16, wide || directoryOffset >= U32_SENTINEL ? U32_SENTINEL : directoryOffset, true);
    await this.write(new Uint8Array(eocd.buffer));
    return this.#position;
  }

  private async write(chunk: Uint8Array): Promise<void> {
    await this.#sink(chunk);
    this.#position += chunk.length;
  }
}

function centralHeader(entry: WrittenEntry, force: boolean): Uint8Array {
  const wideSizes = entry.zip64Sizes;
  const wideOffset = force || entry.offset >= U32_SENTINEL;
  const extraLength = wideSizes || wideOffset ? 4 + (wideSizes ? 16 : 0) + (wideOffset ? 8 : 0) : 0;
  const out = new Uint8Array(CENTRAL_HEADER_BYTES + entry.nameBytes.length + extraLength);
  const view = new DataView(out.buffer);
  const needs64 = extraLength > 0;
  view.setUint32(0, SIG_CENTRAL, true);
  view.setUint16(4, needs64 ? 45 : 20, true);
  view.setUint16(6, needs64 ? 45 : 20, true);
  view.setUint16(8, entry.utf8 ? FLAG_UTF8 : 0, true);
  view.setUint16(10, METHOD_STORED, true);
  view.setUint16(12, DOS_TIME, true);
  view.setUint16(14, DOS_DATE, true);
  view.setUint32(16, entry.crc, true);
  view.setUint32(20, wideSizes ? U32_SENTINEL : entry.size, true);
  view.setUint32(24, wideSizes ? U32_SENTINEL : entry.size, true);
  view.setUint16(28, entry.nameBytes.length, true);
  view.setUint16(30, extraLength, true);
  view.setUint32(42, wideOffset ? U32_SENTINEL : entry.offset, true);
  out.set(entry.nameBytes, CENTRAL_HEADER_BYTES);
  if (needs64) {
    let p = CENTRAL_HEADER_BYTES + entry.nameBytes.length;
    view.setUint16(p, ZIP64_EXTRA_ID, true);
    view.setUint16(p + 2, extraLength - 4, true);
    p += 4;
    if (wideSizes) {
      view.setBigUint64(p, BigInt(entry.size), true);
      view.setBigUint64(p + 8, BigInt(entry.size), true);
      p += 16;
    }
    if (wideOffset) view.setBigUint64(p, BigInt(entry.offset), true);
  }
  return out;
}

// =============================================================================================
// Helpers

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function definedOnly<T extends object>(options: T): Partial<T> {
  return Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined)) as Partial<T>;
}

function isCode(error: unknown, code: string): boolean {
  return typeof error === 'object' && error !== null && (error as { code?: unknown }).code === code;
}

function hex32(value: number): string {
  return `0x${(value >>> 0).toString(16).padStart(8, '0')}`;
}
