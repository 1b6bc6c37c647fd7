import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import {
  OBJECT_TEMPLATES,
  STYLE_TEMPLATES,
  fillTemplate,
  readSidecarCaption,
  shuffleCaption,
  sidecarPath,
  templatesFor,
} from '../../src/data/captions.js';
import { SeededRandom } from '../../src/data/rng.js';

describe('textual-inversion templates (diffusers textual_inversion.py)', () => {
  it('has the object list: 27 prompts in diffusers order', () => {
    expect(OBJECT_TEMPLATES).toHaveLength(27);
    expect(OBJECT_TEMPLATES[0]).toBe('a photo of a {}');
    expect(OBJECT_TEMPLATES[9]).toBe('a close-up photo of a {}');
    expect(OBJECT_TEMPLATES[18]).toBe('a rendition of a {}');
    expect(OBJECT_TEMPLATES[26]).toBe('a photo of a small {}');
  });

  it('has the style list: 19 prompts, with diffusers\' two duplicates', () => {
    expect(STYLE_TEMPLATES).toHaveLength(19);
    expect(STYLE_TEMPLATES[0]).toBe('a painting in the style of {}');
    expect(STYLE_TEMPLATES[7]).toBe('a picture in the style of {}');
    expect(STYLE_TEMPLATES[18]).toBe('a large painting in the style of {}');
    // "a cropped painting…" and "a close-up painting…" each appear twice upstream, which doubles their weight.
    expect(STYLE_TEMPLATES.filter((t) => t === 'a cropped painting in the style of {}')).toHaveLength(2);
    expect(STYLE_TEMPLATES.filter((t) => t === 'a close-up painting in the style of {}')).toHaveLength(2);
  });

  it('every template has exactly one {} and templatesFor picks the list', () => {
    for (const t of [...OBJECT_TEMPLATES, ...STYLE_TEMPLATES]) expect(t.split('{}')).toHaveLength(2);
    expect(templatesFor('object')).toBe(OBJECT_TEMPLATES);
    expect(templatesFor('style')).toBe(STYLE_TEMPLATES);
    expect(templatesFor('none')).toEqual([]);
  });

  it('fills {} with the placeholder token', () => {
    expect(fillTemplate('a photo of a {}', '<cat-toy>')).toBe('a photo of a <cat-toy>');
    expect(fillTemplate('{} and {}', 'x')).toBe('x and x');
  });
});

describe('sidecar captions', () => {
  let dir = '';
  beforeAll(async () => {
    dir = await mkdtemp(path.join(tmpdir(), 'sdwb-captions-'));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('replaces the image extension by the caption extension', () => {
    expect(sidecarPath('/d/img.001.png', '.txt')).toBe('/d/img.001.txt');
    expect(sidecarPath('/d.x/img', '.caption')).toBe('/d.x/img.caption');
    expect(sidecarPath('C:\\d\\a.JPG', '.txt')).toBe('C:\\d\\a.txt');
  });

  it('reads the first non-empty line, trimmed, without a BOM', async () => {
    const file = path.join(dir, 'a.txt');
    await writeFile(file, '\uFEFF\n  a red square, simple  \r\nsecond line\n');
    expect(await readSidecarCaption(file)).toBe('a red square, simple');
  });

  it('returns undefined for a missing file and "" for an empty one', async () => {
    expect(await readSidecarCaption(path.join(dir, 'missing.txt'))).toBeUndefined();
    const empty = path.join(dir, 'empty.txt');
    await writeFile(empty, '\n\n');
    expect(await readSidecarCaption(empty)).toBe('');
  });
});

describe('shuffleCaption (kohya shuffle_caption / keep_tokens)', () => {
  const caption = 'sks dog, sitting, grass, sunny day, bokeh, 35mm';

  it('keeps the first keep_tokens tags and permutes the rest', () => {
    const seen = new Set<string>();
    for (let s = 0; s < 30; s++) {
      const out = shuffleCaption(caption, 2, new SeededRandom(s)).split(', ');
      expect(out.slice(0, 2)).toEqual(['sks dog', 'sitting']);
      expect([...out.slice(2)].sort()).toEqual(['35mm', 'bokeh', 'grass', 'sunny day']);
      seen.add(out.join('|'));
    }
    expect(seen.size).toBeGreaterThan(5);
  });

  it('is reproducible from the generator key and drops empty tags', () => {
    expect(shuffleCaption(caption, 0, new SeededRandom(7, 1))).toBe(shuffleCaption(caption, 0, new SeededRandom(7, 1)));
    expect(shuffleCaption('a,, b ,', 5, new SeededRandom(1))).toBe('a, b');
  });
});

describe('SeededRandom', () => {
  it('is a function of its key', () => {
    const draw = (...key: number[]) => {
      const r = new SeededRandom(...key);
      return [r.nextUint32(), r.nextUint32(), r.nextUint32()];
    };
    expect(draw(1, 2, 3)).toEqual(draw(1, 2, 3));
    expect(draw(1, 2, 3)).not.toEqual(draw(1, 2, 4));
    expect(draw(1, 2, 3)).not.toEqual(draw(2, 2, 3));
    expect(draw(2 ** 40 + 1)).not.toEqual(draw(1));
  });

  it('draws uniform integers without bias across the range', () => {
    const r = new SeededRandom(42);
    const counts = new Array<number>(6).fill(0);
    for (let i = 0; i < 60_000; i++) counts[r.uniformInt(6)]!++;
    // Expected 10 000 each; 4σ of a binomial(60 000, 1/6) is ≈ 365.
    for (const c of counts) expect(Math.abs(c - 10_000)).toBeLessThan(400);
  });

  it('shuffles into a permutation', () => {
    const a = new SeededRandom(3).shuffle(Array.from({ length: 100 }, (_, i) => i));
    expect([...a].sort((x, y) => x - y)).toEqual(Array.from({ length: 100 }, (_, i) => i));
    expect(a).not.toEqual(Array.from({ length: 100 }, (_, i) => i));
  });
});
