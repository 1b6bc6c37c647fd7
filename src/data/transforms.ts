/**
 * Pixel transforms after decoding: resize so the image covers the target, crop, flip, and
 * scale to the SD input range.
 *
 * Resampling reproduces Pillow's `Image.resize(..., BILINEAR)`, which is what diffusers' training
 * scripts get from `transforms.Resize(size, interpolation=BILINEAR)` on PIL images: a separable
 * triangle filter whose support widens with the reduction factor (an antialiased bilinear),
 * pixel centres at (i + 0.5), coefficients normalised per output pixel (so edges renormalise
 * rather than replicate), 22-bit fixed-point weights, horizontal pass first with an 8-bit
 * intermediate. It is done here rather than by libvips because sharp's `kernel: 'linear'` matches
 * Pillow only up to a reduction of about 8×: beyond that libvips box-shrinks first (measured: a
 * 512→16 step edge gives 26/205 against Pillow's 21/210, and fine texture aliases), and its
 * upsampling is shifted by a quarter of a source pixel.
 */

/** An 8-bit interleaved RGB image. */
export interface RgbImage {
  readonly width: number;
  readonly height: number;
  /** width × height × 3 bytes, row-major, RGB interleaved. */
  readonly data: Uint8Array;
}

/** A crop window in the coordinates of the resized image, plus that image's size. */
export interface CropBox {
  readonly resizedWidth: number;
  readonly resizedHeight: number;
  readonly left: number;
  readonly top: number;
  readonly width: number;
  readonly height: number;
}

/**
 * Size after resizing (w, h) to cover (targetWidth, targetHeight) with the aspect kept: the side
 * that constrains gets exactly its target, the other is truncated like torchvision's `Resize(int)`
 * (`int(size * long / short)`) but never below its target.
 */
export function coverSize(width: number, height: number, targetWidth: number, targetHeight: number): { width: number; height: number } {
  // Compare targetWidth/width with targetHeight/height without division, so ties are exact.
  if (targetWidth * height >= targetHeight * width) {
    return { width: targetWidth, height: Math.max(targetHeight, Math.floor((targetWidth * height) / width)) };
  }
  return { width: Math.max(targetWidth, Math.floor((targetHeight * width) / height)), height: targetHeight };
}

/** True when covering the target needs the image to be enlarged on some side. */
export function needsUpscale(width: number, height: number, targetWidth: number, targetHeight: number): boolean {
  return width < targetWidth || height < targetHeight;
}

// Python's round(): halves go to the even neighbour, as in torchvision's CenterCrop offsets.
function roundHalfEven(x: number): number {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** torchvision `CenterCrop`: offsets `round((resized − target) / 2)` with Python's rounding. */
export function centerCropBox(resizedWidth: number, resizedHeight: number, width: number, height: number): CropBox {
  checkCrop(resizedWidth, resizedHeight, width, height);
  return {
    resizedWidth,
    resizedHeight,
    left: roundHalfEven((resizedWidth - width) / 2),
    top: roundHalfEven((resizedHeight - height) / 2),
    width,
    height,
  };
}

/** torchvision `RandomCrop`: top and left uniform over every position where the window fits. */
export function randomCropBox(
  resizedWidth: number,
  resizedHeight: number,
  width: number,
  height: number,
  uniformInt: (n: number) => number,
): CropBox {
  checkCrop(resizedWidth, resizedHeight, width, height);
  const top = uniformInt(resizedHeight - height + 1);
  const left = uniformInt(resizedWidth - width + 1);
  return { resizedWidth, resizedHeight, left, top, width, height };
}

function checkCrop(resizedWidth: number, resizedHeight: number, width: number, height: number): void {
  if (width > resizedWidth || height > resizedHeight) {
    throw new Error(`crop ${width}×${height}: expected it to fit in the resized ${resizedWidth}×${resizedHeight} image`);
  }
}

const PRECISION_BITS = 22; // Pillow's 8-bit resampling precision: 32 − 8 − 2
const ONE = 2 ** PRECISION_BITS;
const HALF = 2 ** (PRECISION_BITS - 1);

interface Coefficients {
  /** First source index of each output pixel. */
  readonly first: Int32Array;
  /** Number of taps of each output pixel. */
  readonly count: Int32Array;
  /** Fixed-point weights, `stride` slots per output pixel. */
  readonly weights: Float64Array;
  readonly stride: number;
}

// Triangle filter with support 1 (Pillow's bilinear), widened by the reduction factor.
function triangleCoefficients(inSize: number, outSize: number): Coefficients {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1);
  const support = filterScale;
  const stride = Math.ceil(support) * 2 + 1;
  const first = new Int32Array(outSize);
  const count = new Int32Array(outSize);
  const weights = new Float64Array(outSize * stride);
  const raw = new Float64Array(stride);
  for (let x = 0; x < outSize; x++) {
    const center = (x + 0.5) * scale;
    const lo = Math.max(0, Math.trunc(center - support + 0.5));
    const hi = Math.min(inSize, Math.trunc(center + support + 0.5));
    const n = hi - lo;
    let total = 0;
    for (let i = 0; i < n; i++) {
      const w = Math.max(0, 1 - Math.abs((i + lo - center + 0.5) / filterScale));
      raw[i] = w;
      total += w;
    }
    for (let i = 0; i < n; i++) {
      const k = total === 0 ? 0 : raw[i]! / total;
      // Pillow rounds half away from zero when converting to fixed point.
      weights[x * stride + i] = k < 0 ? Math.trunc(-0.5 + k * ONE) : Math.trunc(0.5 + k * ONE);
    }
    first[x] = lo;
    count[x] = n;
  }
  return { first, count, weights, stride };
}

function clampByte(acc: number): number {
  const v = Math.floor(acc / ONE);
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

function resizeHorizontal(src: RgbImage, outWidth: number): RgbImage {
  const { width, height, data } = src;
  const c = triangleCoefficients(width, outWidth);
  const out = new Uint8Array(outWidth * height * 3);
  for (let y = 0; y < height; y++) {
    const row = y * width * 3;
    const outRow = y * outWidth * 3;
    for (let x = 0; x < outWidth; x++) {
      const lo = c.first[x]!;
      const n = c.count[x]!;
      const wBase = x * c.stride;
      let r = HALF;
      let g = HALF;
      let b = HALF;
      for (let i = 0; i < n; i++) {
        const k = c.weights[wBase + i]!;
        const p = row + (lo + i) * 3;
        r += data[p]! * k;
        g += data[p + 1]! * k;
        b += data[p + 2]! * k;
      }
      const o = outRow + x * 3;
      out[o] = clampByte(r);
      out[o + 1] = clampByte(g);
      out[o + 2] = clampByte(b);
    }
  }
  return { width: outWidth, height, data: out };
}

function resizeVertical(src: RgbImage, outHeight: number): RgbImage {
  const { width, height, data } = src;
  const c = triangleCoefficients(height, outHeight);
  const rowBytes = width * 3;
  const out = new Uint8Array(rowBytes * outHeight);
  const acc = new Float64Array(rowBytes);
  for (let y = 0; y < outHeight; y++) {
    const lo = c.first[y]!;
    const n = c.count[y]!;
    const wBase = y * c.stride;
    acc.fill(HALF);
    // Row-at-a-time accumulation walks memory sequentially instead of striding down columns.
    for (let i = 0; i < n; i++) {
      const k = c.weights[wBase + i]!;
      const srcRow = (lo + i) * rowBytes;
      for (let j = 0; j < rowBytes; j++) acc[j]! += data[srcRow + j]! * k;
    }
    const outRow = y * rowBytes;
    for (let j = 0; j < rowBytes; j++) out[outRow + j] = clampByte(acc[j]!);
  }
  return { width, height: outHeight, data: out };
}

/** Pillow-equivalent BILINEAR resize (antialiased triangle filter) of an RGB image. */
export function resizeBilinear(src: RgbImage, outWidth: number, outHeight: number): RgbImage {
  if (!(Number.isInteger(outWidth) && Number.isInteger(outHeight) && outWidth > 0 && outHeight > 0)) {
    throw new Error(`resize: expected a positive integer size, found ${outWidth}×${outHeight}`);
  }
  if (src.data.length !== src.width * src.height * 3) {
    throw new Error(`resize: expected ${src.width}×${src.height}×3 bytes, found ${src.data.length}`);
  }
  let image = src;
  if (outWidth !== image.width) image = resizeHorizontal(image, outWidth);
  if (outHeight !== image.height) image = resizeVertical(image, outHeight);
  return image;
}

// x / 127.5 − 1 for every byte, computed in double and rounded once to float32.
const TO_UNIT = (() => {
  const table = new Float32Array(256);
  for (let v = 0; v < 256; v++) table[v] = v / 127.5 - 1;
  return table;
})();

/**
 * Crops `box` out of the resized image, mirrors it left–right if `flip`, and writes it as
 * float32 NHWC [box.height, box.width, 3] in [−1, 1] (x / 127.5 − 1) into `out` at `offset`.
 */
export function cropFlipToUnit(image: RgbImage, box: CropBox, flip: boolean, out: Float32Array, offset = 0): void {
  if (image.width !== box.resizedWidth || image.height !== box.resizedHeight) {
    throw new Error(`crop: expected a ${box.resizedWidth}×${box.resizedHeight} image, found ${image.width}×${image.height}`);
  }
  if (box.left < 0 || box.top < 0 || box.left + box.width > image.width || box.top + box.height > image.height) {
    throw new Error(`crop: window ${box.width}×${box.height} at (${box.left}, ${box.top}) lies outside the ${image.width}×${image.height} image`);
  }
  if (offset + box.width * box.height * 3 > out.length) {
    throw new Error(`crop: output has room for ${out.length - offset} values, expected ${box.width * box.height * 3}`);
  }
  const { data } = image;
  for (let y = 0; y < box.height; y++) {
    const srcRow = ((box.top + y) * image.width + box.left) * 3;
    const dstRow = offset + y * box.width * 3;
    for (let x = 0; x < box.width; x++) {
      const s = srcRow + (flip ? box.width - 1 - x : x) * 3;
      const d = dstRow + x * 3;
      out[d] = TO_UNIT[data[s]!]!;
      out[d + 1] = TO_UNIT[data[s + 1]!]!;
      out[d + 2] = TO_UNIT[data[s + 2]!]!;
    }
  }
}
