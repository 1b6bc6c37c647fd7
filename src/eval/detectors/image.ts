/**
 * Image arithmetic the detectors share: OpenCV-style bilinear resizing (what NudeNet's
 * `cv2.resize` / `cv2.dnn.blobFromImage` do), square padding, channel layouts, and OpenCV's
 * `NMSBoxes`. Written from the documented behaviour of those functions, not from their code.
 */
import sharp from 'sharp';

import type { Image8 } from '../../models/vae/vae.js';

/**
 * Bilinear resize of an interleaved HWC image with OpenCV's INTER_LINEAR geometry: half-pixel
 * centres (`src = (dst + 0.5)·scale − 0.5`), edge clamping, and no antialiasing when shrinking.
 * `scale` gives OpenCV's fx/fy (when the output size was derived from them) instead of the size
 * ratio. With `round8` the result is rounded and clamped to 0…255, as OpenCV returns 8-bit input;
 * OpenCV's 11-bit fixed-point weights are not reproduced, so such values can differ by one level.
 */
export function resizeBilinear(
  src: ArrayLike<number>,
  width: number,
  height: number,
  channels: number,
  outWidth: number,
  outHeight: number,
  round8 = false,
  scale?: { readonly x: number; readonly y: number },
): Float32Array {
  const out = new Float32Array(outWidth * outHeight * channels);
  // OpenCV maps with the given factors when called with fx/fy, else with the size ratio.
  const xs = axisTaps(width, outWidth, scale === undefined ? width / outWidth : 1 / scale.x);
  const ys = axisTaps(height, outHeight, scale === undefined ? height / outHeight : 1 / scale.y);
  for (let oy = 0; oy < outHeight; oy++) {
    const y0 = ys.i0[oy]!;
    const y1 = ys.i1[oy]!;
    const wy = ys.w[oy]!;
    for (let ox = 0; ox < outWidth; ox++) {
      const x0 = xs.i0[ox]!;
      const x1 = xs.i1[ox]!;
      const wx = xs.w[ox]!;
      const o = (oy * outWidth + ox) * channels;
      const a = (y0 * width + x0) * channels;
      const b = (y0 * width + x1) * channels;
      const c = (y1 * width + x0) * channels;
      const d = (y1 * width + x1) * channels;
      for (let k = 0; k < channels; k++) {
        const top = src[a + k]! + (src[b + k]! - src[a + k]!) * wx;
        const bottom = src[c + k]! + (src[d + k]! - src[c + k]!) * wx;
        const v = top + (bottom - top) * wy;
        out[o + k] = round8 ? Math.min(255, Math.max(0, Math.round(v))) : v;
      }
    }
  }
  return out;
}

// Source taps and the weight of the second tap for each output coordinate along one axis.
function axisTaps(size: number, outSize: number, scale: number): { i0: Int32Array; i1: Int32Array; w: Float64Array } {
  const i0 = new Int32Array(outSize);
  const i1 = new Int32Array(outSize);
  const w = new Float64Array(outSize);
  for (let o = 0; o < outSize; o++) {
    let s = (o + 0.5) * scale - 0.5;
    if (s < 0) s = 0;
    let f = Math.floor(s);
    let frac = s - f;
    if (f >= size - 1) {
      f = size - 1;
      frac = 0;
    }
    i0[o] = f;
    i1[o] = Math.min(f + 1, size - 1);
    w[o] = frac;
  }
  return { i0, i1, w };
}

/** The image padded with black on the right and bottom to a `side`×`side` square (side ≥ both sides). */
export function padBottomRight(image: Image8, side: number): Uint8Array {
  const c = image.channels;
  const out = new Uint8Array(side * side * c);
  for (let y = 0; y < image.height; y++) {
    out.set(image.data.subarray(y * image.width * c, (y + 1) * image.width * c), y * side * c);
  }
  return out;
}

/** HWC floats to CHW (one image, NCHW without the batch axis). */
export function hwcToChw(hwc: Float32Array, width: number, height: number, channels: number): Float32Array {
  const out = new Float32Array(hwc.length);
  const plane = width * height;
  for (let i = 0; i < plane; i++) for (let k = 0; k < channels; k++) out[k * plane + i] = hwc[i * channels + k]!;
  return out;
}

/** Reads an image file (PNG, JPEG, …) as 8-bit RGB: alpha dropped, EXIF orientation applied. */
export async function readImageRgb(file: string | Uint8Array): Promise<Image8> {
  const input = typeof file === 'string' ? file : Buffer.from(file.buffer, file.byteOffset, file.byteLength);
  const { data, info } = await sharp(input).rotate().removeAlpha().toColourspace('srgb').raw().toBuffer({ resolveWithObject: true });
  return { width: info.width, height: info.height, channels: 3, data: new Uint8Array(data.buffer, data.byteOffset, data.byteLength) };
}

/** An axis-aligned box [left, top, width, height]. */
export type Box = readonly [number, number, number, number];

// Intersection over union as OpenCV's rectOverlap computes it for Rect2d (two empty boxes overlap fully).
function overlap(a: Box, b: Box): number {
  const areaA = a[2] * a[3];
  const areaB = b[2] * b[3];
  if (areaA + areaB <= Number.EPSILON) return 1;
  const w = Math.min(a[0] + a[2], b[0] + b[2]) - Math.max(a[0], b[0]);
  const h = Math.min(a[1] + a[3], b[1] + b[3]) - Math.max(a[1], b[1]);
  const inter = w > 0 && h > 0 ? w * h : 0;
  return inter / (areaA + areaB - inter);
}

/**
 * Greedy non-maximum suppression with OpenCV `dnn.NMSBoxes` semantics: candidates scoring strictly
 * above `scoreThreshold`, visited by descending score (stable for ties), kept when their overlap
 * with every box kept so far is at most `iouThreshold`. Thresholds and overlaps compare in float32,
 * as OpenCV does. Returns the kept indices in visiting order.
 */
export function nmsBoxes(boxes: readonly Box[], scores: readonly number[], scoreThreshold: number, iouThreshold: number): number[] {
  const scoreT = Math.fround(scoreThreshold);
  const iouT = Math.fround(iouThreshold);
  const order = scores
    .map((s, i) => ({ s: Math.fround(s), i }))
    .filter((c) => c.s > scoreT)
    .sort((x, y) => y.s - x.s || x.i - y.i);
  const kept: number[] = [];
  for (const { i } of order) {
    if (kept.every((k) => Math.fround(overlap(boxes[i]!, boxes[k]!)) <= iouT)) kept.push(i);
  }
  return kept;
}
