/**
 * Gradient fixes for tfjs 4.22, on every backend (the gradient registry is global), for ops our
 * models differentiate through:
 *
 * Missing, added:
 * - StridedSlice has no gradient at all.
 * - Comparisons/logical ops (Greater, Less, ...) have none, so `where(greater(x, 0), x, y)`
 *   fails once the tape walks into the mask. TF treats them as non-differentiable (zero); so do
 *   we. tfjs's own GreaterEqual gradient exists and is left alone.
 *
 * Wrong, replaced:
 * - SquaredDifference, Maximum, Minimum return gradients in the *broadcast* shape, so the tape
 *   throws whenever an input was broadcast (e.g. squaredDifference(x, mean) in a norm layer).
 * - Tile (which broadcastTo and broadcasting `where` run on) throws for rank > 4 and, below
 *   that, sums one slice per repetition: 4,096 slice+add ops to broadcast over a 64×64 map.
 *   Ours is one reshape and one sum, for any rank.
 */
import * as tf from '@tensorflow/tfjs';
import type { GradConfig, NamedAttrMap, Tensor } from '@tensorflow/tfjs';

function firstDy(dy: Tensor | Tensor[]): Tensor {
  const t = Array.isArray(dy) ? dy[0] : dy;
  if (t === undefined) throw new Error('gradient: missing dy');
  return t;
}

function savedAt(saved: Tensor[], i: number, who: string): Tensor {
  const t = saved[i];
  if (t === undefined) throw new Error(`${who} gradient: missing saved input ${i}`);
  return t;
}

/** dL/dx of y = stridedSlice(x, ...): dy scattered back into a zero tensor shaped like x. */
export function stridedSliceBackward(xShape: number[], dy: Tensor, attrs: tf.StridedSliceAttrs): Tensor {
  const info = tf.slice_util.sliceInfo(
    xShape,
    attrs.begin,
    attrs.end,
    attrs.strides,
    attrs.beginMask,
    attrs.endMask,
    attrs.ellipsisMask,
    attrs.newAxisMask,
    attrs.shrinkAxisMask,
  );
  if (info.isIdentity) return tf.reshape(dy, xShape);
  const rank = xShape.length;
  // Per-x-dimension element counts of the slice (before shrink/new-axis reshaping).
  const sizes = tf.slice_util.computeOutShape(info.begin, info.end, info.strides).map((s) => Math.max(0, s));
  const n = sizes.reduce((a, b) => a * b, 1);
  if (sizes.length !== rank || info.begin.length !== rank || n !== dy.size) {
    throw new Error(
      `StridedSlice gradient: cannot map dy [${dy.shape}] back onto x [${xShape}] (slice sizes [${sizes}])`,
    );
  }
  if (n === 0) return tf.zeros(xShape, dy.dtype);
  const dyDense = tf.reshape(dy, sizes);
  if (info.strides.every((s) => s === 1)) {
    const padding = xShape.map((d, i): [number, number] => [info.begin[i]!, d - info.begin[i]! - sizes[i]!]);
    return tf.pad(dyDense, padding);
  }
  // General strides: the slice picks distinct elements, so the gradient is a pure scatter.
  const xStrides = new Array<number>(rank);
  let acc = 1;
  for (let d = rank - 1; d >= 0; d--) {
    xStrides[d] = acc;
    acc *= xShape[d]!;
  }
  const idx = new Int32Array(n);
  const loc = new Array<number>(rank).fill(0);
  for (let i = 0; i < n; i++) {
    let flat = 0;
    for (let d = 0; d < rank; d++) flat += (info.begin[d]! + loc[d]! * info.strides[d]!) * xStrides[d]!;
    idx[i] = flat;
    for (let d = rank - 1; d >= 0; d--) {
      if (++loc[d]! < sizes[d]!) break;
      loc[d] = 0;
    }
  }
  return tf.tidy(() => {
    const indices = tf.tensor2d(idx, [n, 1], 'int32');
    return tf.reshape(tf.scatterND(indices, tf.reshape(dyDense, [n]), [acc]), xShape);
  });
}

const stridedSliceGrad: GradConfig = {
  kernelName: tf.StridedSlice,
  inputsToSave: ['x'],
  gradFunc: (dy: Tensor | Tensor[], saved: Tensor[], attrs: NamedAttrMap) => {
    const x = savedAt(saved, 0, 'StridedSlice');
    const a = attrs as unknown as tf.StridedSliceAttrs;
    return { x: () => stridedSliceBackward(x.shape, firstDy(dy), a) };
  },
};

function zeroGrad(kernelName: string, inputs: readonly string[]): GradConfig {
  return {
    kernelName,
    inputsToSave: [...inputs],
    gradFunc: (_dy: Tensor | Tensor[], saved: Tensor[]) => {
      const out: Record<string, () => Tensor> = {};
      inputs.forEach((name, i) => {
        const t = savedAt(saved, i, kernelName);
        // The tape insists on float32 gradients, whatever the input dtype.
        out[name] = () => tf.zeros(t.shape, 'float32');
      });
      return out;
    },
  };
}

function reduceTo(g: Tensor, shape: number[]): Tensor {
  if (tf.util.arraysEqual(g.shape, shape)) return g;
  const axes = tf.broadcast_util.getReductionAxes(shape, g.shape);
  return tf.reshape(axes.length > 0 ? tf.sum(g, axes) : g, shape);
}

/** Wraps a binary op's gradient so each input's gradient is summed back to that input's shape. */
function broadcastAware(kernelName: string): GradConfig | undefined {
  const orig = tf.getGradient(kernelName);
  if (orig === undefined) return undefined;
  const names = ['a', 'b'];
  if (orig.inputsToSave === undefined || orig.inputsToSave.join() !== names.join()) {
    throw new Error(`${kernelName} gradient: unexpected saved inputs [${orig.inputsToSave}]`);
  }
  return {
    ...orig,
    gradFunc: (dy: Tensor | Tensor[], saved: Tensor[], attrs: NamedAttrMap) => {
      const grads = orig.gradFunc(dy, saved, attrs);
      const out: Record<string, () => Tensor> = {};
      names.forEach((name, i) => {
        const thunk = grads[name];
        const x = savedAt(saved, i, kernelName);
        if (thunk !== undefined) out[name] = () => reduceTo(thunk(), x.shape);
      });
      return out;
    },
  };
}

/** dL/dx of y = tile(x, reps): split each tiled axis into (rep, size) and sum the reps out. */
export function tileBackward(xShape: number[], reps: number[], dy: Tensor): Tensor {
  if (reps.length !== xShape.length) {
    throw new Error(`Tile gradient: reps [${reps}] do not match x rank ${xShape.length}`);
  }
  const split: number[] = [];
  const axes: number[] = [];
  let run = 1; // untiled dims merge into one axis: keeps the reshape's rank small
  xShape.forEach((d, i) => {
    const r = reps[i]!;
    if (r === 1) {
      run *= d;
      return;
    }
    if (run !== 1) split.push(run);
    axes.push(split.length);
    split.push(r);
    run = d;
  });
  if (axes.length === 0) return tf.reshape(dy, xShape);
  if (run !== 1) split.push(run);
  return tf.reshape(tf.sum(tf.reshape(dy, split), axes), xShape);
}

const tileGrad: GradConfig = {
  kernelName: tf.Tile,
  inputsToSave: ['x'],
  gradFunc: (dy: Tensor | Tensor[], saved: Tensor[], attrs: NamedAttrMap) => {
    const x = savedAt(saved, 0, 'Tile');
    const { reps } = attrs as unknown as tf.TileAttrs;
    return { x: () => tileBackward(x.shape, reps, firstDy(dy)) };
  },
};

/** Gradients tfjs lacks: added only where none is registered. */
const MISSING: readonly GradConfig[] = [
  stridedSliceGrad,
  zeroGrad(tf.Greater, ['a', 'b']),
  zeroGrad(tf.Less, ['a', 'b']),
  zeroGrad(tf.LessEqual, ['a', 'b']),
  zeroGrad(tf.Equal, ['a', 'b']),
  zeroGrad(tf.NotEqual, ['a', 'b']),
  zeroGrad(tf.LogicalAnd, ['a', 'b']),
  zeroGrad(tf.LogicalOr, ['a', 'b']),
  zeroGrad(tf.LogicalNot, ['x']),
];

/** Kernel names we add a gradient for (where tfjs has none). */
export const ADDED_GRADIENTS: readonly string[] = MISSING.map((g) => g.kernelName);

const ours = new Set<GradConfig['gradFunc']>();
const originals = new Map<string, GradConfig>();

/** The tfjs gradient we replaced for `kernelName`, if any (for differential tests). */
export function originalGradient(kernelName: string): GradConfig | undefined {
  return originals.get(kernelName);
}

/** Kernel names whose tfjs gradient we replace. */
export const REPLACED_GRADIENTS: readonly string[] = [tf.SquaredDifference, tf.Maximum, tf.Minimum, tf.Tile];

function replacement(kernelName: string): GradConfig | undefined {
  return kernelName === tf.Tile ? tileGrad : broadcastAware(kernelName);
}

/** Adds the missing gradients and replaces the broken ones. Idempotent; returns the names changed. */
export function registerGradientGaps(): string[] {
  const changed: string[] = [];
  for (const g of MISSING) {
    if (tf.getGradient(g.kernelName) !== undefined) continue;
    tf.registerGradient(g);
    ours.add(g.gradFunc);
    changed.push(g.kernelName);
  }
  for (const name of REPLACED_GRADIENTS) {
    const existing = tf.getGradient(name);
    if (existing !== undefined && ours.has(existing.gradFunc)) continue;
    const g = replacement(name);
    if (g === undefined) continue;
    if (existing !== undefined) originals.set(name, existing);
    tf.registerGradient(g);
    ours.add(g.gradFunc);
    changed.push(name);
  }
  return changed;
}
