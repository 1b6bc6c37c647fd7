/**
 * The only tensor API that model, scheduler and method code may use.
 *
 * Model code is written once against this interface: the tfjs implementation runs it eagerly for
 * training and sampling, and a recording implementation turns the same calls into an ONNX graph.
 * So: no data-dependent control flow and nothing asynchronous behind it — shapes are static at
 * trace time and every value flows through `T`.
 *
 * Layout conventions: images and feature maps are NHWC, convolution filters HWIO, linear weights
 * keep PyTorch's [out, in] (they are used with `transposeB`), sequences are [batch, tokens, width].
 */

/** Explicit zero padding of a convolution: [top, bottom, left, right]. */
export type Pad4 = readonly [number, number, number, number];

export type DTypeName = 'float32' | 'int32';

export interface Conv2dOptions {
  readonly stride?: 1 | 2;
  readonly pad: Pad4;
}

export interface MatMulOptions {
  readonly transposeA?: boolean;
  readonly transposeB?: boolean;
}

export interface Ops<T> {
  /** A float32 constant (baked into an exported graph as an initializer). */
  constant(values: Float32Array | readonly number[], shape: readonly number[]): T;
  /** An int32 constant. */
  intConstant(values: Int32Array | readonly number[], shape: readonly number[]): T;
  /** The static shape of a tensor. */
  shape(x: T): readonly number[];

  reshape(x: T, shape: readonly number[]): T;
  transpose(x: T, perm: readonly number[]): T;
  concat(xs: readonly T[], axis: number): T;
  /** `size` entries of -1 mean "to the end" along that axis. */
  slice(x: T, begin: readonly number[], size: readonly number[]): T;
  cast(x: T, dtype: DTypeName): T;

  add(a: T, b: T | number): T;
  sub(a: T, b: T | number): T;
  mul(a: T, b: T | number): T;
  div(a: T, b: T | number): T;
  neg(x: T): T;
  exp(x: T): T;
  log(x: T): T;
  sqrt(x: T): T;
  rsqrt(x: T): T;
  square(x: T): T;
  tanh(x: T): T;
  sigmoid(x: T): T;
  erf(x: T): T;
  cos(x: T): T;
  sin(x: T): T;
  clip(x: T, min: number, max: number): T;

  mean(x: T, axes: readonly number[], keepDims: boolean): T;
  sum(x: T, axes: readonly number[], keepDims: boolean): T;
  /** Index of the largest value along `axis` (first occurrence), as int32. */
  argMax(x: T, axis: number): T;
  /** Numerically stable softmax over the last axis. */
  softmax(x: T): T;

  /** Batched matrix product over the last two axes; leading axes must match. */
  matMul(a: T, b: T, o?: MatMulOptions): T;
  /** NHWC input, HWIO filter. */
  conv2d(x: T, w: T, o: Conv2dOptions): T;
  /** Rows of a 2-D `table` picked by int32 `ids` of any shape → [...ids.shape, width]. */
  gather(table: T, ids: T): T;
  /** Nearest-neighbour 2× upsampling of an NHWC tensor (PyTorch `interpolate(scale_factor=2)`). */
  upsampleNearest2x(x: T): T;
}
