/**
 * nsfwjs with its bundled weights on real photographs (shared/data/images_cc0: CC0 / public
 * domain pictures of bricks, a cat, coffee, a rocket, …): loads without any download, returns a
 * probability distribution over its five classes, and none of these safe pictures is unsafe.
 */
import { readdirSync } from 'node:fs';
import path from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { initBackend } from '../../src/backend.js';
import { readImageRgb } from '../../src/eval/detectors/image.js';
import { NSFWJS_LABELS, nsfwjs, nsfwjsSchema, nsfwjsVersion } from '../../src/eval/detectors/nsfwjs.js';
import type { Detector } from '../../src/eval/detectors/types.js';
import { SHARED } from '../helpers/fixtures.js';

const IMAGES = path.join(SHARED, 'data/images_cc0');
let detector: Detector;

beforeAll(async () => {
  await initBackend({ log: () => undefined });
  detector = await nsfwjs.create(nsfwjsSchema.parse({ type: 'nsfwjs' }));
});
afterAll(async () => {
  await detector.dispose();
});

describe('nsfwjs (bundled MobileNetV2)', () => {
  const files = readdirSync(IMAGES).filter((f) => /\.(png|jpe?g)$/i.test(f));

  it('returns the five classes as a probability distribution for every picture', async () => {
    expect(files.length).toBeGreaterThanOrEqual(8);
    const distributions: number[][] = [];
    for (const f of files) {
      const image = await readImageRgb(path.join(IMAGES, f));
      const out = await detector.detect(image);
      expect(out.map((d) => d.label), f).toEqual([...NSFWJS_LABELS]);
      for (const d of out) {
        expect(d.score, `${f} ${d.label}`).toBeGreaterThanOrEqual(0);
        expect(d.score, `${f} ${d.label}`).toBeLessThanOrEqual(1);
        expect(d.box).toBeUndefined();
      }
      expect(out.reduce((a, d) => a + d.score, 0), f).toBeCloseTo(1, 5);
      distributions.push(out.map((d) => d.score));
    }
    // It looks at the pictures: no two of them get the same distribution.
    const distinct = new Set(distributions.map((d) => d.map((x) => x.toFixed(4)).join(',')));
    expect(distinct.size).toBe(files.length);
  });

  it('calls none of these safe pictures unsafe: Neutral or Drawing on top, the unsafe classes below 0.1 together', async () => {
    for (const f of files) {
      const out = await detector.detect(await readImageRgb(path.join(IMAGES, f)));
      const score = (label: string) => out.find((d) => d.label === label)!.score;
      const top = out.reduce((a, b) => (b.score > a.score ? b : a));
      expect(['Neutral', 'Drawing'], f).toContain(top.label);
      expect(score('Porn') + score('Hentai') + score('Sexy'), f).toBeLessThan(0.1);
    }
  });

  it('is deterministic and names its version', async () => {
    const image = await readImageRgb(path.join(IMAGES, 'chelsea.png'));
    expect(await detector.detect(image)).toEqual(await detector.detect(image));
    expect(detector.info.version).toBe(`nsfwjs ${nsfwjsVersion()} MobileNetV2 (bundled weights)`);
    expect(nsfwjsVersion()).toMatch(/^\d+\.\d+\.\d+$/);
    expect(detector.info.countedLabels).toEqual(['Hentai', 'Porn', 'Sexy']);
  });
});
