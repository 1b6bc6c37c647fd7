// Safe reader for PyTorch checkpoints (.ckpt / .pt / .pth / .bin written by torch.save): the zip
// format (torch >= 1.6: <top>/data.pkl + <top>/data/<key> storages) and the legacy format (five
// pickles back to back, then the raw storages). Nothing in a file is ever evaluated: the pickle
// machine (pickle.ts) hands every global and call to the hooks below, which accept only an
// allow-list no wider than AUTOMATIC1111's safe unpickler (modules/safe.py) — torch's tensor and
// storage rebuild functions, collections.OrderedDict, ParameterDict, numpy scalars/arrays/dtypes,
// _codecs.encode, set, and Lightning's ModelCheckpoint as inert data — and build inert JS values
// for them. Storage data is never loaded up front: tensors are references that read their bytes
// from the archive on demand, after their shape, strides and offset were checked against the
// storage's real size. See torch/serialization.py (_save, _load, _legacy_load) and
// torch/_utils.py (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter) for the format.

import {
  DTYPE_BYTES,
  bf16ToF32Array,
  f16ToF32Array,
  f8ToF32Array,
  type DType,
} from './dtypes.js';
import {
  DATA_ONLY_HOOKS,
  PickleError,
  PickleGlobal,
  PickleObject,
  PickleOpaque,
  PickleTruncatedError,
  PickleTuple,
  describePickleValue,
  isHashable,
  unpickle,
  type CallKind,
  type PickleDict,
  type PickleHooks,
  type PickleLimits,
  type PickleValue,
} from './pickle.js';
import { oneLine, quote } from './messages.js';
import { ZipArchive, ZipError, memorySource, openFileSource, readExactly, type ByteSource, type ZipEntry, type ZipReadOptions } from './zip.js';

export { PickleGlobal, PickleObject, PickleOpaque, PickleTuple, type PickleDict, type PickleValue } from './pickle.js';

/** Any problem with a torch checkpoint (format, policy, limits, or a failed lazy read); one line. */
export class TorchCheckpointError extends Error {
  readonly file: string;

  constructor(file: string, message: string, options?: { cause?: unknown }) {
    super(oneLine(`${file}: ${message}`), options);
    this.name = 'TorchCheckpointError';
    this.file = file;
  }
}

/** Limits for reading a checkpoint; zip limits apply to the zip format. */
export interface TorchReadOptions extends ZipReadOptions {
  /** Largest pickle accepted (data.pkl, or the pickle part of a legacy file); default 64 MiB. */
  readonly maxPickleBytes?: number;
  /** Deepest container nesting accepted in the unpickled value (default 100). */
  readonly maxDepth?: number;
  /** Largest tensor a read may materialise, in bytes (default 2^32 - 1). */
  readonly maxTensorBytes?: number;
  /** Caps of the pickle machine (stack, memo, values). */
  readonly pickleLimits?: Partial<PickleLimits>;
}

const DEFAULTS = {
  maxPickleBytes: 64 * 1024 * 1024,
  maxDepth: 100,
  maxTensorBytes: 2 ** 32 - 1,
};

// =============================================================================================
// Dtypes

/** A torch dtype name this reader can hold tensors of, e.g. "float16". */
export type TorchDTypeName =
  | 'float64'
  | 'float32'
  | 'float16'
  | 'bfloat16'
  | 'int64'
  | 'int32'
  | 'int16'
  | 'int8'
  | 'uint8'
  | 'bool'
  | 'uint16'
  | 'uint32'
  | 'uint64'
  | 'float8_e4m3fn'
  | 'float8_e5m2';

const TORCH_TO_DTYPE: Readonly<Record<TorchDTypeName, DType>> = {
  float64: 'F64',
  float32: 'F32',
  float16: 'F16',
  bfloat16: 'BF16',
  int64: 'I64',
  int32: 'I32',
  int16: 'I16',
  int8: 'I8',
  uint8: 'U8',
  bool: 'BOOL',
  uint16: 'U16',
  uint32: 'U32',
  uint64: 'U64',
  float8_e4m3fn: 'F8_E4M3',
  float8_e5m2: 'F8_E5M2',
};

// The legacy typed storage classes torch still names in persistent ids (torch.storage
// _dtype_to_storage_type_map); dtypes without one are saved as UntypedStorage + _rebuild_tensor_v3.
const STORAGE_CLASSES: Readonly<Record<string, TorchDTypeName>> = {
  DoubleStorage: 'float64',
  FloatStorage: 'float32',
  HalfStorage: 'float16',
  BFloat16Storage: 'bfloat16',
  LongStorage: 'int64',
  IntStorage: 'int32',
  ShortStorage: 'int16',
  CharStorage: 'int8',
  ByteStorage: 'uint8',
  BoolStorage: 'bool',
};

const DTYPE_TO_TORCH: ReadonlyMap<DType, TorchDTypeName> = new Map(Object.entries(TORCH_TO_DTYPE).map(([t, d]) => [d, t as TorchDTypeName]));

/** The torch dtype name of a safetensors-style dtype, if torch has one. */
export function torchDTypeName(dtype: DType): TorchDTypeName | undefined {
  return DTYPE_TO_TORCH.get(dtype);
}

// =============================================================================================
// The allow-list

type GlobalKind =
  | 'ordered-dict'
  | 'rebuild-tensor-v2'
  | 'rebuild-tensor-v3'
  | 'rebuild-parameter'
  | 'rebuild-from-numpy'
  | 'typed-storage'
  | 'untyped-storage'
  | 'dtype'
  | 'inert-class'
  | 'inert-value'
  | 'numpy-scalar'
  | 'numpy-reconstruct'
  | 'numpy-dtype'
  | 'numpy-ndarray'
  | 'codecs-encode'
  | 'set';

const ALLOWED_GLOBALS: ReadonlyMap<string, GlobalKind> = new Map<string, GlobalKind>([
  [key('collections', 'OrderedDict'), 'ordered-dict'],
  [key('torch._utils', '_rebuild_tensor_v2'), 'rebuild-tensor-v2'],
  // The "untyped storage + dtype" form torch uses for dtypes without a legacy storage class.
  [key('torch._utils', '_rebuild_tensor_v3'), 'rebuild-tensor-v3'],
  [key('torch._utils', '_rebuild_parameter'), 'rebuild-parameter'],
  [key('torch._utils', '_rebuild_device_tensor_from_numpy'), 'rebuild-from-numpy'],
  ...Object.keys(STORAGE_CLASSES).map((name): [string, GlobalKind] => [key('torch', name), 'typed-storage']),
  [key('torch', 'UntypedStorage'), 'untyped-storage'],
  [key('torch.storage', 'UntypedStorage'), 'untyped-storage'],
  ...Object.keys(TORCH_TO_DTYPE).map((name): [string, GlobalKind] => [key('torch', name), 'dtype']),
  [key('torch.nn.modules.container', 'ParameterDict'), 'inert-class'],
  [key('pytorch_lightning.callbacks.model_checkpoint', 'ModelCheckpoint'), 'inert-class'],
  // A module object, allowed by A1111 for Lightning checkpoints; only ever kept as a value.
  [key('pytorch_lightning.callbacks', 'model_checkpoint'), 'inert-value'],
  // numpy >= 2 pickles the same functions under numpy._core.
  [key('numpy.core.multiarray', 'scalar'), 'numpy-scalar'],
  [key('numpy._core.multiarray', 'scalar'), 'numpy-scalar'],
  [key('numpy.core.multiarray', '_reconstruct'), 'numpy-reconstruct'],
  [key('numpy._core.multiarray', '_reconstruct'), 'numpy-reconstruct'],
  [key('numpy', 'dtype'), 'numpy-dtype'],
  [key('numpy', 'ndarray'), 'numpy-ndarray'],
  [key('_codecs', 'encode'), 'codecs-encode'],
  [key('builtins', 'set'), 'set'],
  [key('__builtin__', 'set'), 'set'],
]);

function key(module: string, name: string): string {
  return `${module}\u0000${name}`;
}

const PARAMETER_DICT = 'torch.nn.modules.container.ParameterDict';

/** The `module.name` pairs a checkpoint may reference, as "module.name" strings. */
export function allowedGlobals(): string[] {
  return [...ALLOWED_GLOBALS.keys()].map((k) => k.replace('\u0000', '.'));
}

// =============================================================================================
// Values the hooks create

/** A Python collections.OrderedDict; `attributes` holds its BUILD state (torch's `_metadata`). */
export class PickleOrderedDict extends Map<PickleValue, PickleValue> {
  attributes: PickleValue | undefined = undefined;
}

/** A numpy dtype (simple scalar types only). */
export class NumpyDType extends PickleOpaque {
  readonly kind = 'numpy dtype';
  byteOrder: '<' | '>' | '|' | '=' = '=';

  constructor(
    /** Kind and size, e.g. "f4", "i8", "b1". */
    readonly code: NumpyCode,
  ) {
    super();
  }

  get itemSize(): number {
    return NUMPY_CODES[this.code].bytes;
  }
}

/** A numpy ndarray held in memory (they are small in checkpoints: metrics, RNG states). */
export class NumpyArray extends PickleOpaque {
  readonly kind = 'numpy array';
  dtype: NumpyDType | undefined = undefined;
  shape: readonly number[] = [];
  fortranOrder = false;
  /** Raw element bytes in the array's own byte order and memory order. */
  data: Uint8Array = new Uint8Array(0);
}

type NumpyCode = 'b1' | 'i1' | 'u1' | 'i2' | 'u2' | 'i4' | 'u4' | 'i8' | 'u8' | 'f2' | 'f4' | 'f8';

const NUMPY_CODES: Readonly<Record<NumpyCode, { bytes: number; dtype: DType }>> = {
  b1: { bytes: 1, dtype: 'BOOL' },
  i1: { bytes: 1, dtype: 'I8' },
  u1: { bytes: 1, dtype: 'U8' },
  i2: { bytes: 2, dtype: 'I16' },
  u2: { bytes: 2, dtype: 'U16' },
  i4: { bytes: 4, dtype: 'I32' },
  u4: { bytes: 4, dtype: 'U32' },
  i8: { bytes: 8, dtype: 'I64' },
  u8: { bytes: 8, dtype: 'U64' },
  f2: { bytes: 2, dtype: 'F16' },
  f4: { bytes: 4, dtype: 'F32' },
  f8: { bytes: 8, dtype: 'F64' },
};

// Where a storage's bytes live.
interface StorageBacking {
  /** Fresh bytes [start, start + length) of the storage, in file byte order. */
  read(start: number, length: number): Promise<Uint8Array>;
}

interface ReadContext {
  readonly file: string;
  readonly maxTensorBytes: number;
}

/** A torch storage: a flat run of elements in the checkpoint, read on demand. */
export class TorchStorageRef extends PickleOpaque {
  readonly kind = 'storage';
  readonly #backing: StorageBacking;
  readonly #context: ReadContext;

  constructor(
    /** The storage key (the `<n>` of `data/<n>`, or the legacy root key). */
    readonly key: string,
    /** Element type; `U8` for an untyped storage. */
    readonly dtype: DType,
    /** Number of elements. */
    readonly numel: number,
    /** Device the storage was saved from ("cpu", "cuda:0"); data is always read to the CPU. */
    readonly location: string,
    /** False when the checkpoint's byteorder record says "big". */
    readonly littleEndian: boolean,
    backing: StorageBacking,
    context: ReadContext,
  ) {
    super();
    this.#backing = backing;
    this.#context = context;
  }

  /** Size in bytes. */
  get byteLength(): number {
    return this.numel * DTYPE_BYTES[this.dtype];
  }

  /** Bytes [start, start + length) of the storage as stored in the file (fresh copy). */
  async readBytes(start: number, length: number): Promise<Uint8Array> {
    if (!Number.isSafeInteger(start) || !Number.isSafeInteger(length) || start < 0 || length < 0 || start + length > this.byteLength) {
      throw new TorchCheckpointError(this.#context.file, `storage ${quote(this.key)}: read of [${start}, ${start + length}) is outside its ${this.byteLength} bytes`);
    }
    try {
      return await this.#backing.read(start, length);
    } catch (error) {
      throw asCheckpointError(error, this.#context.file, `storage ${quote(this.key)}`);
    }
  }
}

/** A tensor in a checkpoint: dtype, shape and strides are known; data is read on demand. */
export class TorchTensorRef extends PickleOpaque {
  readonly kind = 'tensor';
  readonly #context: ReadContext;

  constructor(
    readonly storage: TorchStorageRef,
    /** Element type (safetensors naming: F32, F16, BF16, I64…). */
    readonly dtype: DType,
    readonly shape: readonly number[],
    /** Strides in elements. */
    readonly stride: readonly number[],
    /** Offset into the storage in elements. */
    readonly storageOffset: number,
    readonly requiresGrad: boolean,
    /** True when saved as an nn.Parameter (`_rebuild_parameter`). */
    readonly isParameter: boolean,
    context: ReadContext,
  ) {
    super();
    this.#context = context;
  }

  /** The torch dtype name, e.g. "float16". */
  get torchDType(): TorchDTypeName {
    return DTYPE_TO_TORCH.get(this.dtype)!;
  }

  /** Number of elements. */
  get numel(): number {
    return this.shape.reduce((a, b) => a * b, 1);
  }

  /** Size of the materialised tensor in bytes. */
  get byteLength(): number {
    return this.numel * DTYPE_BYTES[this.dtype];
  }

  /** True if the elements are one row-major run of the storage (dimensions of size 1 ignored). */
  get isContiguous(): boolean {
    return isContiguous(this.shape, this.stride);
  }

  /** The same tensor marked as an nn.Parameter. */
  asParameter(requiresGrad: boolean): TorchTensorRef {
    return new TorchTensorRef(this.storage, this.dtype, this.shape, this.stride, this.storageOffset, requiresGrad, true, this.#context);
  }

  /** The elements in row-major order as little-endian bytes (strided views are gathered). */
  async readRaw(): Promise<Uint8Array> {
    const item = DTYPE_BYTES[this.dtype];
    const count = this.numel;
    const total = count * item;
    if (total > this.#context.maxTensorBytes) {
      throw new TorchCheckpointError(this.#context.file, `tensor of shape ${formatShape(this.shape)} (${this.dtype}) would take ${total} bytes, more than the limit of ${this.#context.maxTensorBytes}`);
    }
    if (count === 0) return new Uint8Array(0);
    let out: Uint8Array;
    if (this.isContiguous) {
      out = await this.storage.readBytes(this.storageOffset * item, total);
    } else {
      // Read the span the view touches (bounded by the storage's real size), then gather.
      const last = lastIndex(this.shape, this.stride, this.storageOffset);
      const span = await this.storage.readBytes(this.storageOffset * item, (last - this.storageOffset + 1) * item);
      out = gather(span, this.shape, this.stride, item);
    }
    out = ownBuffer(out);
    if (!this.storage.littleEndian && item > 1) swapBytes(out, item);
    return out;
  }

  /** The elements as float32 (floats rounded to nearest, integers converted, bool as 0/1). */
  async readFloat32(): Promise<Float32Array> {
    const raw = await this.readRaw();
    return toFloat32(raw, this.dtype, this.numel);
  }
}

// =============================================================================================
// Checkpoint

/** A loaded checkpoint: the unpickled structure, with every tensor also listed by path. */
export interface TorchCheckpoint {
  /** The path (or name) it was read from. */
  readonly path: string;
  readonly format: 'zip' | 'legacy';
  /** The unpickled value; tensors are TorchTensorRef, dicts are Maps, tuples PickleTuple. */
  readonly root: PickleValue;
  /**
   * Every tensor reachable from the root, keyed by its path with components joined by "." (dict
   * keys as text, list/tuple indices as numbers). A container reachable by several paths is
   * listed under the first one only; a tensor reachable by several paths (tied weights) under each.
   */
  readonly tensors: ReadonlyMap<string, TorchTensorRef>;
  /** Releases the file; later tensor reads fail. */
  close(): Promise<void>;
}

class LoadedCheckpoint implements TorchCheckpoint {
  constructor(
    readonly path: string,
    readonly format: 'zip' | 'legacy',
    readonly root: PickleValue,
    readonly tensors: ReadonlyMap<string, TorchTensorRef>,
    private readonly source: { close(): Promise<void> },
  ) {}

  close(): Promise<void> {
    return this.source.close();
  }
}

/** Reads a torch checkpoint without evaluating anything in it; tensor data stays on disk until read. */
export async function readTorchCheckpoint(path: string, options: TorchReadOptions = {}): Promise<TorchCheckpoint> {
  let source: ByteSource;
  try {
    source = await openFileSource(path);
  } catch (error) {
    throw asCheckpointError(error, path);
  }
  try {
    return await loadFromSource(source, options);
  } catch (error) {
    await source.close().catch(() => undefined);
    throw asCheckpointError(error, path);
  }
}

/** Reads a checkpoint held in memory (tests, fuzzing); the bytes are not copied. */
export async function readTorchCheckpointBytes(bytes: Uint8Array, name = '<memory>', options: TorchReadOptions = {}): Promise<TorchCheckpoint> {
  try {
    return await loadFromSource(memorySource(bytes, name), options);
  } catch (error) {
    throw asCheckpointError(error, name);
  }
}

async function loadFromSource(source: ByteSource, options: TorchReadOptions): Promise<TorchCheckpoint> {
  const file = source.name;
  // Storage bytes are viewed as typed arrays, which use the host's byte order.
  if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) throw new TorchCheckpointError(file, 'reading checkpoints needs a little-endian host');
  if (source.size === 0) throw new TorchCheckpointError(file, 'empty file: expected a torch checkpoint');
  const head = new Uint8Array(Math.min(source.size, 512));
  await readExactly(source, head, 0);
  // torch.load itself decides by the first four bytes (serialization._is_zipfile).
  if (head.length >= 4 && head[0] === 0x50 && head[1] === 0x4b && head[2] === 0x03 && head[3] === 0x04) {
    return loadZip(source, options);
  }
  if (head[0] === 0x80) return loadLegacy(source, options);
  if (head.length >= 262 && String.fromCharCode(...head.subarray(257, 262)) === 'ustar') {
    throw new TorchCheckpointError(file, 'the tar-based format of very early torch versions is not supported');
  }
  const preview = [...head.subarray(0, 4)].map((b) => b.toString(16).padStart(2, '0')).join(' ');
  throw new TorchCheckpointError(file, `not a torch checkpoint: expected a zip archive (50 4b 03 04) or a pickle (80 …), found bytes ${preview}`);
}

// ---------------------------------------------------------------------------------------------
// Zip format

// <top>/<record>: the records torch.save writes (serialization.py _save and the C++ stream writer).
const MEMBER_PATTERN = /^([^/\\\u0000]+)\/(data\.pkl|version|byteorder|\.data\/serialization_id|\.data\/version|\.format_version|\.storage_alignment|data\/([0-9]{1,20}))$/;
const SMALL_RECORD_BYTES = 64;

async function loadZip(source: ByteSource, options: TorchReadOptions): Promise<TorchCheckpoint> {
  const file = source.name;
  const archive = await ZipArchive.fromSource(source, options);
  const fail = (message: string): TorchCheckpointError => new TorchCheckpointError(file, message);

  // Member names: only the torch layout is accepted, so path tricks ("../x", "/etc/x",
  // "archive/../../x") and TorchScript archives (code/, constants.pkl) stop here.
  const pickles: string[] = [];
  const records = new Map<string, ZipEntry>();
  for (const entry of archive.entries.values()) {
    const match = MEMBER_PATTERN.exec(entry.name);
    if (match === null || match[1] === '.' || match[1] === '..') {
      const hint = /(^|\/)(code\/|constants\.pkl$|\.data\/ts_code)/.test(entry.name) ? ' (a TorchScript archive: use torch.jit.load, not supported here)' : '';
      throw fail(`unexpected member ${quote(entry.name)}${hint}: a torch checkpoint holds only <top>/data.pkl, <top>/data/<n>, <top>/version, <top>/byteorder, <top>/.data/version, <top>/.data/serialization_id, <top>/.format_version and <top>/.storage_alignment`);
    }
    if (match[2] === 'data.pkl') pickles.push(entry.name);
    records.set(entry.name, entry);
  }
  if (pickles.length !== 1) {
    throw fail(pickles.length === 0 ? 'no <top>/data.pkl member: not a torch checkpoint' : `${pickles.length} data.pkl members (${pickles.map(quote).join(', ')}): expected exactly one`);
  }
  const top = pickles[0]!.slice(0, -'/data.pkl'.length);
  for (const name of records.keys()) {
    if (!name.startsWith(`${top}/`)) throw fail(`member ${quote(name)} is outside the archive folder ${quote(top)} that holds data.pkl`);
  }

  const small = async (record: string): Promise<string | undefined> => {
    const entry = records.get(`${top}/${record}`);
    if (entry === undefined) return undefined;
    if (entry.size > SMALL_RECORD_BYTES) throw fail(`member ${quote(entry.name)} is ${entry.size} bytes, expected at most ${SMALL_RECORD_BYTES}`);
    const bytes = await archive.read(entry);
    const text = String.fromCharCode(...bytes);
    if (!/^[\x20-\x7e]*\n?$/.test(text)) throw fail(`member ${quote(entry.name)} is not short ASCII text`);
    return text;
  };
  for (const record of ['version', '.data/version', '.format_version', '.storage_alignment']) {
    const text = await small(record);
    if (text !== undefined && !/^[0-9]{1,6}\n?$/.test(text)) throw fail(`member ${quote(`${top}/${record}`)}: expected a decimal number, found ${quote(text)}`);
  }
  await small('.data/serialization_id');
  const byteOrder = await small('byteorder');
  if (byteOrder !== undefined && byteOrder !== 'little' && byteOrder !== 'big') {
    throw fail(`member ${quote(`${top}/byteorder`)}: expected "little" or "big", found ${quote(byteOrder)}`);
  }
  const littleEndian = byteOrder !== 'big';

  const pickleEntry = records.get(pickles[0]!)!;
  const maxPickleBytes = options.maxPickleBytes ?? DEFAULTS.maxPickleBytes;
  if (pickleEntry.size > maxPickleBytes) throw fail(`data.pkl is ${pickleEntry.size} bytes, more than the limit of ${maxPickleBytes}`);
  const pickle = await archive.read(pickleEntry);

  const context: ReadContext = { file, maxTensorBytes: options.maxTensorBytes ?? DEFAULTS.maxTensorBytes };
  const storages = new Map<string, TorchStorageRef>();
  const hooks = new CheckpointHooks(file, context, (pid) => {
    const { storageType, storageKey, location, numel } = parseStoragePid(pid, 5);
    const existing = storages.get(storageKey);
    // torch reuses the first storage loaded under a key (serialization._load, loaded_storages).
    if (existing !== undefined) return existing;
    const entry = records.get(`${top}/data/${storageKey}`);
    if (entry === undefined) throw new PickleError(`storage ${quote(storageKey)}: the archive has no member ${quote(`${top}/data/${storageKey}`)}`);
    const bytes = BigInt(numel) * BigInt(DTYPE_BYTES[storageType]);
    if (bytes !== BigInt(entry.size)) {
      throw new PickleError(`storage ${quote(storageKey)} declares ${numel} ${torchName(storageType)} elements (${bytes} bytes), but ${quote(entry.name)} holds ${entry.size} bytes`);
    }
    const backing: StorageBacking = { read: (start, length) => archive.readRange(entry, start, length) };
    const storage = new TorchStorageRef(storageKey, storageType, numel, location, littleEndian, backing, context);
    storages.set(storageKey, storage);
    return storage;
  });

  let root: PickleValue;
  try {
    root = unpickle(pickle, hooks, { limits: options.pickleLimits ?? {} }).value;
  } catch (error) {
    if (error instanceof PickleError) throw fail(`${pickleEntry.name}: ${error.message}`);
    throw error;
  }
  const tensors = indexTensors(root, file, options.maxDepth ?? DEFAULTS.maxDepth);
  return new LoadedCheckpoint(file, 'zip', root, tensors, archive);
}

// ---------------------------------------------------------------------------------------------
// Legacy format

const LEGACY_MAGIC = 0x1950a86a20f9469cfc6cn;
const LEGACY_PROTOCOL_VERSION = 1001;
const LEGACY_FIRST_READ = 1 << 20;

interface LegacyStorage {
  readonly storage: TorchStorageRef;
  /** Filled in once the storage layout after the pickles is known. */
  readonly slot: { dataOffset: number | undefined };
}

async function loadLegacy(source: ByteSource, options: TorchReadOptions): Promise<TorchCheckpoint> {
  const file = source.name;
  const maxPickleBytes = options.maxPickleBytes ?? DEFAULTS.maxPickleBytes;
  const cap = Math.min(source.size, maxPickleBytes);
  // The pickles' total length is only known by parsing them, so read a prefix and grow it
  // (bounded by the file and the pickle limit) whenever the parse runs out of bytes.
  let length = Math.min(cap, LEGACY_FIRST_READ);
  for (;;) {
    const buffer = new Uint8Array(length);
    await readExactly(source, buffer, 0);
    try {
      return await parseLegacy(source, buffer, options);
    } catch (error) {
      if (!(error instanceof PickleTruncatedError) || length >= cap) {
        if (error instanceof PickleTruncatedError && cap < source.size) {
          throw new TorchCheckpointError(file, `legacy pickle: ${error.message}, within the first ${maxPickleBytes} bytes (the pickle limit)`);
        }
        if (error instanceof PickleError) throw new TorchCheckpointError(file, `legacy pickle: ${error.message}`);
        throw error;
      }
      length = Math.min(cap, length * 4);
    }
  }
}

async function parseLegacy(source: ByteSource, buffer: Uint8Array, options: TorchReadOptions): Promise<TorchCheckpoint> {
  const file = source.name;
  const limits = { limits: options.pickleLimits ?? {} };
  const fail = (message: string): TorchCheckpointError => new TorchCheckpointError(file, `legacy format: ${message}`);

  const magic = unpickle(buffer, DATA_ONLY_HOOKS, limits);
  if (magic.value !== LEGACY_MAGIC) throw fail(`expected the torch magic number 0x1950a86a20f9469cfc6c first, found ${describePickleValue(magic.value)}`);
  const version = unpickle(buffer, DATA_ONLY_HOOKS, { ...limits, start: magic.end });
  if (version.value !== LEGACY_PROTOCOL_VERSION) throw fail(`expected protocol version 1001, found ${String(printable(version.value))}`);
  const sysInfo = unpickle(buffer, DATA_ONLY_HOOKS, { ...limits, start: version.end });
  if (!(sysInfo.value instanceof Map)) throw fail(`expected the sys_info dict third, found ${describePickleValue(sysInfo.value)}`);
  if (sysInfo.value.get('little_endian') === false) throw fail('big-endian legacy checkpoints are not supported');

  const context: ReadContext = { file, maxTensorBytes: options.maxTensorBytes ?? DEFAULTS.maxTensorBytes };
  const roots = new Map<string, LegacyStorage>();
  const views = new Map<string, TorchStorageRef>();
  const hooks = new CheckpointHooks(file, context, (pid) => {
    const { storageType, storageKey, location, numel, view } = parseStoragePid(pid, 6);
    let root = roots.get(storageKey);
    if (root === undefined) {
      const slot: LegacyStorage['slot'] = { dataOffset: undefined };
      const backing: StorageBacking = {
        read: async (start, length) => {
          if (slot.dataOffset === undefined) throw new TorchCheckpointError(file, `storage ${quote(storageKey)} has no data`);
          const out = new Uint8Array(length);
          await readExactly(source, out, slot.dataOffset + start);
          return out;
        },
      };
      root = { storage: new TorchStorageRef(storageKey, storageType, numel, location, true, backing, context), slot };
      roots.set(storageKey, root);
    }
    if (view === undefined) return root.storage;
    // Pre-1.0 files could save views of a storage: (view_key, offset, view_size) in elements.
    const existing = views.get(view.key);
    if (existing !== undefined) return existing;
    const base = root.storage;
    if (view.offset + view.size > base.numel) {
      throw new PickleError(`storage view ${quote(view.key)} covers elements [${view.offset}, ${view.offset + view.size}) of storage ${quote(storageKey)}, which has ${base.numel}`);
    }
    const itemBytes = DTYPE_BYTES[base.dtype];
    const backing: StorageBacking = { read: (start, length) => base.readBytes(view.offset * itemBytes + start, length) };
    const storage = new TorchStorageRef(view.key, base.dtype, view.size, location, true, backing, context);
    views.set(view.key, storage);
    return storage;
  });
  const main = unpickle(buffer, hooks, { ...limits, start: sysInfo.end });
  const keys = unpickle(buffer, DATA_ONLY_HOOKS, { ...limits, start: main.end });
  if (!Array.isArray(keys.value)) throw fail(`expected the list of storage keys last, found ${describePickleValue(keys.value)}`);

  // Storages follow back to back in key-list order, each as an int64 element count and the data.
  let offset = keys.end;
  const seen = new Set<string>();
  const header = new Uint8Array(8);
  for (const item of keys.value) {
    if (typeof item !== 'string') throw fail(`storage keys must be str, found ${describePickleValue(item)}`);
    const slot = roots.get(item);
    if (slot === undefined) throw fail(`storage key ${quote(item)} is listed but never used by the pickle`);
    if (seen.has(item)) throw fail(`storage key ${quote(item)} is listed twice`);
    seen.add(item);
    if (offset + 8 > source.size) throw fail(`storage ${quote(item)}: its element count at offset ${offset} is past the end of the ${source.size}-byte file (truncated)`);
    await readExactly(source, header, offset);
    const count = new DataView(header.buffer).getBigInt64(0, true);
    if (count !== BigInt(slot.storage.numel)) throw fail(`storage ${quote(item)}: the file stores ${count} elements, the pickle declares ${slot.storage.numel}`);
    const end = offset + 8 + slot.storage.byteLength;
    if (end > source.size) throw fail(`storage ${quote(item)}: data [${offset + 8}, ${end}) runs past the end of the ${source.size}-byte file (truncated)`);
    slot.slot.dataOffset = offset + 8;
    offset = end;
  }
  for (const storageKey of roots.keys()) {
    if (!seen.has(storageKey)) throw fail(`storage ${quote(storageKey)} is used by the pickle but has no data (missing from the key list)`);
  }
  const tensors = indexTensors(main.value, file, options.maxDepth ?? DEFAULTS.maxDepth);
  return new LoadedCheckpoint(file, 'legacy', main.value, tensors, source);
}

// ---------------------------------------------------------------------------------------------
// Persistent ids

interface StoragePid {
  storageType: DType;
  storageKey: string;
  location: string;
  numel: number;
  view: { key: string; offset: number; size: number } | undefined;
}

// ('storage', storage_type, key, location, numel) in zip files; legacy files add view_metadata.
function parseStoragePid(pid: PickleValue, arity: 5 | 6): StoragePid {
  if (!(pid instanceof PickleTuple)) throw new PickleError(`persistent id must be a tuple, found ${describePickleValue(pid)}`);
  const tag = asText(pid.items[0]);
  if (tag !== 'storage') {
    const what = tag === 'module' ? ' (a pickled nn.Module class with its source code)' : '';
    throw new PickleError(`persistent id of type ${tag === undefined ? describePickleValue(pid.items[0]) : quote(tag)}${what} is not allowed; only "storage"`);
  }
  if (pid.length !== arity) throw new PickleError(`storage persistent id must have ${arity} items, found ${pid.length}`);
  const [, type, rawKey, rawLocation, rawNumel, rawView] = pid.items;
  let storageType: DType;
  const kind = type instanceof PickleGlobal ? ALLOWED_GLOBALS.get(key(type.module, type.name)) : undefined;
  if (kind === 'typed-storage') storageType = TORCH_TO_DTYPE[STORAGE_CLASSES[(type as PickleGlobal).name]!];
  else if (kind === 'untyped-storage') storageType = 'U8';
  else throw new PickleError(`storage type must be a torch storage class, found ${describePickleValue(type)}`);
  const storageKey = asText(rawKey);
  if (storageKey === undefined || !/^[0-9]{1,20}$/.test(storageKey)) throw new PickleError(`storage key must be a decimal string, found ${printable(rawKey)}`);
  const location = asText(rawLocation);
  if (location === undefined) throw new PickleError(`storage ${quote(storageKey)}: location must be a str, found ${describePickleValue(rawLocation)}`);
  const numel = nonNegativeInt(rawNumel, `storage ${quote(storageKey)}: element count`);
  let view: StoragePid['view'];
  if (arity === 6 && rawView !== null && rawView !== undefined) {
    if (!(rawView instanceof PickleTuple) || rawView.length !== 3) throw new PickleError(`storage ${quote(storageKey)}: view metadata must be (key, offset, size), found ${describePickleValue(rawView)}`);
    const viewKey = asText(rawView.items[0]);
    if (viewKey === undefined) throw new PickleError(`storage ${quote(storageKey)}: view key must be a str`);
    view = { key: viewKey, offset: nonNegativeInt(rawView.items[1], 'view offset'), size: nonNegativeInt(rawView.items[2], 'view size') };
  }
  return { storageType, storageKey, location, numel, view };
}

// ---------------------------------------------------------------------------------------------
// The hooks: allow-list policy and inert reconstruction

class CheckpointHooks implements PickleHooks {
  readonly #globals = new Map<string, PickleGlobal>();

  constructor(
    private readonly file: string,
    private readonly context: ReadContext,
    private readonly loadStorage: (pid: PickleValue) => TorchStorageRef,
  ) {}

  resolveGlobal(module: string, name: string): PickleValue {
    const id = key(module, name);
    if (!ALLOWED_GLOBALS.has(id)) {
      throw new PickleError(`global ${quote(`${module}.${name}`)} is not allowed (not on the checkpoint allow-list; nothing was executed)`);
    }
    let global = this.#globals.get(id);
    if (global === undefined) {
      global = new PickleGlobal(module, name);
      this.#globals.set(id, global);
    }
    return global;
  }

  call(callable: PickleValue, args: readonly PickleValue[], how: CallKind, kwargs: PickleDict | undefined): PickleValue {
    if (!(callable instanceof PickleGlobal)) throw new PickleError(`${how} on ${describePickleValue(callable)}: only allowed globals can be called`);
    const kind = ALLOWED_GLOBALS.get(key(callable.module, callable.name))!;
    const name = callable.qualifiedName;
    if (kind === 'inert-class') return new PickleObject(callable, args, kwargs);
    if (kwargs !== undefined && kwargs.size > 0) throw new PickleError(`${how} of ${name} with keyword arguments is not allowed`);
    // Classes may be instantiated with NEWOBJ (cls.__new__); functions only with REDUCE.
    const isClass = kind === 'ordered-dict' || kind === 'set';
    if (how !== 'REDUCE' && !(isClass && (how === 'NEWOBJ' || how === 'NEWOBJ_EX'))) throw new PickleError(`${how} of ${name} is not allowed`);
    switch (kind) {
      case 'rebuild-tensor-v2':
        return this.rebuildTensor(args, false);
      case 'rebuild-tensor-v3':
        return this.rebuildTensor(args, true);
      case 'rebuild-parameter':
        return rebuildParameter(args);
      case 'rebuild-from-numpy':
        return this.rebuildFromNumpy(args);
      case 'ordered-dict':
        return orderedDictFrom(args, how === 'REDUCE' ? args : []);
      case 'set':
        return setFrom(how === 'REDUCE' ? args : []);
      case 'codecs-encode':
        return codecsEncode(args);
      case 'numpy-dtype':
        return numpyDType(args);
      case 'numpy-scalar':
        return numpyScalar(args);
      case 'numpy-reconstruct':
        return numpyReconstruct(args);
      default:
        throw new PickleError(`${how} of ${name} is not allowed (it is not callable in a checkpoint)`);
    }
  }

  build(target: PickleValue, state: PickleValue): void {
    if (target instanceof PickleOrderedDict) {
      // torch state_dict()s carry a `_metadata` attribute, pickled as BUILD with {'_metadata': …}.
      if (!(state instanceof Map) && state !== null) throw new PickleError(`BUILD state of an OrderedDict must be a dict, found ${describePickleValue(state)}`);
      target.attributes = state;
      return;
    }
    if (target instanceof PickleObject) {
      if (target.state !== undefined) throw new PickleError(`BUILD applied twice to a ${target.cls.qualifiedName} object`);
      target.state = state;
      return;
    }
    if (target instanceof NumpyDType) return buildNumpyDType(target, state);
    if (target instanceof NumpyArray) return buildNumpyArray(target, state);
    throw new PickleError(`BUILD on ${describePickleValue(target)} is not allowed`);
  }

  persistentLoad(pid: PickleValue): PickleValue {
    return this.loadStorage(pid);
  }

  // _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
  // _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype[, metadata])
  private rebuildTensor(args: readonly PickleValue[], v3: boolean): TorchTensorRef {
    const fn = v3 ? '_rebuild_tensor_v3' : '_rebuild_tensor_v2';
    const [min, max] = v3 ? [7, 8] : [6, 7];
    if (args.length < min || args.length > max) throw new PickleError(`${fn} takes ${min} or ${max} arguments, found ${args.length}`);
    const [storage, rawOffset, rawSize, rawStride, requiresGrad, hooks] = args;
    if (!(storage instanceof TorchStorageRef)) throw new PickleError(`${fn}: the storage argument must be a persistent-id storage, found ${describePickleValue(storage)}`);
    let dtype = storage.dtype;
    if (v3) {
      const dtypeArg = args[6];
      const kind = dtypeArg instanceof PickleGlobal ? ALLOWED_GLOBALS.get(key(dtypeArg.module, dtypeArg.name)) : undefined;
      if (kind !== 'dtype') throw new PickleError(`${fn}: the dtype argument must be a torch dtype such as torch.float16, found ${describePickleValue(dtypeArg)}`);
      dtype = TORCH_TO_DTYPE[(dtypeArg as PickleGlobal).name as TorchDTypeName];
    }
    const offset = nonNegativeInt(rawOffset, `${fn}: storage offset`);
    const shape = intSequence(rawSize, `${fn}: size`);
    const stride = intSequence(rawStride, `${fn}: stride`);
    if (stride.length !== shape.length) throw new PickleError(`${fn}: size ${formatShape(shape)} and stride ${formatShape(stride)} have different lengths`);
    if (typeof requiresGrad !== 'boolean') throw new PickleError(`${fn}: requires_grad must be a bool, found ${describePickleValue(requiresGrad)}`);
    if (!(hooks instanceof Map)) throw new PickleError(`${fn}: backward_hooks must be a dict, found ${describePickleValue(hooks)}`);
    const metadata = args[v3 ? 7 : 6];
    if (metadata !== undefined && metadata !== null && !(metadata instanceof Map)) throw new PickleError(`${fn}: metadata must be a dict, found ${describePickleValue(metadata)}`);
    // torch records lazy negation/conjugation bits here; the stored values would need transforming.
    for (const flag of ['neg', 'conj']) {
      const value = metadata instanceof Map ? metadata.get(flag) : undefined;
      if (value !== undefined && value !== false && value !== 0) throw new PickleError(`${fn}: tensors with a lazy ${flag} bit are not supported`);
    }
    checkBounds(shape, stride, offset, dtype, storage, fn);
    return new TorchTensorRef(storage, dtype, Object.freeze(shape), Object.freeze(stride), offset, requiresGrad, false, this.context);
  }

  // _rebuild_device_tensor_from_numpy(data, dtype, device, requires_grad): a tensor whose data is
  // a numpy array inside the pickle (XLA and similar devices).
  private rebuildFromNumpy(args: readonly PickleValue[]): TorchTensorRef {
    const fn = '_rebuild_device_tensor_from_numpy';
    if (args.length !== 4) throw new PickleError(`${fn} takes 4 arguments, found ${args.length}`);
    const [array, dtypeArg, device, requiresGrad] = args;
    if (!(array instanceof NumpyArray) || array.dtype === undefined) throw new PickleError(`${fn}: data must be a numpy array, found ${describePickleValue(array)}`);
    const kind = dtypeArg instanceof PickleGlobal ? ALLOWED_GLOBALS.get(key(dtypeArg.module, dtypeArg.name)) : undefined;
    if (kind !== 'dtype') throw new PickleError(`${fn}: dtype must be a torch dtype, found ${describePickleValue(dtypeArg)}`);
    const dtype = TORCH_TO_DTYPE[(dtypeArg as PickleGlobal).name as TorchDTypeName];
    if (NUMPY_CODES[array.dtype.code].dtype !== dtype) throw new PickleError(`${fn}: numpy dtype ${array.dtype.code} does not match ${(dtypeArg as PickleGlobal).qualifiedName}`);
    if (array.dtype.byteOrder === '>') throw new PickleError(`${fn}: big-endian numpy arrays are not supported`);
    if (typeof device !== 'string') throw new PickleError(`${fn}: device must be a str, found ${describePickleValue(device)}`);
    if (typeof requiresGrad !== 'boolean') throw new PickleError(`${fn}: requires_grad must be a bool, found ${describePickleValue(requiresGrad)}`);
    const bytes = array.data;
    const numel = array.shape.reduce((a, b) => a * b, 1);
    const backing: StorageBacking = { read: (start, length) => Promise.resolve(bytes.slice(start, start + length)) };
    const storage = new TorchStorageRef('numpy', dtype, numel, device, true, backing, this.context);
    const shape = [...array.shape];
    const stride = array.fortranOrder ? fortranStrides(shape) : contiguousStrides(shape);
    return new TorchTensorRef(storage, dtype, Object.freeze(shape), Object.freeze(stride), 0, requiresGrad, false, this.context);
  }
}

// _rebuild_parameter(data, requires_grad, backward_hooks)
function rebuildParameter(args: readonly PickleValue[]): TorchTensorRef {
  const fn = '_rebuild_parameter';
  if (args.length !== 3) throw new PickleError(`${fn} takes 3 arguments, found ${args.length}`);
  const [data, requiresGrad, hooks] = args;
  if (!(data instanceof TorchTensorRef)) throw new PickleError(`${fn}: data must be a tensor, found ${describePickleValue(data)}`);
  if (typeof requiresGrad !== 'boolean') throw new PickleError(`${fn}: requires_grad must be a bool, found ${describePickleValue(requiresGrad)}`);
  if (!(hooks instanceof Map)) throw new PickleError(`${fn}: backward_hooks must be a dict, found ${describePickleValue(hooks)}`);
  return data.asParameter(requiresGrad);
}

function orderedDictFrom(args: readonly PickleValue[], source: readonly PickleValue[]): PickleOrderedDict {
  const dict = new PickleOrderedDict();
  if (source.length === 0) return dict;
  if (source.length > 1) throw new PickleError(`collections.OrderedDict takes at most 1 argument, found ${args.length}`);
  const items = source[0]!;
  const put = (k: PickleValue, v: PickleValue): void => {
    if (!isHashable(k)) throw new PickleError(`collections.OrderedDict: unhashable key ${describePickleValue(k)}`);
    dict.set(k, v);
  };
  if (items instanceof Map) {
    for (const [k, v] of items) put(k, v);
    return dict;
  }
  const list = sequenceItems(items);
  if (list === undefined) throw new PickleError(`collections.OrderedDict: expected a dict or a sequence of pairs, found ${describePickleValue(items)}`);
  for (const pair of list) {
    const kv = sequenceItems(pair);
    if (kv === undefined || kv.length !== 2) throw new PickleError(`collections.OrderedDict: expected (key, value) pairs, found ${describePickleValue(pair)}`);
    put(kv[0]!, kv[1]!);
  }
  return dict;
}

function setFrom(args: readonly PickleValue[]): Set<PickleValue> {
  const set = new Set<PickleValue>();
  if (args.length === 0) return set;
  if (args.length > 1) throw new PickleError(`builtins.set takes at most 1 argument, found ${args.length}`);
  const items = args[0] instanceof Set ? [...args[0]] : sequenceItems(args[0]!);
  if (items === undefined) throw new PickleError(`builtins.set: expected a list, tuple or set, found ${describePickleValue(args[0])}`);
  for (const item of items) {
    if (!isHashable(item)) throw new PickleError(`builtins.set: unhashable item ${describePickleValue(item)}`);
    set.add(item);
  }
  return set;
}

// _codecs.encode(text, encoding): how protocol 2 pickles Python 3 bytes (always "latin1").
function codecsEncode(args: readonly PickleValue[]): Uint8Array {
  const [text, encoding = 'utf-8'] = args;
  if (args.length < 1 || args.length > 2 || typeof text !== 'string' || typeof encoding !== 'string') {
    throw new PickleError('_codecs.encode: expected (str, encoding)');
  }
  const normalized = encoding.toLowerCase().replace(/_/g, '-');
  if (['latin1', 'latin-1', 'iso-8859-1', 'iso8859-1', 'l1'].includes(normalized)) {
    const out = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) {
      const c = text.charCodeAt(i);
      if (c > 0xff) throw new PickleError(`_codecs.encode: character U+${c.toString(16).padStart(4, '0')} is not Latin-1`);
      out[i] = c;
    }
    return out;
  }
  if (normalized === 'utf-8' || normalized === 'utf8') return new TextEncoder().encode(text);
  throw new PickleError(`_codecs.encode: encoding ${quote(encoding)} is not allowed (only latin1 and utf-8)`);
}

// numpy.dtype(code, align, copy), completed by BUILD with (version, byteorder, …).
function numpyDType(args: readonly PickleValue[]): NumpyDType {
  const code = args[0];
  if (args.length < 1 || args.length > 3 || typeof code !== 'string') throw new PickleError('numpy.dtype: expected (str, align, copy)');
  if (!Object.hasOwn(NUMPY_CODES, code)) throw new PickleError(`numpy.dtype ${quote(code)} is not supported (only bool, int, uint and float scalars)`);
  return new NumpyDType(code as NumpyCode);
}

function buildNumpyDType(target: NumpyDType, state: PickleValue): void {
  if (!(state instanceof PickleTuple) || state.length < 2) throw new PickleError(`numpy dtype BUILD state must be a tuple (version, byteorder, …), found ${describePickleValue(state)}`);
  const order = state.items[1];
  if (order !== '<' && order !== '>' && order !== '|' && order !== '=') throw new PickleError(`numpy dtype byte order must be one of < > | =, found ${printable(order)}`);
  // Items 2-4 are subarray, names and fields: set only for structured dtypes.
  for (const item of state.items.slice(2, 5)) {
    if (item !== null) throw new PickleError('structured numpy dtypes are not supported');
  }
  target.byteOrder = order;
}

// numpy.core.multiarray.scalar(dtype, bytes): one numpy scalar such as a saved global_step.
function numpyScalar(args: readonly PickleValue[]): number | bigint | boolean {
  const [dtype, data] = args;
  if (args.length !== 2 || !(dtype instanceof NumpyDType) || !(data instanceof Uint8Array)) {
    throw new PickleError(`numpy scalar: expected (dtype, bytes), found (${args.map((a) => describePickleValue(a)).join(', ')})`);
  }
  if (data.length !== dtype.itemSize) throw new PickleError(`numpy scalar: ${dtype.code} needs ${dtype.itemSize} bytes, found ${data.length}`);
  const view = new DataView(data.buffer, data.byteOffset, data.length);
  const little = dtype.byteOrder !== '>';
  switch (dtype.code) {
    case 'b1':
      return data[0] !== 0;
    case 'i1':
      return view.getInt8(0);
    case 'u1':
      return view.getUint8(0);
    case 'i2':
      return view.getInt16(0, little);
    case 'u2':
      return view.getUint16(0, little);
    case 'i4':
      return view.getInt32(0, little);
    case 'u4':
      return view.getUint32(0, little);
    case 'i8':
      return safeNumber(view.getBigInt64(0, little));
    case 'u8':
      return safeNumber(view.getBigUint64(0, little));
    case 'f2': {
      const out = new Float32Array(1);
      f16ToF32Array(Uint16Array.of(view.getUint16(0, little)), out);
      return out[0]!;
    }
    case 'f4':
      return view.getFloat32(0, little);
    case 'f8':
      return view.getFloat64(0, little);
  }
}

// numpy.core.multiarray._reconstruct(ndarray, (0,), b'b'): an empty array filled by BUILD.
function numpyReconstruct(args: readonly PickleValue[]): NumpyArray {
  const cls = args[0];
  if (args.length !== 3 || !(cls instanceof PickleGlobal) || ALLOWED_GLOBALS.get(key(cls.module, cls.name)) !== 'numpy-ndarray') {
    throw new PickleError(`numpy _reconstruct: expected (numpy.ndarray, shape, typecode), found first ${describePickleValue(cls)}`);
  }
  return new NumpyArray();
}

// ndarray.__setstate__((version, shape, dtype, is_fortran, data)); old numpy omits the version.
function buildNumpyArray(target: NumpyArray, state: PickleValue): void {
  if (!(state instanceof PickleTuple) || (state.length !== 5 && state.length !== 4)) {
    throw new PickleError(`numpy array BUILD state must be (version, shape, dtype, is_fortran, data), found ${describePickleValue(state)}`);
  }
  if (target.dtype !== undefined) throw new PickleError('BUILD applied twice to a numpy array');
  const [shapeArg, dtype, fortran, data] = state.length === 5 ? state.items.slice(1) : state.items;
  const shape = intSequence(shapeArg!, 'numpy array shape');
  if (!(dtype instanceof NumpyDType)) throw new PickleError(`numpy array dtype must be a numpy dtype, found ${describePickleValue(dtype)}`);
  if (typeof fortran !== 'boolean') throw new PickleError(`numpy array is_fortran must be a bool, found ${describePickleValue(fortran)}`);
  if (!(data instanceof Uint8Array)) throw new PickleError(`numpy array data must be bytes (object arrays are not supported), found ${describePickleValue(data)}`);
  const expected = checkedProduct(shape, dtype.itemSize);
  if (expected !== data.length) throw new PickleError(`numpy array of shape ${formatShape(shape)} and dtype ${dtype.code} needs ${expected ?? 'more than 2^53'} bytes, found ${data.length}`);
  target.dtype = dtype;
  target.shape = Object.freeze(shape);
  target.fortranOrder = fortran;
  target.data = data;
}

// ---------------------------------------------------------------------------------------------
// Shape checks

function checkBounds(shape: readonly number[], stride: readonly number[], offset: number, dtype: DType, storage: TorchStorageRef, fn: string): void {
  const item = DTYPE_BYTES[dtype];
  // torch lets a tensor with no elements point anywhere (checkInBoundsForStorage returns early).
  if (shape.includes(0)) return;
  let last = BigInt(offset);
  for (let i = 0; i < shape.length; i++) last += BigInt(shape[i]! - 1) * BigInt(stride[i]!);
  const needed = (last + 1n) * BigInt(item);
  if (needed > BigInt(storage.byteLength)) {
    throw new PickleError(
      `${fn}: a ${dtype} tensor of shape ${formatShape(shape)}, stride ${formatShape(stride)} and offset ${offset} needs ${needed} bytes of storage, but storage ${quote(storage.key)} has ${storage.byteLength} (${storage.numel} ${torchName(storage.dtype)} elements)`,
    );
  }
  if (checkedProduct(shape, item) === undefined) throw new PickleError(`${fn}: shape ${formatShape(shape)} has more than 2^53 bytes`);
}

function isContiguous(shape: readonly number[], stride: readonly number[]): boolean {
  if (shape.includes(0)) return true;
  let expected = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    if (shape[i] !== 1 && stride[i] !== expected) return false;
    expected *= shape[i]!;
  }
  return true;
}

function lastIndex(shape: readonly number[], stride: readonly number[], offset: number): number {
  let last = offset;
  for (let i = 0; i < shape.length; i++) last += (shape[i]! - 1) * stride[i]!;
  return last;
}

// Gathers a strided view out of `span` (which starts at the view's first element) in row-major order.
function gather(span: Uint8Array, shape: readonly number[], stride: readonly number[], item: number): Uint8Array {
  const dims = shape.length;
  const count = shape.reduce((a, b) => a * b, 1);
  const out = new Uint8Array(count * item);
  const inner = shape[dims - 1]!;
  const innerStride = stride[dims - 1]!;
  const outer = count / inner;
  const index = new Array<number>(Math.max(0, dims - 1)).fill(0);
  let base = 0;
  let at = 0;
  for (let o = 0; o < outer; o++) {
    if (innerStride === 1) {
      out.set(span.subarray(base * item, (base + inner) * item), at);
      at += inner * item;
    } else {
      for (let j = 0; j < inner; j++) {
        const from = (base + j * innerStride) * item;
        for (let b = 0; b < item; b++) out[at++] = span[from + b]!;
      }
    }
    // Odometer over the outer dimensions.
    for (let d = dims - 2; d >= 0; d--) {
      index[d]!++;
      base += stride[d]!;
      if (index[d]! < shape[d]!) break;
      base -= stride[d]! * shape[d]!;
      index[d] = 0;
    }
  }
  return out;
}

/** Row-major (C-contiguous) element strides of `shape`, as torch gives a contiguous tensor (size-0 dims count as 1). */
export function contiguousStrides(shape: readonly number[]): number[] {
  const stride = new Array<number>(shape.length);
  let step = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    stride[i] = step;
    step *= Math.max(1, shape[i]!);
  }
  return stride;
}

function fortranStrides(shape: readonly number[]): number[] {
  const stride = new Array<number>(shape.length);
  let step = 1;
  for (let i = 0; i < shape.length; i++) {
    stride[i] = step;
    step *= Math.max(1, shape[i]!);
  }
  return stride;
}

// ---------------------------------------------------------------------------------------------
// Walking the value: cycle and depth checks, tensor paths

interface WalkFrame {
  readonly node: object;
  readonly path: readonly string[];
  /** False inside sub-structures that are walked for safety checks only (no tensor names). */
  readonly named: boolean;
  readonly children: Iterator<[string | undefined, PickleValue]>;
}

// Children of a container with their path components; undefined marks a child (and everything
// under it) as walked for the cycle and depth checks only, not named.
function* childrenOf(node: object, dictsOnly: boolean): Generator<[string | undefined, PickleValue]> {
  if (node instanceof Map) {
    for (const [k, v] of node) yield [keyText(k), v];
    if (!dictsOnly && node instanceof PickleOrderedDict && node.attributes !== undefined) yield [undefined, node.attributes];
  } else if (node instanceof PickleObject) {
    const parameters = parameterDictEntries(node);
    if (parameters !== undefined) {
      for (const [k, v] of parameters) yield [keyText(k), v];
      if (dictsOnly) return;
      yield [undefined, node.state!];
    } else if (dictsOnly) {
      return;
    } else if (node.state instanceof Map) {
      for (const [k, v] of node.state) yield [keyText(k), v];
    } else if (node.state !== undefined) {
      yield [undefined, node.state];
    }
    for (const arg of node.args) yield [undefined, arg];
    if (node.kwargs !== undefined) yield [undefined, node.kwargs];
  } else if (dictsOnly) {
    return;
  } else if (Array.isArray(node)) {
    for (let i = 0; i < node.length; i++) yield [String(i), node[i]!];
  } else if (node instanceof PickleTuple) {
    for (let i = 0; i < node.items.length; i++) yield [String(i), node.items[i]!];
  } else if (node instanceof Set) {
    for (const item of node) yield [undefined, item];
  }
}

// A ParameterDict's parameters live in its BUILD state's `_parameters` dict.
function parameterDictEntries(node: PickleObject): PickleDict | undefined {
  if (node.cls.qualifiedName !== PARAMETER_DICT || !(node.state instanceof Map)) return undefined;
  const parameters = node.state.get('_parameters');
  return parameters instanceof Map ? parameters : undefined;
}

function isContainer(value: PickleValue): value is PickleValue[] | PickleTuple | PickleDict | Set<PickleValue> | PickleObject {
  return Array.isArray(value) || value instanceof PickleTuple || value instanceof Map || value instanceof Set || value instanceof PickleObject;
}

// Iterative depth-first walk: rejects cycles and excessive depth, reports tensors with paths.
// Containers reached a second time are not walked again, so shared sub-structures cost nothing.
function walk(root: PickleValue, maxDepth: number, dictsOnly: boolean, onTensor: (path: readonly string[], tensor: TorchTensorRef) => void, fail: (message: string) => Error): void {
  if (root instanceof TorchTensorRef) onTensor([], root);
  if (!isContainer(root)) return;
  const active = new Set<object>([root]);
  const done = new Set<object>();
  const stack: WalkFrame[] = [{ node: root, path: [], named: true, children: childrenOf(root, dictsOnly) }];
  while (stack.length > 0) {
    const frame = stack[stack.length - 1]!;
    const next = frame.children.next();
    if (next.done === true) {
      stack.pop();
      active.delete(frame.node);
      done.add(frame.node);
      continue;
    }
    const [component, child] = next.value;
    const named = frame.named && component !== undefined;
    const path = named ? [...frame.path, component] : frame.path;
    if (child instanceof TorchTensorRef) {
      if (named) onTensor(path, child);
      continue;
    }
    if (!isContainer(child) || done.has(child)) continue;
    if (active.has(child)) throw fail(`recursive structure: ${describePickleValue(child)} at ${formatPath(path)} contains itself`);
    if (stack.length >= maxDepth) throw fail(`containers nested deeper than ${maxDepth} levels at ${formatPath(path)}`);
    active.add(child);
    stack.push({ node: child, path, named, children: childrenOf(child, dictsOnly) });
  }
}

function indexTensors(root: PickleValue, file: string, maxDepth: number): Map<string, TorchTensorRef> {
  const tensors = new Map<string, TorchTensorRef>();
  walk(root, maxDepth, false, (path, tensor) => {
    const name = path.join('.');
    if (!tensors.has(name)) tensors.set(name, tensor);
  }, (message) => new TorchCheckpointError(file, message));
  return tensors;
}

/**
 * The checkpoint's tensor dict, flattened with "." : the `state_dict` entry when there is one
 * (Lightning and original SD checkpoints), else the root if it is a dict. Nested dicts (and
 * ParameterDicts) are flattened; other values (lists, numbers, strings) are skipped.
 */
export function stateDict(ckpt: Pick<TorchCheckpoint, 'root' | 'path'>): Map<string, TorchTensorRef> {
  const fail = (message: string): TorchCheckpointError => new TorchCheckpointError(ckpt.path, `state dict: ${message}`);
  let target = ckpt.root;
  const nested = target instanceof Map ? target.get('state_dict') : undefined;
  if (nested !== undefined && isDictLike(nested)) target = nested;
  if (!isDictLike(target)) throw fail(`expected a dict of tensors (or a dict with a "state_dict" entry), found ${describePickleValue(target)} at the root`);
  const out = new Map<string, TorchTensorRef>();
  walk(target, DEFAULTS.maxDepth, true, (path, tensor) => {
    const name = path.join('.');
    if (out.has(name) && out.get(name) !== tensor) throw fail(`two tensors flatten to the same name ${quote(name)}`);
    out.set(name, tensor);
  }, fail);
  if (out.size === 0) throw fail('no tensors found');
  return out;
}

function isDictLike(value: PickleValue): boolean {
  return value instanceof Map || (value instanceof PickleObject && parameterDictEntries(value) !== undefined);
}

function keyText(value: PickleValue): string {
  if (typeof value === 'string') return value;
  if (typeof value === 'number' || typeof value === 'bigint') return String(value);
  if (typeof value === 'boolean') return value ? 'True' : 'False';
  if (value === null) return 'None';
  if (value instanceof PickleGlobal) return value.qualifiedName;
  if (value instanceof PickleTuple) return `(${value.items.map((item) => (isContainer(item) ? describePickleValue(item) : keyText(item))).join(', ')})`;
  if (value instanceof Uint8Array) return `b'${[...value.subarray(0, 32)].map((b) => b.toString(16).padStart(2, '0')).join('')}'`;
  return `<${describePickleValue(value)}>`;
}

function formatPath(path: readonly string[]): string {
  return path.length === 0 ? 'the root' : quote(path.join('.'));
}

// ---------------------------------------------------------------------------------------------
// Conversions

function toFloat32(raw: Uint8Array, dtype: DType, count: number): Float32Array {
  const buffer = raw.buffer;
  if (dtype === 'F32') return new Float32Array(buffer, 0, count);
  const out = new Float32Array(count);
  switch (dtype) {
    case 'F16':
      f16ToF32Array(new Uint16Array(buffer, 0, count), out);
      break;
    case 'BF16':
      bf16ToF32Array(new Uint16Array(buffer, 0, count), out);
      break;
    case 'F64':
      out.set(new Float64Array(buffer, 0, count));
      break;
    case 'F8_E4M3':
    case 'F8_E5M2':
      f8ToF32Array(dtype, new Uint8Array(buffer, 0, count), out);
      break;
    case 'I64': {
      const src = new BigInt64Array(buffer, 0, count);
      for (let i = 0; i < count; i++) out[i] = Number(src[i]!);
      break;
    }
    case 'U64': {
      const src = new BigUint64Array(buffer, 0, count);
      for (let i = 0; i < count; i++) out[i] = Number(src[i]!);
      break;
    }
    case 'I32':
      out.set(new Int32Array(buffer, 0, count));
      break;
    case 'U32':
      out.set(new Uint32Array(buffer, 0, count));
      break;
    case 'I16':
      out.set(new Int16Array(buffer, 0, count));
      break;
    case 'U16':
      out.set(new Uint16Array(buffer, 0, count));
      break;
    case 'I8':
      out.set(new Int8Array(buffer, 0, count));
      break;
    case 'U8':
      out.set(new Uint8Array(buffer, 0, count));
      break;
    case 'BOOL': {
      const src = new Uint8Array(buffer, 0, count);
      for (let i = 0; i < count; i++) out[i] = src[i] === 0 ? 0 : 1;
      break;
    }
  }
  return out;
}

// Typed-array views below need offset 0 in a buffer of their own (zlib output may be pooled).
function ownBuffer(bytes: Uint8Array): Uint8Array {
  return bytes.byteOffset === 0 && bytes.buffer.byteLength === bytes.length && bytes.buffer instanceof ArrayBuffer ? bytes : bytes.slice();
}

function swapBytes(bytes: Uint8Array, item: number): void {
  for (let i = 0; i < bytes.length; i += item) {
    for (let a = i, b = i + item - 1; a < b; a++, b--) {
      const t = bytes[a]!;
      bytes[a] = bytes[b]!;
      bytes[b] = t;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Small helpers

function torchName(dtype: DType): string {
  return DTYPE_TO_TORCH.get(dtype) ?? dtype;
}

function sequenceItems(value: PickleValue): readonly PickleValue[] | undefined {
  if (Array.isArray(value)) return value;
  if (value instanceof PickleTuple) return value.items;
  return undefined;
}

function intSequence(value: PickleValue | undefined, what: string): number[] {
  const items = value === undefined ? undefined : sequenceItems(value);
  if (items === undefined) throw new PickleError(`${what} must be a tuple of ints, found ${describePickleValue(value)}`);
  return items.map((item, i) => nonNegativeInt(item, `${what}[${i}]`));
}

function nonNegativeInt(value: PickleValue | undefined, what: string): number {
  if (typeof value === 'number' && Number.isSafeInteger(value) && value >= 0) return value;
  if (typeof value === 'number' && Number.isInteger(value) && value < 0) throw new PickleError(`${what} must not be negative, found ${value}`);
  if (typeof value === 'bigint') throw new PickleError(`${what} ${value < 0n ? 'must not be negative' : 'is too large'}, found ${value}`);
  throw new PickleError(`${what} must be a non-negative int, found ${describePickleValue(value)}`);
}

function checkedProduct(shape: readonly number[], item: number): number | undefined {
  if (shape.includes(0)) return 0;
  let total = item;
  for (const dim of shape) {
    total *= dim;
    if (total > Number.MAX_SAFE_INTEGER) return undefined;
  }
  return total;
}

function asText(value: PickleValue | undefined): string | undefined {
  if (typeof value === 'string') return value;
  // torch decodes bytes ids with ASCII (_maybe_decode_ascii) for Python 2 era files.
  if (value instanceof Uint8Array && value.every((b) => b < 0x80)) return String.fromCharCode(...value);
  return undefined;
}

function safeNumber(value: bigint): number | bigint {
  return value >= BigInt(Number.MIN_SAFE_INTEGER) && value <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(value) : value;
}

function printable(value: PickleValue | undefined): string {
  if (typeof value === 'string') return quote(value);
  if (typeof value === 'number' || typeof value === 'bigint' || typeof value === 'boolean') return String(value);
  return describePickleValue(value);
}

function formatShape(shape: readonly number[]): string {
  return `[${shape.join(', ')}]`;
}

function asCheckpointError(error: unknown, file: string, where?: string): unknown {
  if (error instanceof TorchCheckpointError) return error;
  const prefix = where === undefined ? '' : `${where}: `;
  if (error instanceof ZipError) {
    const message = error.message.startsWith(`${error.file}: `) ? error.message.slice(error.file.length + 2) : error.message;
    return new TorchCheckpointError(file, `${prefix}${message}`, { cause: error });
  }
  if (error instanceof PickleError) return new TorchCheckpointError(file, `${prefix}${error.message}`, { cause: error });
  return error;
}
