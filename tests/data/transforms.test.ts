import { describe, expect, it } from 'vitest';

import {
  centerCropBox,
  coverSize,
  cropFlipToUnit,
  needsUpscale,
  randomCropBox,
  resizeBilinear,
  type RgbImage,
} from '../../src/data/transforms.js';

// A one-row grey image whose pixel x has value f(x).
function row(width: number, f: (x: number) => number): RgbImage {
  const data = new Uint8Array(width * 3);
  for (let x = 0; x < width; x++) data.fill(f(x), x * 3, x * 3 + 3);
  return { width, height: 1, data };
}

function red(image: RgbImage): number[] {
  return Array.from({ length: image.width * image.height }, (_, i) => image.data[i * 3]!);
}

describe('coverSize (torchvision Resize(int) semantics)', () => {
  it('sets the short side to the target and truncates the long side', () => {
    expect(coverSize(600, 400, 512, 512)).toEqual({ width: 768, height: 512 }); // 512·600/400 = 768
    expect(coverSize(451, 300, 512, 512)).toEqual({ width: 769, height: 512 }); // int(769.7)
    expect(coverSize(300, 451, 512, 512)).toEqual({ width: 512, height: 769 });
    expect(coverSize(1440, 1440, 32, 32)).toEqual({ width: 32, height: 32 });
  });

  it('covers a non-square target on both sides', () => {
    // 100×100 into 64×32: width constrains (64/100 > 32/100) → 64×64.
    expect(coverSize(100, 100, 64, 32)).toEqual({ width: 64, height: 64 });
    // 200×50 into 64×32: height constrains (32/50 > 64/200) → 128×32.
    expect(coverSize(200, 50, 64, 32)).toEqual({ width: 128, height: 32 });
  });

  it('flags images that would have to be enlarged', () => {
    expect(needsUpscale(511, 800, 512, 512)).toBe(true);
    expect(needsUpscale(512, 800, 512, 512)).toBe(false);
    expect(needsUpscale(100, 40, 64, 32)).toBe(false);
    expect(needsUpscale(100, 31, 64, 32)).toBe(true);
  });
});

describe('resizeBilinear (Pillow BILINEAR: antialiased triangle filter)', () => {
  it('keeps a solid colour exact at any scale', () => {
    const src: RgbImage = { width: 37, height: 23, data: new Uint8Array(37 * 23 * 3) };
    for (let i = 0; i < 37 * 23; i++) src.data.set([200, 17, 99], i * 3);
    for (const [w, h] of [[8, 5], [16, 16], [100, 61]] as const) {
      const out = resizeBilinear(src, w, h);
      for (let i = 0; i < w * h; i++) expect([...out.data.subarray(i * 3, i * 3 + 3)]).toEqual([200, 17, 99]);
    }
  });

  it('samples a ramp at the output pixel centres when halving', () => {
    // Output pixel j covers source centre 2j + 0.5; a ramp 4x gives 8j + 2 there (interior pixels:
    // the edge ones renormalise over a clipped window).
    const out = red(resizeBilinear(row(64, (x) => 4 * x), 32, 1));
    for (let j = 1; j < 31; j++) expect(out[j]).toBe(8 * j + 2);
  });

  it('widens the filter with the reduction factor (an 8× step edge spreads over two pixels)', () => {
    // Output 7 is centred at 59.5 with a triangle of half-width 8: the pixels ≥ 64 carry
    // (0.4375 + 0.3125 + 0.1875 + 0.0625) / 8 = 1/8 of the weight → 255/8 = 31.9 → 32; output 8 gets 7/8 → 223.
    const out = red(resizeBilinear(row(128, (x) => (x < 64 ? 0 : 255)), 16, 1));
    expect(out).toEqual([0, 0, 0, 0, 0, 0, 0, 32, 223, 255, 255, 255, 255, 255, 255, 255]);
  });

  it('interpolates between the two nearest pixels when enlarging, clamping at the borders', () => {
    // 16 → 32: output i samples source position i/2 − 0.25, so a ramp 16x gives 8i − 4.
    const out = red(resizeBilinear(row(16, (x) => 16 * x), 32, 1));
    expect(out[0]).toBe(0);
    for (let i = 1; i < 31; i++) expect(out[i]).toBe(8 * i - 4);
    expect(out[31]).toBe(240);
  });

  it('agrees within one level with the filter evaluated directly in float64 (noise, down and up)', () => {
    // Reference: the 2-D separable triangle sum in float64 with no fixed point and no 8-bit
    // intermediate; the fixed-point two-pass result may differ from it by one level at most.
    const width = 97;
    const height = 61;
    const src: RgbImage = { width, height, data: new Uint8Array(width * height * 3) };
    let state = 12345;
    for (let i = 0; i < src.data.length; i++) {
      state = (Math.imul(state, 1103515245) + 12345) >>> 0;
      src.data[i] = state >>> 24;
    }
    const weights = (inSize: number, outSize: number, o: number) => {
      const scale = inSize / outSize;
      const support = Math.max(scale, 1);
      const centre = (o + 0.5) * scale;
      const w = new Float64Array(inSize);
      for (let i = 0; i < inSize; i++) w[i] = Math.max(0, 1 - Math.abs(i + 0.5 - centre) / support);
      const total = w.reduce((a, b) => a + b, 0);
      return w.map((v) => v / total);
    };
    for (const [ow, oh] of [[23, 17], [150, 90], [40, 100]] as const) {
      const out = resizeBilinear(src, ow, oh);
      let worst = 0;
      for (let oy = 0; oy < oh; oy++) {
        const wy = weights(height, oh, oy);
        for (let ox = 0; ox < ow; ox++) {
          const wx = weights(width, ow, ox);
          for (let c = 0; c < 3; c++) {
            let v = 0;
            for (let y = 0; y < height; y++) {
              if (wy[y] === 0) continue;
              for (let x = 0; x < width; x++) if (wx[x] !== 0) v += wy[y]! * wx[x]! * src.data[(y * width + x) * 3 + c]!;
            }
            worst = Math.max(worst, Math.abs(out.data[(oy * ow + ox) * 3 + c]! - v));
          }
        }
      }
      expect(worst).toBeLessThanOrEqual(1.001);
    }
  });

  it('averages a fine pattern instead of aliasing it', () => {
    const out = red(resizeBilinear(row(64, (x) => (x % 2 === 0 ? 0 : 254)), 16, 1));
    for (let j = 1; j < 15; j++) expect(out[j]).toBe(127);
    // Output 0 (centre 2, half-width 4) is clipped to source pixels 0…5 with weights
    // 0.625, 0.875, 0.875, 0.625, 0.375, 0.125: the odd ones hold 1.625 of 3.5 → 254·1.625/3.5 = 117.9.
    expect(out[0]).toBe(118);
  });
});

describe('crop boxes (torchvision CenterCrop / RandomCrop)', () => {
  it('centres with Python rounding of the offset', () => {
    expect(centerCropBox(768, 512, 512, 512)).toMatchObject({ left: 128, top: 0 });
    expect(centerCropBox(513, 512, 512, 512)).toMatchObject({ left: 0 }); // round(0.5) = 0
    expect(centerCropBox(515, 512, 512, 512)).toMatchObject({ left: 2 }); // round(1.5) = 2
    expect(centerCropBox(512, 517, 512, 512)).toMatchObject({ top: 2 }); // round(2.5) = 2
  });

  it('draws random offsets over every position where the window fits', () => {
    const asked: number[] = [];
    const box = randomCropBox(100, 40, 32, 32, (n) => {
      asked.push(n);
      return n - 1;
    });
    expect(asked.sort((a, b) => a - b)).toEqual([9, 69]);
    expect(box).toMatchObject({ left: 68, top: 8, width: 32, height: 32 });
  });

  it('rejects a window larger than the image', () => {
    expect(() => centerCropBox(30, 40, 32, 32)).toThrow(/crop 32×32/);
  });
});

describe('cropFlipToUnit', () => {
  const image: RgbImage = { width: 4, height: 2, data: new Uint8Array([0, 0, 0, 51, 51, 51, 255, 0, 0, 128, 128, 128, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]) };
  const box = { resizedWidth: 4, resizedHeight: 2, left: 1, top: 0, width: 2, height: 2 };

  it('crops and scales by x / 127.5 − 1', () => {
    const out = new Float32Array(12);
    cropFlipToUnit(image, box, false, out);
    const unit = (v: number) => Math.fround(v / 127.5 - 1);
    expect([...out]).toEqual([51, 51, 51, 255, 0, 0, 4, 5, 6, 7, 8, 9].map(unit));
    expect(out[3]).toBe(1);
    expect(out[4]).toBe(-1);
  });

  it('mirrors left–right when flipped', () => {
    const out = new Float32Array(12);
    cropFlipToUnit(image, box, true, out);
    const unit = (v: number) => Math.fround(v / 127.5 - 1);
    expect([...out]).toEqual([255, 0, 0, 51, 51, 51, 7, 8, 9, 4, 5, 6].map(unit));
  });
});
