/**
 * The toy world: rendered pixels are exactly the caption's colour or the background's, shapes
 * sit where their geometry says (checked against independent geometric facts, not the rasteriser's
 * own inside test), styles have their visible signature, the same seed gives the same bytes, the
 * held-out concepts are never named in the pretraining split, and written folders decode to the renders.
 */
import { mkdtemp, readdir, readFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

import sharp from 'sharp';
import { describe, expect, it } from 'vitest';

import { toySamples, writeToyDataset } from '../../src/toy/dataset.js';
import { renderScene } from '../../src/toy/raster.js';
import {
  BACKGROUNDS,
  COLOURS,
  GENERIC_SHAPE_RATE,
  GENERIC_SHAPE_WORD,
  GENERIC_STYLE_RATE,
  GENERIC_STYLE_WORD,
  HELD_OUT,
  parseCaption,
  sampleScene,
  SHAPES,
  STYLELESS_RATE,
  STYLES,
  type Scene,
} from '../../src/toy/world.js';

const SIZE = 64;
const base: Scene = { size: SIZE, shape: 'circle', colour: 'red', style: 'solid', background: 'grey', cx: 32, cy: 32, radius: 20 };

/** Whether pixel (x, y) has exactly the RGB value `c`. */
function pixelIs(img: { data: Uint8Array; width: number }, x: number, y: number, c: readonly number[]): boolean {
  const i = 3 * (Math.floor(y) * img.width + Math.floor(x));
  return img.data[i] === c[0] && img.data[i + 1] === c[1] && img.data[i + 2] === c[2];
}

describe('rendering', () => {
  it('every pixel is exactly the shape colour or the background colour, with both present', () => {
    for (const s of toySamples({ seed: 3, split: 'all', size: 32, count: 200 })) {
      const fg = COLOURS[s.scene.colour];
      const bg = BACKGROUNDS[s.scene.background];
      let fgCount = 0;
      let other = 0;
      for (let y = 0; y < 32; y++) {
        for (let x = 0; x < 32; x++) {
          const isFg = pixelIs(s.image, x, y, fg);
          if (!isFg && !pixelIs(s.image, x, y, bg)) other++;
          if (isFg) fgCount++;
        }
      }
      expect(other).toBe(0);
      expect(fgCount).toBeGreaterThan(20);
      expect(fgCount).toBeLessThan(32 * 32 - 100);
    }
  });

  it('the shape colour lies only within the scene radius of its centre', () => {
    for (const s of toySamples({ seed: 4, split: 'all', size: 32, count: 200 })) {
      const { cx, cy, radius } = s.scene;
      let outside = 0;
      for (let y = 0; y < 32; y++) {
        for (let x = 0; x < 32; x++) {
          if (!pixelIs(s.image, x, y, COLOURS[s.scene.colour])) continue;
          if (Math.abs(x + 0.5 - cx) > radius || Math.abs(y + 0.5 - cy) > radius) outside++;
        }
      }
      expect(outside).toBe(0);
    }
  });

  it('a solid circle covers the disc and nothing beyond it', () => {
    const img = renderScene(base);
    for (let y = 0; y < SIZE; y++) {
      for (let x = 0; x < SIZE; x++) {
        const d = Math.hypot(x + 0.5 - 32, y + 0.5 - 32);
        if (d < 19) expect(pixelIs(img, x, y, COLOURS.red)).toBe(true);
        if (d > 21) expect(pixelIs(img, x, y, BACKGROUNDS.grey)).toBe(true);
      }
    }
  });

  it('shapes differ where their geometry differs', () => {
    const at = (shape: Scene['shape'], u: number, v: number) => pixelIs(renderScene({ ...base, shape }), 32 + u * 20, 32 + v * 20, COLOURS.red);
    // Square corners are filled; the circle leaves them empty.
    expect(at('square', 0.7, 0.7)).toBe(true);
    expect(at('circle', 0.75, 0.75)).toBe(false);
    // A cross: arms filled, the corner between arms empty.
    expect(at('cross', 0.7, 0)).toBe(true);
    expect(at('cross', 0, -0.7)).toBe(true);
    expect(at('cross', 0.6, 0.6)).toBe(false);
    // A star: its top point is filled, the notch beside it empty.
    expect(at('star', 0, -0.8)).toBe(true);
    expect(at('star', 0.8 * Math.cos((-54 * Math.PI) / 180), 0.8 * Math.sin((-54 * Math.PI) / 180))).toBe(false);
    // A heart: two lobes with the notch between them, its point at the bottom.
    expect(at('heart', -0.5, -0.5)).toBe(true);
    expect(at('heart', 0.5, -0.5)).toBe(true);
    expect(at('heart', 0, -0.75)).toBe(false);
    expect(at('heart', 0, 0.7)).toBe(true);
    // A triangle pointing up: wide at the bottom, narrow at the top.
    expect(at('triangle', -0.7, 0.7)).toBe(true);
    expect(at('triangle', -0.6, -0.6)).toBe(false);
    expect(at('triangle', 0, -0.7)).toBe(true);
  });

  it('styles have their signatures inside a disc', () => {
    const inner = (style: Scene['style']) => {
      const img = renderScene({ ...base, style, radius: 24 });
      const rows: boolean[][] = [];
      for (let y = 24; y < 40; y++) {
        const row: boolean[] = [];
        for (let x = 24; x < 40; x++) row.push(pixelIs(img, x, y, COLOURS.red));
        rows.push(row);
      }
      const flat = rows.flat();
      return { rows, coverage: flat.filter(Boolean).length / flat.length };
    };
    expect(inner('solid').coverage).toBe(1);
    // Outlined: the middle is empty.
    expect(inner('outlined').coverage).toBe(0);
    // Striped: horizontal bands — each row uniform, both kinds of row present.
    const striped = inner('striped');
    for (const row of striped.rows) expect(new Set(row).size).toBe(1);
    expect(striped.coverage).toBeGreaterThan(0.3);
    expect(striped.coverage).toBeLessThan(0.7);
    // Dotted: mostly colour with holes.
    const dotted = inner('dotted');
    expect(dotted.coverage).toBeGreaterThan(0.8);
    expect(dotted.coverage).toBeLessThan(1);
    // Checkered: half colour, and rows are not uniform (unlike stripes).
    const checkered = inner('checkered');
    expect(checkered.coverage).toBeGreaterThan(0.4);
    expect(checkered.coverage).toBeLessThan(0.6);
    expect(checkered.rows.some((row) => new Set(row).size === 2)).toBe(true);
    // Outlined: the ring is coloured just inside the edge.
    expect(pixelIs(renderScene({ ...base, style: 'outlined', radius: 24 }), 32, 32 - 23, COLOURS.red)).toBe(true);
  });

  it('the same seed gives the same bytes; another seed other scenes', () => {
    const a = toySamples({ seed: 11, split: 'pretrain', size: 32, count: 50 });
    const b = toySamples({ seed: 11, split: 'pretrain', size: 32, count: 50 });
    const c = toySamples({ seed: 12, split: 'pretrain', size: 32, count: 50 });
    expect(a.map((s) => Buffer.from(s.image.data).toString('hex'))).toEqual(b.map((s) => Buffer.from(s.image.data).toString('hex')));
    expect(a.map((s) => s.caption)).not.toEqual(c.map((s) => s.caption));
    // A sample does not depend on the ones before it.
    expect(toySamples({ seed: 11, split: 'pretrain', size: 32, from: 37, count: 1 })[0]!.caption).toBe(a[37]!.caption);
  });
});

describe('captions and splits', () => {
  it('pretraining draws both held-out concepts but never names them; generic and style-less captions come at their rates', () => {
    const n = 6000;
    const shapes = new Map<string, { named: number; generic: number }>();
    const styles = new Map<string, { named: number; generic: number; omitted: number }>();
    const named = { shape: new Set<string>(), style: new Set<string>(), colour: new Set<string>() };
    for (const s of toySamples({ seed: 0, split: 'pretrain', size: 32, count: n })) {
      expect(s.caption).not.toMatch(new RegExp(`\\b(${HELD_OUT.shape}|${HELD_OUT.style})\\b`));
      // Read the caption with plain string work, independently of captionOf: word 3 (or 2) is the shape.
      const m = /^a (\w+) (?:(\w+) )?(\w+) on a (\w+) background$/.exec(s.caption);
      expect(m, s.caption).not.toBeNull();
      const [, colour, style, shape, background] = m!;
      expect([colour, background]).toEqual([s.scene.colour, s.scene.background]);
      const st = shapes.get(s.scene.shape) ?? { named: 0, generic: 0 };
      if (shape === GENERIC_SHAPE_WORD) st.generic++;
      else {
        expect(shape).toBe(s.scene.shape);
        named.shape.add(shape!);
        st.named++;
      }
      shapes.set(s.scene.shape, st);
      const sy = styles.get(s.scene.style) ?? { named: 0, generic: 0, omitted: 0 };
      if (style === undefined) sy.omitted++;
      else if (style === GENERIC_STYLE_WORD) sy.generic++;
      else {
        expect(style).toBe(s.scene.style);
        named.style.add(style);
        sy.named++;
      }
      styles.set(s.scene.style, sy);
      named.colour.add(colour!);
      // Captions that name everything are the ones the eval parses.
      if (style !== undefined && style !== GENERIC_STYLE_WORD && shape !== GENERIC_SHAPE_WORD) expect(parseCaption(s.caption)).toBeDefined();
    }
    expect([...named.shape].sort()).toEqual(SHAPES.filter((s) => s !== HELD_OUT.shape).sort());
    expect([...named.style].sort()).toEqual(STYLES.filter((s) => s !== HELD_OUT.style).sort());
    expect(named.colour.size).toBe(Object.keys(COLOURS).length);
    // Every shape and style is drawn (≈ 1,000 and 1,200 each); the held-out ones always generic.
    const heart = shapes.get(HELD_OUT.shape)!;
    expect(heart).toEqual({ named: 0, generic: heart.generic });
    expect(heart.generic).toBeGreaterThan(850);
    const checkered = styles.get(HELD_OUT.style)!;
    expect(checkered).toEqual({ named: 0, generic: checkered.generic, omitted: 0 });
    expect(checkered.generic).toBeGreaterThan(1000);
    // Binomial bands of ± 4 standard deviations around each rate.
    const band = (k: number, total: number, p: number) => {
      const sd = Math.sqrt(p * (1 - p) / total);
      expect(k / total).toBeGreaterThan(p - 4 * sd);
      expect(k / total).toBeLessThan(p + 4 * sd);
    };
    for (const shape of SHAPES.filter((s) => s !== HELD_OUT.shape)) {
      const t = shapes.get(shape)!;
      band(t.generic, t.named + t.generic, GENERIC_SHAPE_RATE);
    }
    for (const style of STYLES.filter((s) => s !== HELD_OUT.style)) {
      const t = styles.get(style)!;
      band(t.generic, t.named + t.generic + t.omitted, GENERIC_STYLE_RATE);
      band(t.omitted, t.named + t.generic + t.omitted, STYLELESS_RATE);
    }
  });

  it('held-out splits draw only their concept; the full split has everything', () => {
    for (let i = 0; i < 200; i++) {
      expect(sampleScene(0, 'heldout-shape', i, 32).shape).toBe(HELD_OUT.shape);
      expect(sampleScene(0, 'heldout-style', i, 32).style).toBe(HELD_OUT.style);
    }
    const all = toySamples({ seed: 0, split: 'all', size: 32, count: 600 });
    expect(new Set(all.map((s) => s.scene.shape)).size).toBe(SHAPES.length);
    expect(new Set(all.map((s) => s.scene.style)).size).toBe(STYLES.length);
  });
});

describe('image folder', () => {
  it('writes PNGs that decode to the rendered bytes, with sidecar captions', async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-toy-data-'));
    await writeToyDataset({ dir, seed: 5, split: 'pretrain', size: 32, count: 12 });
    const files = (await readdir(dir)).sort();
    expect(files.filter((f) => f.endsWith('.png'))).toHaveLength(12);
    expect(files.filter((f) => f.endsWith('.txt'))).toHaveLength(12);
    const expected = toySamples({ seed: 5, split: 'pretrain', size: 32, count: 12 });
    for (const s of expected) {
      const stem = path.join(dir, `pretrain-${String(s.index).padStart(5, '0')}`);
      const { data, info } = await sharp(`${stem}.png`).raw().toBuffer({ resolveWithObject: true });
      expect([info.width, info.height, info.channels]).toEqual([32, 32, 3]);
      expect(Buffer.compare(data, Buffer.from(s.image.data))).toBe(0);
      expect((await readFile(`${stem}.txt`, 'utf8')).trim()).toBe(s.caption);
    }
  });
});
