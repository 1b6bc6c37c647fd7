/**
 * CRC-32C (Castagnoli), as used by TFRecord framing.
 *
 * Reflected polynomial 0x82F63B78 (= bit-reversed 0x1EDC6F41), initial value 0xFFFFFFFF, final
 * XOR 0xFFFFFFFF (RFC 3720 §12.1 / appendix B.4). Slice-by-one table: event records are small,
 * and the writer checksums each one once.
 */

const POLY_REFLECTED = 0x82f63b78;

const TABLE: Uint32Array = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ POLY_REFLECTED : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

/** CRC-32C of `bytes` as an unsigned 32-bit integer. */
export function crc32c(bytes: Uint8Array): number {
  let crc = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) {
    crc = TABLE[(crc ^ bytes[i]!) & 0xff]! ^ (crc >>> 8);
  }
  return (crc ^ 0xffffffff) >>> 0;
}

// TFRecord's mask (tensorflow/core/lib/hash/crc32c.h): rotate right by 15 bits and add a
// constant, so that a CRC computed over data that itself contains embedded CRCs stays useful.
const MASK_DELTA = 0xa282ead8;

/** TFRecord's masked CRC-32C: ((crc >>> 15) | (crc << 17)) + 0xa282ead8, mod 2^32. */
export function maskedCrc32c(bytes: Uint8Array): number {
  const crc = crc32c(bytes);
  return ((((crc >>> 15) | (crc << 17)) >>> 0) + MASK_DELTA) >>> 0;
}

/** Inverse of the TFRecord mask, for readers that want the raw CRC back. */
export function unmaskCrc32c(masked: number): number {
  const rot = (masked - MASK_DELTA) >>> 0;
  return ((rot >>> 17) | (rot << 15)) >>> 0;
}
