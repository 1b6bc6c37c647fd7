/**
 * The noise schedule as diffusers' schedulers precompute it: β, α = 1 − β and ᾱ (alphas_cumprod),
 * the k-diffusion noise levels σ = √((1 − ᾱ)/ᾱ), and the inference timestep grids.
 *
 * Every table is computed with PyTorch's own float32 arithmetic, so ᾱ (and everything the
 * samplers derive from it) is bit-identical to diffusers' tensors:
 * - `torch.linspace(..., dtype=float32)` on x86 CPUs runs AVX2 8-wide: the base of each vector is
 *   one fused multiply-add (`start + step·idx`, single rounding), the lanes add k·step
 *   ({@link torchLinspaceF32});
 * - `torch.cumprod` on float32 CPU tensors accumulates in double and rounds each output.
 *
 * Symbols: β_t betas, α_t = 1 − β_t, ᾱ_t = ∏_{s≤t} α_s, σ_t = √((1 − ᾱ_t)/ᾱ_t).
 */

/** Rounds to float32 (the result of one float32 operation on exact inputs). */
export const f32 = Math.fround;

const f32Scratch = new Float32Array(1);
const u32Scratch = new Uint32Array(f32Scratch.buffer);

/** The float32 adjacent to a finite float32 `x`, towards +∞ (`up`) or −∞. */
function nextFloat32(x: number, up: boolean): number {
  if (x === 0) return up ? 2 ** -149 : -(2 ** -149);
  f32Scratch[0] = x;
  const away = x > 0 === up;
  u32Scratch[0] = away ? u32Scratch[0]! + 1 : u32Scratch[0]! - 1;
  return f32Scratch[0]!;
}

/**
 * Fused multiply-add in float32, a·b + c with one rounding (C's `fmaf`). a·b of two float32 is
 * exact in double; the sum's rounding error is recovered exactly (TwoSum), which resolves the
 * only case where rounding the double sum again to float32 would differ: an exact halfway point.
 */
export function fma32(a: number, b: number, c: number): number {
  const p = a * b;
  const s = p + c;
  const r = f32(s);
  if (r === s || !Number.isFinite(s)) return r;
  const v = s - p;
  const err = p - (s - v) + (c - v);
  if (err === 0) return r;
  const other = nextFloat32(r, r < s);
  if (s - r !== other - s && r - s !== s - other) return r; // not a tie: the double sum rounds correctly
  // s is halfway between r and its neighbour; the true value lies on the side of err.
  const towardsOther = (other > r) === (err > 0);
  return towardsOther ? other : r;
}

/** numpy's `round` (half to even), which every diffusers timestep grid goes through. */
export function roundHalfEven(x: number): number {
  const r = Math.round(x);
  return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

// =============================================================================================
// β and ᾱ

export type BetaSchedule = 'linear' | 'scaled_linear' | 'squaredcos_cap_v2';

export interface NoiseScheduleSpec {
  readonly trainTimesteps: number;
  readonly betaSchedule: BetaSchedule;
  readonly betaStart: number;
  readonly betaEnd: number;
  /** Explicit β table (diffusers' `trained_betas`), which overrides the schedule. */
  readonly trainedBetas?: readonly number[] | null;
  /** Rescale β so that ᾱ_T = 0 (Lin et al. 2023, "Common Diffusion Noise Schedules … are Flawed", Alg. 1). */
  readonly rescaleZeroTerminalSnr?: boolean;
}

/** The training noise schedule, float32 as diffusers holds it. */
export interface NoiseSchedule {
  readonly trainTimesteps: number;
  readonly betas: Float32Array;
  readonly alphas: Float32Array;
  readonly alphasCumprod: Float32Array;
}

/**
 * `torch.linspace(start, end, n, dtype=torch.float32)` on an x86 CPU, bit for bit: PyTorch's
 * kernel fills 2×8 lanes per iteration (AVX2), each 8-lane vector from a base computed with one
 * FMA (`start + step·idx` for the first half of the range, `end − step·(n − 1 − idx)` for the
 * second, decided per vector) plus k·step per lane; the remainder (< 16) is computed per element.
 * Valid for n ≤ 32768 (PyTorch's grain size, above which the range is split across threads).
 */
export function torchLinspaceF32(start: number, end: number, n: number): Float32Array {
  const out = new Float32Array(n);
  if (n === 1) {
    out[0] = start;
    return out;
  }
  const s = f32(start);
  const e = f32(end);
  const step = f32(f32(e - s) / (n - 1));
  const halfway = Math.floor(n / 2);
  const base = (idx: number): number => (idx < halfway ? fma32(step, idx, s) : fma32(-step, n - idx - 1, e));
  const lanes = 8;
  let i = 0;
  for (; i + 2 * lanes <= n; i += 2 * lanes) {
    for (const v of [i, i + lanes]) {
      const b = base(v);
      for (let k = 0; k < lanes; k++) out[v + k] = fma32(k, step, b);
    }
  }
  for (; i < n; i++) out[i] = base(i);
  return out;
}

/** diffusers' `betas_for_alpha_bar` with the cosine ᾱ(t) of Nichol & Dhariwal (2021), β capped at 0.999. */
function cosineBetas(n: number): Float32Array {
  const alphaBar = (t: number) => Math.cos(((t + 0.008) / 1.008) * (Math.PI / 2)) ** 2;
  const betas = new Float32Array(n);
  for (let i = 0; i < n; i++) betas[i] = Math.min(1 - alphaBar((i + 1) / n) / alphaBar(i / n), 0.999);
  return betas;
}

/** β → ᾱ as `torch.cumprod` on float32 (double accumulator, float32 outputs). */
export function cumprodF32(alphas: Float32Array): Float32Array {
  const out = new Float32Array(alphas.length);
  let acc = 1;
  for (let i = 0; i < alphas.length; i++) {
    acc *= alphas[i]!;
    out[i] = acc;
  }
  return out;
}

/** Zero-terminal-SNR rescaling (Lin et al. 2023, Alg. 1), in float32 as diffusers' `rescale_zero_terminal_snr`. */
function rescaleZeroTerminalSnr(betas: Float32Array): Float32Array {
  const n = betas.length;
  const alphaBar = cumprodF32(betas.map((b) => f32(1 - b)));
  const sqrtAlphaBar = alphaBar.map((a) => f32(Math.sqrt(a)));
  const first = sqrtAlphaBar[0]!;
  const last = sqrtAlphaBar[n - 1]!;
  const scale = f32(first / f32(first - last));
  // Shift so the last √ᾱ is 0, scale so the first is unchanged.
  const rescaled = sqrtAlphaBar.map((v) => f32(f32(v - last) * scale));
  const newAlphaBar = rescaled.map((v) => f32(v * v));
  const out = new Float32Array(n);
  out[0] = f32(1 - newAlphaBar[0]!);
  for (let i = 1; i < n; i++) out[i] = f32(1 - f32(newAlphaBar[i]! / newAlphaBar[i - 1]!));
  return out;
}

/** β, α and ᾱ for a training schedule, bit-identical to diffusers' float32 tensors. */
export function noiseSchedule(spec: NoiseScheduleSpec): NoiseSchedule {
  const n = spec.trainTimesteps;
  let betas: Float32Array;
  if (spec.trainedBetas != null) {
    if (spec.trainedBetas.length !== n) {
      throw new Error(`trained_betas has ${spec.trainedBetas.length} entries, expected num_train_timesteps = ${n}`);
    }
    betas = Float32Array.from(spec.trainedBetas);
  } else if (spec.betaSchedule === 'linear') {
    betas = torchLinspaceF32(spec.betaStart, spec.betaEnd, n);
  } else if (spec.betaSchedule === 'scaled_linear') {
    // Latent diffusion's schedule: linear in √β (torch `** 2` on float32 is x·x).
    betas = torchLinspaceF32(Math.sqrt(spec.betaStart), Math.sqrt(spec.betaEnd), n).map((b) => f32(b * b));
  } else {
    betas = cosineBetas(n);
  }
  if (spec.rescaleZeroTerminalSnr === true) betas = rescaleZeroTerminalSnr(betas);
  const alphas = betas.map((b) => f32(1 - b));
  return { trainTimesteps: n, betas, alphas, alphasCumprod: cumprodF32(alphas) };
}

/** σ_t = √((1 − ᾱ_t)/ᾱ_t) in float32, as diffusers' `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5`. */
export function sigmasOf(alphasCumprod: Float32Array): Float32Array {
  return alphasCumprod.map((a) => f32(Math.sqrt(f32(f32(1 - a) / a))));
}

// =============================================================================================
// Timestep grids and σ interpolation (numpy semantics: float64 arithmetic, half-to-even rounding)

export type TimestepSpacing = 'leading' | 'trailing' | 'linspace';

/** `np.linspace(start, stop, num)`: i·step + start, with the last entry exactly `stop`. */
export function npLinspace(start: number, stop: number, num: number): number[] {
  if (num === 1) return [start];
  const step = (stop - start) / (num - 1);
  const out = Array.from({ length: num }, (_, i) => i * step + start);
  out[num - 1] = stop;
  return out;
}

/** `np.arange(start, stop, step)` for a float step (start + i·step while short of stop). */
export function npArange(start: number, stop: number, step: number): number[] {
  const count = Math.max(0, Math.ceil((stop - start) / step));
  return Array.from({ length: count }, (_, i) => start + i * step);
}

/**
 * The integer timestep grid of DDIM/PNDM-style schedulers, descending (Lin et al. 2023, Table 2):
 * leading = (0, r, 2r, …)·reversed + stepsOffset with r = ⌊T/n⌋; trailing = round(T, T − T/n, …) − 1;
 * linspace = round(linspace(0, T − 1, n)) reversed.
 */
export function integerTimesteps(spacing: TimestepSpacing, steps: number, trainTimesteps: number, stepsOffset: number): number[] {
  checkSteps(steps, trainTimesteps);
  switch (spacing) {
    case 'leading': {
      const ratio = Math.floor(trainTimesteps / steps);
      return Array.from({ length: steps }, (_, i) => (steps - 1 - i) * ratio + stepsOffset);
    }
    case 'trailing':
      return npArange(trainTimesteps, 0, -(trainTimesteps / steps)).map((t) => roundHalfEven(t) - 1);
    case 'linspace':
      return npLinspace(0, trainTimesteps - 1, steps)
        .map(roundHalfEven)
        .reverse();
  }
}

/**
 * The (possibly fractional) descending timestep grid of the σ-space schedulers (Euler, LMS):
 * as {@link integerTimesteps} but linspace is not rounded.
 */
export function sigmaTimesteps(spacing: TimestepSpacing, steps: number, trainTimesteps: number, stepsOffset: number): number[] {
  if (spacing !== 'linspace') return integerTimesteps(spacing, steps, trainTimesteps, stepsOffset);
  checkSteps(steps, trainTimesteps);
  // diffusers builds this grid in float32.
  return npLinspace(0, trainTimesteps - 1, steps).map(f32).reverse();
}

/** Rejects a step count outside [1, T] (diffusers raises the same). */
export function checkSteps(steps: number, trainTimesteps: number): void {
  if (!Number.isInteger(steps) || steps < 1 || steps > trainTimesteps) {
    throw new Error(`number of inference steps must be an integer in [1, ${trainTimesteps}], got ${steps}`);
  }
}

/** `np.interp(x, arange(len(table)), table)`: σ at a fractional timestep, linear between entries. */
export function interpTable(table: ArrayLike<number>, x: number): number {
  const last = table.length - 1;
  if (x <= 0) return table[0]!;
  if (x >= last) return table[last]!;
  const j = Math.floor(x);
  if (x === j) return table[j]!;
  const slope = table[j + 1]! - table[j]!;
  return slope * (x - j) + table[j]!;
}

/**
 * Karras et al. (2022) eq. 5 noise levels: σ_i = (σ_max^{1/ρ} + i/(n−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, ρ = 7.
 */
export function karrasSigmas(sigmaMin: number, sigmaMax: number, steps: number): number[] {
  const rho = 7;
  const minInvRho = sigmaMin ** (1 / rho);
  const maxInvRho = sigmaMax ** (1 / rho);
  return npLinspace(0, 1, steps).map((r) => (maxInvRho + r * (minInvRho - maxInvRho)) ** rho);
}

/**
 * The fractional timestep whose σ is `sigma`: linear interpolation in log σ between the two
 * table entries around it (diffusers' `_sigma_to_t`; `logSigmas` is float32 as there).
 */
export function sigmaToTimestep(sigma: number, logSigmas: Float32Array): number {
  const logSigma = Math.log(Math.max(sigma, 1e-10));
  // The last index whose log σ is ≤ log sigma (the table ascends), kept inside [0, len − 2].
  let low = 0;
  for (let i = 0; i < logSigmas.length; i++) if (logSigma - logSigmas[i]! >= 0) low = i;
  low = Math.min(low, logSigmas.length - 2);
  const lo = logSigmas[low]!;
  const hi = logSigmas[low + 1]!;
  const w = Math.min(1, Math.max(0, (lo - logSigma) / (lo - hi)));
  return (1 - w) * low + w * (low + 1);
}

/** log σ per training timestep, float32 (numpy's `np.log` of the float32 σ table). */
export function logSigmasOf(sigmas: Float32Array): Float32Array {
  return sigmas.map((s) => f32(Math.log(s)));
}
