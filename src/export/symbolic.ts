/**
 * Symbolic sizes for dynamic axes, found by tracing the model definition at several input sizes.
 *
 * Model code sees plain numbers (`o.shape(x)` → [2, 8, 8, 32]) and computes reshape targets and
 * slice bounds from them, so one trace cannot tell a batch of 2 from a constant 2. Instead the
 * forward is traced shape-only (`shapeOps`, no tensor memory) once at base sizes, once per symbol
 * with that symbol doubled, and once with every symbol tripled. Every number an op receives or
 * produces is then fitted as a monomial
 *
 *   d = (num / den) · Π_k s_k^e_k        (e_k = log₂(d_k / d_base) from the doubled traces)
 *
 * and checked against the tripled trace (prediction d_base · 3^Σe). Sizes that are not monomials
 * (H + 1, …) fail the check and are reported, as are constants baked from sizes and op sequences
 * that change with size (data-dependent structure). The fitted sizes let the recorder emit
 * reshapes that stay valid for any batch / height / width (see `recorder.ts`).
 */
import type { Ops } from '../ops/ops.js';
import { shapeOps, type ShapeOnly } from '../ops/shape-ops.js';

/** A dynamic axis of a graph: its ONNX `dim_param` name and its size in the base trace. */
export interface SymbolSpec {
  readonly name: string;
  /** Size in the base trace; the doubled and tripled traces must be valid sizes too. */
  readonly base: number;
}

/** A size as (num / den) · Π symbol^exp; a constant when every exponent is 0 (den = 1 then). */
export interface Dim {
  readonly num: number;
  readonly den: number;
  readonly exps: readonly number[];
}

export function constDim(value: number, symbols: number): Dim {
  return { num: value, den: 1, exps: new Array<number>(symbols).fill(0) };
}

export function isConst(d: Dim): boolean {
  return d.exps.every((e) => e === 0);
}

/** The value of a constant dim (throws for a symbolic one). */
export function constValue(d: Dim): number {
  if (!isConst(d)) throw new Error('constValue: the size depends on a dynamic axis');
  return d.num / d.den;
}

export function dimEquals(a: Dim, b: Dim): boolean {
  return a.num === b.num && a.den === b.den && a.exps.length === b.exps.length && a.exps.every((e, i) => e === b.exps[i]);
}

/** The dim at concrete symbol sizes. */
export function evalDim(d: Dim, sizes: readonly number[]): number {
  let v = d.num;
  d.exps.forEach((e, k) => {
    v *= sizes[k]! ** e;
  });
  return v / d.den;
}

/** A readable form for `dim_param` and errors: `batch`, `height/8`, `2*batch`, `height*width/4`. */
export function dimToString(d: Dim, symbols: readonly SymbolSpec[]): string {
  if (isConst(d)) return String(d.num / d.den);
  const up: string[] = [];
  const down: string[] = [];
  d.exps.forEach((e, k) => {
    const name = symbols[k]!.name;
    for (let i = 0; i < Math.abs(e); i++) (e > 0 ? up : down).push(name);
  });
  if (d.num !== 1) up.unshift(String(d.num));
  if (d.den !== 1) down.push(String(d.den));
  return `${up.join('*')}${down.length > 0 ? `/${down.join('/')}` : ''}`;
}

function gcd(a: number, b: number): number {
  let x = Math.abs(a);
  let y = Math.abs(b);
  while (y !== 0) [x, y] = [y, x % y];
  return x;
}

/** Why a number could not be fitted. */
export class FitError extends Error {}

/**
 * The monomial through `values` = [base, doubled symbol 0, …, doubled symbol k−1, all tripled],
 * or a {@link FitError}.
 */
export function fitDim(values: readonly number[], symbols: readonly SymbolSpec[]): Dim {
  const k = symbols.length;
  const base = values[0]!;
  if (values.length !== k + 2) throw new Error(`fitDim: ${values.length} traces for ${k} symbols`);
  if (base === 0 || k === 0) {
    if (values.some((v) => v !== base)) throw new FitError(`sizes ${values.join(', ')} change with the input size from 0`);
    return constDim(base, k);
  }
  const exps = symbols.map((_, s) => {
    const ratio = values[s + 1]! / base;
    const e = Math.round(Math.log2(Math.abs(ratio)));
    if (!(ratio > 0) || base * 2 ** e !== values[s + 1]) {
      throw new FitError(`sizes ${values.join(', ')} do not scale as a power of ${symbols[s]!.name}`);
    }
    return e;
  });
  const predicted = base * 3 ** exps.reduce((a, b) => a + b, 0);
  if (values[k + 1] !== predicted) {
    throw new FitError(`sizes ${values.join(', ')} are not a monomial in ${symbols.map((s) => s.name).join(', ')} (expected ${predicted} in the tripled trace)`);
  }
  // Constants (eps, scales, -1 in reshape targets) may be fractional: keep them as they are.
  if (exps.every((e) => e === 0)) return constDim(base, k);
  // d = base · Π (s_k / base_k)^e_k
  let num = base;
  let den = 1;
  exps.forEach((e, s) => {
    const b = symbols[s]!.base;
    if (e > 0) den *= b ** e;
    if (e < 0) num *= b ** -e;
  });
  const g = gcd(num, den);
  return { num: num / g, den: den / g, exps };
}

/** The base sizes, or the sizes of trace `t` (0: base, 1…k: symbol t−1 doubled, k+1: all tripled). */
export function traceSizes(symbols: readonly SymbolSpec[], t: number): number[] {
  return symbols.map((s, k) => (t === 0 ? s.base : t === symbols.length + 1 ? 3 * s.base : t === k + 1 ? 2 * s.base : s.base));
}

export function traceCount(symbols: readonly SymbolSpec[]): number {
  return symbols.length + 2;
}

/** What one op call looked like in a shape-only trace. */
export interface CallRecord {
  readonly op: string;
  /** Output shape. */
  readonly out: readonly number[];
  /** Every number the call received, argument by argument (constants: shape, then a value hash). */
  readonly args: readonly (readonly number[])[];
}

/** What the recorder knows about call i of the forward: sizes as monomials. */
export interface CallPlan {
  readonly op: string;
  readonly out: readonly Dim[];
  readonly args: readonly (readonly Dim[])[];
  /**
   * A constant whose shape or values change with the input size (e.g. an arange over the
   * batch): fine while unused, an error if it reaches a graph output.
   */
  readonly sizeDependentConstant: boolean;
}

/** FNV-1a over the bytes of a constant's values: equal across traces ⇔ same constant. */
function hashValues(values: Float32Array | Int32Array | readonly number[]): number {
  const arr = Array.isArray(values) ? Float64Array.from(values as readonly number[]) : (values as Float32Array | Int32Array);
  const bytes = new Uint8Array(arr.buffer, arr.byteOffset, arr.byteLength);
  let h = 0x811c9dc5;
  for (let i = 0; i < bytes.length; i++) {
    h ^= bytes[i]!;
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h;
}

function isShapeOnly(v: unknown): v is ShapeOnly {
  return typeof v === 'object' && v !== null && 'shape' in v && !Array.isArray(v) && !ArrayBuffer.isView(v);
}

/** The numbers inside one argument of an op call (tensor operands contribute none). */
function numbersOf(arg: unknown): number[] | undefined {
  if (typeof arg === 'number') return [arg];
  if (Array.isArray(arg)) {
    if (arg.every((x) => typeof x === 'number')) return [...(arg as number[])];
    return undefined; // a list of tensors (concat)
  }
  if (arg === undefined || isShapeOnly(arg) || ArrayBuffer.isView(arg)) return undefined;
  if (typeof arg === 'string') return undefined;
  if (typeof arg === 'object' && arg !== null) {
    // Options objects ({ stride, pad }, { transposeB }): their numbers and flags, in key order.
    const out: number[] = [];
    for (const key of Object.keys(arg).sort()) {
      const v = (arg as Record<string, unknown>)[key];
      if (typeof v === 'boolean') out.push(v ? 1 : 0);
      else out.push(...(numbersOf(v) ?? []));
    }
    return out;
  }
  return undefined;
}

/**
 * `shapeOps` that also appends a {@link CallRecord} per op call to `log` (`shape()` is a query,
 * not an op, and is not logged).
 */
export function loggingShapeOps(log: CallRecord[]): Ops<ShapeOnly> {
  const wrapped: Record<string, unknown> = {};
  for (const [name, fn] of Object.entries(shapeOps) as [string, (...a: unknown[]) => ShapeOnly][]) {
    if (name === 'shape') {
      wrapped[name] = fn;
      continue;
    }
    wrapped[name] = (...args: unknown[]): ShapeOnly => {
      const out = fn(...args);
      const numbers: number[][] = [];
      if (name === 'constant' || name === 'intConstant') {
        numbers.push([...(args[1] as readonly number[])], [hashValues(args[0] as Float32Array | Int32Array | readonly number[])]);
      } else {
        for (const a of args) {
          const n = numbersOf(a);
          if (n !== undefined) numbers.push(n);
        }
      }
      log.push({ op: name, out: [...out.shape], args: numbers });
      return out;
    };
  }
  // Built key by key from shapeOps itself, so it has exactly the Ops methods.
  return wrapped as unknown as Ops<ShapeOnly>;
}

/**
 * Fits the logs of all traces (in {@link traceSizes} order) into one plan per op call. Throws if
 * the op sequence differs between traces or a size is not a monomial of the symbols.
 */
export function fitPlan(logs: readonly (readonly CallRecord[])[], symbols: readonly SymbolSpec[], what: string): CallPlan[] {
  const base = logs[0]!;
  logs.forEach((log, t) => {
    if (log.length !== base.length) {
      throw new Error(`${what}: the definition runs ${base.length} ops at base sizes but ${log.length} at ${describeTrace(symbols, t)} (size-dependent structure cannot be exported with dynamic axes)`);
    }
  });
  return base.map((call, i) => {
    for (const [t, log] of logs.entries()) {
      const other = log[i]!;
      if (other.op !== call.op || other.args.length !== call.args.length || other.out.length !== call.out.length) {
        throw new Error(`${what}: op #${i} is ${call.op} at base sizes but ${other.op} at ${describeTrace(symbols, t)}: the op sequence depends on the input size`);
      }
    }
    const fit = (pick: (r: CallRecord) => number, where: string): Dim => {
      try {
        return fitDim(logs.map((l) => pick(l[i]!)), symbols);
      } catch (e) {
        if (e instanceof FitError) throw new Error(`${what}: op #${i} (${call.op}) ${where}: ${e.message}; make the axis static or change the definition`);
        throw e;
      }
    };
    const out = call.out.map((_, d) => fit((r) => r.out[d]!, `output dim ${d}`));
    const isConstant = call.op === 'constant' || call.op === 'intConstant';
    let sizeDependentConstant = false;
    const args: Dim[][] = [];
    call.args.forEach((arg, a) => {
      const sameLength = logs.every((l) => l[i]!.args[a]!.length === arg.length);
      if (isConstant) {
        const varies = !sameLength || logs.some((l) => l[i]!.args[a]!.some((v, j) => v !== arg[j]));
        if (varies) sizeDependentConstant = true;
        args.push(arg.map((v) => constDim(v, symbols.length)));
        return;
      }
      if (!sameLength) throw new Error(`${what}: op #${i} (${call.op}) argument ${a} changes length with the input size`);
      args.push(arg.map((_, j) => fit((r) => r.args[a]![j]!, `argument ${a}[${j}]`)));
    });
    return { op: call.op, out, args, sizeDependentConstant };
  });
}

function describeTrace(symbols: readonly SymbolSpec[], t: number): string {
  const sizes = traceSizes(symbols, t);
  return symbols.map((s, k) => `${s.name}=${sizes[k]}`).join(', ');
}
