import { copyFile, mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { OBJECT_TEMPLATES } from '../../src/data/captions.js';
import { BadImageError, ImageFolderDataset, listImageFiles, scanImageFolder, type Batch } from '../../src/data/image-folder.js';

const IMAGES_CC0 = path.resolve(import.meta.dirname, '../../../shared/data/images_cc0');

type Rgb = readonly [number, number, number];
const RED: Rgb = [255, 0, 0];
const GREEN: Rgb = [0, 255, 0];
const BLUE: Rgb = [0, 0, 255];
const BLACK: Rgb = [0, 0, 0];
const unit = (v: number) => Math.fround(v / 127.5 - 1);

let root = '';
let folderCount = 0;

beforeAll(async () => {
  root = await mkdtemp(path.join(tmpdir(), 'sdwb-image-folder-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

async function folder(files: Record<string, Buffer | string>): Promise<string> {
  const dir = path.join(root, `d${folderCount++}`);
  await mkdir(dir, { recursive: true });
  for (const [name, content] of Object.entries(files)) {
    await mkdir(path.dirname(path.join(dir, name)), { recursive: true });
    await writeFile(path.join(dir, name), content);
  }
  return dir;
}

/** An RGB PNG where pixel (x, y) has colour f(x, y). */
async function png(width: number, height: number, f: (x: number, y: number) => Rgb): Promise<Buffer> {
  const data = Buffer.alloc(width * height * 3);
  for (let y = 0; y < height; y++) for (let x = 0; x < width; x++) data.set(f(x, y), (y * width + x) * 3);
  return sharp(data, { raw: { width, height, channels: 3 } }).png().toBuffer();
}

const solid = (width: number, height: number, c: Rgb) => png(width, height, () => c);

/** Pixel (x, y) of sample b of a batch, as [r, g, b] in [−1, 1]. */
function pixel(batch: Batch, b: number, x: number, y: number): number[] {
  const at = ((b * batch.height + y) * batch.width + x) * 3;
  return [...batch.pixels.subarray(at, at + 3)];
}

async function firstBatch(dataset: ImageFolderDataset, size = dataset.epochLength): Promise<Batch> {
  for await (const batch of dataset.batches(size)) return batch;
  throw new Error('no batch');
}

describe('decoding', () => {
  it('maps a solid colour exactly to x / 127.5 − 1 (pure red → (1, −1, −1))', async () => {
    const dir = await folder({ 'red.png': await solid(48, 48, RED), 'mixed.png': await solid(40, 40, [0, 128, 51]) });
    const dataset = await ImageFolderDataset.open({ dir, resolution: 32 }, { seed: 0 });
    expect(dataset.images.map((i) => i.relativePath)).toEqual(['mixed.png', 'red.png']);
    const batch = await firstBatch(dataset);
    expect(batch.pixels).toHaveLength(2 * 32 * 32 * 3);
    for (let b = 0; b < 2; b++) {
      const expected = batch.samples[b]!.image.relativePath === 'red.png' ? [1, -1, -1] : [-1, unit(128), unit(51)];
      for (let y = 0; y < 32; y++) for (let x = 0; x < 32; x++) expect(pixel(batch, b, x, y)).toEqual(expected);
    }
  });

  it('applies the EXIF orientation before resizing and cropping', async () => {
    // Stored 80×40 with a red marker in the stored top-left; orientation 6 (rotate 90° clockwise
    // to display) shows a 40×80 image with the marker top-right.
    const stored = Buffer.alloc(80 * 40 * 3);
    for (let y = 0; y < 20; y++) for (let x = 0; x < 20; x++) stored.set(RED, (y * 80 + x) * 3);
    const jpeg = await sharp(stored, { raw: { width: 80, height: 40, channels: 3 } })
      .jpeg({ quality: 100 })
      .withMetadata({ orientation: 6 })
      .toBuffer();
    expect((await sharp(jpeg).metadata()).orientation).toBe(6);
    const dir = await folder({ 'rotated.jpg': jpeg });
    // 32×64 covers the displayed 40×80 exactly (scale 0.8, no crop): the marker lands in x 16…32, y 0…16.
    const dataset = await ImageFolderDataset.open({ dir, resolution: 32, width: 32, height: 64 }, { seed: 0 });
    expect(dataset.images[0]).toMatchObject({ width: 40, height: 80 });
    const batch = await firstBatch(dataset);
    const near = (got: number[], want: Rgb) => got.forEach((v, i) => expect(Math.abs(v - unit(want[i]!))).toBeLessThan(0.1));
    near(pixel(batch, 0, 26, 6), RED); // top-right: the marker
    near(pixel(batch, 0, 5, 6), BLACK); // top-left
    near(pixel(batch, 0, 26, 58), BLACK); // bottom-right
    near(pixel(batch, 0, 5, 58), BLACK);
  });

  it('flattens transparency onto white by default, or onto the configured background', async () => {
    // Left half fully transparent red, right half opaque blue.
    const rgba = Buffer.alloc(64 * 64 * 4);
    for (let y = 0; y < 64; y++) for (let x = 0; x < 64; x++) rgba.set(x < 32 ? [255, 0, 0, 0] : [0, 0, 255, 255], (y * 64 + x) * 4);
    const dir = await folder({ 'alpha.png': await sharp(rgba, { raw: { width: 64, height: 64, channels: 4 } }).png().toBuffer() });
    const white = await firstBatch(await ImageFolderDataset.open({ dir, resolution: 32 }, { seed: 0 }));
    expect(pixel(white, 0, 4, 10)).toEqual([1, 1, 1]);
    expect(pixel(white, 0, 28, 10)).toEqual([-1, -1, 1]);
    const black = await firstBatch(await ImageFolderDataset.open({ dir, resolution: 32, background: '#000000' }, { seed: 0 }));
    expect(pixel(black, 0, 4, 10)).toEqual([-1, -1, -1]);
  });

  it('takes the first frame of animated GIF and WebP images', async () => {
    // Two 32×32 frames stacked: red, then blue.
    const frames = Buffer.alloc(32 * 64 * 4);
    for (let i = 0; i < 32 * 64; i++) frames.set(i < 32 * 32 ? [255, 0, 0, 255] : [0, 0, 255, 255], i * 4);
    const input = { raw: { width: 32, height: 64, channels: 4 as const, pageHeight: 32 } };
    const gif = await sharp(frames, input).gif().toBuffer();
    const webp = await sharp(frames, input).webp({ lossless: true }).toBuffer();
    expect((await sharp(gif).metadata()).pages).toBe(2);
    expect((await sharp(webp).metadata()).pages).toBe(2);
    const dir = await folder({ 'anim.gif': gif, 'anim.webp': webp });
    const batch = await firstBatch(await ImageFolderDataset.open({ dir, resolution: 32 }, { seed: 0 }));
    expect(batch.samples).toHaveLength(2);
    for (let b = 0; b < 2; b++) for (const [x, y] of [[0, 0], [16, 16], [31, 31]] as const) expect(pixel(batch, b, x, y)).toEqual([1, -1, -1]);
  });

  it('reduces 16-bit PNGs to 8 bits by value (65535 → 255, 32896 → 128) and flattens grey + alpha', async () => {
    const deep = new Uint16Array(32 * 32 * 3);
    for (let i = 0; i < deep.length; i += 3) deep.set([65535, 32896, 2570], i);
    const png16 = await sharp(deep, { raw: { width: 32, height: 32, channels: 3 } }).toColourspace('rgb16').png().toBuffer();
    expect((await sharp(png16).metadata()).depth).toBe('ushort');
    // Grey 100 at alpha 0 (→ white) on the left half, at alpha 255 on the right.
    const greyAlpha = Buffer.alloc(32 * 32 * 2);
    for (let i = 0; i < 32 * 32; i++) greyAlpha.set([100, i % 32 < 16 ? 0 : 255], i * 2);
    const la = await sharp(greyAlpha, { raw: { width: 32, height: 32, channels: 2 as 3 } }).png().toBuffer();
    const dir = await folder({ 'a-deep.png': png16, 'b-grey-alpha.png': la });
    const dataset = await ImageFolderDataset.open({ dir, resolution: 32 }, { seed: 0 });
    const batch = await firstBatch(dataset);
    const at = (name: string) => batch.samples.findIndex((s) => s.image.relativePath === name);
    expect(pixel(batch, at('a-deep.png'), 7, 7)).toEqual([1, unit(128), unit(10)]);
    expect(pixel(batch, at('b-grey-alpha.png'), 3, 3)).toEqual([1, 1, 1]);
    expect(pixel(batch, at('b-grey-alpha.png'), 28, 3)).toEqual([unit(100), unit(100), unit(100)]);
  });

  it('turns greyscale images into three equal channels, in range', async () => {
    const dir = await folder({});
    await copyFile(path.join(IMAGES_CC0, 'brick.png'), path.join(dir, 'brick.png'));
    const batch = await firstBatch(await ImageFolderDataset.open({ dir, resolution: 64 }, { seed: 0 }));
    let spread = 0;
    for (let i = 0; i < 64 * 64; i++) {
      const [r, g, b] = [batch.pixels[i * 3]!, batch.pixels[i * 3 + 1]!, batch.pixels[i * 3 + 2]!];
      expect(g).toBe(r);
      expect(b).toBe(r);
      expect(Math.abs(r)).toBeLessThanOrEqual(1);
      spread = Math.max(spread, Math.abs(r - batch.pixels[0]!));
    }
    expect(spread).toBeGreaterThan(0.2); // a real texture, not a flat fill
  });

  it('resizes real photos like libvips does at moderate factors (an independent bilinear)', async () => {
    // At small reductions libvips' linear kernel is the same antialiased triangle as Pillow's, so
    // sharp's own resize is an independent reference up to libvips' coarser (12-bit) weights.
    const dir = await folder({});
    for (const name of ['chelsea.png', 'coffee.png']) await copyFile(path.join(IMAGES_CC0, name), path.join(dir, name));
    const dataset = await ImageFolderDataset.open({ dir, resolution: 128 }, { seed: 0 });
    expect(dataset.images.map((i) => [i.relativePath, i.width, i.height])).toEqual([
      ['chelsea.png', 451, 300],
      ['coffee.png', 600, 400],
    ]);
    const batch = await firstBatch(dataset);
    for (let b = 0; b < 2; b++) {
      const sample = batch.samples[b]!;
      const { crop } = sample;
      const reference = await sharp(sample.image.path)
        .resize(crop.resizedWidth, crop.resizedHeight, { kernel: 'linear', fit: 'fill' })
        .extract({ left: crop.left, top: crop.top, width: 128, height: 128 })
        .removeAlpha()
        .raw()
        .toBuffer();
      let sum = 0;
      let worst = 0;
      for (let i = 0; i < reference.length; i++) {
        const diff = Math.abs((batch.pixels[b * reference.length + i]! + 1) * 127.5 - reference[i]!);
        sum += diff;
        worst = Math.max(worst, diff);
      }
      // Measured: mean 0.21 / 0.22 levels, worst 2 / 5.
      expect(sum / reference.length).toBeLessThan(0.35);
      expect(worst).toBeLessThanOrEqual(6);
    }
  });
});

describe('cropping and flipping', () => {
  // 96×32: with resolution 32 nothing is resized (the short side is already 32), so crops are exact.
  const gradient = () => png(96, 32, (x) => [2 * x, 255 - 2 * x, 7]);
  const leftOf = (batch: Batch, b: number) => (batch.pixels[((b * 32 + 0) * 32 + 0) * 3]! + 1) * 127.5 / 2;

  it('centre crop takes the middle (a centred marker stays centred)', async () => {
    const marker = await png(96, 32, (x) => (x >= 40 && x < 56 ? GREEN : RED));
    const batch = await firstBatch(await ImageFolderDataset.open({ dir: await folder({ 'm.png': marker }), resolution: 32 }, { seed: 0 }));
    expect(batch.samples[0]!.crop).toMatchObject({ left: 32, top: 0, resizedWidth: 96, resizedHeight: 32 });
    for (let y = 0; y < 32; y++) {
      for (let x = 0; x < 32; x++) expect(pixel(batch, 0, x, y)).toEqual(x >= 8 && x < 24 ? [-1, 1, -1] : [1, -1, -1]);
    }
  });

  it('random crops follow the planned window, are reproducible by seed and differ across seeds', async () => {
    const dir = await folder({ 'g.png': await gradient() });
    const config = { dir, resolution: 32, center_crop: false, repeats: 12 };
    const lefts = async (seed: number) => {
      const batch = await firstBatch(await ImageFolderDataset.open(config, { seed }));
      return batch.samples.map((s, b) => {
        // Column 0 of the output is source column `left`, whose red value is 2·left.
        expect(Math.round(leftOf(batch, b))).toBe(s.crop.left);
        for (let x = 0; x < 32; x++) expect(pixel(batch, b, x, 5)).toEqual([unit(2 * (s.crop.left + x)), unit(255 - 2 * (s.crop.left + x)), unit(7)]);
        return s.crop.left;
      });
    };
    const a = await lefts(1);
    expect(await lefts(1)).toEqual(a);
    expect(await lefts(2)).not.toEqual(a);
    expect(new Set(a).size).toBeGreaterThan(4);
    for (const left of a) {
      expect(left).toBeGreaterThanOrEqual(0);
      expect(left).toBeLessThanOrEqual(64);
    }
  });

  it('random flip mirrors the crop, about half the time, decided per sample and epoch', async () => {
    const dir = await folder({ 'g.png': await gradient() });
    const dataset = await ImageFolderDataset.open({ dir, resolution: 32, random_flip: true, repeats: 50 }, { seed: 5 });
    let flipped = 0;
    for await (const batch of dataset.batches(50, { epoch: 0, index: 0 }, { endEpoch: 4 })) {
      batch.samples.forEach((s, b) => {
        if (s.flip) flipped++;
        // Centre crop starts at 32; a flipped sample shows column 63 − x at x.
        const source = (x: number) => (s.flip ? 63 - x : 32 + x);
        for (const x of [0, 13, 31]) expect(pixel(batch, b, x, 3)[0]).toBe(unit(2 * source(x)));
      });
    }
    // 200 fair coin flips: 4σ ≈ 28 around 100.
    expect(flipped).toBeGreaterThan(72);
    expect(flipped).toBeLessThan(128);
  });
});

describe('captions', () => {
  it('reads sidecar captions and reports images without one', async () => {
    const dir = await folder({
      'a.png': await solid(32, 32, RED),
      'a.txt': 'a red square\n',
      'b.png': await solid(32, 32, BLUE),
      'c.png': await solid(32, 32, GREEN),
      'c.caption': 'a green square',
    });
    const plain = await ImageFolderDataset.open({ dir, resolution: 32 }, { seed: 0 });
    const byName = Object.fromEntries(plain.images.map((i) => [i.relativePath, i.caption]));
    expect(byName).toEqual({ 'a.png': 'a red square', 'b.png': undefined, 'c.png': undefined });
    expect(plain.warnings.join('\n')).toMatch(/no \.txt caption for b\.png, c\.png/);
    const batch = await firstBatch(plain);
    for (const [i, s] of batch.samples.entries()) expect(batch.captions[i]).toBe(s.image.relativePath === 'a.png' ? 'a red square' : '');

    const other = await ImageFolderDataset.open({ dir, resolution: 32, caption_extension: '.caption' }, { seed: 0 });
    expect(other.images.map((i) => i.caption)).toEqual([undefined, undefined, 'a green square']);
  });

  it('fills textual-inversion templates with the placeholder token, varying per sample', async () => {
    const dir = await folder({ 'a.png': await solid(32, 32, RED) });
    const dataset = await ImageFolderDataset.open({ dir, resolution: 32, template: 'object', repeats: 40 }, { seed: 3, placeholderToken: '<duck>' });
    const filled = new Set(OBJECT_TEMPLATES.map((t) => t.replace('{}', '<duck>')));
    const captions = (await firstBatch(dataset)).captions;
    for (const c of captions) expect(filled.has(c)).toBe(true);
    expect(new Set(captions).size).toBeGreaterThan(10);
    await expect(ImageFolderDataset.open({ dir, template: 'style', resolution: 32 }, { seed: 0 })).rejects.toThrow(/placeholder token/);
  });

  it('uses a fixed instance prompt, and drops captions at the configured rate', async () => {
    const dir = await folder({ 'a.png': await solid(32, 32, RED), 'a.txt': 'ignored' });
    const instance = await ImageFolderDataset.open({ dir, resolution: 32, instance_prompt: 'a photo of sks toy', repeats: 4 }, { seed: 0 });
    expect((await firstBatch(instance)).captions).toEqual(Array(4).fill('a photo of sks toy'));

    const dropped = await ImageFolderDataset.open(
      { dir, resolution: 32, instance_prompt: 'a photo of sks toy', repeats: 400, caption_dropout_rate: 0.25 },
      { seed: 0 },
    );
    const captions = [...dropped.plannedBatches(400, undefined, { endEpoch: 1 })][0]!.samples.map((s) => s.caption);
    const empty = captions.filter((c) => c === '').length;
    expect(empty + captions.filter((c) => c === 'a photo of sks toy').length).toBe(400);
    expect(empty).toBeGreaterThan(100 - 35); // binomial(400, 0.25): σ ≈ 8.7
    expect(empty).toBeLessThan(100 + 35);
  });

  it('shuffles sidecar tags, keeping the first keep_tokens', async () => {
    const dir = await folder({ 'a.png': await solid(32, 32, RED), 'a.txt': 'sks, dog, grass, sun, tree' });
    const dataset = await ImageFolderDataset.open({ dir, resolution: 32, shuffle_caption: true, keep_tokens: 1, repeats: 20 }, { seed: 0 });
    const captions = [...dataset.plannedBatches(20, undefined, { endEpoch: 1 })][0]!.samples.map((s) => s.caption);
    for (const c of captions) {
      const tags = c.split(', ');
      expect(tags[0]).toBe('sks');
      expect(tags.slice(1).sort()).toEqual(['dog', 'grass', 'sun', 'tree']);
    }
    expect(new Set(captions).size).toBeGreaterThan(5);
  });
});

describe('sample order, repeats and resume', () => {
  let dir = '';
  beforeAll(async () => {
    dir = await folder({
      'a.png': await solid(32, 32, RED),
      'b.png': await solid(32, 32, GREEN),
      'c.png': await solid(32, 32, BLUE),
    });
  });
  const config = () => ({ dir, resolution: 32, repeats: 5, center_crop: false, random_flip: true });
  const key = (b: Batch) => b.samples.map((s) => `${s.image.relativePath}@${s.crop.left},${s.crop.top}${s.flip ? 'f' : ''}`);

  it('has images × repeats samples per epoch, each image exactly `repeats` times', async () => {
    const dataset = await ImageFolderDataset.open(config(), { seed: 11 });
    expect(dataset.epochLength).toBe(15);
    expect(dataset.batchesPerEpoch(4)).toBe(4);
    expect(dataset.batchesPerEpoch(4, true)).toBe(3);
    expect([...dataset.epochOrder(0)].sort((x, y) => x - y)).toEqual(Array.from({ length: 15 }, (_, i) => i));
    for (let epoch = 0; epoch < 3; epoch++) {
      const counts: Record<string, number> = {};
      for (let index = 0; index < 15; index++) {
        const name = dataset.plan({ epoch, index }).image.relativePath;
        counts[name] = (counts[name] ?? 0) + 1;
      }
      expect(counts).toEqual({ 'a.png': 5, 'b.png': 5, 'c.png': 5 });
    }
  });

  it('orders each epoch reproducibly from (seed, epoch) and differently across epochs and seeds', async () => {
    const names = (d: ImageFolderDataset, epoch: number) => Array.from({ length: 15 }, (_, index) => d.plan({ epoch, index }).image.relativePath).join();
    const one = await ImageFolderDataset.open(config(), { seed: 11 });
    const two = await ImageFolderDataset.open(config(), { seed: 11 });
    const other = await ImageFolderDataset.open(config(), { seed: 12 });
    // Reading epoch 2 first must not matter: the order is a function of (seed, epoch) only.
    expect(names(two, 2)).toBe(names(one, 2));
    expect(names(two, 0)).toBe(names(one, 0));
    expect(new Set([0, 1, 2, 3].map((e) => names(one, e))).size).toBeGreaterThan(1);
    expect([0, 1, 2, 3].map((e) => names(other, e))).not.toEqual([0, 1, 2, 3].map((e) => names(one, e)));
  });

  it('batches stay within an epoch and resuming from any saved state continues the same sequence', async () => {
    const dataset = await ImageFolderDataset.open(config(), { seed: 11 });
    const full: Batch[] = [];
    for await (const b of dataset.batches(4, undefined, { endEpoch: 3 })) full.push(b);
    expect(full.map((b) => b.samples.length)).toEqual([4, 4, 4, 3, 4, 4, 4, 3, 4, 4, 4, 3]);
    expect(full[3]!.next).toEqual({ epoch: 1, index: 0 });
    expect(full[5]!.next).toEqual({ epoch: 1, index: 8 });

    for (const k of [0, 3, 5, 9]) {
      const resumedDataset = await ImageFolderDataset.open(config(), { seed: 11 });
      const resumed: Batch[] = [];
      for await (const b of resumedDataset.batches(4, full[k]!.next, { endEpoch: 3 })) resumed.push(b);
      expect(resumed.map(key)).toEqual(full.slice(k + 1).map(key));
      expect(resumed.map((b) => b.next)).toEqual(full.slice(k + 1).map((b) => b.next));
      resumed.forEach((b, i) => expect(Buffer.from(b.pixels.buffer).equals(Buffer.from(full[k + 1 + i]!.pixels.buffer))).toBe(true));
    }
  });

  it('drops short batches with dropLast and rejects impossible states', async () => {
    const dataset = await ImageFolderDataset.open(config(), { seed: 11 });
    const sizes = [...dataset.plannedBatches(4, { epoch: 0, index: 0 }, { dropLast: true, endEpoch: 2 })].map((b) => b.samples.length);
    expect(sizes).toEqual([4, 4, 4, 4, 4, 4]);
    expect(() => dataset.plan({ epoch: 0, index: 16 })).toThrow(/0 ≤ index ≤ 15/);
    expect(() => dataset.plannedBatches(0).next()).toThrow(/batch size/);
  });
});

describe('folder scanning and bad data', () => {
  it('lists image extensions in any case, sorted by relative path, recursing only when asked', async () => {
    const dir = await folder({
      'b.png': await solid(32, 32, RED),
      'A.PNG': await solid(32, 32, RED),
      'a.jpeg': await sharp(await solid(32, 32, RED)).jpeg().toBuffer(),
      'notes.txt': 'x',
      '.hidden.png': await solid(32, 32, RED),
      'sub/c.webp': await sharp(await solid(32, 32, RED)).webp().toBuffer(),
    });
    expect(await listImageFiles(dir, false)).toEqual(['A.PNG', 'a.jpeg', 'b.png']);
    expect(await listImageFiles(dir, true)).toEqual(['A.PNG', 'a.jpeg', 'b.png', 'sub/c.webp']);
    const dataset = await ImageFolderDataset.open({ dir, resolution: 32, recursive: true }, { seed: 0 });
    expect(dataset.images.map((i) => i.relativePath)).toEqual(['A.PNG', 'a.jpeg', 'b.png', 'sub/c.webp']);
  });

  it('skips corrupt, truncated and too-small images with a named reason', async () => {
    const goodJpeg = await sharp(await png(64, 64, (x, y) => [x * 4, y * 4, 100])).jpeg().toBuffer();
    const dir = await folder({
      'good.png': await solid(32, 32, RED),
      'corrupt.png': 'this is not a png',
      'truncated.jpg': goodJpeg.subarray(0, goodJpeg.length >> 1),
      'small.png': await solid(31, 40, RED),
    });
    const dataset = await ImageFolderDataset.open({ dir, resolution: 32 }, { seed: 0 });
    expect(dataset.images.map((i) => i.relativePath)).toEqual(['good.png']);
    const reasons = Object.fromEntries(dataset.bad.map((b) => [b.relativePath, b.reason]));
    expect(Object.keys(reasons).sort()).toEqual(['corrupt.png', 'small.png', 'truncated.jpg']);
    expect(reasons['corrupt.png']).toMatch(/^cannot decode: /);
    expect(reasons['truncated.jpg']).toMatch(/^cannot decode: .*(premature end|truncated)/i);
    expect(reasons['small.png']).toMatch(/too small: 31×40 cannot cover the 32×32 training size.*upscale_small: true/);
    expect(dataset.bad.find((b) => b.relativePath === 'small.png')!.path).toBe(path.join(dir, 'small.png'));
    expect(dataset.warnings.join('\n')).toMatch(/skipped 3 unusable image\(s\)[\s\S]*corrupt\.png: cannot decode/);

    const upscaled = await ImageFolderDataset.open({ dir, resolution: 32, upscale_small: true }, { seed: 0 });
    expect(upscaled.images.map((i) => i.relativePath)).toEqual(['good.png', 'small.png']);
    // A solid image stays solid when enlarged.
    const batch = await firstBatch(upscaled);
    expect(pixel(batch, 1, 0, 0)).toEqual([1, -1, -1]);
    expect(pixel(batch, 1, 31, 31)).toEqual([1, -1, -1]);
  });

  it("fails naming the files with on_bad_image: 'fail'", async () => {
    const dir = await folder({ 'good.png': await solid(32, 32, RED), 'broken.jpg': 'garbage' });
    const open = ImageFolderDataset.open({ dir, resolution: 32, on_bad_image: 'fail' }, { seed: 0 });
    await expect(open).rejects.toThrow(BadImageError);
    await expect(open).rejects.toThrow(/1 unusable image\(s\)[\s\S]*broken\.jpg: cannot decode/);
    const scan = await scanImageFolder({ dir, resolution: 32 });
    expect(scan.bad.map((b) => b.relativePath)).toEqual(['broken.jpg']);
  });

  it('explains an empty folder, a missing one and one with nothing usable', async () => {
    const empty = await folder({ 'readme.txt': 'no images here' });
    await expect(ImageFolderDataset.open({ dir: empty }, { seed: 0 })).rejects.toThrow(
      new RegExp(`${empty.replace(/[/\\.]/g, '\\$&')}: no images found; looked for \\.jpg, \\.jpeg, \\.png, \\.webp, \\.gif`),
    );
    await expect(ImageFolderDataset.open({ dir: path.join(empty, 'nope') }, { seed: 0 })).rejects.toThrow(/nope: cannot open the image folder/);
    const allBad = await folder({ 'x.png': 'bad' });
    await expect(ImageFolderDataset.open({ dir: allBad }, { seed: 0 })).rejects.toThrow(/none of the 1 image\(s\) is usable[\s\S]*x\.png/);
  });

  it('decodes again from disk past the memory budget, and notices a file changed since the scan', async () => {
    const dir = await folder({ 'a.png': await solid(40, 40, RED), 'b.png': await solid(40, 40, BLUE) });
    const dataset = await ImageFolderDataset.open({ dir, resolution: 32 }, { seed: 0, pixelCacheBytes: 0 });
    const batch = await firstBatch(dataset);
    const blue = batch.samples.findIndex((s) => s.image.relativePath === 'b.png');
    expect(pixel(batch, blue, 3, 3)).toEqual([-1, -1, 1]);
    await writeFile(path.join(dir, 'b.png'), await solid(40, 40, GREEN));
    await expect(firstBatch(dataset)).rejects.toThrow(/b\.png: the file changed since the dataset was scanned/);
  });
});
