// A pickle opcode machine (protocols 0-5) that never executes anything. Data opcodes build plain
// JS values; every opcode that would import or call Python code (GLOBAL, STACK_GLOBAL, INST, OBJ,
// REDUCE, NEWOBJ, NEWOBJ_EX, BUILD, PERSID, BINPERSID) is handed to caller-supplied hooks, which
// decide from an allow-list what inert value stands for the result, or refuse. EXT1/2/4 (the
// copyreg extension registry) and out-of-band buffers are always refused.
// The machine is a loop over the bytes with an explicit stack, so nesting depth cannot overflow
// the JS stack; stack, memo and value counts are capped so a small pickle cannot exhaust memory.
// Opcode semantics follow CPython's Lib/pickle.py (`_Unpickler`) and Lib/pickletools.py.

/** A value produced by unpickling. Dicts are Maps (keys keep their Python types), lists are arrays. */
export type PickleValue =
  | null
  | boolean
  | number
  | bigint
  | string
  | Uint8Array
  | PickleValue[]
  | PickleTuple
  | PickleDict
  | Set<PickleValue>
  | PickleGlobal
  | PickleObject
  | PickleOpaque;

/** A Python dict (or dict subclass such as OrderedDict), in insertion order. */
export type PickleDict = Map<PickleValue, PickleValue>;

/** A Python tuple (immutable; kept distinct from lists). */
export class PickleTuple {
  readonly items: readonly PickleValue[];

  constructor(items: readonly PickleValue[]) {
    this.items = Object.freeze([...items]);
  }

  get length(): number {
    return this.items.length;
  }
}

/** A reference to a Python global (`module.name`) that an allow-list accepted; inert data. */
export class PickleGlobal {
  constructor(
    readonly module: string,
    readonly name: string,
  ) {}

  /** `module.name`, as used in messages. */
  get qualifiedName(): string {
    return `${this.module}.${this.name}`;
  }

  toString(): string {
    return this.qualifiedName;
  }
}

/** An instance of an allowed class, kept as inert data: class, constructor arguments, BUILD state. */
export class PickleObject {
  state: PickleValue | undefined;

  constructor(
    readonly cls: PickleGlobal,
    readonly args: readonly PickleValue[],
    readonly kwargs: PickleDict | undefined,
  ) {
    this.state = undefined;
  }
}

/** Base of values that hooks create for allowed objects with their own meaning (tensors, storages…). */
export abstract class PickleOpaque {
  /** A short description for messages, e.g. "tensor". */
  abstract readonly kind: string;
}

/** How a callable is applied: the opcode that asked for it. */
export type CallKind = 'REDUCE' | 'NEWOBJ' | 'NEWOBJ_EX' | 'OBJ' | 'INST';

/**
 * The policy side of the machine. Each hook returns the inert value standing for the result or
 * throws (preferably `new PickleError(message)`; the machine adds the offset and opcode).
 */
export interface PickleHooks {
  /** GLOBAL, STACK_GLOBAL and INST: the value that names `module.name`. */
  resolveGlobal(module: string, name: string): PickleValue;
  /** REDUCE, NEWOBJ, NEWOBJ_EX, OBJ, INST: the result of applying `callable`. */
  call(callable: PickleValue, args: readonly PickleValue[], how: CallKind, kwargs: PickleDict | undefined): PickleValue;
  /** BUILD: apply `state` to `target` (in place). */
  build(target: PickleValue, state: PickleValue): void;
  /** PERSID and BINPERSID: the object the persistent id stands for. */
  persistentLoad(pid: PickleValue): PickleValue;
}

/** Resource caps for one pickle. */
export interface PickleLimits {
  /** Most items on the stack at once (default 1,000,000). */
  readonly maxStack: number;
  /** Most memo entries (default 4,000,000). */
  readonly maxMemo: number;
  /** Most values pushed in total, a bound on the objects a pickle can make (default 5,000,000). */
  readonly maxValues: number;
  /** Largest LONG4 / text integer in bytes or digits (default 1024). */
  readonly maxLongBytes: number;
}

/** Defaults for `PickleLimits`. */
export const DEFAULT_PICKLE_LIMITS: Readonly<PickleLimits> = Object.freeze({
  maxStack: 1_000_000,
  maxMemo: 4_000_000,
  maxValues: 5_000_000,
  maxLongBytes: 1024,
});

/** A malformed or refused pickle. `offset` and `opcode` locate the failing opcode when known. */
export class PickleError extends Error {
  readonly detail: string;
  readonly offset?: number;
  readonly opcode?: string;

  constructor(detail: string, offset?: number, opcode?: string, options?: { cause?: unknown }) {
    super(offset === undefined ? detail : `offset ${offset}${opcode === undefined ? '' : ` (${opcode})`}: ${detail}`, options);
    this.name = 'PickleError';
    this.detail = detail;
    if (offset !== undefined) this.offset = offset;
    if (opcode !== undefined) this.opcode = opcode;
  }
}

/** The pickle ended before STOP: more bytes might complete it (used to read streams in pieces). */
export class PickleTruncatedError extends PickleError {
  constructor(detail: string, offset?: number, opcode?: string) {
    super(detail, offset, opcode);
    this.name = 'PickleTruncatedError';
  }
}

/** Result of `unpickle`: the value and the offset just past its STOP opcode. */
export interface UnpickleResult {
  readonly value: PickleValue;
  readonly end: number;
}

/** Hooks that refuse every global, call and persistent id: for pickles that must be plain data. */
export const DATA_ONLY_HOOKS: PickleHooks = Object.freeze({
  resolveGlobal(module: string, name: string): PickleValue {
    throw new PickleError(`global ${JSON.stringify(`${module}.${name}`)} is not allowed here (plain data expected)`);
  },
  call(): PickleValue {
    throw new PickleError('calls are not allowed here (plain data expected)');
  },
  build(): void {
    throw new PickleError('BUILD is not allowed here (plain data expected)');
  },
  persistentLoad(): PickleValue {
    throw new PickleError('persistent ids are not allowed here (plain data expected)');
  },
});

/** Unpickles one pickle starting at `start` in `bytes`, with `hooks` deciding every global and call. */
export function unpickle(bytes: Uint8Array, hooks: PickleHooks, options: { start?: number; limits?: Partial<PickleLimits> } = {}): UnpickleResult {
  const limits = { ...DEFAULT_PICKLE_LIMITS, ...options.limits };
  return new Machine(bytes, options.start ?? 0, hooks, limits).run();
}

/** True for values a Python dict accepts as keys (lists, dicts and non-frozen sets are unhashable). */
export function isHashable(value: PickleValue): boolean {
  if (Array.isArray(value) || value instanceof Map) return false;
  if (value instanceof Set) return frozenSets.has(value);
  if (value instanceof PickleTuple) return value.items.every(isHashableShallow);
  return true;
}

// Tuples nested in tuples are checked one level deep: deep tuple keys do not occur in checkpoints
// and an unbounded check would need its own depth limit.
function isHashableShallow(value: PickleValue): boolean {
  if (Array.isArray(value) || value instanceof Map) return false;
  if (value instanceof Set) return frozenSets.has(value);
  return true;
}

/** True if `value` came from FROZENSET (a frozenset, hashable) rather than a set. */
export function isFrozenSet(value: PickleValue): boolean {
  return value instanceof Set && frozenSets.has(value);
}

/** A short, safe description of a value's type for messages. */
export function describePickleValue(value: PickleValue | undefined): string {
  if (value === undefined) return 'nothing';
  if (value === null) return 'None';
  if (typeof value === 'boolean') return 'a bool';
  if (typeof value === 'number') return Number.isInteger(value) ? 'an int' : 'a float';
  if (typeof value === 'bigint') return 'an int';
  if (typeof value === 'string') return 'a str';
  if (value instanceof Uint8Array) return 'bytes';
  if (Array.isArray(value)) return 'a list';
  if (value instanceof PickleTuple) return 'a tuple';
  if (value instanceof Map) return 'a dict';
  if (value instanceof Set) return frozenSets.has(value) ? 'a frozenset' : 'a set';
  if (value instanceof PickleGlobal) return value.qualifiedName;
  if (value instanceof PickleObject) return `a ${value.cls.qualifiedName} object`;
  return `a ${value.kind}`;
}

const frozenSets = new WeakSet<Set<PickleValue>>();

// =============================================================================================
// The machine

const OP = {
  MARK: 0x28, // (
  STOP: 0x2e, // .
  POP: 0x30, // 0
  POP_MARK: 0x31, // 1
  DUP: 0x32, // 2
  FLOAT: 0x46, // F
  INT: 0x49, // I
  BININT: 0x4a, // J
  BININT1: 0x4b, // K
  LONG: 0x4c, // L
  BININT2: 0x4d, // M
  NONE: 0x4e, // N
  PERSID: 0x50, // P
  BINPERSID: 0x51, // Q
  REDUCE: 0x52, // R
  STRING: 0x53, // S
  BINSTRING: 0x54, // T
  SHORT_BINSTRING: 0x55, // U
  UNICODE: 0x56, // V
  BINUNICODE: 0x58, // X
  APPEND: 0x61, // a
  BUILD: 0x62, // b
  GLOBAL: 0x63, // c
  DICT: 0x64, // d
  EMPTY_DICT: 0x7d, // }
  APPENDS: 0x65, // e
  GET: 0x67, // g
  BINGET: 0x68, // h
  INST: 0x69, // i
  LONG_BINGET: 0x6a, // j
  LIST: 0x6c, // l
  EMPTY_LIST: 0x5d, // ]
  OBJ: 0x6f, // o
  PUT: 0x70, // p
  BINPUT: 0x71, // q
  LONG_BINPUT: 0x72, // r
  SETITEM: 0x73, // s
  TUPLE: 0x74, // t
  EMPTY_TUPLE: 0x29, // )
  SETITEMS: 0x75, // u
  BINFLOAT: 0x47, // G
  // protocol 2
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
  // protocol 3
  BINBYTES: 0x42, // B
  SHORT_BINBYTES: 0x43, // C
  // protocol 4
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
  // protocol 5
  BYTEARRAY8: 0x96,
  NEXT_BUFFER: 0x97,
  READONLY_BUFFER: 0x98,
} as const;

const OP_NAMES: ReadonlyMap<number, string> = new Map(Object.entries(OP).map(([name, code]) => [code, name]));

const HIGHEST_PROTOCOL = 5;
const MAX_TEXT_LINE = 4096;
const utf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
const latin1 = new TextDecoder('latin1');

class Machine {
  readonly #bytes: Uint8Array;
  readonly #view: DataView;
  readonly #hooks: PickleHooks;
  readonly #limits: PickleLimits;
  readonly #stack: PickleValue[] = [];
  // Stack heights at each open MARK: Python keeps a separate "metastack"; indices are equivalent.
  readonly #marks: number[] = [];
  readonly #memo = new Map<number, PickleValue>();
  #pos: number;
  #opStart = 0;
  #opName = '';
  #pushed = 0;

  constructor(bytes: Uint8Array, start: number, hooks: PickleHooks, limits: PickleLimits) {
    this.#bytes = bytes;
    this.#view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.#pos = start;
    this.#hooks = hooks;
    this.#limits = limits;
  }

  run(): UnpickleResult {
    try {
      for (;;) {
        if (this.#pos >= this.#bytes.length) {
          throw new PickleTruncatedError(`pickle data ended at byte ${this.#bytes.length} without a STOP opcode`, this.#bytes.length);
        }
        this.#opStart = this.#pos;
        const op = this.#bytes[this.#pos++]!;
        this.#opName = OP_NAMES.get(op) ?? `0x${op.toString(16).padStart(2, '0')}`;
        if (op === OP.STOP) {
          const value = this.stop();
          return { value, end: this.#pos };
        }
        this.step(op);
      }
    } catch (error) {
      if (error instanceof PickleError && error.offset === undefined) {
        const Kind = error instanceof PickleTruncatedError ? PickleTruncatedError : PickleError;
        throw new Kind(error.detail, this.#opStart, this.#opName);
      }
      throw error;
    }
  }

  private stop(): PickleValue {
    if (this.#marks.length > 0) throw new PickleError(`STOP with ${this.#marks.length} MARK(s) still open`);
    if (this.#stack.length !== 1) {
      throw new PickleError(this.#stack.length === 0 ? 'stack underflow: STOP found an empty stack' : `STOP found ${this.#stack.length} values on the stack, expected exactly 1`);
    }
    return this.#stack.pop()!;
  }

  private step(op: number): void {
    switch (op) {
      // ---- framing and protocol
      case OP.PROTO: {
        const protocol = this.u8();
        if (protocol > HIGHEST_PROTOCOL) throw new PickleError(`unsupported pickle protocol ${protocol} (highest known is ${HIGHEST_PROTOCOL})`);
        return;
      }
      case OP.FRAME: {
        const length = this.u64('frame length');
        if (length > this.#bytes.length - this.#pos) {
          throw new PickleTruncatedError(`frame of ${length} bytes runs past the end of the data (${this.#bytes.length - this.#pos} bytes left)`);
        }
        return;
      }

      // ---- constants and numbers
      case OP.NONE:
        return this.push(null);
      case OP.NEWTRUE:
        return this.push(true);
      case OP.NEWFALSE:
        return this.push(false);
      case OP.BININT1:
        return this.push(this.u8());
      case OP.BININT2:
        this.take(2, 'BININT2 argument');
        return this.push(this.#view.getUint16(this.#pos - 2, true));
      case OP.BININT:
        this.take(4, 'BININT argument');
        return this.push(this.#view.getInt32(this.#pos - 4, true));
      case OP.LONG1:
        return this.push(this.long(this.u8()));
      case OP.LONG4: {
        this.take(4, 'LONG4 length');
        const length = this.#view.getInt32(this.#pos - 4, true);
        if (length < 0) throw new PickleError(`LONG4 has a negative byte count ${length}`);
        if (length > this.#limits.maxLongBytes) throw new PickleError(`LONG4 of ${length} bytes exceeds the limit of ${this.#limits.maxLongBytes} bytes`);
        return this.push(this.long(length));
      }
      case OP.INT: {
        const text = this.textLine();
        if (text === '00') return this.push(false);
        if (text === '01') return this.push(true);
        return this.push(this.decimal(text, 'INT'));
      }
      case OP.LONG: {
        const text = this.textLine();
        return this.push(this.decimal(text.endsWith('L') ? text.slice(0, -1) : text, 'LONG'));
      }
      case OP.FLOAT:
        return this.push(parseFloatText(this.textLine()));
      case OP.BINFLOAT:
        this.take(8, 'BINFLOAT argument');
        return this.push(this.#view.getFloat64(this.#pos - 8, false));

      // ---- strings and bytes
      case OP.SHORT_BINUNICODE:
        return this.push(this.utf8(this.u8()));
      case OP.BINUNICODE:
        return this.push(this.utf8(this.u32()));
      case OP.BINUNICODE8:
        return this.push(this.utf8(this.u64('BINUNICODE8 length')));
      // Python 2 str: torch.load decodes these with encoding="utf-8", so they become text.
      case OP.SHORT_BINSTRING:
        return this.push(this.utf8(this.u8()));
      case OP.BINSTRING: {
        this.take(4, 'BINSTRING length');
        const length = this.#view.getInt32(this.#pos - 4, true);
        if (length < 0) throw new PickleError(`BINSTRING has a negative length ${length}`);
        return this.push(this.utf8(length));
      }
      case OP.STRING:
        return this.push(decodeUtf8(unescapeStringLiteral(this.line('STRING argument')), 'STRING'));
      case OP.UNICODE:
        return this.push(decodeRawUnicodeEscape(this.line('UNICODE argument')));
      case OP.SHORT_BINBYTES:
        return this.push(this.bytesOf(this.u8()));
      case OP.BINBYTES:
        return this.push(this.bytesOf(this.u32()));
      case OP.BINBYTES8:
        return this.push(this.bytesOf(this.u64('BINBYTES8 length')));
      case OP.BYTEARRAY8:
        return this.push(this.bytesOf(this.u64('BYTEARRAY8 length')));
      case OP.NEXT_BUFFER:
        throw new PickleError('out-of-band buffers (protocol 5 NEXT_BUFFER) are not supported');
      case OP.READONLY_BUFFER:
        this.peek();
        return;

      // ---- containers
      case OP.EMPTY_LIST:
        return this.push([]);
      case OP.EMPTY_DICT:
        return this.push(new Map());
      case OP.EMPTY_TUPLE:
        return this.push(new PickleTuple([]));
      case OP.EMPTY_SET:
        return this.push(new Set());
      case OP.LIST:
        return this.push(this.popMark());
      case OP.TUPLE:
        return this.push(new PickleTuple(this.popMark()));
      case OP.TUPLE1: {
        const a = this.pop();
        return this.push(new PickleTuple([a]));
      }
      case OP.TUPLE2: {
        const b = this.pop();
        const a = this.pop();
        return this.push(new PickleTuple([a, b]));
      }
      case OP.TUPLE3: {
        const c = this.pop();
        const b = this.pop();
        const a = this.pop();
        return this.push(new PickleTuple([a, b, c]));
      }
      case OP.DICT: {
        const items = this.popMark();
        const dict: PickleDict = new Map();
        this.setItems(dict, items);
        return this.push(dict);
      }
      case OP.FROZENSET: {
        const set = new Set<PickleValue>();
        this.addItems(set, this.popMark());
        frozenSets.add(set);
        return this.push(set);
      }
      case OP.APPEND: {
        const value = this.pop();
        this.listTarget().push(value);
        return;
      }
      case OP.APPENDS: {
        const items = this.popMark();
        const list = this.listTarget();
        for (const item of items) list.push(item);
        return;
      }
      case OP.SETITEM: {
        const value = this.pop();
        const key = this.pop();
        this.setItems(this.dictTarget(), [key, value]);
        return;
      }
      case OP.SETITEMS: {
        const items = this.popMark();
        this.setItems(this.dictTarget(), items);
        return;
      }
      case OP.ADDITEMS: {
        const items = this.popMark();
        const target = this.peek();
        if (!(target instanceof Set) || frozenSets.has(target)) throw new PickleError(`ADDITEMS target must be a set, found ${describePickleValue(target)}`);
        this.addItems(target, items);
        return;
      }

      // ---- stack and memo
      case OP.MARK:
        this.#marks.push(this.#stack.length);
        return;
      case OP.POP:
        // Python pops the mark itself when the current frame (above the last MARK) is empty.
        if (this.#stack.length > this.markBase()) this.#stack.pop();
        else if (this.#marks.length > 0) this.#marks.pop();
        else throw new PickleError('stack underflow: POP found an empty stack');
        return;
      case OP.POP_MARK:
        this.popMark();
        return;
      case OP.DUP:
        return this.push(this.peek());
      case OP.PUT:
        return this.memoPut(this.memoIndexText());
      case OP.BINPUT:
        return this.memoPut(this.u8());
      case OP.LONG_BINPUT:
        return this.memoPut(this.u32());
      case OP.MEMOIZE:
        return this.memoPut(this.#memo.size);
      case OP.GET:
        return this.memoGet(this.memoIndexText());
      case OP.BINGET:
        return this.memoGet(this.u8());
      case OP.LONG_BINGET:
        return this.memoGet(this.u32());

      // ---- everything that would touch Python code goes through the hooks
      case OP.GLOBAL: {
        const module = decodeUtf8(this.line('GLOBAL module'), 'GLOBAL module');
        const name = decodeUtf8(this.line('GLOBAL name'), 'GLOBAL name');
        return this.push(this.#hooks.resolveGlobal(module, name));
      }
      case OP.STACK_GLOBAL: {
        const name = this.pop();
        const module = this.pop();
        if (typeof module !== 'string' || typeof name !== 'string') {
          throw new PickleError(`STACK_GLOBAL needs two str values, found ${describePickleValue(module)} and ${describePickleValue(name)}`);
        }
        return this.push(this.#hooks.resolveGlobal(module, name));
      }
      case OP.INST: {
        const module = decodeUtf8(this.line('INST module'), 'INST module');
        const name = decodeUtf8(this.line('INST name'), 'INST name');
        const cls = this.#hooks.resolveGlobal(module, name);
        const args = this.popMark();
        return this.push(this.#hooks.call(cls, args, 'INST', undefined));
      }
      case OP.OBJ: {
        const items = this.popMark();
        if (items.length === 0) throw new PickleError('OBJ needs a class after its MARK, found nothing');
        const [cls, ...args] = items;
        return this.push(this.#hooks.call(cls!, args, 'OBJ', undefined));
      }
      case OP.REDUCE: {
        const args = this.pop();
        const callable = this.pop();
        if (!(args instanceof PickleTuple)) throw new PickleError(`REDUCE arguments must be a tuple, found ${describePickleValue(args)} (callable ${describePickleValue(callable)})`);
        return this.push(this.#hooks.call(callable, args.items, 'REDUCE', undefined));
      }
      case OP.NEWOBJ: {
        const args = this.pop();
        const cls = this.pop();
        if (!(args instanceof PickleTuple)) throw new PickleError(`NEWOBJ arguments must be a tuple, found ${describePickleValue(args)} (class ${describePickleValue(cls)})`);
        return this.push(this.#hooks.call(cls, args.items, 'NEWOBJ', undefined));
      }
      case OP.NEWOBJ_EX: {
        const kwargs = this.pop();
        const args = this.pop();
        const cls = this.pop();
        if (!(args instanceof PickleTuple) || !(kwargs instanceof Map)) {
          throw new PickleError(`NEWOBJ_EX needs a tuple and a dict, found ${describePickleValue(args)} and ${describePickleValue(kwargs)} (class ${describePickleValue(cls)})`);
        }
        return this.push(this.#hooks.call(cls, args.items, 'NEWOBJ_EX', kwargs));
      }
      case OP.BUILD: {
        const state = this.pop();
        this.#hooks.build(this.peek(), state);
        return;
      }
      case OP.PERSID: {
        const pid = decodeAscii(this.line('PERSID argument'), 'PERSID');
        return this.push(this.#hooks.persistentLoad(pid));
      }
      case OP.BINPERSID:
        return this.push(this.#hooks.persistentLoad(this.pop()));
      case OP.EXT1:
      case OP.EXT2:
      case OP.EXT4: {
        let code: number;
        if (op === OP.EXT1) code = this.u8();
        else if (op === OP.EXT4) code = this.u32();
        else {
          this.take(2, 'EXT2 code');
          code = this.#view.getUint16(this.#pos - 2, true);
        }
        throw new PickleError(`extension code ${code}: the copyreg extension registry is not allowed (it would import an unnamed global)`);
      }
      default:
        throw new PickleError(`unknown opcode 0x${op.toString(16).padStart(2, '0')}`);
    }
  }

  // ---- stack helpers

  private markBase(): number {
    return this.#marks.length === 0 ? 0 : this.#marks[this.#marks.length - 1]!;
  }

  private push(value: PickleValue): void {
    if (this.#stack.length >= this.#limits.maxStack) throw new PickleError(`stack exceeds the limit of ${this.#limits.maxStack} values`);
    if (++this.#pushed > this.#limits.maxValues) throw new PickleError(`more than ${this.#limits.maxValues} values created (limit)`);
    this.#stack.push(value);
  }

  private pop(): PickleValue {
    if (this.#stack.length <= this.markBase()) throw new PickleError(this.underflow());
    return this.#stack.pop()!;
  }

  private peek(): PickleValue {
    if (this.#stack.length <= this.markBase()) throw new PickleError(this.underflow());
    return this.#stack[this.#stack.length - 1]!;
  }

  private underflow(): string {
    return this.#stack.length === 0 ? 'stack underflow: the stack is empty' : 'stack underflow: nothing above the last MARK';
  }

  private popMark(): PickleValue[] {
    const base = this.#marks.pop();
    if (base === undefined) throw new PickleError('no MARK is open');
    return this.#stack.splice(base);
  }

  private listTarget(): PickleValue[] {
    const target = this.peek();
    if (!Array.isArray(target)) throw new PickleError(`${this.#opName} target must be a list, found ${describePickleValue(target)}`);
    return target;
  }

  private dictTarget(): PickleDict {
    const target = this.peek();
    if (!(target instanceof Map)) throw new PickleError(`${this.#opName} target must be a dict, found ${describePickleValue(target)}`);
    return target;
  }

  private setItems(dict: PickleDict, items: readonly PickleValue[]): void {
    if (items.length % 2 !== 0) throw new PickleError(`${this.#opName} needs key/value pairs, found an odd number (${items.length}) of items`);
    for (let i = 0; i < items.length; i += 2) {
      const key = items[i]!;
      if (!isHashable(key)) throw new PickleError(`unhashable dict key: ${describePickleValue(key)}`);
      dict.set(key, items[i + 1]!);
    }
  }

  private addItems(set: Set<PickleValue>, items: readonly PickleValue[]): void {
    for (const item of items) {
      if (!isHashable(item)) throw new PickleError(`unhashable set item: ${describePickleValue(item)}`);
      set.add(item);
    }
  }

  private memoPut(index: number): void {
    const value = this.peek();
    if (!this.#memo.has(index) && this.#memo.size >= this.#limits.maxMemo) throw new PickleError(`memo exceeds the limit of ${this.#limits.maxMemo} entries`);
    this.#memo.set(index, value);
  }

  private memoGet(index: number): void {
    if (!this.#memo.has(index)) throw new PickleError(`memo key ${index} was never stored`);
    this.push(this.#memo.get(index)!);
  }

  // ---- argument readers

  private take(count: number, what: string): void {
    if (count > this.#bytes.length - this.#pos) {
      throw new PickleTruncatedError(`${what}: needs ${count} bytes, only ${this.#bytes.length - this.#pos} left`);
    }
    this.#pos += count;
  }

  private u8(): number {
    this.take(1, `${this.#opName} argument`);
    return this.#bytes[this.#pos - 1]!;
  }

  private u32(): number {
    this.take(4, `${this.#opName} argument`);
    return this.#view.getUint32(this.#pos - 4, true);
  }

  private u64(what: string): number {
    this.take(8, what);
    const value = this.#view.getBigUint64(this.#pos - 8, true);
    if (value > BigInt(this.#bytes.length)) {
      throw new PickleTruncatedError(`${what}: ${value} bytes declared, only ${this.#bytes.length - this.#pos} left`);
    }
    return Number(value);
  }

  private slice(length: number, what: string): Uint8Array {
    this.take(length, what);
    return this.#bytes.subarray(this.#pos - length, this.#pos);
  }

  private utf8(length: number): string {
    return decodeUtf8(this.slice(length, `${this.#opName} data`), this.#opName);
  }

  private bytesOf(length: number): Uint8Array {
    // A copy, so the values do not keep the whole pickle buffer alive.
    return this.slice(length, `${this.#opName} data`).slice();
  }

  // Little-endian two's complement, as LONG1/LONG4 store it.
  private long(length: number): number | bigint {
    const data = this.slice(length, `${this.#opName} data`);
    if (length === 0) return 0;
    let value = 0n;
    for (let i = length - 1; i >= 0; i--) value = (value << 8n) | BigInt(data[i]!);
    if ((data[length - 1]! & 0x80) !== 0) value -= 1n << BigInt(8 * length);
    return normalizeInt(value);
  }

  private line(what: string): Uint8Array {
    const start = this.#pos;
    const limit = Math.min(this.#bytes.length, start + MAX_TEXT_LINE + 1);
    const newline = this.#bytes.subarray(start, limit).indexOf(0x0a);
    if (newline < 0) {
      if (limit === this.#bytes.length) throw new PickleTruncatedError(`${what}: no newline before the end of the data`);
      throw new PickleError(`${what}: line longer than ${MAX_TEXT_LINE} bytes`);
    }
    this.#pos = start + newline + 1;
    return this.#bytes.subarray(start, start + newline);
  }

  private textLine(): string {
    return decodeAscii(this.line(`${this.#opName} argument`), this.#opName);
  }

  private decimal(text: string, what: string): number | bigint {
    if (!/^[+-]?[0-9]+$/.test(text)) throw new PickleError(`${what} argument ${JSON.stringify(text)} is not a decimal integer`);
    if (text.length > this.#limits.maxLongBytes) throw new PickleError(`${what} argument of ${text.length} digits exceeds the limit of ${this.#limits.maxLongBytes}`);
    return normalizeInt(BigInt(text));
  }

  private memoIndexText(): number {
    const text = this.textLine();
    if (!/^[0-9]{1,15}$/.test(text)) throw new PickleError(`memo index ${JSON.stringify(text)} is not a small non-negative integer`);
    return Number(text);
  }
}

/** An int as a JS number when exactly representable, else a bigint. */
export function normalizeInt(value: bigint): number | bigint {
  return value >= BigInt(Number.MIN_SAFE_INTEGER) && value <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(value) : value;
}

function decodeUtf8(bytes: Uint8Array, what: string): string {
  try {
    return utf8.decode(bytes);
  } catch {
    throw new PickleError(`${what}: invalid UTF-8 text`);
  }
}

function decodeAscii(bytes: Uint8Array, what: string): string {
  for (const b of bytes) if (b >= 0x80) throw new PickleError(`${what}: expected ASCII text, found byte 0x${b.toString(16)}`);
  return latin1.decode(bytes);
}

function parseFloatText(text: string): number {
  const t = text.trim();
  if (/^[+-]?(inf|infinity)$/i.test(t)) return t.startsWith('-') ? -Infinity : Infinity;
  if (/^[+-]?nan$/i.test(t)) return NaN;
  if (!/^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$/.test(t)) throw new PickleError(`FLOAT argument ${JSON.stringify(text.slice(0, 40))} is not a number`);
  return Number(t);
}

// Protocol 0 STRING: a quoted Python 2 string literal, unescaped like codecs.escape_decode.
function unescapeStringLiteral(raw: Uint8Array): Uint8Array {
  const quoteChar = raw[0];
  if (raw.length < 2 || (quoteChar !== 0x22 && quoteChar !== 0x27) || raw[raw.length - 1] !== quoteChar) {
    throw new PickleError('the STRING argument must be quoted');
  }
  const body = raw.subarray(1, raw.length - 1);
  const out: number[] = [];
  const simple: Record<number, number> = { 0x5c: 0x5c, 0x27: 0x27, 0x22: 0x22, 0x6e: 0x0a, 0x72: 0x0d, 0x74: 0x09, 0x61: 0x07, 0x62: 0x08, 0x66: 0x0c, 0x76: 0x0b };
  for (let i = 0; i < body.length; i++) {
    const c = body[i]!;
    if (c !== 0x5c) {
      out.push(c);
      continue;
    }
    const e = body[++i];
    if (e === undefined) throw new PickleError('STRING argument ends with a lone backslash');
    if (simple[e] !== undefined) out.push(simple[e]);
    else if (e === 0x0a) continue; // backslash-newline is a line continuation
    else if (e === 0x78 /* x */) {
      const hex = String.fromCharCode(body[i + 1] ?? 0, body[i + 2] ?? 0);
      if (!/^[0-9a-fA-F]{2}$/.test(hex)) throw new PickleError('STRING argument has an invalid \\x escape');
      out.push(parseInt(hex, 16));
      i += 2;
    } else if (e >= 0x30 && e <= 0x37) {
      let value = e - 0x30;
      for (let k = 0; k < 2 && body[i + 1] !== undefined && body[i + 1]! >= 0x30 && body[i + 1]! <= 0x37; k++) value = value * 8 + (body[++i]! - 0x30);
      out.push(value & 0xff);
    } else {
      out.push(0x5c, e); // unknown escapes stay as written
    }
  }
  return Uint8Array.from(out);
}

// Protocol 0 UNICODE: "raw-unicode-escape": \uXXXX and \UXXXXXXXX escapes, other bytes are Latin-1.
function decodeRawUnicodeEscape(raw: Uint8Array): string {
  let out = '';
  for (let i = 0; i < raw.length; i++) {
    const c = raw[i]!;
    if (c === 0x5c && (raw[i + 1] === 0x75 || raw[i + 1] === 0x55)) {
      const digits = raw[i + 1] === 0x75 ? 4 : 8;
      const hex = String.fromCharCode(...raw.subarray(i + 2, i + 2 + digits));
      if (hex.length !== digits || !/^[0-9a-fA-F]+$/.test(hex)) throw new PickleError(`UNICODE argument has a truncated \\${digits === 4 ? 'u' : 'U'} escape`);
      const code = parseInt(hex, 16);
      if (code > 0x10ffff) throw new PickleError(`UNICODE argument escapes code point 0x${hex} beyond U+10FFFF`);
      out += String.fromCodePoint(code);
      i += 1 + digits;
    } else {
      out += String.fromCharCode(c);
    }
  }
  return out;
}
