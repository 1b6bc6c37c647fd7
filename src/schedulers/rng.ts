/**
 * Seeded noise, bit-identical to PyTorch's CPU generator, so a seed gives the same initial latents
 * and ancestral noise as `torch.randn(shape, generator=torch.Generator().manual_seed(seed))` in a
 * diffusers pipeline on an x86-64 CPU.
 *
 * The algorithm (PyTorch ≥ 1.x, `aten/src/ATen/native/cpu/DistributionTemplates.h`, AVX2 build —
 * the default CPU dispatch):
 * 1. The engine is MT19937 (Matsumoto & Nishimura 1998) seeded with the low 32 bits of the seed
 *    by the standard `init_genrand` recurrence.
 * 2. `randn` of n ≥ 16 float32 values first draws n uniforms u = (r & 0xFFFFFF)·2⁻²⁴ from n engine
 *    outputs r, then applies Box–Muller to each block of 16 in place: for j < 8,
 *    ρ = √(−2 ln(1 − u_j)), θ = 2π·u_{j+8}, out_j = ρ cos θ, out_{j+8} = ρ sin θ. If 16 ∤ n, the
 *    last 16 values are redrawn (16 fresh uniforms) and transformed again.
 * 3. ln, sin and cos are avx_mathfun's float32 polynomials (cephes coefficients), compiled with
 *    fused multiply-adds; they are reproduced here operation by operation in float32.
 * Values are produced in the tensor's PyTorch (row-major, NCHW for images) order.
 *
 * Verified bit for bit against the reference fixtures' torch.randn tensors; the engine against
 * the C++ standard's known answer (10000th output of seed 5489 is 4123659995).
 */
import { nchwToNhwc } from '../io/layout.js';
import { f32, fma32 } from './tables.js';

/** The 32-bit Mersenne Twister, as `std::mt19937` and PyTorch's `at::mt19937`. */
export class Mt19937 {
  private readonly state = new Uint32Array(624);
  private index = 624;

  constructor(seed: number) {
    const mt = this.state;
    mt[0] = seed >>> 0;
    for (let i = 1; i < 624; i++) {
      const prev = mt[i - 1]!;
      mt[i] = (Math.imul(1812433253, prev ^ (prev >>> 30)) + i) >>> 0;
    }
  }

  /** The next tempered 32-bit output. */
  nextUint32(): number {
    if (this.index >= 624) this.twist();
    let y = this.state[this.index++]!;
    y ^= y >>> 11;
    y ^= (y << 7) & 0x9d2c5680;
    y ^= (y << 15) & 0xefc60000;
    y ^= y >>> 18;
    return y >>> 0;
  }

  private twist(): void {
    const mt = this.state;
    for (let i = 0; i < 624; i++) {
      const y = (mt[i]! & 0x80000000) | (mt[(i + 1) % 624]! & 0x7fffffff);
      mt[i] = mt[(i + 397) % 624]! ^ (y >>> 1) ^ (y & 1 ? 0x9908b0df : 0);
    }
    this.index = 0;
  }
}

/** The low 32 bits of a PyTorch seed (any integer in [−2⁶³, 2⁶⁴), as `manual_seed` accepts). */
export function torchSeedLow32(seed: number | bigint): number {
  if (typeof seed === 'number' && !Number.isSafeInteger(seed)) {
    throw new Error(`seed ${seed} is not an exact integer; pass seeds beyond 2^53 as a bigint`);
  }
  const s = BigInt(seed);
  if (s < -(1n << 63n) || s >= 1n << 64n) throw new Error(`seed ${seed} is outside PyTorch's range [-2^63, 2^64)`);
  return Number(BigInt.asUintN(32, s));
}

/** A seeded source of standard-normal float32 noise: PyTorch's CPU `torch.Generator`, reproduced. */
export class TorchGenerator {
  private readonly engine: Mt19937;

  constructor(seed: number | bigint) {
    this.engine = new Mt19937(torchSeedLow32(seed));
  }

  /** `torch.randn(shape, generator=this)` for float32 on CPU, in PyTorch's row-major order. */
  randn(shape: readonly number[]): Float32Array {
    const n = shape.reduce((a, b) => a * b, 1);
    if (n < 16) {
      // PyTorch draws small tensors through a different (double-precision, cached-pair) path.
      throw new Error(`randn: tensors of fewer than 16 values (${n}) are not supported`);
    }
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) out[i] = this.uniform24();
    for (let i = 0; i + 16 <= n; i += 16) boxMuller16(out, i);
    if (n % 16 !== 0) {
      for (let i = n - 16; i < n; i++) out[i] = this.uniform24();
      boxMuller16(out, n - 16);
    }
    return out;
  }

  /**
   * Latent-shaped noise in our NHWC layout: drawn as PyTorch draws [n, c, h, w] and transposed,
   * so `randnNhwc([1, 64, 64, 4])` equals diffusers' initial latents for the same seed.
   */
  randnNhwc(shape: readonly [number, number, number, number]): Float32Array {
    const [n, h, w, c] = shape;
    return nchwToNhwc(this.randn([n, c, h, w]), [n, c, h, w]).data;
  }

  /** A float32 uniform in [0, 1) with 24 random bits (`uniform_real_distribution<float>`). */
  private uniform24(): number {
    return (this.engine.nextUint32() & 0xffffff) * 2 ** -24;
  }
}

/** Box–Muller on data[i..i+16) in place, as PyTorch's `normal_fill_16_AVX2`. */
function boxMuller16(data: Float32Array, i: number): void {
  const twoPi = f32(2 * Math.PI);
  for (let j = 0; j < 8; j++) {
    const u1 = f32(1 - data[i + j]!); // (0, 1] for the logarithm
    const u2 = data[i + j + 8]!;
    const radius = f32(Math.sqrt(f32(-2 * logF32(u1))));
    const [sin, cos] = sinCosF32(f32(twoPi * u2));
    data[i + j] = f32(radius * cos);
    data[i + j + 8] = f32(radius * sin);
  }
}

const bits = new Float32Array(1);
const bitsI = new Int32Array(bits.buffer);

// cephes' logf coefficients (avx_mathfun `log256_ps`).
const LOG_P = [
  7.0376836292e-2, -1.151461031e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1,
  -2.4999993993e-1, 3.3333331174e-1,
].map(f32);
const LOG_Q1 = f32(-2.12194440e-4);
const LOG_Q2 = f32(0.693359375);
const SQRT_HALF = f32(0.707106781186547524);

/** avx_mathfun's `log256_ps` for a positive normal float32, with its fused multiply-adds. */
function logF32(x: number): number {
  bits[0] = x;
  const exponent = (bitsI[0]! >>> 23) - 0x7f;
  bitsI[0] = (bitsI[0]! & ~0x7f800000) | 0x3f000000; // mantissa in [0.5, 1)
  let m = bits[0]!;
  let e = exponent + 1;
  // Fold m < √½ onto [√½, √2): m ← 2m − 1, e ← e − 1; otherwise m ← m − 1.
  const below = m < SQRT_HALF;
  const add = below ? m : 0;
  m = f32(m - 1);
  if (below) e -= 1;
  m = f32(m + add);
  const z = f32(m * m);
  let y = LOG_P[0]!;
  for (let k = 1; k < LOG_P.length; k++) y = fma32(y, m, LOG_P[k]!);
  y = f32(y * m);
  y = fma32(y, z, f32(e * LOG_Q1));
  y = fma32(z, -0.5, y);
  const r = f32(m + y);
  return fma32(e, LOG_Q2, r);
}

// cephes' sinf/cosf reduction constants and polynomials (avx_mathfun `sincos256_ps`).
const FOUR_OVER_PI = f32(1.27323954473516);
const DP1 = f32(-0.78515625);
const DP2 = f32(-2.4187564849853515625e-4);
const DP3 = f32(-3.77489497744594108e-8);
const SIN_P = [f32(-1.9515295891e-4), f32(8.3321608736e-3), f32(-1.6666654611e-1)];
const COS_P = [f32(2.443315711809948e-5), f32(-1.388731625493765e-3), f32(4.166664568298827e-2)];

/** avx_mathfun's `sincos256_ps` for θ ≥ 0 (θ = 2πu here), with its fused multiply-adds: [sin, cos]. */
function sinCosF32(theta: number): [number, number] {
  let x = Math.abs(theta);
  // Octant j (rounded up to even) and the reduced argument x − j·π/4 in three parts.
  const j = ((Math.trunc(f32(x * FOUR_OVER_PI)) + 1) & ~1) >>> 0;
  const y = j;
  x = fma32(y, DP1, x);
  x = fma32(y, DP2, x);
  x = fma32(y, DP3, x);
  const swapSinSign = (j & 4) !== 0;
  const negateCos = ((j - 2) & 4) === 0; // avx_mathfun: sign from andnot(j − 2, 4)
  const sinPolyIsSin = (j & 2) === 0;
  const z = f32(x * x);
  let c = COS_P[0]!;
  c = fma32(c, z, COS_P[1]!);
  c = fma32(c, z, COS_P[2]!);
  c = f32(c * z);
  c = fma32(c, z, -f32(z * 0.5));
  c = f32(c + 1);
  let s = SIN_P[0]!;
  s = fma32(s, z, SIN_P[1]!);
  s = fma32(s, z, SIN_P[2]!);
  s = f32(s * z);
  s = fma32(s, x, x);
  let sin = sinPolyIsSin ? s : c;
  let cos = sinPolyIsSin ? c : s;
  if (swapSinSign !== theta < 0) sin = -sin;
  if (negateCos) cos = -cos;
  return [sin, cos];
}
