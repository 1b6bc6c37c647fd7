/**
 * Counter-based seeded randomness for the data pipeline.
 *
 * Every random decision (epoch order, crop, flip, template, caption shuffle and dropout) draws
 * from its own generator keyed by (seed, stream, epoch, position), never from a shared running
 * state: a resumed run reaches sample k of epoch e without replaying samples 0…k−1, and turning
 * one augmentation on or off does not change the draws of another.
 *
 * The generator is xoshiro128** (Blackman & Vigna 2018) with its 128-bit state filled from the
 * key by the MurmurHash3 32-bit finaliser, so neighbouring keys give unrelated streams.
 */

/** Stream identifiers: one per kind of decision, so each is independent of the others. */
export const STREAM = {
  order: 1,
  crop: 2,
  flip: 3,
  template: 4,
  captionDropout: 5,
  captionShuffle: 6,
} as const;

// MurmurHash3's fmix32: a bijective avalanche on 32 bits.
function fmix32(h: number): number {
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

function rotl(x: number, k: number): number {
  return ((x << k) | (x >>> (32 - k))) >>> 0;
}

/** A seeded generator of 32-bit words, uniform integers and shuffles. */
export class SeededRandom {
  private s0: number;
  private s1: number;
  private s2: number;
  private s3: number;

  /** `key` is any list of safe integers, e.g. (seed, stream, epoch, position). */
  constructor(...key: readonly number[]) {
    // Fold the key into one 32-bit accumulator per state word; the golden-ratio increments keep
    // the four words different even for an all-zero key (xoshiro must not start at all zeros).
    const words: number[] = [];
    for (const k of key) {
      if (!Number.isSafeInteger(k)) throw new Error(`random key: expected safe integers, found ${k}`);
      words.push(k >>> 0, Math.floor(k / 0x1_0000_0000) >>> 0);
    }
    const state = [0, 0, 0, 0];
    for (let lane = 0; lane < 4; lane++) {
      let h = fmix32((0x9e3779b9 * (lane + 1)) >>> 0);
      for (const w of words) h = fmix32((h ^ fmix32((w + Math.imul(lane + 1, 0x7f4a7c15)) >>> 0)) + 0x9e3779b9);
      state[lane] = h;
    }
    this.s0 = state[0]!;
    this.s1 = state[1]!;
    this.s2 = state[2]!;
    this.s3 = state[3]!;
    if ((this.s0 | this.s1 | this.s2 | this.s3) === 0) this.s0 = 1;
  }

  /** The next uniform 32-bit word. */
  nextUint32(): number {
    const result = Math.imul(rotl(Math.imul(this.s1, 5) >>> 0, 7), 9) >>> 0;
    const t = (this.s1 << 9) >>> 0;
    this.s2 ^= this.s0;
    this.s3 ^= this.s1;
    this.s1 ^= this.s2;
    this.s0 ^= this.s3;
    this.s2 ^= t;
    this.s3 = rotl(this.s3, 11);
    this.s0 >>>= 0;
    this.s1 >>>= 0;
    this.s2 >>>= 0;
    return result;
  }

  /** A uniform float in [0, 1) with 32 bits of resolution. */
  nextFloat(): number {
    return this.nextUint32() / 0x1_0000_0000;
  }

  /** A uniform integer in [0, n); rejection sampling keeps it unbiased for any n ≤ 2³². */
  uniformInt(n: number): number {
    if (!Number.isInteger(n) || n <= 0 || n > 0x1_0000_0000) throw new Error(`uniformInt: expected 1 ≤ n ≤ 2^32, found ${n}`);
    const limit = 0x1_0000_0000 - (0x1_0000_0000 % n);
    for (;;) {
      const r = this.nextUint32();
      if (r < limit) return r % n;
    }
  }

  /** Shuffles `items` in place (Fisher–Yates) and returns it. */
  shuffle<E, A extends { length: number; [i: number]: E }>(items: A): A {
    for (let i = items.length - 1; i > 0; i--) {
      const j = this.uniformInt(i + 1);
      const tmp = items[i]!;
      items[i] = items[j]!;
      items[j] = tmp;
    }
    return items;
  }
}
