import sharp from 'sharp';
import { describe, expect, it } from 'vitest';
import { addPngText, crc32, formatParameters, parseParameters, readPngText } from '../../src/io/png-text.js';

async function tinyPng(): Promise<Uint8Array> {
  return new Uint8Array(await sharp({ create: { width: 4, height: 3, channels: 3, background: '#ff0000' } }).png().toBuffer());
}

describe('PNG text chunks', () => {
  it('computes the standard CRC-32 check value', () => {
    expect(crc32(new TextEncoder().encode('123456789'))).toBe(0xcbf43926);
  });

  it('adds tEXt/iTXt chunks that sharp still decodes and that read back', async () => {
    const png = addPngText(await tinyPng(), { parameters: 'a cat\nSteps: 20', comment: 'ünïcødé ✓ 猫' });
    const meta = await sharp(png).metadata();
    expect([meta.width, meta.height]).toEqual([4, 3]);
    const { data } = await sharp(png).raw().toBuffer({ resolveWithObject: true });
    expect([...data.subarray(0, 3)]).toEqual([255, 0, 0]);
    expect(readPngText(png)).toEqual({ parameters: 'a cat\nSteps: 20', comment: 'ünïcødé ✓ 猫' });
  });

  it('rejects a file that is not a PNG', () => {
    expect(() => readPngText(new Uint8Array([1, 2, 3]))).toThrow(/not a PNG/);
  });
});

describe('A1111 parameters', () => {
  it("parses AUTOMATIC1111's own format", () => {
    // As written by A1111's create_infotext (prompt, negative prompt, settings line).
    const text =
      'masterpiece, a castle on a hill\nNegative prompt: blurry, lowres\n' +
      'Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234567, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly';
    const p = parseParameters(text);
    expect(p.prompt).toBe('masterpiece, a castle on a hill');
    expect(p.negativePrompt).toBe('blurry, lowres');
    expect(p.settings).toEqual({
      Steps: '20',
      Sampler: 'Euler a',
      'CFG scale': '7',
      Seed: '1234567',
      Size: '512x512',
      'Model hash': '6ce0161689',
      Model: 'v1-5-pruned-emaonly',
    });
  });

  it('round-trips prompts with commas, colons, quotes and several lines', () => {
    const p = {
      prompt: 'a photo: of "sks" dog,\nin the snow',
      negativePrompt: 'ugly, bad: hands',
      settings: { Steps: '10', Sampler: 'DDIM', 'CFG scale': '7.5', Seed: '0', Size: '32x32', Note: 'x, y: "z"' },
    };
    expect(parseParameters(formatParameters(p))).toEqual(p);
  });
});
