/** CRC-32C against the published vectors of RFC 3720 appendix B.4 and the usual check value. */
import { describe, expect, it } from 'vitest';

import { crc32c, maskedCrc32c, unmaskCrc32c } from '../../src/train/crc32c.js';

describe('crc32c', () => {
  it('RFC 3720 B.4 vectors', () => {
    expect(crc32c(new Uint8Array(32))).toBe(0x8a9136aa);
    expect(crc32c(new Uint8Array(32).fill(0xff))).toBe(0x62a8ab43);
    expect(crc32c(Uint8Array.from({ length: 32 }, (_, i) => i))).toBe(0x46dd794e);
    expect(crc32c(Uint8Array.from({ length: 32 }, (_, i) => 31 - i))).toBe(0x113fdb5c);
    // "An iSCSI - SCSI Read (10) Command PDU" (48 bytes).
    const pdu = Uint8Array.from([
      0x01, 0xc0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x14, 0x00,
      0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x14, 0x00, 0x00, 0x00, 0x18, 0x28, 0x00, 0x00, 0x00,
      0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ]);
    expect(crc32c(pdu)).toBe(0xd9963a56);
  });

  it('check value of "123456789" and the empty input', () => {
    expect(crc32c(new TextEncoder().encode('123456789'))).toBe(0xe3069283);
    expect(crc32c(new Uint8Array(0))).toBe(0);
  });

  it("TFRecord mask: rotate right 15, add 0xa282ead8 (and it round-trips, as tensorflow's crc32c_test checks)", () => {
    // 0x8a9136aa rotated right by 15 = 0x6d55_1522 (low 15 bits 0x36aa move to the top);
    // + 0xa282ead8 = 0x1_0fd7_fffa → 0x0fd7fffa mod 2³².
    expect(maskedCrc32c(new Uint8Array(32))).toBe(0x0fd7fffa);
    const crc = crc32c(new TextEncoder().encode('foo'));
    const masked = maskedCrc32c(new TextEncoder().encode('foo'));
    expect(masked).not.toBe(crc);
    expect(unmaskCrc32c(masked)).toBe(crc);
  });
});
