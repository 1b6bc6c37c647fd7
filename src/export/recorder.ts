/**
 * The recording implementation of {@link Ops}: running a model definition over it appends ONNX
 * nodes to a {@link GraphBuilder} instead of computing anything.
 *
 * Layout. Model code is NHWC (its *logical* layout); ONNX's Conv wants NCHW. Every recorded value
 * carries a `layout` — physical axis j of the ONNX tensor holds logical axis layout[j] — so
 * transposes are free and lazy: `transpose` only permutes the layout, and a Transpose node is
 * emitted when an op needs a particular physical order (MatMul and Gather want the logical order,
 * Conv wants NCHW, binary ops want their operands alike). With the 'nchw' policy a conv's output
 * stays NCHW and flows through GroupNorm's reshapes, SiLU, residual adds and the skip concats
 * without a single Transpose, exactly like a PyTorch export; 'nhwc' transposes every conv's
 * output back to NHWC at once (the graph "as written"). See README.md for the measurements.
 *
 * Sizes. Each call looks up its fitted sizes in the trace plan (`symbolic.ts`), so reshape
 * targets are built from 0 ("copy this axis"), −1 ("infer") and, only where needed, Shape-derived
 * runtime sizes — the graph stays valid for any batch, height and width.
 *
 * Peepholes (same maths, shapes ORT's fusions recognise): x²  → Pow(x, 2) and a·rsqrt(v) →
 * a / Sqrt(v), which turns LayerNorm's decomposition into ORT's LayerNormalization pattern.
 */
import type { Conv2dOptions, DTypeName, MatMulOptions, Ops } from '../ops/ops.js';
import { ONNX_DTYPE } from './onnx-proto.js';
import { GraphBuilder, type IoDim } from './graph.js';
import { constDim, constValue, dimEquals, dimToString, evalDim, isConst, type CallPlan, type Dim, type SymbolSpec } from './symbolic.js';

/** How conv outputs are laid out (see the module comment and README.md). */
export type LayoutPolicy = 'nchw' | 'nhwc';

/** A recorded tensor. */
export interface OnnxValue {
  /** The ONNX value name. */
  readonly name: string;
  readonly dtype: DTypeName;
  /** Logical shape at the base trace sizes (what model code sees). */
  readonly shape: readonly number[];
  /** Logical sizes as monomials of the graph's symbols. */
  readonly dims: readonly Dim[];
  /** Physical axis j of the ONNX tensor holds logical axis layout[j]. */
  readonly layout: readonly number[];
  /** Set on rsqrt(v): the Sqrt(v) value, so a·rsqrt(v) can be emitted as a / Sqrt(v). */
  readonly sqrtOf?: OnnxValue;
}

/** Where the runtime size of a symbol is read: axis `axis` of graph input `input`. */
export interface SymbolSource {
  readonly input: string;
  readonly axis: number;
}

export interface RecorderOptions {
  readonly opset: number;
  readonly layout: LayoutPolicy;
}

/** One entry of a runtime shape / index vector: a literal, a size, or a sum of two sizes. */
type ShapeEntry = number | bigint | Dim | readonly [Dim, Dim];

const FLT_MAX = 3.4028234663852886e38;
const INT64_MAX = 9223372036854775807n;
const NCHW = [0, 3, 1, 2] as const;
const OIHW = [3, 2, 0, 1] as const;

function identity(rank: number): number[] {
  return Array.from({ length: rank }, (_, i) => i);
}

function isIdentity(layout: readonly number[]): boolean {
  return layout.every((l, i) => l === i);
}

function sameList(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

function product(xs: readonly number[]): number {
  return xs.reduce((a, b) => a * b, 1);
}

function isOne(d: Dim): boolean {
  return isConst(d) && constValue(d) === 1;
}

function gcd(a: number, b: number): number {
  let x = Math.abs(a);
  let y = Math.abs(b);
  while (y !== 0) [x, y] = [y, x % y];
  return x;
}

/** a + b as one dim when they are like terms (or one is 0), else the pair, summed at runtime (slice ends). */
function addDims(a: Dim, b: Dim): Dim | readonly [Dim, Dim] {
  if (isConst(a) && constValue(a) === 0) return b;
  if (isConst(b) && constValue(b) === 0) return a;
  if (!sameList(a.exps, b.exps)) return [a, b];
  const num = a.num * b.den + b.num * a.den;
  const den = a.den * b.den;
  const g = gcd(num, den) || 1;
  return { num: num / g, den: den / g, exps: a.exps };
}

/**
 * Groups of logical axes a reshape merges or splits (input axes ↔ output axes with equal
 * products), or undefined when the sizes do not pair up that way.
 */
function reshapeGroups(from: readonly number[], to: readonly number[]): { readonly from: number[]; readonly to: number[] }[] | undefined {
  const groups: { from: number[]; to: number[] }[] = [];
  let i = 0;
  let j = 0;
  while (i < from.length && j < to.length) {
    const g = { from: [i], to: [j] };
    let pi = from[i++]!;
    let pj = to[j++]!;
    while (pi !== pj) {
      if (pi < pj) {
        if (i >= from.length) return undefined;
        pi *= from[i]!;
        g.from.push(i++);
      } else {
        if (j >= to.length) return undefined;
        pj *= to[j]!;
        g.to.push(j++);
      }
    }
    groups.push(g);
  }
  const last = groups.at(-1);
  if (last === undefined) return undefined;
  for (; i < from.length; i++) {
    if (from[i] !== 1) return undefined;
    last.from.push(i);
  }
  for (; j < to.length; j++) {
    if (to[j] !== 1) return undefined;
    last.to.push(j);
  }
  return groups;
}

/** {@link Ops} over {@link OnnxValue}: every call appends nodes to the graph. */
export class OnnxRecorder implements Ops<OnnxValue> {
  private index = 0;
  private readonly scalars = new Map<string, string>();
  private readonly int64Consts = new Map<string, string>();
  private readonly symbolTensors = new Map<number, string>();
  private readonly dimTensors = new Map<string, string>();
  private readonly baseSizes: number[];

  constructor(
    readonly graph: GraphBuilder,
    private readonly plan: readonly CallPlan[],
    readonly symbols: readonly SymbolSpec[],
    private readonly sources: ReadonlyMap<number, SymbolSource>,
    readonly options: RecorderOptions,
  ) {
    this.baseSizes = symbols.map((s) => s.base);
  }

  // ------------------------------------------------------------------------------------------
  // Bookkeeping

  /** The plan of the next op call, which must be `op`. */
  private call(op: string): CallPlan {
    const p = this.plan[this.index];
    if (p === undefined || p.op !== op) {
      throw new Error(`${this.graph.name}: op #${this.index} is ${op} while recording but ${p?.op ?? 'nothing'} while tracing (the definition is not deterministic)`);
    }
    this.index++;
    // Only reshape targets and slice bounds may follow the input size: any other number an op
    // takes (a scalar operand, axes, padding) is emitted as a constant.
    if (op !== 'reshape' && op !== 'slice') {
      const dynamic = p.args.findIndex((arg) => arg.some((d) => !isConst(d)));
      if (dynamic >= 0) {
        throw new Error(`${this.graph.name}: op #${this.index - 1} (${op}) takes a number computed from the input size (argument ${dynamic}); only reshape and slice sizes can follow dynamic axes`);
      }
    }
    return p;
  }

  /** Throws unless every traced op was recorded. */
  finish(): void {
    if (this.index !== this.plan.length) {
      throw new Error(`${this.graph.name}: recorded ${this.index} ops, traced ${this.plan.length}`);
    }
  }

  /** A value record for ONNX value `name`. */
  value(name: string, dtype: DTypeName, dims: readonly Dim[], layout: readonly number[]): OnnxValue {
    if (layout.length !== dims.length) throw new Error(`${this.graph.name}: layout [${layout.join(', ')}] for rank ${dims.length}`);
    return { name, dtype, dims, layout, shape: dims.map((d) => evalDim(d, this.baseSizes)) };
  }

  private physDims(v: OnnxValue): Dim[] {
    return v.layout.map((l) => v.dims[l]!);
  }

  private constDims(shape: readonly number[]): Dim[] {
    return shape.map((d) => constDim(d, this.symbols.length));
  }

  /** A rank-0 constant of `dtype`, shared by every use of the same value. */
  scalar(value: number, dtype: DTypeName): string {
    const v = dtype === 'float32' ? Math.fround(value) : value;
    const key = `${dtype}:${Object.is(v, -0) ? '-0' : String(v)}`;
    const known = this.scalars.get(key);
    if (known !== undefined) return known;
    const name = this.graph.fresh('scalar');
    this.graph.addInitializer({
      name,
      dtype,
      dims: [],
      data: () => (dtype === 'float32' ? Float32Array.of(v) : Int32Array.of(v)),
    });
    this.scalars.set(key, name);
    return name;
  }

  /** A 1-D int64 constant (shapes, axes, indices). */
  int64Const(values: readonly (number | bigint)[]): string {
    const key = values.map(String).join(',');
    const known = this.int64Consts.get(key);
    if (known !== undefined) return known;
    const name = this.graph.fresh('ints');
    const data = BigInt64Array.from(values.map((v) => BigInt(v)));
    this.graph.addInitializer({ name, dtype: 'int64', dims: [values.length], data: () => data });
    this.int64Consts.set(key, name);
    return name;
  }

  /** The runtime size of symbol k as int64 [1]. */
  private symbolTensor(k: number): string {
    const known = this.symbolTensors.get(k);
    if (known !== undefined) return known;
    const source = this.sources.get(k);
    if (source === undefined) throw new Error(`${this.graph.name}: no input carries the size '${this.symbols[k]!.name}'`);
    const [shape] = this.graph.node('Shape', [source.input]);
    const [size] = this.graph.node('Gather', [shape!, this.int64Const([source.axis])], { axis: { kind: 'int', value: 0 } });
    this.symbolTensors.set(k, size!);
    return size!;
  }

  /** A dim's runtime value as int64 [1]: (Π symbols^e · num) / den, built from Shape. */
  private dimTensor(d: Dim): string {
    if (isConst(d)) return this.int64Const([constValue(d)]);
    const key = `${d.num}/${d.den}:${d.exps.join(',')}`;
    const known = this.dimTensors.get(key);
    if (known !== undefined) return known;
    let acc: string | undefined;
    const times = (x: string) => {
      acc = acc === undefined ? x : this.graph.node('Mul', [acc, x])[0]!;
    };
    d.exps.forEach((e, k) => {
      for (let i = 0; i < e; i++) times(this.symbolTensor(k));
    });
    if (d.num !== 1 || acc === undefined) times(this.int64Const([d.num]));
    let divisor: string | undefined;
    const over = (x: string) => {
      divisor = divisor === undefined ? x : this.graph.node('Mul', [divisor, x])[0]!;
    };
    d.exps.forEach((e, k) => {
      for (let i = 0; i < -e; i++) over(this.symbolTensor(k));
    });
    if (d.den !== 1) over(this.int64Const([d.den]));
    const out = divisor === undefined ? acc! : this.graph.node('Div', [acc!, divisor])[0]!;
    this.dimTensors.set(key, out);
    return out;
  }

  /** A 1-D int64 tensor of literal numbers and runtime dims or sums of dims (concatenated when some are dynamic). */
  private shapeInput(entries: readonly ShapeEntry[]): string {
    const isLiteral = (e: ShapeEntry): e is number | bigint => typeof e === 'number' || typeof e === 'bigint';
    if (entries.every(isLiteral)) return this.int64Const(entries);
    const parts: string[] = [];
    let run: (number | bigint)[] = [];
    for (const e of entries) {
      if (isLiteral(e)) {
        run.push(e);
        continue;
      }
      if (run.length > 0) parts.push(this.int64Const(run));
      run = [];
      parts.push(Array.isArray(e) ? this.graph.node('Add', [this.dimTensor(e[0]), this.dimTensor(e[1])])[0]! : this.dimTensor(e as Dim));
    }
    if (run.length > 0) parts.push(this.int64Const(run));
    return this.graph.node('Concat', parts, { axis: { kind: 'int', value: 0 } })[0]!;
  }

  /**
   * Reshape physical tensor `src` (sizes `from`) to sizes `to`: constants as literals, axes equal
   * to the input's at the same position as 0 (copy), one remaining dynamic axis as −1 (infer),
   * any further ones computed from Shape.
   */
  private emitReshape(src: string, from: readonly Dim[], to: readonly Dim[]): string {
    let inferred = false;
    const entries = to.map((d, i): number | Dim => {
      if (isConst(d)) {
        const v = constValue(d);
        if (!(Number.isInteger(v) && v > 0)) throw new Error(`${this.graph.name}: reshape to a size ${v}`);
        return v;
      }
      if (i < from.length && dimEquals(d, from[i]!)) return 0;
      if (!inferred) {
        inferred = true;
        return -1;
      }
      return d;
    });
    return this.graph.node('Reshape', [src, this.shapeInput(entries)])[0]!;
  }

  /** `v` with physical layout `target`: a Transpose, or a Reshape when only size-1 axes move. */
  materialize(v: OnnxValue, target: readonly number[]): OnnxValue {
    if (sameList(v.layout, target)) return v;
    const perm = target.map((l) => v.layout.indexOf(l));
    const from = this.physDims(v);
    const to = target.map((l) => v.dims[l]!);
    const moved = perm.filter((p) => !isOne(from[p]!));
    const ordered = moved.every((p, i) => i === 0 || p > moved[i - 1]!);
    const name = ordered ? this.emitReshape(v.name, from, to) : this.graph.node('Transpose', [v.name], { perm: { kind: 'ints', value: perm } })[0]!;
    return this.value(name, v.dtype, v.dims, target);
  }

  /** A lower-rank operand aligned to the trailing logical axes of a rank-`rank` tensor laid out `target`. */
  private liftTo(v: OnnxValue, rank: number, target: readonly number[]): OnnxValue {
    const flat = this.materialize(v, identity(v.dims.length));
    const dims = [...this.constDims(new Array<number>(rank - v.dims.length).fill(1)), ...flat.dims];
    const physical = target.map((l) => dims[l]!);
    const positions = target.map((l, j) => ({ l, j })).filter(({ l }) => l >= rank - v.dims.length && !isOne(dims[l]!));
    const ordered = positions.every((p, i) => i === 0 || p.l > positions[i - 1]!.l);
    if (ordered) return this.value(this.emitReshape(flat.name, flat.dims, physical), v.dtype, dims, target);
    const lifted = this.value(this.emitReshape(flat.name, flat.dims, dims), v.dtype, dims, identity(rank));
    return this.materialize(lifted, target);
  }

  /** Declare a graph input and return it as a logical value (`layout`: physical ← logical). */
  input(name: string, dtype: DTypeName, dims: readonly Dim[], layout: readonly number[]): OnnxValue {
    this.graph.reserve(name);
    const physical = layout.map((l) => dims[l]!);
    this.graph.inputs.push({ name, dtype, dims: physical.map((d) => this.ioDim(d)) });
    return this.value(name, dtype, dims, layout);
  }

  /**
   * Declare a 1-D graph input [`dimName`] — one value, or one per sample — that the model sees as
   * a 1-D tensor of symbol k's size: Expand(Reshape(x, [−1]), [size]). This is how diffusers' UNet
   * takes `timestep` (`timesteps.expand(sample.shape[0])`).
   */
  broadcastInput(name: string, dtype: DTypeName, k: number, dimName: string): OnnxValue {
    this.graph.reserve(name);
    this.graph.inputs.push({ name, dtype, dims: [dimName] });
    const [flat] = this.graph.node('Reshape', [name, this.int64Const([-1])]);
    const dim: Dim = { num: 1, den: 1, exps: this.symbols.map((_, s) => (s === k ? 1 : 0)) };
    const [out] = this.graph.node('Expand', [flat!, this.dimTensor(dim)]);
    return this.value(out!, dtype, [dim], [0]);
  }

  /** Name `v` as graph output `name`, laid out `layout` (physical ← logical). */
  output(v: OnnxValue, name: string, layout: readonly number[] = identity(v.dims.length)): void {
    const m = this.materialize(v, layout);
    this.graph.reserve(name);
    this.graph.node('Identity', [m.name], {}, [name]);
    this.graph.outputs.push({ name, dtype: m.dtype, dims: this.physDims(m).map((d) => this.ioDim(d)) });
  }

  private ioDim(d: Dim): IoDim {
    return isConst(d) ? constValue(d) : dimToString(d, this.symbols);
  }

  // ------------------------------------------------------------------------------------------
  // Element-wise

  private emitBinary(op: string, a: OnnxValue, b: OnnxValue | number, dims: readonly Dim[]): OnnxValue {
    if (typeof b === 'number') {
      const [out] = this.graph.node(op, [a.name, this.scalar(b, a.dtype)]);
      return this.value(out!, a.dtype, dims, a.layout);
    }
    let x = a;
    let y = b;
    let layout: readonly number[];
    if (a.dims.length === b.dims.length) {
      layout = product(b.shape) > product(a.shape) ? b.layout : a.layout;
      x = this.materialize(a, layout);
      y = this.materialize(b, layout);
    } else {
      const big = a.dims.length > b.dims.length ? a : b;
      layout = big.layout;
      const align = (v: OnnxValue) => (isIdentity(layout) ? this.materialize(v, identity(v.dims.length)) : this.liftTo(v, layout.length, layout));
      if (big === a) y = align(b);
      else x = align(a);
    }
    const [out] = this.graph.node(op, [x.name, y.name]);
    return this.value(out!, a.dtype, dims, layout);
  }

  private binary(op: string, onnxOp: string, a: OnnxValue, b: OnnxValue | number): OnnxValue {
    const p = this.call(op);
    return this.emitBinary(onnxOp, a, b, p.out);
  }

  private unary(op: string, onnxOp: string, x: OnnxValue): OnnxValue {
    const p = this.call(op);
    const [out] = this.graph.node(onnxOp, [x.name]);
    return this.value(out!, x.dtype, p.out, x.layout);
  }

  add(a: OnnxValue, b: OnnxValue | number): OnnxValue {
    return this.binary('add', 'Add', a, b);
  }
  sub(a: OnnxValue, b: OnnxValue | number): OnnxValue {
    return this.binary('sub', 'Sub', a, b);
  }
  mul(a: OnnxValue, b: OnnxValue | number): OnnxValue {
    const p = this.call('mul');
    if (typeof b !== 'number' && b.sqrtOf !== undefined) return this.emitBinary('Div', a, b.sqrtOf, p.out);
    if (typeof b !== 'number' && a.sqrtOf !== undefined) return this.emitBinary('Div', b, a.sqrtOf, p.out);
    return this.emitBinary('Mul', a, b, p.out);
  }
  div(a: OnnxValue, b: OnnxValue | number): OnnxValue {
    return this.binary('div', 'Div', a, b);
  }
  neg(x: OnnxValue): OnnxValue {
    return this.unary('neg', 'Neg', x);
  }
  exp(x: OnnxValue): OnnxValue {
    return this.unary('exp', 'Exp', x);
  }
  log(x: OnnxValue): OnnxValue {
    return this.unary('log', 'Log', x);
  }
  sqrt(x: OnnxValue): OnnxValue {
    return this.unary('sqrt', 'Sqrt', x);
  }
  rsqrt(x: OnnxValue): OnnxValue {
    const p = this.call('rsqrt');
    const [root] = this.graph.node('Sqrt', [x.name]);
    const sqrtValue = this.value(root!, x.dtype, p.out, x.layout);
    const [out] = this.graph.node('Reciprocal', [root!]);
    return { ...this.value(out!, x.dtype, p.out, x.layout), sqrtOf: sqrtValue };
  }
  square(x: OnnxValue): OnnxValue {
    const p = this.call('square');
    const [out] = this.graph.node('Pow', [x.name, this.scalar(2, x.dtype)]);
    return this.value(out!, x.dtype, p.out, x.layout);
  }
  tanh(x: OnnxValue): OnnxValue {
    return this.unary('tanh', 'Tanh', x);
  }
  sigmoid(x: OnnxValue): OnnxValue {
    return this.unary('sigmoid', 'Sigmoid', x);
  }
  erf(x: OnnxValue): OnnxValue {
    return this.unary('erf', 'Erf', x);
  }
  cos(x: OnnxValue): OnnxValue {
    return this.unary('cos', 'Cos', x);
  }
  sin(x: OnnxValue): OnnxValue {
    return this.unary('sin', 'Sin', x);
  }
  clip(x: OnnxValue, min: number, max: number): OnnxValue {
    const p = this.call('clip');
    const lo = min <= -FLT_MAX ? '' : this.scalar(min, x.dtype);
    const hi = max >= FLT_MAX ? '' : this.scalar(max, x.dtype);
    const inputs = hi === '' ? (lo === '' ? [x.name] : [x.name, lo]) : [x.name, lo, hi];
    const [out] = this.graph.node('Clip', inputs);
    return this.value(out!, x.dtype, p.out, x.layout);
  }

  // ------------------------------------------------------------------------------------------
  // Constants and shapes

  constant(values: Float32Array | readonly number[], shape: readonly number[]): OnnxValue {
    const p = this.call('constant');
    const data = Float32Array.from(values);
    const name = this.graph.fresh('const');
    this.graph.addInitializer({
      name,
      dtype: 'float32',
      dims: [...shape],
      data: () => data,
      ...(p.sizeDependentConstant ? { sizeDependent: `float constant [${shape.join(', ')}] (op #${this.index - 1})` } : {}),
    });
    return this.value(name, 'float32', p.out, identity(shape.length));
  }

  intConstant(values: Int32Array | readonly number[], shape: readonly number[]): OnnxValue {
    const p = this.call('intConstant');
    const data = Int32Array.from(values);
    const name = this.graph.fresh('const');
    this.graph.addInitializer({
      name,
      dtype: 'int32',
      dims: [...shape],
      data: () => data,
      ...(p.sizeDependentConstant ? { sizeDependent: `int constant [${shape.join(', ')}] (op #${this.index - 1})` } : {}),
    });
    return this.value(name, 'int32', p.out, identity(shape.length));
  }

  shape(x: OnnxValue): readonly number[] {
    return x.shape;
  }

  reshape(x: OnnxValue, _shape: readonly number[]): OnnxValue {
    const p = this.call('reshape');
    const out = p.out;
    // Feature maps (rank 4: images, GroupNorm's [N, HW, G, C/G]) keep a lazy layout when the
    // reshape only merges or splits axes adjacent in the physical order; token tensors (rank ≤ 3)
    // go to the logical order, where MatMul and LayerNorm want them.
    if (!isIdentity(x.layout) && out.length >= 4) {
      const outShape = out.map((d) => evalDim(d, this.baseSizes));
      const groups = reshapeGroups(x.shape, outShape);
      const positions = groups?.map((g) => g.from.map((a) => x.layout.indexOf(a)));
      const contiguous = positions?.every((ps) => ps.every((q, i) => i === 0 || q === ps[i - 1]! + 1));
      if (groups !== undefined && positions !== undefined && contiguous === true) {
        const order = groups.map((g, i) => ({ g, at: positions[i]![0]! })).sort((a, b) => a.at - b.at);
        const layout = order.flatMap(({ g }) => g.to);
        const name = this.emitReshape(x.name, this.physDims(x), layout.map((l) => out[l]!));
        return this.value(name, x.dtype, out, layout);
      }
    }
    const flat = this.materialize(x, identity(x.dims.length));
    return this.value(this.emitReshape(flat.name, flat.dims, out), x.dtype, out, identity(out.length));
  }

  transpose(x: OnnxValue, perm: readonly number[]): OnnxValue {
    const p = this.call('transpose');
    const inverse = new Array<number>(perm.length);
    perm.forEach((src, dst) => {
      inverse[src] = dst;
    });
    return this.value(x.name, x.dtype, p.out, x.layout.map((l) => inverse[l]!));
  }

  concat(xs: readonly OnnxValue[], axis: number): OnnxValue {
    const p = this.call('concat');
    const first = xs[0];
    if (first === undefined) throw new Error(`${this.graph.name}: concat of nothing`);
    if (xs.length === 1) return this.value(first.name, first.dtype, p.out, first.layout);
    const rank = first.dims.length;
    const a = axis < 0 ? axis + rank : axis;
    const parts = xs.map((x) => this.materialize(x, first.layout));
    const [out] = this.graph.node('Concat', parts.map((x) => x.name), { axis: { kind: 'int', value: first.layout.indexOf(a) } });
    return this.value(out!, first.dtype, p.out, first.layout);
  }

  slice(x: OnnxValue, _begin: readonly number[], _size: readonly number[]): OnnxValue {
    const p = this.call('slice');
    const [begin = [], size = []] = p.args;
    const zero = constDim(0, this.symbols.length);
    const starts: Dim[] = [];
    const ends: (Dim | readonly [Dim, Dim] | bigint)[] = [];
    const axes: number[] = [];
    x.dims.forEach((dim, i) => {
      const b = begin[i] ?? zero;
      const s = size[i];
      const toEnd = s === undefined || (isConst(s) && constValue(s) === -1);
      const fromStart = isConst(b) && constValue(b) === 0;
      if (fromStart && (toEnd || dimEquals(s!, dim))) return;
      axes.push(x.layout.indexOf(i));
      starts.push(b);
      ends.push(toEnd ? INT64_MAX : addDims(b, s!));
    });
    if (axes.length === 0) return this.value(x.name, x.dtype, p.out, x.layout);
    const asEntry = (d: Dim | readonly [Dim, Dim] | bigint): ShapeEntry => (typeof d === 'bigint' || Array.isArray(d) ? d : isConst(d as Dim) ? constValue(d as Dim) : (d as Dim));
    const [out] = this.graph.node('Slice', [x.name, this.shapeInput(starts.map(asEntry)), this.shapeInput(ends.map(asEntry)), this.int64Const(axes)]);
    return this.value(out!, x.dtype, p.out, x.layout);
  }

  cast(x: OnnxValue, dtype: DTypeName): OnnxValue {
    const p = this.call('cast');
    if (x.dtype === dtype) return this.value(x.name, dtype, p.out, x.layout);
    const [out] = this.graph.node('Cast', [x.name], { to: { kind: 'int', value: ONNX_DTYPE[dtype] } });
    return this.value(out!, dtype, p.out, x.layout);
  }

  // ------------------------------------------------------------------------------------------
  // Reductions

  private reduce(op: 'mean' | 'sum', x: OnnxValue, axes: readonly number[], keepDims: boolean): OnnxValue {
    const p = this.call(op);
    const rank = x.dims.length;
    const logical = axes.map((a) => (a < 0 ? a + rank : a));
    const physical = logical.map((a) => x.layout.indexOf(a)).sort((a, b) => a - b);
    const onnxOp = op === 'mean' ? 'ReduceMean' : 'ReduceSum';
    // ReduceSum takes axes as an input since opset 13, ReduceMean since opset 18.
    const axesAsInput = op === 'sum' || this.options.opset >= 18;
    const attrs = { keepdims: { kind: 'int' as const, value: keepDims ? 1 : 0 }, ...(axesAsInput ? {} : { axes: { kind: 'ints' as const, value: physical } }) };
    const [out] = this.graph.node(onnxOp, axesAsInput ? [x.name, this.int64Const(physical)] : [x.name], attrs);
    const layout = keepDims ? x.layout : x.layout.filter((l) => !logical.includes(l)).map((l) => l - logical.filter((a) => a < l).length);
    return this.value(out!, x.dtype, p.out, layout);
  }

  mean(x: OnnxValue, axes: readonly number[], keepDims: boolean): OnnxValue {
    return this.reduce('mean', x, axes, keepDims);
  }

  sum(x: OnnxValue, axes: readonly number[], keepDims: boolean): OnnxValue {
    return this.reduce('sum', x, axes, keepDims);
  }

  argMax(x: OnnxValue, axis: number): OnnxValue {
    const p = this.call('argMax');
    const rank = x.dims.length;
    const a = axis < 0 ? axis + rank : axis;
    const [index] = this.graph.node('ArgMax', [x.name], {
      axis: { kind: 'int', value: x.layout.indexOf(a) },
      keepdims: { kind: 'int', value: 0 },
      select_last_index: { kind: 'int', value: 0 },
    });
    const [out] = this.graph.node('Cast', [index!], { to: { kind: 'int', value: ONNX_DTYPE.int32 } });
    const layout = x.layout.filter((l) => l !== a).map((l) => (l > a ? l - 1 : l));
    return this.value(out!, 'int32', p.out, layout);
  }

  softmax(x: OnnxValue): OnnxValue {
    const p = this.call('softmax');
    const rank = x.dims.length;
    const m = x.layout[rank - 1] === rank - 1 ? x : this.materialize(x, identity(rank));
    const [out] = this.graph.node('Softmax', [m.name], { axis: { kind: 'int', value: rank - 1 } });
    return this.value(out!, x.dtype, p.out, m.layout);
  }

  // ------------------------------------------------------------------------------------------
  // Linear algebra and images

  /** `v` with its last two logical axes swapped (layout only). */
  private swapLast(v: OnnxValue): OnnxValue {
    const r = v.dims.length;
    const perm = identity(r);
    perm[r - 2] = r - 1;
    perm[r - 1] = r - 2;
    return this.value(
      v.name,
      v.dtype,
      perm.map((i) => v.dims[i]!),
      v.layout.map((l) => perm[l]!),
    );
  }

  matMul(a: OnnxValue, b: OnnxValue, o?: MatMulOptions): OnnxValue {
    const p = this.call('matMul');
    const x = this.materialize(o?.transposeA ? this.swapLast(a) : a, identity(a.dims.length));
    const y = this.materialize(o?.transposeB ? this.swapLast(b) : b, identity(b.dims.length));
    const [out] = this.graph.node('MatMul', [x.name, y.name]);
    return this.value(out!, a.dtype, p.out, identity(p.out.length));
  }

  conv2d(x: OnnxValue, w: OnnxValue, o: Conv2dOptions): OnnxValue {
    const p = this.call('conv2d');
    const xn = this.materialize(x, NCHW);
    const wn = this.materialize(w, OIHW);
    const [kh, kw] = w.shape as [number, number, number, number];
    const s = o.stride ?? 1;
    const [top, bottom, left, right] = o.pad;
    const [out] = this.graph.node('Conv', [xn.name, wn.name], {
      kernel_shape: { kind: 'ints', value: [kh, kw] },
      strides: { kind: 'ints', value: [s, s] },
      pads: { kind: 'ints', value: [top, left, bottom, right] },
      dilations: { kind: 'ints', value: [1, 1] },
      group: { kind: 'int', value: 1 },
    });
    const y = this.value(out!, 'float32', p.out, NCHW);
    return this.options.layout === 'nhwc' ? this.materialize(y, identity(4)) : y;
  }

  gather(table: OnnxValue, ids: OnnxValue): OnnxValue {
    const p = this.call('gather');
    const t = this.materialize(table, identity(table.dims.length));
    const i = this.materialize(ids, identity(ids.dims.length));
    const [out] = this.graph.node('Gather', [t.name, i.name], { axis: { kind: 'int', value: 0 } });
    return this.value(out!, table.dtype, p.out, identity(p.out.length));
  }

  upsampleNearest2x(x: OnnxValue): OnnxValue {
    const p = this.call('upsampleNearest2x');
    const scales = x.layout.map((l) => (l === 1 || l === 2 ? 2 : 1));
    const name = this.graph.fresh('scales');
    const data = Float32Array.from(scales);
    this.graph.addInitializer({ name, dtype: 'float32', dims: [scales.length], data: () => data });
    // asymmetric + floor: output pixel i reads input ⌊i/2⌋, PyTorch's nearest interpolation.
    const [out] = this.graph.node('Resize', [x.name, '', name], {
      mode: { kind: 'string', value: 'nearest' },
      coordinate_transformation_mode: { kind: 'string', value: 'asymmetric' },
      nearest_mode: { kind: 'string', value: 'floor' },
    });
    return this.value(out!, x.dtype, p.out, x.layout);
  }
}
