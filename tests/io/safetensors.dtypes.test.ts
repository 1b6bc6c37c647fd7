// Bit-exact float16 / bfloat16 / FP8 conversions, checked against hand-known patterns and against
// independent reference roundings (nearest representable value, ties to even).
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';

import {
  bf16BitsToF32Bits,
  bf16ToF32Array,
  f16BitsToF32Bits,
  f16ToF32Array,
  f32Bits,
  f32BitsToBf16Bits,
  f32BitsToF16Bits,
  f32BitsToF32,
  f32ToBf16Array,
  f32ToF16Array,
  f8e4m3ToF32,
  f8e5m2ToF32,
  f8ToF32Array,
} from '../../src/io/dtypes.js';

const halfToNumber = (h: number): number => f32BitsToF32(f16BitsToF32Bits(h));
const bf16ToNumber = (b: number): number => f32BitsToF32(bf16BitsToF32Bits(b));
const toHalf = (x: number): number => f32BitsToF16Bits(f32Bits(x));
const toBf16 = (x: number): number => f32BitsToBf16Bits(f32Bits(x));

// Independent definition of binary16 values, straight from IEEE 754.
function referenceHalfValue(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exponent = (h >> 10) & 0x1f;
  const mantissa = h & 0x3ff;
  if (exponent === 0x1f) return mantissa === 0 ? sign * Infinity : NaN;
  if (exponent === 0) return sign * mantissa * 2 ** -24;
  return sign * (1024 + mantissa) * 2 ** (exponent - 25);
}

// Nearest half to a finite float by search; 0x7c00 stands for 2^16 when rounding, so that values
// from 65520 up (the midpoint between 65504 and 2^16) round to infinity with ties to even.
function referenceToHalf(x: number): number {
  const sign = x < 0 || Object.is(x, -0) ? 0x8000 : 0;
  const magnitude = Math.abs(x);
  const value = (h: number): number => (h === 0x7c00 ? 65536 : referenceHalfValue(h));
  let lo = 0;
  let hi = 0x7c00;
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1;
    if (value(mid) <= magnitude) lo = mid;
    else hi = mid;
  }
  if (magnitude >= 65536) return sign | 0x7c00;
  const below = magnitude - value(lo);
  const above = value(hi) - magnitude;
  const pick = below < above ? lo : above < below ? hi : lo % 2 === 0 ? lo : hi;
  return sign | pick;
}

// Nearest bfloat16: the two candidates are the truncation and the next pattern up.
function referenceToBf16(bits: number): number {
  const truncated = bits >>> 16;
  const sign = truncated & 0x8000;
  const magnitudeBits = truncated & 0x7fff;
  const x = Math.abs(f32BitsToF32(bits));
  const low = Math.abs(bf16ToNumber(magnitudeBits));
  const high = magnitudeBits + 1 === 0x7f80 ? 2 ** 128 : Math.abs(bf16ToNumber(magnitudeBits + 1));
  const below = x - low;
  const above = high - x;
  const pick = below < above ? magnitudeBits : above < below ? magnitudeBits + 1 : magnitudeBits % 2 === 0 ? magnitudeBits : magnitudeBits + 1;
  return sign | pick;
}

const nextUp = (x: number): number => f32BitsToF32(f32Bits(x) + 1); // positive finite x only
const nextDown = (x: number): number => f32BitsToF32(f32Bits(x) - 1);

describe('float16 → float32', () => {
  it.each([
    [0x3c00, 1],
    [0xc000, -2],
    [0x0001, 2 ** -24],
    [0x03ff, 1023 * 2 ** -24],
    [0x0400, 2 ** -14],
    [0x7bff, 65504],
    [0xfbff, -65504],
    [0x3555, 0.333251953125],
    [0x7c00, Infinity],
    [0xfc00, -Infinity],
    [0x0000, 0],
  ])('pattern %i is exactly %s', (bits, value) => {
    expect(halfToNumber(bits)).toBe(value);
  });

  it('keeps the sign of zero', () => {
    expect(Object.is(halfToNumber(0x8000), -0)).toBe(true);
  });

  it('maps NaN patterns to NaN, keeping sign and payload bits', () => {
    expect(halfToNumber(0x7e00)).toBeNaN();
    expect(halfToNumber(0x7c01)).toBeNaN();
    expect(f16BitsToF32Bits(0xfe01)).toBe(0xffc02000);
  });

  it('agrees with the IEEE definition on all 65536 patterns, and the array path agrees with the scalar one', () => {
    const all = Uint16Array.from({ length: 65536 }, (_, i) => i);
    const out = new Float32Array(65536);
    f16ToF32Array(all, out);
    for (let h = 0; h < 65536; h++) {
      const expected = Math.fround(referenceHalfValue(h));
      if (Number.isNaN(expected)) expect(out[h]).toBeNaN();
      else if (out[h] !== expected || Object.is(out[h], -0) !== Object.is(expected, -0)) throw new Error(`0x${h.toString(16)}: ${out[h]} vs ${expected}`);
    }
  });
});

describe('array conversions at any alignment and length', () => {
  it.each([
    [0, 7, 0],
    [1, 8, 3],
    [1, 1, 0],
    [2, 0, 1],
    [3, 13, 5],
  ])('source offset %i, length %i, destination offset %i', (srcOffset, length, dstOffset) => {
    const backing = Uint16Array.from({ length: 32 }, (_, i) => (i * 0x9e37 + 0x3c00) & 0xffff);
    const src = backing.subarray(srcOffset, srcOffset + length);
    for (const [convert, scalar] of [
      [f16ToF32Array, f16BitsToF32Bits],
      [bf16ToF32Array, bf16BitsToF32Bits],
    ] as const) {
      const out = new Float32Array(dstOffset + length + 2).fill(99);
      convert(src, out, dstOffset);
      const bits = new Uint32Array(out.buffer);
      for (let i = 0; i < length; i++) expect(bits[dstOffset + i]).toBe(scalar(src[i]!));
      expect(out[dstOffset + length]).toBe(99);
      if (dstOffset > 0) expect(out[dstOffset - 1]).toBe(99);
    }
  });

  it('refuses to write past the destination', () => {
    expect(() => f16ToF32Array(new Uint16Array(4), new Float32Array(4), 1)).toThrow(RangeError);
  });
});

describe('float32 → float16 (round to nearest, ties to even)', () => {
  it.each([
    ['1', 1, 0x3c00],
    ['-2', -2, 0xc000],
    ['65504 (max)', 65504, 0x7bff],
    ['just below the overflow midpoint', nextDown(65520), 0x7bff],
    ['the overflow midpoint 65520 → inf (tie to even)', 65520, 0x7c00],
    ['1e6 → inf', 1e6, 0x7c00],
    ['-1e6 → -inf', -1e6, 0xfc00],
    ['1 + 2^-11: tie → 1 (even)', 1 + 2 ** -11, 0x3c00],
    ['1 + 3·2^-11: tie → 1 + 2^-9 (even)', 1 + 3 * 2 ** -11, 0x3c02],
    ['just above the tie rounds up', 1 + 2 ** -11 + 2 ** -23, 0x3c01],
    ['2^-24 (smallest subnormal)', 2 ** -24, 0x0001],
    ['2^-25: tie → 0 (even)', 2 ** -25, 0x0000],
    ['just above 2^-25 → smallest subnormal', nextUp(2 ** -25), 0x0001],
    ['3·2^-25: tie → 2·2^-24 (even)', 3 * 2 ** -25, 0x0002],
    ['largest subnormal + half ulp: tie → 2^-14 (even)', 1023.5 * 2 ** -24, 0x0400],
    ['1e-10 → 0', 1e-10, 0x0000],
    ['-1e-10 → -0', -1e-10, 0x8000],
    ['-0', -0, 0x8000],
    ['inf', Infinity, 0x7c00],
    ['-inf', -Infinity, 0xfc00],
    ['1/3', 1 / 3, 0x3555],
  ])('%s', (_label, value, bits) => {
    expect(toHalf(value)).toBe(bits);
  });

  it('keeps NaN a (quiet) NaN', () => {
    const h = toHalf(NaN);
    expect(h & 0x7c00).toBe(0x7c00);
    expect(h & 0x3ff).not.toBe(0);
    expect(f32BitsToF16Bits(0x7f800001) & 0x3ff).not.toBe(0); // signalling NaN with payload only in low bits
  });

  it('round-trips every non-NaN half exactly', () => {
    for (let h = 0; h < 65536; h++) {
      const back = f32BitsToF16Bits(f16BitsToF32Bits(h));
      const isNaN = (h & 0x7c00) === 0x7c00 && (h & 0x3ff) !== 0;
      if (isNaN ? (back & 0x7e00) !== 0x7e00 || (back & 0x8000) !== (h & 0x8000) : back !== h) {
        throw new Error(`0x${h.toString(16)} came back as 0x${back.toString(16)}`);
      }
    }
  });

  it('matches the reference at every midpoint between neighbouring halves and one ulp either side', () => {
    for (let h = 0; h < 0x7bff; h++) {
      const mid = (referenceHalfValue(h) + referenceHalfValue(h + 1)) / 2; // exact in float32
      for (const x of [mid, nextUp(mid), mid === 0 ? 0 : nextDown(mid)]) {
        for (const signed of [x, -x]) {
          const got = toHalf(signed);
          const want = referenceToHalf(Math.fround(signed));
          if (got !== want) throw new Error(`${signed}: got 0x${got.toString(16)}, want 0x${want.toString(16)}`);
        }
      }
    }
  });

  it('matches the reference on random float32 bit patterns', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 0xffffffff }), (bits) => {
        const x = f32BitsToF32(bits);
        fc.pre(!Number.isNaN(x));
        expect(f32BitsToF16Bits(bits)).toBe(referenceToHalf(x));
      }),
      { numRuns: 20_000 },
    );
  });

  it('array conversion equals the scalar one', () => {
    const values = Float32Array.from({ length: 4096 }, (_, i) => (i - 2048) * 17.37 + 1 / (i + 1));
    const out = new Uint16Array(4096);
    f32ToF16Array(values, out);
    values.forEach((v, i) => expect(out[i]).toBe(toHalf(v)));
  });
});

describe('bfloat16', () => {
  it.each([
    [0x3f80, 1],
    [0xc000, -2],
    [0x7f80, Infinity],
    [0xff80, -Infinity],
    [0x0001, 2 ** -133],
    [0x7f7f, 3.3895313892515355e38],
  ])('pattern %i → %s', (bits, value) => {
    expect(bf16ToNumber(bits)).toBe(value);
  });

  it('keeps NaN', () => {
    expect(bf16ToNumber(0x7fc0)).toBeNaN();
    expect(toBf16(NaN) & 0x7fc0).toBe(0x7fc0);
    expect(f32BitsToBf16Bits(0x7f800001) & 0x7f).not.toBe(0); // sNaN must not become inf
  });

  it.each([
    ['1', 1, 0x3f80],
    ['1 + 2^-8: tie → 1 (even)', 1 + 2 ** -8, 0x3f80],
    ['1 + 3·2^-8: tie → 1 + 2^-6 (even)', 1 + 3 * 2 ** -8, 0x3f82],
    ['just above the tie', 1 + 2 ** -8 + 2 ** -23, 0x3f81],
    ['max float32 → inf', 3.4028234663852886e38, 0x7f80],
    ['-0', -0, 0x8000],
  ])('float32 → bfloat16: %s', (_label, value, bits) => {
    expect(toBf16(value)).toBe(bits);
  });

  it('round-trips every non-NaN pattern', () => {
    for (let b = 0; b < 65536; b++) {
      const isNaN = (b & 0x7f80) === 0x7f80 && (b & 0x7f) !== 0;
      if (!isNaN && f32BitsToBf16Bits(bf16BitsToF32Bits(b)) !== b) throw new Error(`0x${b.toString(16)}`);
    }
  });

  it('matches the reference on random float32 bit patterns', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 0xffffffff }), (bits) => {
        fc.pre(!Number.isNaN(f32BitsToF32(bits)));
        expect(f32BitsToBf16Bits(bits)).toBe(referenceToBf16(bits));
      }),
      { numRuns: 20_000 },
    );
  });

  it('array conversions equal the scalar ones', () => {
    const values = Float32Array.from({ length: 1000 }, (_, i) => Math.sin(i) * 10 ** (i % 20 - 10));
    const bits = new Uint16Array(1000);
    f32ToBf16Array(values, bits);
    const back = new Float32Array(1000);
    bf16ToF32Array(bits, back);
    values.forEach((v, i) => {
      expect(bits[i]).toBe(toBf16(v));
      expect(back[i]).toBe(bf16ToNumber(toBf16(v)));
    });
  });
});

describe('FP8', () => {
  it.each([
    [0x38, 1],
    [0xb8, -1],
    [0x7e, 448],
    [0x01, 2 ** -9],
    [0x08, 2 ** -6],
    [0x00, 0],
  ])('E4M3 byte %i → %s', (byte, value) => {
    expect(f8e4m3ToF32(byte)).toBe(value);
  });

  it('E4M3 has NaN only at S.1111.111 and no infinities', () => {
    expect(f8e4m3ToF32(0x7f)).toBeNaN();
    expect(f8e4m3ToF32(0xff)).toBeNaN();
    expect(f8e4m3ToF32(0x78)).toBe(256);
    expect(Object.is(f8e4m3ToF32(0x80), -0)).toBe(true);
  });

  it.each([
    [0x3c, 1],
    [0x7b, 57344],
    [0x7c, Infinity],
    [0xfc, -Infinity],
    [0x01, 2 ** -16],
    [0x04, 2 ** -14],
  ])('E5M2 byte %i → %s', (byte, value) => {
    expect(f8e5m2ToF32(byte)).toBe(value);
  });

  it('E5M2 NaNs, and the array path', () => {
    expect(f8e5m2ToF32(0x7d)).toBeNaN();
    const out = new Float32Array(3);
    f8ToF32Array('F8_E5M2', new Uint8Array([0x3c, 0x7b, 0xc0]), out);
    expect([...out]).toEqual([1, 57344, -2]);
    f8ToF32Array('F8_E4M3', new Uint8Array([0x38, 0x7e, 0xc0]), out);
    expect([...out]).toEqual([1, 448, -2]);
  });
});
