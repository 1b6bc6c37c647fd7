/**
 * PyTorch ↔ internal layout of parameters. Checkpoints store convolution filters OIHW; the model
 * code runs NHWC with HWIO filters, so they are transposed once at load and back at save/export.
 * Every other tensor keeps its PyTorch layout (linear weights are used with `transposeB`).
 */

/** Whether a checkpoint tensor of this shape is a convolution filter (the only rank-4 parameters). */
export function isConvFilter(shape: readonly number[]): boolean {
  return shape.length === 4;
}

/** [O, I, kh, kw] → [kh, kw, I, O]. */
export function oihwToHwio(data: Float32Array, shape: readonly number[]): { data: Float32Array; shape: number[] } {
  const [o, i, kh, kw] = shape as [number, number, number, number];
  const out = new Float32Array(data.length);
  for (let a = 0; a < o; a++) {
    for (let b = 0; b < i; b++) {
      for (let y = 0; y < kh; y++) {
        for (let x = 0; x < kw; x++) {
          out[((y * kw + x) * i + b) * o + a] = data[((a * i + b) * kh + y) * kw + x]!;
        }
      }
    }
  }
  return { data: out, shape: [kh, kw, i, o] };
}

/** [kh, kw, I, O] → [O, I, kh, kw]. */
export function hwioToOihw(data: Float32Array, shape: readonly number[]): { data: Float32Array; shape: number[] } {
  const [kh, kw, i, o] = shape as [number, number, number, number];
  const out = new Float32Array(data.length);
  for (let y = 0; y < kh; y++) {
    for (let x = 0; x < kw; x++) {
      for (let b = 0; b < i; b++) {
        for (let a = 0; a < o; a++) {
          out[((a * i + b) * kh + y) * kw + x] = data[((y * kw + x) * i + b) * o + a]!;
        }
      }
    }
  }
  return { data: out, shape: [o, i, kh, kw] };
}

/** NCHW activations (diffusers' tensors) → NHWC. */
export function nchwToNhwc(data: Float32Array, shape: readonly number[]): { data: Float32Array; shape: number[] } {
  const [n, c, h, w] = shape as [number, number, number, number];
  const out = new Float32Array(data.length);
  for (let b = 0; b < n; b++)
    for (let ch = 0; ch < c; ch++)
      for (let y = 0; y < h; y++)
        for (let x = 0; x < w; x++) out[((b * h + y) * w + x) * c + ch] = data[((b * c + ch) * h + y) * w + x]!;
  return { data: out, shape: [n, h, w, c] };
}

/** NHWC activations → NCHW. */
export function nhwcToNchw(data: Float32Array, shape: readonly number[]): { data: Float32Array; shape: number[] } {
  const [n, h, w, c] = shape as [number, number, number, number];
  const out = new Float32Array(data.length);
  for (let b = 0; b < n; b++)
    for (let ch = 0; ch < c; ch++)
      for (let y = 0; y < h; y++)
        for (let x = 0; x < w; x++) out[((b * c + ch) * h + y) * w + x] = data[((b * h + y) * w + x) * c + ch]!;
  return { data: out, shape: [n, c, h, w] };
}
