/**
 * An {@link Ops} implementation over shapes alone: running a model's forward with it (and a
 * {@link ManifestScope}) costs no tensor memory, so a full-size model's parameter manifest can be
 * derived from its config. Every op checks its operands' shapes as the real kernel would.
 */
import type { Conv2dOptions, MatMulOptions, Ops } from './ops.js';

export interface ShapeOnly {
  readonly shape: readonly number[];
}

const of = (shape: readonly number[]): ShapeOnly => ({ shape: [...shape] });

function fail(op: string, detail: string): never {
  throw new Error(`shapeOps.${op}: ${detail}`);
}

function fmt(s: readonly number[]): string {
  return `[${s.join(', ')}]`;
}

function size(s: readonly number[]): number {
  return s.reduce((a, b) => a * b, 1);
}

/** NumPy broadcasting of two shapes. */
function broadcast(op: string, a: readonly number[], b: readonly number[]): number[] {
  const rank = Math.max(a.length, b.length);
  const out: number[] = [];
  for (let i = 0; i < rank; i++) {
    const da = a[a.length - rank + i] ?? 1;
    const db = b[b.length - rank + i] ?? 1;
    if (da !== db && da !== 1 && db !== 1) fail(op, `cannot broadcast ${fmt(a)} with ${fmt(b)}`);
    out.push(da === 1 ? db : da);
  }
  return out;
}

function axisOf(axis: number, rank: number): number {
  return axis < 0 ? axis + rank : axis;
}

const binary =
  (op: string) =>
  (a: ShapeOnly, b: ShapeOnly | number): ShapeOnly =>
    of(typeof b === 'number' ? a.shape : broadcast(op, a.shape, b.shape));

const unary = (x: ShapeOnly): ShapeOnly => of(x.shape);

function reduce(x: ShapeOnly, axes: readonly number[], keepDims: boolean): ShapeOnly {
  const rank = x.shape.length;
  const drop = new Set(axes.map((a) => axisOf(a, rank)));
  const out: number[] = [];
  x.shape.forEach((d, i) => {
    if (!drop.has(i)) out.push(d);
    else if (keepDims) out.push(1);
  });
  return of(out);
}

/** Shape-only operations: each returns the output shape a real backend would produce. */
export const shapeOps: Ops<ShapeOnly> = {
  constant: (values, shape) => {
    if (values.length !== size(shape)) fail('constant', `${values.length} values for shape ${fmt(shape)}`);
    return of(shape);
  },
  intConstant: (values, shape) => {
    if (values.length !== size(shape)) fail('intConstant', `${values.length} values for shape ${fmt(shape)}`);
    return of(shape);
  },
  shape: (x) => x.shape,

  reshape: (x, shape) => {
    const total = size(x.shape);
    const known = shape.filter((d) => d !== -1);
    const free = shape.length - known.length;
    if (free > 1) fail('reshape', `more than one -1 in ${fmt(shape)}`);
    const rest = size(known);
    const out = shape.map((d) => (d === -1 ? total / rest : d));
    if (size(out) !== total || !out.every(Number.isInteger)) fail('reshape', `${fmt(x.shape)} cannot become ${fmt(shape)}`);
    return of(out);
  },
  transpose: (x, perm) => {
    if (perm.length !== x.shape.length) fail('transpose', `perm ${fmt(perm)} for rank ${x.shape.length}`);
    return of(perm.map((p) => x.shape[p]!));
  },
  concat: (xs, axis) => {
    const first = xs[0] ?? fail('concat', 'no operands');
    const ax = axisOf(axis, first.shape.length);
    let total = 0;
    for (const x of xs) {
      if (x.shape.length !== first.shape.length || x.shape.some((d, i) => i !== ax && d !== first.shape[i])) {
        fail('concat', `${fmt(x.shape)} does not match ${fmt(first.shape)} off axis ${ax}`);
      }
      total += x.shape[ax]!;
    }
    return of(first.shape.map((d, i) => (i === ax ? total : d)));
  },
  slice: (x, begin, sz) =>
    of(
      x.shape.map((d, i) => {
        const b = begin[i] ?? 0;
        const s = sz[i] ?? -1;
        const n = s === -1 ? d - b : s;
        if (b < 0 || n < 0 || b + n > d) fail('slice', `begin ${fmt(begin)} size ${fmt(sz)} out of ${fmt(x.shape)}`);
        return n;
      }),
    ),
  cast: unary,

  add: binary('add'),
  sub: binary('sub'),
  mul: binary('mul'),
  div: binary('div'),
  neg: unary,
  exp: unary,
  log: unary,
  sqrt: unary,
  rsqrt: unary,
  square: unary,
  tanh: unary,
  sigmoid: unary,
  erf: unary,
  cos: unary,
  sin: unary,
  clip: unary,

  mean: reduce,
  sum: reduce,
  argMax: (x, axis) => reduce(x, [axis], false),
  softmax: unary,

  matMul: (a, b, o?: MatMulOptions) => {
    if (a.shape.length < 2 || b.shape.length < 2) fail('matMul', `rank < 2: ${fmt(a.shape)} × ${fmt(b.shape)}`);
    const [m, ka] = o?.transposeA ? [a.shape.at(-1)!, a.shape.at(-2)!] : [a.shape.at(-2)!, a.shape.at(-1)!];
    const [kb, n] = o?.transposeB ? [b.shape.at(-1)!, b.shape.at(-2)!] : [b.shape.at(-2)!, b.shape.at(-1)!];
    if (ka !== kb) fail('matMul', `inner dimensions differ: ${fmt(a.shape)} × ${fmt(b.shape)} (${JSON.stringify(o ?? {})})`);
    const lead = broadcast('matMul', a.shape.slice(0, -2), b.shape.slice(0, -2));
    return of([...lead, m, n]);
  },
  conv2d: (x, w, o: Conv2dOptions) => {
    const [n, h, wd, ci] = x.shape as [number, number, number, number];
    const [kh, kw, wi, co] = w.shape as [number, number, number, number];
    if (x.shape.length !== 4 || w.shape.length !== 4 || ci !== wi) fail('conv2d', `input ${fmt(x.shape)} with filter ${fmt(w.shape)}`);
    const s = o.stride ?? 1;
    const [t, b, l, r] = o.pad;
    const oh = Math.floor((h + t + b - kh) / s) + 1;
    const ow = Math.floor((wd + l + r - kw) / s) + 1;
    if (oh < 1 || ow < 1) fail('conv2d', `empty output for input ${fmt(x.shape)}, filter ${fmt(w.shape)}`);
    return of([n, oh, ow, co]);
  },
  gather: (table, ids) => {
    if (table.shape.length !== 2) fail('gather', `table ${fmt(table.shape)} is not 2-D`);
    return of([...ids.shape, table.shape[1]!]);
  },
  upsampleNearest2x: (x) => {
    const [n, h, w, c] = x.shape as [number, number, number, number];
    return of([n, h * 2, w * 2, c]);
  },
};
