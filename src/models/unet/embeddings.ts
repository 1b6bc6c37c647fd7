/**
 * Timestep conditioning of the UNet: diffusers' `Timesteps` (sinusoidal features, `time_proj`) and
 * `TimestepEmbedding` (the time MLP, `time_embedding`).
 */
import type { Ops } from '../../ops/ops.js';
import type { Scope } from '../../ops/scope.js';
import { linear, silu } from '../../ops/nn.js';

const MAX_PERIOD = 10000;

/** Single-rounded float32 a·b + c (a, b, c float32): the double product is exact, TwoSum recovers the sum's error. */
function fmaf(a: number, b: number, c: number): number {
  const product = a * b; // ≤ 48 significant bits: exact in a double
  const sum = product + c;
  const v = sum - product;
  const error = product - (sum - v) + (c - v); // exact: product + c = sum + error
  const rounded = Math.fround(sum);
  // Double rounding only goes wrong when `sum` sits exactly halfway between two floats.
  const other = 2 * sum - rounded;
  if (error !== 0 && other !== rounded && Math.fround(other) === other) {
    return (error > 0) === (other > rounded) ? other : rounded;
  }
  return rounded;
}

const f32 = Math.fround;

/**
 * exp in float32 exactly as PyTorch's CPU kernels compute it: `Vectorized<float>::exp` is SLEEF's
 * `xexpf` (1-ulp variant, FMA build) — Cody–Waite reduction by ln 2 split in two parts, a
 * degree-6 polynomial, then scaling by 2^q. Differs from the correctly rounded exp in the last
 * bit for some arguments (16 of SD 1.5's 160 timestep frequencies).
 */
export function expf32Torch(d: number): number {
  const x = f32(d * f32(Math.LOG2E));
  let q = Math.round(x);
  if (q - x === 0.5 && q % 2 !== 0) q -= 1; // cvtps2dq rounds half to even
  let s = fmaf(q, f32(-0.693145751953125), d);
  s = fmaf(q, f32(-1.428606765330187045e-6), s);
  let u = f32(0.000198527617612853646278381);
  u = fmaf(u, s, f32(0.00139304355252534151077271));
  u = fmaf(u, s, f32(0.00833336077630519866943359));
  u = fmaf(u, s, f32(0.0416664853692054748535156));
  u = fmaf(u, s, f32(0.166666671633720397949219));
  u = fmaf(u, s, 0.5);
  u = f32(1 + fmaf(f32(s * s), u, s));
  if (d < -104) return 0;
  if (d > 100) return Infinity;
  const half = q >> 1;
  return f32(f32(u * 2 ** half) * 2 ** (q - half));
}

/**
 * The frequency table of diffusers' `get_timestep_embedding`, rounded as PyTorch's float32 CPU
 * ops round it: exponentᵢ = (−ln 10000 · i) / (half − freqShift), frequencyᵢ = exp(exponentᵢ),
 * with i = 0…half−1 from `torch.arange(dtype=float32)`. The Python-float factor enters the
 * float32 multiply rounded to float32, each step rounds to float32, and exp is torch's own.
 */
export function timestepFrequencies(half: number, freqShift: number): Float32Array {
  const factor = f32(-Math.log(MAX_PERIOD));
  const divisor = f32(half - freqShift);
  const out = new Float32Array(half);
  for (let i = 0; i < half; i++) out[i] = expf32Torch(f32(f32(factor * i) / divisor));
  return out;
}

export interface TimestepFeatureSpec {
  /** Feature width (even): half sines, half cosines. */
  readonly dim: number;
  /** Output [cos | sin] instead of [sin | cos] (true for every SD UNet). */
  readonly flipSinToCos: boolean;
  readonly freqShift: number;
}

/**
 * `time_proj`: float32 timesteps [B] (fractional ones allowed, as k-diffusion samplers use) →
 * sinusoidal features [B, dim]: [sin(t·f) | cos(t·f)], or [cos | sin] when flipped.
 */
export function timestepFeatures<T>(o: Ops<T>, timesteps: T, c: TimestepFeatureSpec): T {
  const half = c.dim / 2;
  const frequencies = o.constant(timestepFrequencies(half, c.freqShift), [1, half]);
  const angles = o.mul(o.reshape(timesteps, [-1, 1]), frequencies); // [B, half]
  const sin = o.sin(angles);
  const cos = o.cos(angles);
  return o.concat(c.flipSinToCos ? [cos, sin] : [sin, cos], 1); // [B, dim]
}

/** `time_embedding`: linear_1 → SiLU → linear_2, [B, inDim] → [B, embedDim]. */
export function timeEmbedding<T>(o: Ops<T>, p: Scope<T>, features: T, inDim: number, embedDim: number): T {
  const h = silu(o, linear(o, p.sub('linear_1'), features, inDim, embedDim));
  return linear(o, p.sub('linear_2'), h, embedDim, embedDim);
}
