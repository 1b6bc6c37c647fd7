import * as tf from '@tensorflow/tfjs';
import type { Conv2dOptions, DTypeName, MatMulOptions, Ops } from './ops.js';

type TfTensor = tf.Tensor;

function asTensor(v: TfTensor | number): TfTensor | tf.Scalar {
  return typeof v === 'number' ? tf.scalar(v) : v;
}

/** Eager tfjs implementation of {@link Ops}: differentiable, runs on whichever backend is active. */
export const tfOps: Ops<TfTensor> = {
  constant: (values, shape) => tf.tensor(Float32Array.from(values), [...shape], 'float32'),
  intConstant: (values, shape) => tf.tensor(Int32Array.from(values), [...shape], 'int32'),
  shape: (x) => x.shape,

  reshape: (x, shape) => tf.reshape(x, [...shape]),
  transpose: (x, perm) => tf.transpose(x, [...perm]),
  concat: (xs, axis) => (xs.length === 1 ? xs[0]! : tf.concat([...xs], axis)),
  slice: (x, begin, size) => tf.slice(x, [...begin], [...size]),
  cast: (x, dtype: DTypeName) => tf.cast(x, dtype),

  add: (a, b) => tf.add(a, asTensor(b)),
  sub: (a, b) => tf.sub(a, asTensor(b)),
  mul: (a, b) => tf.mul(a, asTensor(b)),
  div: (a, b) => tf.div(a, asTensor(b)),
  neg: (x) => tf.neg(x),
  exp: (x) => tf.exp(x),
  log: (x) => tf.log(x),
  sqrt: (x) => tf.sqrt(x),
  rsqrt: (x) => tf.rsqrt(x),
  square: (x) => tf.square(x),
  tanh: (x) => tf.tanh(x),
  sigmoid: (x) => tf.sigmoid(x),
  erf: (x) => tf.erf(x),
  cos: (x) => tf.cos(x),
  sin: (x) => tf.sin(x),
  clip: (x, min, max) => tf.clipByValue(x, min, max),

  mean: (x, axes, keepDims) => tf.mean(x, [...axes], keepDims),
  sum: (x, axes, keepDims) => tf.sum(x, [...axes], keepDims),
  argMax: (x, axis) => tf.argMax(x, axis),
  softmax: (x) => tf.softmax(x),

  matMul: (a, b, o?: MatMulOptions) => {
    const ta = o?.transposeA ?? false;
    const tb = o?.transposeB ?? false;
    if (a.rank <= 3 && b.rank <= 3) return tf.matMul(a as tf.Tensor2D, b as tf.Tensor2D, ta, tb);
    // tfjs' batched matmul wants rank-3 operands: fold the leading batch axes.
    const lead = a.shape.slice(0, -2);
    const a3: tf.Tensor3D = tf.reshape(a, [-1, a.shape.at(-2)!, a.shape.at(-1)!]); // [batch, M, K]
    const b3: tf.Tensor3D = tf.reshape(b, [-1, b.shape.at(-2)!, b.shape.at(-1)!]); // [batch, K, N]
    const y = tf.matMul(a3, b3, ta, tb);
    return tf.reshape(y, [...lead, ...y.shape.slice(-2)]);
  },
  conv2d: (x, w, o: Conv2dOptions) => {
    const [t, b, l, r] = o.pad;
    const stride = o.stride ?? 1;
    return tf.conv2d(x as tf.Tensor4D, w as tf.Tensor4D, stride, [[0, 0], [t, b], [l, r], [0, 0]], 'NHWC');
  },
  gather: (table, ids) => tf.gather(table, ids, 0),
  upsampleNearest2x: (x) => {
    // Broadcast-and-reshape rather than resizeNearestNeighbor: exact PyTorch indexing for any
    // size, and its gradient is a plain sum, which every backend has.
    const [n, h, w, c] = x.shape as [number, number, number, number];
    const x6 = tf.reshape(x, [n, h, 1, w, 1, c]);
    const tiled = tf.broadcastTo(x6, [n, h, 2, w, 2, c]); // [N,H,2,W,2,C]
    return tf.reshape(tiled, [n, h * 2, w * 2, c]);
  },
};
