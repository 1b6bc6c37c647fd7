// Writer for torch.save-compatible checkpoints: a zip of stored entries, 64-byte aligned like
// torch's own writer — archive/data.pkl (pickle protocol 2, the default of torch.save),
// archive/byteorder, archive/data/<n> (one per tensor), archive/version ("3"). Tensors are written
// exactly as torch 1.13+ writes them (`torch._utils._rebuild_tensor_v2` over a persistent-id
// storage, or `_rebuild_parameter` around that), and bytes as protocol 2 does (`_codecs.encode`),
// so every global in the output is on both our reader's allow-list and torch's weights_only one.
// Used for AUTOMATIC1111 `.pt` embeddings ({string_to_token, string_to_param, name, step, …}) and
// hypernetworks (dicts keyed by int layer width).

import type { FileHandle } from 'node:fs/promises';

import { writeFileAtomic } from './atomic.js';
import { f32ToBf16Array, f32ToF16Array, type DType } from './dtypes.js';
import { PickleTuple, describePickleValue, type PickleValue } from './pickle.js';
import { contiguousStrides, PickleOrderedDict, TorchCheckpointError, TorchTensorRef, torchDTypeName } from './torch-pickle.js';
import { ZipWriter } from './zip.js';

/** Tensor element types the writer accepts, by torch name or safetensors name. */
export type SaveDType =
  | 'float32'
  | 'float16'
  | 'bfloat16'
  | 'float64'
  | 'int64'
  | 'int32'
  | 'int16'
  | 'int8'
  | 'uint8'
  | 'bool'
  | 'F32'
  | 'F16'
  | 'BF16'
  | 'F64'
  | 'I64'
  | 'I32'
  | 'I16'
  | 'I8'
  | 'U8'
  | 'BOOL';

/**
 * A tensor to write, recognised by its shape: an object with exactly `dtype`, `shape`, `data`
 * (and optionally `requiresGrad`, `parameter`). Data: Float32Array for float types (float16 and
 * bfloat16 are rounded to nearest even) or Uint16Array of raw float16/bfloat16 bits; Float64Array
 * for float64; BigInt64Array or Int32Array for int64; Int32Array, Int16Array, Int8Array for the
 * other ints; Uint8Array for uint8 and bool (0/1).
 */
export interface TensorToSave {
  readonly dtype: SaveDType;
  readonly shape: readonly number[];
  readonly data: Float32Array | Float64Array | Uint16Array | BigInt64Array | Int32Array | Int16Array | Int8Array | Uint8Array;
  /** Saved in the tensor's requires_grad flag (default false). */
  readonly requiresGrad?: boolean;
  /** Save as an nn.Parameter (`_rebuild_parameter`), as A1111 hypernetwork layers are. */
  readonly parameter?: boolean;
}

/** A Python float, for integral values that must not become ints (plain numbers like 1 do). */
export class PyFloat {
  constructor(readonly value: number) {}
}

/** Marks `value` to be written as a Python float even if it is integral. */
export function pyFloat(value: number): PyFloat {
  return new PyFloat(value);
}

/** A dict key the writer accepts. */
export type TorchSaveKey = string | number | bigint | boolean | null | PickleTuple;

/**
 * A value the writer accepts: None, bool, int (integral numbers, bigints), float (other numbers,
 * PyFloat), str, bytes (Uint8Array), lists, tuples (PickleTuple), dicts (Map, or plain objects
 * with string keys; note JS orders integer-like string keys first, so use a Map with number keys
 * for int-keyed dicts), OrderedDicts (PickleOrderedDict), tensors (TensorToSave, or a
 * TorchTensorRef from a checkpoint being re-saved).
 */
export type TorchSaveValue =
  | null
  | boolean
  | number
  | bigint
  | string
  | Uint8Array
  | PyFloat
  | TensorToSave
  | TorchTensorRef
  | PickleTuple
  | readonly TorchSaveValue[]
  | ReadonlyMap<TorchSaveKey, TorchSaveValue>
  | { readonly [key: string]: TorchSaveValue };

/** Options of the writer. */
export interface TorchSaveOptions {
  /** The archive's top-level folder (default "archive", as torch >= 1.13 writes). */
  readonly archiveName?: string;
}

/** Writes `value` to `path` as a torch checkpoint, atomically; readable by torch.load(weights_only=True). */
export async function writeTorchCheckpoint(path: string, value: TorchSaveValue, options: TorchSaveOptions = {}): Promise<void> {
  const plan = planCheckpoint(path, value, options);
  await writeFileAtomic(path, async (handle) => {
    const sink = new BufferedSink(handle);
    await writeArchive(plan, (chunk) => sink.write(chunk));
    await sink.flush();
  });
}

/** Serializes `value` as torch checkpoint bytes in memory (small files, tests). */
export async function serializeTorchCheckpoint(value: TorchSaveValue, options: TorchSaveOptions = {}): Promise<Uint8Array> {
  const plan = planCheckpoint('<memory>', value, options);
  const chunks: Uint8Array[] = [];
  await writeArchive(plan, (chunk) => {
    chunks.push(chunk.slice());
  });
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const chunk of chunks) {
    out.set(chunk, at);
    at += chunk.length;
  }
  return out;
}

interface PlannedStorage {
  readonly key: string;
  readonly bytes: () => Promise<Uint8Array>;
}

interface Plan {
  readonly file: string;
  readonly top: string;
  readonly pickle: Uint8Array;
  readonly storages: readonly PlannedStorage[];
}

const encoder = new TextEncoder();

async function writeArchive(plan: Plan, sink: (chunk: Uint8Array) => Promise<void> | void): Promise<void> {
  const zip = new ZipWriter(sink);
  await zip.add(`${plan.top}/data.pkl`, plan.pickle);
  await zip.add(`${plan.top}/byteorder`, encoder.encode('little'));
  for (const storage of plan.storages) {
    let bytes: Uint8Array;
    try {
      bytes = await storage.bytes();
    } catch (error) {
      if (error instanceof TorchCheckpointError) throw new TorchCheckpointError(plan.file, `storage ${storage.key}: ${error.message}`, { cause: error });
      throw error;
    }
    await zip.add(`${plan.top}/data/${storage.key}`, bytes);
  }
  await zip.add(`${plan.top}/version`, encoder.encode('3\n'));
  await zip.finish();
}

function planCheckpoint(file: string, value: TorchSaveValue, options: TorchSaveOptions): Plan {
  if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) throw new TorchCheckpointError(file, 'writing checkpoints needs a little-endian host');
  const top = options.archiveName ?? 'archive';
  if (!/^[A-Za-z0-9_.-]{1,100}$/.test(top) || top === '.' || top === '..') {
    throw new TorchCheckpointError(file, `archive name ${JSON.stringify(top)}: expected 1-100 letters, digits, "_", "-" or "."`);
  }
  const encoder = new PickleEncoder(file);
  const pickle = encoder.encodeRoot(value);
  return { file, top, pickle, storages: encoder.storages };
}

// =============================================================================================
// Pickle encoding (protocol 2, as CPython's pickle.Pickler writes it)

const OP = {
  PROTO: 0x80,
  STOP: 0x2e,
  NONE: 0x4e,
  NEWTRUE: 0x88,
  NEWFALSE: 0x89,
  BININT: 0x4a,
  BININT1: 0x4b,
  BININT2: 0x4d,
  LONG1: 0x8a,
  LONG4: 0x8b,
  BINFLOAT: 0x47,
  BINUNICODE: 0x58,
  EMPTY_LIST: 0x5d,
  EMPTY_DICT: 0x7d,
  EMPTY_TUPLE: 0x29,
  MARK: 0x28,
  TUPLE: 0x74,
  TUPLE1: 0x85,
  TUPLE2: 0x86,
  TUPLE3: 0x87,
  APPEND: 0x61,
  APPENDS: 0x65,
  SETITEM: 0x73,
  SETITEMS: 0x75,
  GLOBAL: 0x63,
  REDUCE: 0x52,
  BUILD: 0x62,
  BINPERSID: 0x51,
  BINPUT: 0x71,
  LONG_BINPUT: 0x72,
  BINGET: 0x68,
  LONG_BINGET: 0x6a,
} as const;

// CPython batches APPENDS/SETITEMS in groups of this size.
const BATCH = 1000;
const MAX_DEPTH = 1000;

// Storage classes for the dtypes torch pickles through typed storages.
const STORAGE_CLASS: Readonly<Partial<Record<DType, string>>> = {
  F64: 'DoubleStorage',
  F32: 'FloatStorage',
  F16: 'HalfStorage',
  BF16: 'BFloat16Storage',
  I64: 'LongStorage',
  I32: 'IntStorage',
  I16: 'ShortStorage',
  I8: 'CharStorage',
  U8: 'ByteStorage',
  BOOL: 'BoolStorage',
};

const SAVE_DTYPES: Readonly<Record<SaveDType, DType>> = {
  float32: 'F32',
  float16: 'F16',
  bfloat16: 'BF16',
  float64: 'F64',
  int64: 'I64',
  int32: 'I32',
  int16: 'I16',
  int8: 'I8',
  uint8: 'U8',
  bool: 'BOOL',
  F32: 'F32',
  F16: 'F16',
  BF16: 'BF16',
  F64: 'F64',
  I64: 'I64',
  I32: 'I32',
  I16: 'I16',
  I8: 'I8',
  U8: 'U8',
  BOOL: 'BOOL',
};

const TENSOR_KEYS = new Set(['dtype', 'shape', 'data', 'requiresGrad', 'parameter']);

class PickleEncoder {
  readonly storages: PlannedStorage[] = [];
  readonly #file: string;
  #buffer = new Uint8Array(1 << 16);
  #length = 0;
  readonly #memo = new Map<unknown, number>();
  readonly #active = new Set<object>();

  constructor(file: string) {
    this.#file = file;
  }

  encodeRoot(value: TorchSaveValue): Uint8Array {
    this.op(OP.PROTO);
    this.byte(2);
    this.value(value, [], 0);
    this.op(OP.STOP);
    return this.#buffer.slice(0, this.#length);
  }

  private fail(path: readonly string[], message: string): TorchCheckpointError {
    const where = path.length === 0 ? 'the root value' : `value at ${JSON.stringify(path.join('.'))}`;
    return new TorchCheckpointError(this.#file, `${where}: ${message}`);
  }

  private value(value: unknown, path: readonly string[], depth: number): void {
    if (depth > MAX_DEPTH) throw this.fail(path, `nested deeper than ${MAX_DEPTH} levels`);
    if (value === null) return this.op(OP.NONE);
    switch (typeof value) {
      case 'boolean':
        return this.op(value ? OP.NEWTRUE : OP.NEWFALSE);
      case 'number':
        if (Number.isInteger(value) && !Object.is(value, -0)) return this.int(BigInt(value));
        return this.float(value);
      case 'bigint':
        return this.int(value);
      case 'string':
        return this.string(value, path);
      case 'object':
        break;
      default:
        throw this.fail(path, `cannot save a ${typeof value}`);
    }
    if (value instanceof PyFloat) return this.float(value.value);
    if (value instanceof Uint8Array) return this.bytes(value);
    // Checked before the memo: CPython would write a cycle, but our reader refuses them.
    if (this.#active.has(value)) throw this.fail(path, 'the value contains itself (recursive structures are not saved)');
    if (this.getMemo(value)) return;
    this.#active.add(value);
    try {
      if (value instanceof TorchTensorRef) this.tensorRef(value, path);
      else if (isTensorToSave(value)) this.tensor(value, path);
      else if (Array.isArray(value)) this.list(value as readonly unknown[], path, depth);
      else if (value instanceof PickleTuple) this.tuple(value.items, path, depth);
      else if (value instanceof PickleOrderedDict) this.orderedDict(value, path, depth);
      else if (value instanceof Map) this.dict(value as ReadonlyMap<unknown, unknown>, value, path, depth);
      else if (isPlainObject(value)) this.dict(new Map(Object.entries(value)), value, path, depth);
      else throw this.fail(path, `cannot save ${describeUnknown(value)}`);
    } finally {
      this.#active.delete(value);
    }
  }

  private list(items: readonly unknown[], path: readonly string[], depth: number): void {
    this.op(OP.EMPTY_LIST);
    this.putMemo(items);
    this.batched(items.length, OP.APPEND, OP.APPENDS, (i) => this.value(items[i], [...path, String(i)], depth + 1));
  }

  private tuple(items: readonly unknown[], path: readonly string[], depth: number): void {
    const each = (): void => items.forEach((item, i) => this.value(item, [...path, String(i)], depth + 1));
    if (items.length === 0) this.op(OP.EMPTY_TUPLE);
    else if (items.length <= 3) {
      each();
      this.op([OP.TUPLE1, OP.TUPLE2, OP.TUPLE3][items.length - 1]!);
    } else {
      this.op(OP.MARK);
      each();
      this.op(OP.TUPLE);
    }
  }

  private dict(map: ReadonlyMap<unknown, unknown>, memoKey: object, path: readonly string[], depth: number): void {
    this.op(OP.EMPTY_DICT);
    this.putMemo(memoKey);
    this.setItems(map, path, depth);
  }

  // OrderedDict as CPython reduces it: OrderedDict() then SETITEMS, then BUILD with its __dict__.
  private orderedDict(dict: PickleOrderedDict, path: readonly string[], depth: number): void {
    this.global('collections', 'OrderedDict');
    this.op(OP.EMPTY_TUPLE);
    this.op(OP.REDUCE);
    this.putMemo(dict);
    this.setItems(dict, path, depth);
    if (dict.attributes instanceof Map && dict.attributes.size > 0) {
      this.value(dict.attributes, [...path, '<attributes>'], depth + 1);
      this.op(OP.BUILD);
    }
  }

  private setItems(map: ReadonlyMap<unknown, unknown>, path: readonly string[], depth: number): void {
    const entries = [...map];
    this.batched(entries.length, OP.SETITEM, OP.SETITEMS, (i) => {
      const [k, v] = entries[i]!;
      const name = keyName(k);
      if (!isSaveKey(k)) throw this.fail([...path, name], `dict key must be a str, int, bool, None or tuple, found ${describeUnknown(k)}`);
      this.value(k, [...path, name], depth + 1);
      this.value(v, [...path, name], depth + 1);
    });
  }

  private batched(count: number, single: number, multiple: number, item: (index: number) => void): void {
    for (let start = 0; start < count; start += BATCH) {
      const end = Math.min(count, start + BATCH);
      if (end - start === 1) {
        item(start);
        this.op(single);
        continue;
      }
      this.op(OP.MARK);
      for (let i = start; i < end; i++) item(i);
      this.op(multiple);
    }
  }

  private tensor(tensor: TensorToSave, path: readonly string[]): void {
    const dtype = SAVE_DTYPES[tensor.dtype as SaveDType];
    if (dtype === undefined) throw this.fail(path, `tensor dtype ${JSON.stringify(tensor.dtype)} is not supported; use one of ${Object.keys(SAVE_DTYPES).join(', ')}`);
    const shape = [...tensor.shape];
    for (const dim of shape) {
      if (!Number.isSafeInteger(dim) || dim < 0) throw this.fail(path, `tensor shape [${shape.join(', ')}] must hold non-negative integers`);
    }
    const numel = shape.reduce((a, b) => a * b, 1);
    const bytes = storageBytes(dtype, tensor.data, numel, (message) => this.fail(path, message));
    this.emitTensor(tensor, dtype, shape, numel, tensor.requiresGrad ?? false, tensor.parameter ?? false, () => Promise.resolve(bytes));
  }

  private tensorRef(ref: TorchTensorRef, path: readonly string[]): void {
    if (STORAGE_CLASS[ref.dtype] === undefined) throw this.fail(path, `tensor dtype ${ref.dtype} has no torch storage class; it cannot be re-saved`);
    this.emitTensor(ref, ref.dtype, [...ref.shape], ref.numel, ref.requiresGrad, ref.isParameter, () => ref.readRaw());
  }

  // _rebuild_tensor_v2(storage, 0, size, contiguous stride, requires_grad, OrderedDict()),
  // wrapped in _rebuild_parameter(tensor, requires_grad, OrderedDict()) for parameters.
  private emitTensor(memoKey: object, dtype: DType, shape: readonly number[], numel: number, requiresGrad: boolean, parameter: boolean, bytes: () => Promise<Uint8Array>): void {
    const key = String(this.storages.length);
    this.storages.push({ key, bytes });
    if (parameter) this.global('torch._utils', '_rebuild_parameter');
    this.global('torch._utils', '_rebuild_tensor_v2');
    this.op(OP.MARK);
    this.op(OP.MARK);
    this.string('storage', []);
    this.global('torch', STORAGE_CLASS[dtype]!);
    this.string(key, []);
    this.string('cpu', []);
    this.int(BigInt(numel));
    this.op(OP.TUPLE);
    this.op(OP.BINPERSID);
    this.int(0n);
    this.tuple(shape, [], 0);
    this.tuple(contiguousStrides(shape), [], 0);
    this.op(parameter ? OP.NEWFALSE : requiresGrad ? OP.NEWTRUE : OP.NEWFALSE);
    this.emptyOrderedDict();
    this.op(OP.TUPLE);
    this.op(OP.REDUCE);
    if (parameter) {
      this.op(requiresGrad ? OP.NEWTRUE : OP.NEWFALSE);
      this.emptyOrderedDict();
      this.op(OP.TUPLE3);
      this.op(OP.REDUCE);
    }
    this.putMemo(memoKey);
  }

  private emptyOrderedDict(): void {
    this.global('collections', 'OrderedDict');
    this.op(OP.EMPTY_TUPLE);
    this.op(OP.REDUCE);
  }

  // Protocol 2 has no bytes opcode: CPython writes _codecs.encode(latin-1 text, "latin1").
  private bytes(data: Uint8Array): void {
    this.global('_codecs', 'encode');
    let text = '';
    for (let i = 0; i < data.length; i += 4096) text += String.fromCharCode(...data.subarray(i, i + 4096));
    this.string(text, []);
    this.string('latin1', []);
    this.op(OP.TUPLE2);
    this.op(OP.REDUCE);
  }

  private global(module: string, name: string): void {
    const id = `global:${module}.${name}`;
    if (this.getMemo(id)) return;
    this.op(OP.GLOBAL);
    this.raw(encoder.encode(`${module}\n${name}\n`));
    this.putMemo(id);
  }

  private string(text: string, path: readonly string[]): void {
    if (/\p{Surrogate}/u.test(text)) throw this.fail(path, 'string contains a lone surrogate (not valid UTF-8)');
    const data = encoder.encode(text);
    if (data.length > 0xffffffff) throw this.fail(path, 'string longer than 4 GiB');
    this.op(OP.BINUNICODE);
    this.u32(data.length);
    this.raw(data);
  }

  private int(value: bigint): void {
    if (value >= 0n && value <= 0xffn) {
      this.op(OP.BININT1);
      this.byte(Number(value));
    } else if (value >= 0n && value <= 0xffffn) {
      this.op(OP.BININT2);
      this.byte(Number(value) & 0xff);
      this.byte(Number(value) >> 8);
    } else if (value >= -(2n ** 31n) && value < 2n ** 31n) {
      this.op(OP.BININT);
      this.u32(Number(BigInt.asUintN(32, value)));
    } else {
      const data = encodeLong(value);
      if (data.length < 256) {
        this.op(OP.LONG1);
        this.byte(data.length);
      } else {
        this.op(OP.LONG4);
        this.u32(data.length);
      }
      this.raw(data);
    }
  }

  private float(value: number): void {
    this.op(OP.BINFLOAT);
    const bytes = new Uint8Array(8);
    new DataView(bytes.buffer).setFloat64(0, value, false);
    this.raw(bytes);
  }

  private getMemo(key: unknown): boolean {
    const index = this.#memo.get(key);
    if (index === undefined) return false;
    if (index < 256) {
      this.op(OP.BINGET);
      this.byte(index);
    } else {
      this.op(OP.LONG_BINGET);
      this.u32(index);
    }
    return true;
  }

  private putMemo(key: unknown): void {
    const index = this.#memo.size;
    this.#memo.set(key, index);
    if (index < 256) {
      this.op(OP.BINPUT);
      this.byte(index);
    } else {
      this.op(OP.LONG_BINPUT);
      this.u32(index);
    }
  }

  private op(code: number): void {
    this.byte(code);
  }

  private byte(value: number): void {
    this.reserve(1);
    this.#buffer[this.#length++] = value;
  }

  private u32(value: number): void {
    this.reserve(4);
    new DataView(this.#buffer.buffer).setUint32(this.#length, value, true);
    this.#length += 4;
  }

  private raw(data: Uint8Array): void {
    this.reserve(data.length);
    this.#buffer.set(data, this.#length);
    this.#length += data.length;
  }

  private reserve(extra: number): void {
    if (this.#length + extra <= this.#buffer.length) return;
    let size = this.#buffer.length * 2;
    while (size < this.#length + extra) size *= 2;
    const grown = new Uint8Array(size);
    grown.set(this.#buffer.subarray(0, this.#length));
    this.#buffer = grown;
  }
}

// Memo keys for tensors/containers are the objects themselves, so a tensor referenced twice (tied
// weights) is written once and read back as one shared object, as torch does.

// Minimal little-endian two's complement, as CPython's pickle.encode_long.
function encodeLong(value: bigint): Uint8Array {
  if (value === 0n) return new Uint8Array(0);
  const bytes: number[] = [];
  let v = value;
  for (;;) {
    bytes.push(Number(BigInt.asUintN(8, v)));
    v >>= 8n;
    const top = bytes[bytes.length - 1]!;
    if ((v === 0n && (top & 0x80) === 0) || (v === -1n && (top & 0x80) !== 0)) break;
  }
  return Uint8Array.from(bytes);
}

function storageBytes(dtype: DType, data: TensorToSave['data'], numel: number, fail: (message: string) => TorchCheckpointError): Uint8Array {
  if (!ArrayBuffer.isView(data)) throw fail('tensor data must be a typed array');
  if (data.length !== numel) throw fail(`tensor data has ${data.length} elements, its shape needs ${numel}`);
  const view = (a: ArrayBufferView): Uint8Array => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
  switch (dtype) {
    case 'F32':
      if (data instanceof Float32Array) return view(data);
      break;
    case 'F64':
      if (data instanceof Float64Array) return view(data);
      break;
    case 'F16':
    case 'BF16': {
      if (data instanceof Uint16Array) return view(data);
      if (data instanceof Float32Array) {
        const bits = new Uint16Array(numel);
        (dtype === 'F16' ? f32ToF16Array : f32ToBf16Array)(data, bits);
        return view(bits);
      }
      break;
    }
    case 'I64':
      if (data instanceof BigInt64Array) return view(data);
      if (data instanceof Int32Array) return view(BigInt64Array.from(data, (x) => BigInt(x)));
      break;
    case 'I32':
      if (data instanceof Int32Array) return view(data);
      break;
    case 'I16':
      if (data instanceof Int16Array) return view(data);
      break;
    case 'I8':
      if (data instanceof Int8Array) return view(data);
      break;
    case 'U8':
      if (data instanceof Uint8Array) return view(data);
      break;
    case 'BOOL':
      if (data instanceof Uint8Array) {
        if (data.some((b) => b > 1)) throw fail('bool tensor data must be 0 or 1');
        return view(data);
      }
      break;
    default:
      break;
  }
  throw fail(`tensor data ${data.constructor.name} does not fit dtype ${torchDTypeName(dtype) ?? dtype}`);
}

function isTensorToSave(value: object): value is TensorToSave {
  if (!isPlainObject(value)) return false;
  const keys = Object.keys(value);
  return keys.includes('dtype') && keys.includes('shape') && keys.includes('data') && keys.every((k) => TENSOR_KEYS.has(k)) && ArrayBuffer.isView((value as { data: unknown }).data);
}

function isPlainObject(value: object): value is Record<string, unknown> {
  const proto: unknown = Object.getPrototypeOf(value);
  return proto === Object.prototype || proto === null;
}

function isSaveKey(value: unknown): boolean {
  return value === null || ['string', 'number', 'bigint', 'boolean'].includes(typeof value) || value instanceof PickleTuple;
}

function keyName(value: unknown): string {
  return typeof value === 'string' ? value : typeof value === 'object' && value !== null ? describeUnknown(value) : String(value);
}

function describeUnknown(value: unknown): string {
  if (value instanceof PickleTuple || value instanceof Map || value instanceof Set || Array.isArray(value)) return describePickleValue(value as PickleValue);
  if (ArrayBuffer.isView(value)) return `a bare ${value.constructor.name} (wrap it as {dtype, shape, data})`;
  if (typeof value === 'object' && value !== null) return `a ${value.constructor?.name ?? 'null-prototype'} object`;
  return `a ${typeof value}`;
}

// Collects small writes (headers, pickle) into larger ones; big chunks go straight through.
class BufferedSink {
  readonly #handle: FileHandle;
  readonly #buffer = new Uint8Array(1 << 20);
  #length = 0;

  constructor(handle: FileHandle) {
    this.#handle = handle;
  }

  async write(chunk: Uint8Array): Promise<void> {
    if (this.#length + chunk.length <= this.#buffer.length) {
      this.#buffer.set(chunk, this.#length);
      this.#length += chunk.length;
      return;
    }
    await this.flush();
    if (chunk.length <= this.#buffer.length) {
      this.#buffer.set(chunk, 0);
      this.#length = chunk.length;
      return;
    }
    await writeAll(this.#handle, chunk);
  }

  async flush(): Promise<void> {
    if (this.#length === 0) return;
    await writeAll(this.#handle, this.#buffer.subarray(0, this.#length));
    this.#length = 0;
  }
}

async function writeAll(handle: FileHandle, data: Uint8Array): Promise<void> {
  // fs writes are limited to 2 GiB - 1 per call.
  for (let done = 0; done < data.length; ) {
    const { bytesWritten } = await handle.write(data, done, Math.min(data.length - done, 1 << 30));
    done += bytesWritten;
  }
}
