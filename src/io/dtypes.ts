// Element types of the safetensors format and bit-exact conversions between the reduced-precision
// float formats (IEEE binary16, bfloat16, OCP FP8) and float32.

/** Every dtype this reader accepts, in safetensors' own alignment order (the Rust `Dtype` enum). */
export const DTYPES = [
  'BOOL',
  'U8',
  'I8',
  'F8_E5M2',
  'F8_E4M3',
  'I16',
  'U16',
  'F16',
  'BF16',
  'I32',
  'U32',
  'F32',
  'F64',
  'I64',
  'U64',
] as const;

/** A safetensors element type. */
export type DType = (typeof DTYPES)[number];

/** Bytes per element of each dtype. */
export const DTYPE_BYTES: Readonly<Record<DType, number>> = Object.freeze({
  BOOL: 1,
  U8: 1,
  I8: 1,
  F8_E5M2: 1,
  F8_E4M3: 1,
  I16: 2,
  U16: 2,
  F16: 2,
  BF16: 2,
  I32: 4,
  U32: 4,
  F32: 4,
  F64: 8,
  I64: 8,
  U64: 8,
});

// The Rust library sorts tensors by descending position in its `Dtype` enum; keeping the same rank
// here is what makes our files byte-identical to Python's `save_file`.
const DTYPE_RANK: ReadonlyMap<string, number> = new Map(DTYPES.map((d, i) => [d, i]));

/** Dtypes that safetensors defines but this reader deliberately rejects (sub-byte or complex). */
export const UNSUPPORTED_SAFETENSORS_DTYPES: readonly string[] = [
  'F4',
  'F6_E2M3',
  'F6_E3M2',
  'F8_E8M0',
  'F8_E4M3FNUZ',
  'F8_E5M2FNUZ',
  'C64',
];

/** True if `s` names a supported dtype. */
export function isDType(s: string): s is DType {
  return DTYPE_RANK.has(s);
}

/** Position of a dtype in safetensors' alignment order (higher = written first). */
export function dtypeRank(d: DType): number {
  return DTYPE_RANK.get(d) ?? -1;
}

/** True for the dtypes `readFloat32` understands as floating point. */
export function isFloatDType(d: DType): boolean {
  return d === 'F64' || d === 'F32' || d === 'F16' || d === 'BF16' || d === 'F8_E4M3' || d === 'F8_E5M2';
}

// ---------------------------------------------------------------------------------------------
// Scalar bit conversions. Float32 bit patterns are handled as unsigned 32-bit numbers so NaN
// payloads and signed zeros survive, which `Math.fround` on values would not guarantee.

/** float16 bits → float32 bits (exact: every binary16 value is representable in binary32). */
export function f16BitsToF32Bits(h: number): number {
  const sign = (h & 0x8000) << 16;
  let exponent = (h >>> 10) & 0x1f;
  let mantissa = h & 0x3ff;
  if (exponent === 0x1f) return (sign | 0x7f800000 | (mantissa << 13)) >>> 0;
  if (exponent === 0) {
    if (mantissa === 0) return sign >>> 0;
    // Subnormal half: shift the leading 1 into the implicit-bit position; float32 has the range.
    exponent = 1;
    while ((mantissa & 0x400) === 0) {
      mantissa <<= 1;
      exponent--;
    }
    mantissa &= 0x3ff;
  }
  return (sign | ((exponent + 112) << 23) | (mantissa << 13)) >>> 0;
}

/** float32 bits → float16 bits, IEEE round-to-nearest-even; overflow → ±inf, NaN stays quiet NaN. */
export function f32BitsToF16Bits(x: number): number {
  const sign = (x >>> 16) & 0x8000;
  const exponent = (x >>> 23) & 0xff;
  const mantissa = x & 0x7fffff;
  if (exponent === 0xff) return sign | 0x7c00 | (mantissa !== 0 ? 0x200 | (mantissa >>> 13) : 0);
  const halfExponent = exponent - 127 + 15;
  if (halfExponent >= 0x1f) return sign | 0x7c00;
  if (halfExponent <= 0) {
    // Below 2^-25 everything rounds to zero (exactly 2^-25 ties to the even zero).
    if (halfExponent < -10) return sign;
    const significand = mantissa | 0x800000;
    const shift = 14 - halfExponent; // 14..24: aligns the significand to units of 2^-24
    let half = significand >>> shift;
    const remainder = significand & ((1 << shift) - 1);
    const halfway = 1 << (shift - 1);
    if (remainder > halfway || (remainder === halfway && (half & 1) === 1)) half++;
    return sign | half; // a carry into bit 10 correctly yields the smallest normal
  }
  let half = (halfExponent << 10) | (mantissa >>> 13);
  const remainder = mantissa & 0x1fff;
  if (remainder > 0x1000 || (remainder === 0x1000 && (half & 1) === 1)) half++; // carry may reach inf
  return sign | half;
}

/** bfloat16 bits → float32 bits (bfloat16 is the top half of a float32). */
export function bf16BitsToF32Bits(b: number): number {
  return (b << 16) >>> 0;
}

/** float32 bits → bfloat16 bits, round-to-nearest-even; NaN stays (quiet) NaN. */
export function f32BitsToBf16Bits(x: number): number {
  if ((x & 0x7fffffff) >>> 0 > 0x7f800000) return ((x >>> 16) | 0x40) & 0xffff;
  // Largest non-NaN input is 0xff800000, so the sum stays below 2^32 before the shift.
  return ((x >>> 0) + 0x7fff + ((x >>> 16) & 1)) >>> 16;
}

/** OCP FP8 E4M3 ("fn": no infinities, S.1111.111 is NaN, max 448) → float32 value. */
export function f8e4m3ToF32(byte: number): number {
  const sign = byte & 0x80 ? -1 : 1;
  const exponent = (byte >>> 3) & 0xf;
  const mantissa = byte & 0x7;
  if (exponent === 0xf && mantissa === 0x7) return NaN;
  if (exponent === 0) return sign * mantissa * 2 ** -9;
  return sign * (8 + mantissa) * 2 ** (exponent - 10);
}

/** OCP FP8 E5M2 (IEEE-like, with infinities and NaNs, max 57344) → float32 value. */
export function f8e5m2ToF32(byte: number): number {
  const sign = byte & 0x80 ? -1 : 1;
  const exponent = (byte >>> 2) & 0x1f;
  const mantissa = byte & 0x3;
  if (exponent === 0x1f) return mantissa === 0 ? sign * Infinity : NaN;
  if (exponent === 0) return sign * mantissa * 2 ** -16;
  return sign * (4 + mantissa) * 2 ** (exponent - 17);
}

// ---------------------------------------------------------------------------------------------
// Array conversions. Tables are built lazily: a 256 KB table turns half→float into one load per
// element, several times faster than bit twiddling in a loop.

const HOST_IS_LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
let f16Table: Uint32Array | undefined;
let f8e4m3Table: Float32Array | undefined;
let f8e5m2Table: Float32Array | undefined;

function getF16Table(): Uint32Array {
  if (f16Table === undefined) {
    f16Table = new Uint32Array(65536);
    for (let h = 0; h < 65536; h++) f16Table[h] = f16BitsToF32Bits(h);
  }
  return f16Table;
}

/** Converts float16 bit patterns to float32 (written as bits into `dst` starting at `dstOffset`). */
export function f16ToF32Array(src: Uint16Array, dst: Float32Array, dstOffset = 0): void {
  checkRoom(src.length, dst.length, dstOffset);
  const table = getF16Table();
  const out = new Uint32Array(dst.buffer, dst.byteOffset + dstOffset * 4, src.length);
  let i = 0;
  if (HOST_IS_LITTLE_ENDIAN && src.byteOffset % 4 === 0) {
    // Two halves per 32-bit load: about a third faster than one load per element.
    const pairs = new Uint32Array(src.buffer, src.byteOffset, src.length >>> 1);
    for (let j = 0; j < pairs.length; j++, i += 2) {
      const word = pairs[j]!;
      out[i] = table[word & 0xffff]!; // little-endian: the first element is the low half
      out[i + 1] = table[word >>> 16]!;
    }
  }
  for (; i < src.length; i++) out[i] = table[src[i]!]!;
}

/** Converts bfloat16 bit patterns to float32. */
export function bf16ToF32Array(src: Uint16Array, dst: Float32Array, dstOffset = 0): void {
  checkRoom(src.length, dst.length, dstOffset);
  const out = new Uint32Array(dst.buffer, dst.byteOffset + dstOffset * 4, src.length);
  let i = 0;
  if (HOST_IS_LITTLE_ENDIAN && src.byteOffset % 4 === 0) {
    const pairs = new Uint32Array(src.buffer, src.byteOffset, src.length >>> 1);
    for (let j = 0; j < pairs.length; j++, i += 2) {
      const word = pairs[j]!;
      out[i] = word << 16;
      out[i + 1] = word & 0xffff0000;
    }
  }
  for (; i < src.length; i++) out[i] = src[i]! << 16;
}

/** Converts FP8 (E4M3 or E5M2) bytes to float32. */
export function f8ToF32Array(kind: 'F8_E4M3' | 'F8_E5M2', src: Uint8Array, dst: Float32Array, dstOffset = 0): void {
  checkRoom(src.length, dst.length, dstOffset);
  let table: Float32Array;
  if (kind === 'F8_E4M3') {
    table = f8e4m3Table ??= Float32Array.from({ length: 256 }, (_, b) => f8e4m3ToF32(b));
  } else {
    table = f8e5m2Table ??= Float32Array.from({ length: 256 }, (_, b) => f8e5m2ToF32(b));
  }
  for (let i = 0; i < src.length; i++) dst[dstOffset + i] = table[src[i]!]!;
}

/** Converts float32 values to float16 bits (round-to-nearest-even) into `dst`. */
export function f32ToF16Array(src: Float32Array, dst: Uint16Array, dstOffset = 0): void {
  checkRoom(src.length, dst.length, dstOffset);
  const bits = new Uint32Array(src.buffer, src.byteOffset, src.length);
  for (let i = 0; i < bits.length; i++) dst[dstOffset + i] = f32BitsToF16Bits(bits[i]!);
}

/** Converts float32 values to bfloat16 bits (round-to-nearest-even) into `dst`. */
export function f32ToBf16Array(src: Float32Array, dst: Uint16Array, dstOffset = 0): void {
  checkRoom(src.length, dst.length, dstOffset);
  const bits = new Uint32Array(src.buffer, src.byteOffset, src.length);
  for (let i = 0; i < bits.length; i++) dst[dstOffset + i] = f32BitsToBf16Bits(bits[i]!);
}

function checkRoom(count: number, dstLength: number, dstOffset: number): void {
  if (!Number.isInteger(dstOffset) || dstOffset < 0 || dstOffset + count > dstLength) {
    throw new RangeError(`conversion of ${count} elements at offset ${dstOffset} overruns a destination of ${dstLength}`);
  }
}

/** Scalar float32 → float16 → float32 round trip helper for tests and callers with plain numbers. */
export function roundToF16(value: number): number {
  return f32BitsToF32(f16BitsToF32Bits(f32BitsToF16Bits(f32Bits(value))));
}

/** float32 bit pattern of a number (after rounding it to float32). */
export function f32Bits(value: number): number {
  scratchF32[0] = value;
  return scratchU32[0]!;
}

/** float32 value of a bit pattern. */
export function f32BitsToF32(bits: number): number {
  scratchU32[0] = bits >>> 0;
  return scratchF32[0]!;
}

const scratchF32 = new Float32Array(1);
const scratchU32 = new Uint32Array(scratchF32.buffer);
