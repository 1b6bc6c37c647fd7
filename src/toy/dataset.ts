/**
 * Toy datasets: scenes drawn by index, rendered in memory (classifier training, tests) or written
 * as an image folder with sidecar captions (`name.png` + `name.txt`) that `src/data` reads for
 * `sdwb train`. File names carry the index, so a folder can be extended or checked image by image.
 */
import { mkdir, writeFile } from 'node:fs/promises';
import path from 'node:path';

import sharp from 'sharp';

import type { Image8 } from '../models/vae/vae.js';
import { renderScene } from './raster.js';
import { captionOf, sampleScene, type Scene, type Split } from './world.js';

/** One rendered sample. */
export interface ToySample {
  readonly index: number;
  readonly scene: Scene;
  readonly caption: string;
  readonly image: Image8;
}

/** Samples `from` … `from + count − 1` of a split. */
export function toySamples(o: { seed: number; split: Split; size: number; from?: number; count: number }): ToySample[] {
  const from = o.from ?? 0;
  return Array.from({ length: o.count }, (_, k) => {
    const index = from + k;
    const scene = sampleScene(o.seed, o.split, index, o.size);
    return { index, scene, caption: captionOf(scene), image: renderScene(scene) };
  });
}

/** An 8-bit RGB image as PNG bytes (sharp, default compression). */
export async function encodePng(image: Image8): Promise<Buffer> {
  const raw = Buffer.from(image.data.buffer, image.data.byteOffset, image.data.byteLength);
  return sharp(raw, { raw: { width: image.width, height: image.height, channels: image.channels as 3 } }).png().toBuffer();
}

/** What {@link writeToyDataset} writes. */
export interface ToyDatasetOptions {
  readonly dir: string;
  readonly seed: number;
  readonly split: Split;
  readonly size: number;
  readonly count: number;
  /** Rewrites each drawn scene (e.g. fixes its attributes to one specific object). */
  readonly scene?: (scene: Scene) => Scene;
  /** The caption of a scene (default: the world's full caption). */
  readonly caption?: (scene: Scene) => string;
  /** Called every 1,000 images with the number written so far. */
  readonly onProgress?: (written: number) => void;
}

/** Writes `<split>-<index>.png` with `<split>-<index>.txt` captions, and `dataset.json` describing the set. */
export async function writeToyDataset(o: ToyDatasetOptions): Promise<void> {
  await mkdir(o.dir, { recursive: true });
  const digits = Math.max(5, String(o.count - 1).length);
  const chunk = 256;
  for (let from = 0; from < o.count; from += chunk) {
    const samples = toySamples({ seed: o.seed, split: o.split, size: o.size, from, count: Math.min(chunk, o.count - from) });
    for (const drawn of samples) {
      const scene = o.scene === undefined ? drawn.scene : o.scene(drawn.scene);
      const s = { index: drawn.index, image: scene === drawn.scene ? drawn.image : renderScene(scene), caption: o.caption === undefined ? captionOf(scene) : o.caption(scene) };
      const stem = path.join(o.dir, `${o.split}-${String(s.index).padStart(digits, '0')}`);
      await writeFile(`${stem}.png`, await encodePng(s.image));
      await writeFile(`${stem}.txt`, `${s.caption}\n`);
      if ((s.index + 1) % 1000 === 0) o.onProgress?.(s.index + 1);
    }
  }
  const description = { generator: 'sd-workbench toy world (src/toy)', seed: o.seed, split: o.split, size: o.size, count: o.count };
  await writeFile(path.join(o.dir, 'dataset.json'), `${JSON.stringify(description, null, 2)}\n`);
}
