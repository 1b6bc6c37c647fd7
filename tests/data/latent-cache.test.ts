import { mkdir, mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { ImageFolderDataset } from '../../src/data/image-folder.js';
import {
  LatentCache,
  hashFile,
  latentBatches,
  latentKeyOf,
  precomputeLatents,
  type EncodeFn,
  type LatentKey,
} from '../../src/data/latent-cache.js';

let root = '';
let count = 0;
beforeAll(async () => {
  root = await mkdtemp(path.join(tmpdir(), 'sdwb-latent-cache-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

const fresh = async (name: string) => {
  const dir = path.join(root, `${name}${count++}`);
  await mkdir(dir, { recursive: true });
  return dir;
};

const solidPng = (width: number, height: number, rgb: readonly [number, number, number]) =>
  sharp({ create: { width, height, channels: 3, background: { r: rgb[0], g: rgb[1], b: rgb[2] } } }).png().toBuffer();

/**
 * A stand-in VAE: the mean of each 8×8 block of the red channel, and a std of 0.5 + the block's
 * green mean; counts its calls so tests can tell cache hits from misses.
 */
function fakeEncoder(): { encode: EncodeFn; calls: number[] } {
  const calls: number[] = [];
  const encode: EncodeFn = async (pixels, height, width) => {
    calls.push(pixels.length);
    const bh = height / 8;
    const bw = width / 8;
    const mean = new Float32Array(bh * bw);
    const std = new Float32Array(bh * bw);
    for (let y = 0; y < height; y++) {
      for (let x = 0; x < width; x++) {
        const block = Math.floor(y / 8) * bw + Math.floor(x / 8);
        mean[block]! += pixels[(y * width + x) * 3]! / 64;
        std[block]! += pixels[(y * width + x) * 3 + 1]! / 64;
      }
    }
    for (let i = 0; i < std.length; i++) std[i] = 1.5 + std[i]!;
    return { mean, std };
  };
  return { encode, calls };
}

async function dataFolder(): Promise<string> {
  const dir = await fresh('images');
  await writeFile(path.join(dir, 'red.png'), await solidPng(48, 32, [255, 0, 0]));
  await writeFile(path.join(dir, 'blue.png'), await solidPng(32, 32, [0, 0, 255]));
  return dir;
}

async function drain(it: AsyncIterable<unknown>): Promise<void> {
  for await (const _ of it) void _;
}

describe('LatentCache', () => {
  it('encodes on the first pass and serves every later pass from disk', async () => {
    const dir = await dataFolder();
    const cacheDir = await fresh('cache');
    const dataset = await ImageFolderDataset.open({ dir, resolution: 32, repeats: 3 }, { seed: 1 });
    const first = fakeEncoder();
    const cache = new LatentCache(cacheDir, 'vae-sha256-aaaa');
    const batches = [];
    for await (const b of latentBatches(dataset, cache, first.encode, 2, undefined, { endEpoch: 2 })) batches.push(b);
    // Centre crop, no flip: one variant per image, so 2 encodes for 12 samples.
    expect(first.calls).toEqual([32 * 32 * 3, 32 * 32 * 3]);
    expect(cache.stats).toEqual({ hits: 10, misses: 2, corrupt: 0, writes: 2 });

    // The red image is solid (1, −1, −1): every block mean is 1 and every std is 1.5 − 1 = 0.5.
    const red = batches[0]!.samples.findIndex((s) => s.image.relativePath === 'red.png');
    const block = batches[0]!.latentLength;
    expect(block).toBe(16);
    expect([...batches[0]!.mean.subarray(red * block, (red + 1) * block)]).toEqual(Array(16).fill(1));
    expect([...batches[0]!.std.subarray(red * block, (red + 1) * block)]).toEqual(Array(16).fill(0.5));

    // A new process (new cache object, new dataset) hits for every sample: the encoder is never called.
    const second = fakeEncoder();
    const again = new LatentCache(cacheDir, 'vae-sha256-aaaa');
    const reopened = await ImageFolderDataset.open({ dir, resolution: 32, repeats: 3 }, { seed: 1 });
    const replay = [];
    for await (const b of latentBatches(reopened, again, second.encode, 2, undefined, { endEpoch: 2 })) replay.push(b);
    expect(second.calls).toEqual([]);
    expect(again.stats.hits).toBe(12);
    expect(replay.map((b) => [...b.mean])).toEqual(batches.map((b) => [...b.mean]));
    expect(replay.map((b) => b.next)).toEqual(batches.map((b) => b.next));
  });

  it('follows the pixel batches: same samples, captions and resume states', async () => {
    const dir = await dataFolder();
    const dataset = await ImageFolderDataset.open({ dir, resolution: 32, repeats: 2, instance_prompt: 'sks' }, { seed: 4 });
    const cache = new LatentCache(await fresh('cache'), 'm');
    const { encode } = fakeEncoder();
    const pixels = [];
    for await (const b of dataset.batches(3, { epoch: 0, index: 1 }, { endEpoch: 1 })) pixels.push(b);
    const latents = [];
    for await (const b of latentBatches(dataset, cache, encode, 3, { epoch: 0, index: 1 }, { endEpoch: 1 })) latents.push(b);
    expect(latents.map((b) => b.samples.map((s) => s.image.relativePath))).toEqual(pixels.map((b) => b.samples.map((s) => s.image.relativePath)));
    expect(latents.map((b) => b.next)).toEqual(pixels.map((b) => b.next));
    expect(latents.flatMap((b) => b.captions)).toEqual(['sks', 'sks', 'sks']);
  });

  it('misses when the file bytes, the crop, the flip, the size or the model change', async () => {
    const dir = await dataFolder();
    const cacheDir = await fresh('cache');
    const dataset = await ImageFolderDataset.open({ dir, resolution: 32 }, { seed: 0 });
    const cache = new LatentCache(cacheDir, 'model-a');
    const { encode, calls } = fakeEncoder();
    await precomputeLatents(dataset, cache, encode);
    expect(calls).toHaveLength(2);

    const red = dataset.plan({ epoch: 0, index: 0 }).image.relativePath === 'red.png' ? { epoch: 0, index: 0 } : { epoch: 0, index: 1 };
    const key = latentKeyOf(dataset, dataset.plan(red));
    expect(key.crop).toMatchObject({ resizedWidth: 48, resizedHeight: 32, left: 8, top: 0 });
    expect(await cache.read(key)).toBeDefined();
    const variants: LatentKey[] = [
      { ...key, fileSha256: '0'.repeat(64) },
      { ...key, crop: { ...key.crop, left: 9 } },
      { ...key, flip: true },
      { ...key, width: 24, crop: { ...key.crop, width: 24 } },
      { ...key, background: '#000000' },
    ];
    for (const variant of variants) expect(await cache.read(variant)).toBeUndefined();
    expect(await new LatentCache(cacheDir, 'model-b').read(key)).toBeUndefined();
    expect(cache.stats.corrupt).toBe(0); // absent, not corrupt

    // Rewriting the image (new bytes, same name) gives a new key after the rescan: a miss for it only.
    await writeFile(path.join(dir, 'red.png'), await solidPng(48, 32, [200, 0, 0]));
    const rescanned = await ImageFolderDataset.open({ dir, resolution: 32 }, { seed: 0 });
    const before = calls.length;
    await precomputeLatents(rescanned, cache, encode);
    expect(calls.length - before).toBe(1);
  });

  it('random crops and flips are cached per variant', async () => {
    const dir = await dataFolder();
    const dataset = await ImageFolderDataset.open({ dir, resolution: 32, center_crop: false, random_flip: true, repeats: 20 }, { seed: 2 });
    expect(dataset.warnings.join()).not.toMatch(/cache_latents/);
    const cache = new LatentCache(await fresh('cache'), 'm');
    const { encode, calls } = fakeEncoder();
    await drain(latentBatches(dataset, cache, encode, 8, undefined, { endEpoch: 1 }));
    // blue.png is square (1 window × 2 flips); red.png is 48×32 (17 windows × 2 flips).
    const variants = new Set<string>();
    for (let index = 0; index < dataset.epochLength; index++) {
      const p = dataset.plan({ epoch: 0, index });
      variants.add(`${p.image.relativePath}/${p.crop.left}/${p.flip}`);
    }
    expect(calls).toHaveLength(variants.size);
    expect(variants.size).toBeGreaterThan(10);
    expect(cache.stats.hits + cache.stats.misses).toBe(40);
  });

  it('ignores corrupted entries and rewrites them', async () => {
    const dir = await dataFolder();
    const cacheDir = await fresh('cache');
    const dataset = await ImageFolderDataset.open({ dir, resolution: 32 }, { seed: 0 });
    const cache = new LatentCache(cacheDir, 'm');
    const { encode, calls } = fakeEncoder();
    await precomputeLatents(dataset, cache, encode);
    const keys = [0, 1].map((index) => latentKeyOf(dataset, dataset.plan({ epoch: 0, index })));
    const [a, b] = keys.map((k) => cache.fileFor(k)) as [string, string];
    const good = await readFile(a);
    const originalMean = (await cache.read(keys[0]!))!.mean;

    const damage: [string, (bytes: Buffer) => Promise<Buffer | string> | Buffer | string][] = [
      ['garbage', () => 'not a safetensors file'],
      ['truncated', (bytes) => bytes.subarray(0, bytes.length - 7)],
      ['another entry', () => readFile(b)],
      ['NaN values', (bytes) => {
        const copy = Buffer.from(bytes);
        copy.writeFloatLE(Number.NaN, copy.length - 4);
        return copy;
      }],
    ];
    for (const [what, corrupt] of damage) {
      const replaced = await corrupt(good);
      await writeFile(a, replaced);
      const reader = new LatentCache(cacheDir, 'm');
      expect(await reader.read(keys[0]!), what).toBeUndefined();
      expect(reader.stats.corrupt, what).toBe(1);
      const before = calls.length;
      const latent = await reader.getOrEncode(keys[0]!, () => dataset.loadPixels([dataset.plan({ epoch: 0, index: 0 })]), encode);
      expect(calls.length - before, what).toBe(1);
      expect([...latent.mean], what).toEqual([...originalMean]);
      expect(await readFile(a), what).toEqual(good); // rewritten, byte for byte the original entry
      expect(await reader.read(keys[0]!), what).toBeDefined();
    }
    // No temporary files left behind by the rewrites.
    const shard = await readdir(path.dirname(a));
    expect(shard.filter((f) => f.endsWith('.tmp'))).toEqual([]);
  });

  it('hashes files by content and refuses an empty model key', async () => {
    const dir = await fresh('hash');
    await writeFile(path.join(dir, 'abc'), 'abc');
    // sha256("abc"), FIPS 180-2 example.
    expect(await hashFile(path.join(dir, 'abc'))).toBe('ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad');
    expect(() => new LatentCache(dir, '')).toThrow(/model key/);
  });
});
