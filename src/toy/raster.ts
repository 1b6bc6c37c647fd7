/**
 * A pure-JS rasteriser of toy scenes into 8-bit RGB buffers. No anti-aliasing, on purpose: every
 * pixel is exactly the shape colour or exactly the background, so tests (and the classifier's
 * labels) can check colours and coverage exactly, and the same scene always gives the same bytes.
 *
 * A pixel (x, y) is inside when its centre (x + ½, y + ½) is; shapes are defined in unit
 * coordinates u = (px − cx)/r, v = (py − cy)/r (v grows downwards) so each fills about the same
 * box, then the style decides which inside pixels take the colour.
 */
import type { Image8 } from '../models/vae/vae.js';
import { BACKGROUNDS, COLOURS, type Scene, type Shape } from './world.js';

type Point = readonly [number, number];

// Five-pointed star: outer radius 1, inner 0.45, first point straight up.
const STAR: readonly Point[] = Array.from({ length: 10 }, (_, i) => {
  const angle = -Math.PI / 2 + (i * Math.PI) / 5;
  const r = i % 2 === 0 ? 1 : 0.45;
  return [r * Math.cos(angle), r * Math.sin(angle)] as const;
});
const TRIANGLE: readonly Point[] = [
  [0, -0.95],
  [0.95, 0.8],
  [-0.95, 0.8],
];

// Even-odd rule: count crossings of a ray towards +u.
function inPolygon(u: number, v: number, poly: readonly Point[]): boolean {
  let inside = false;
  for (let i = 0, j = poly.length - 1; i < poly.length; j = i++) {
    const [ui, vi] = poly[i]!;
    const [uj, vj] = poly[j]!;
    if (vi > v !== vj > v && u < ((uj - ui) * (v - vi)) / (vj - vi) + ui) inside = !inside;
  }
  return inside;
}

/** Whether unit-coordinate point (u, v) lies inside `shape`. */
export function insideShape(shape: Shape, u: number, v: number): boolean {
  switch (shape) {
    case 'circle':
      return u * u + v * v <= 1;
    case 'square':
      // Half-side 0.8: about the circle's area, so size alone does not tell the two apart.
      return Math.abs(u) <= 0.8 && Math.abs(v) <= 0.8;
    case 'triangle':
      return inPolygon(u, v, TRIANGLE);
    case 'star':
      return inPolygon(u, v, STAR);
    case 'cross':
      return (Math.abs(u) <= 0.3 && Math.abs(v) <= 0.95) || (Math.abs(v) <= 0.3 && Math.abs(u) <= 0.95);
    case 'heart': {
      // The sextic heart (x² + y² − 1)³ − x²y³ ≤ 0, scaled to the unit box and flipped (y up).
      const x = u * 1.25;
      const y = -v * 1.25 + 0.25;
      const a = x * x + y * y - 1;
      return a * a * a - x * x * y * y * y <= 0;
    }
  }
}

/** The shape's coverage: 1 where a pixel centre is inside, row-major `size`×`size`. */
export function shapeMask(scene: Scene): Uint8Array {
  const { size, cx, cy, radius } = scene;
  const mask = new Uint8Array(size * size);
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      if (insideShape(scene.shape, (x + 0.5 - cx) / radius, (y + 0.5 - cy) / radius)) mask[y * size + x] = 1;
    }
  }
  return mask;
}

/** Pattern cell size in pixels: 1 at 32 px, growing with the image so patterns look alike at any size. */
export function patternUnit(size: number): number {
  return Math.max(1, Math.round(size / 32));
}

/**
 * Which inside pixels take the shape colour: 1 = colour, 0 = background. Styles:
 * solid (all), striped (horizontal bands 2 units on / 2 off), dotted (a background dot every 3
 * units), outlined (a ring 2 units wide), checkered (2-unit checks).
 */
export function paintMask(scene: Scene): Uint8Array {
  const { size } = scene;
  const inside = shapeMask(scene);
  const unit = patternUnit(size);
  const paint = new Uint8Array(size * size);
  const ring = 2 * unit;
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      const i = y * size + x;
      if (inside[i] === 0) continue;
      let on: boolean;
      switch (scene.style) {
        case 'solid':
          on = true;
          break;
        case 'striped':
          on = Math.floor(y / (2 * unit)) % 2 === 0;
          break;
        case 'dotted':
          on = !(Math.floor(x / unit) % 3 === 1 && Math.floor(y / unit) % 3 === 1);
          break;
        case 'checkered':
          on = (Math.floor(x / (2 * unit)) + Math.floor(y / (2 * unit))) % 2 === 0;
          break;
        case 'outlined':
          on = nearOutside(inside, size, x, y, ring);
          break;
      }
      if (on) paint[i] = 1;
    }
  }
  return paint;
}

// True when a pixel within Chebyshev distance `d` of (x, y) is outside the shape (or the image).
function nearOutside(inside: Uint8Array, size: number, x: number, y: number, d: number): boolean {
  for (let dy = -d; dy <= d; dy++) {
    for (let dx = -d; dx <= d; dx++) {
      const xx = x + dx;
      const yy = y + dy;
      if (xx < 0 || yy < 0 || xx >= size || yy >= size || inside[yy * size + xx] === 0) return true;
    }
  }
  return false;
}

/** Renders a scene as an 8-bit RGB image. */
export function renderScene(scene: Scene): Image8 {
  const { size } = scene;
  const paint = paintMask(scene);
  const fg = COLOURS[scene.colour];
  const bg = BACKGROUNDS[scene.background];
  const data = new Uint8Array(size * size * 3);
  for (let i = 0; i < size * size; i++) {
    const c = paint[i] === 1 ? fg : bg;
    data[3 * i] = c[0];
    data[3 * i + 1] = c[1];
    data[3 * i + 2] = c[2];
  }
  return { width: size, height: size, channels: 3, data };
}
