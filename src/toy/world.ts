/**
 * The toy world's vocabulary and its seeded scene sampler: one shape of one colour and one style
 * on a plain background, captioned "a red striped circle on a black background".
 *
 * Two concepts are held out of pretraining captions, in the two ways the methods that learn them
 * later need. The held-out shape (heart) is drawn in the `pretrain` split but never named: its
 * captions say "shape", as do a fifth of the other shapes' captions — so the toy model can draw a
 * heart without having a word for it, which is what textual inversion finds (a word for something
 * the generator can already make; a tiny model cannot invent a new shape from an embedding). The
 * held-out style (checkered) is not in the `pretrain` split at all — a hypernetwork adds weights
 * and must teach the UNet a style it has never drawn.
 *
 * Every scene is a pure function of (seed, split, index): a generator keyed by the three (the
 * counter-based scheme of `src/data/rng.ts`), so any image of a dataset can be redrawn alone.
 */
import { SeededRandom } from '../data/rng.js';

/** Shapes, in classifier-label order. */
export const SHAPES = ['circle', 'square', 'triangle', 'star', 'cross', 'heart'] as const;
/** Fill styles, in classifier-label order. */
export const STYLES = ['solid', 'striped', 'dotted', 'outlined', 'checkered'] as const;

export type Shape = (typeof SHAPES)[number];
export type Style = (typeof STYLES)[number];

/** Shape colours with their exact 8-bit RGB values (chosen far apart and far from every background). */
export const COLOURS = {
  red: [220, 30, 30],
  green: [30, 170, 50],
  blue: [40, 70, 230],
  yellow: [245, 215, 30],
  purple: [150, 50, 200],
  orange: [250, 130, 20],
} as const satisfies Record<string, readonly [number, number, number]>;
export type Colour = keyof typeof COLOURS;
/** Colour names in classifier-label order. */
export const COLOUR_NAMES = Object.keys(COLOURS) as readonly Colour[];

/** Backgrounds with their exact 8-bit RGB values. */
export const BACKGROUNDS = {
  black: [0, 0, 0],
  white: [255, 255, 255],
  grey: [128, 128, 128],
} as const satisfies Record<string, readonly [number, number, number]>;
export type Background = keyof typeof BACKGROUNDS;
export const BACKGROUND_NAMES = Object.keys(BACKGROUNDS) as readonly Background[];

/** The concepts kept out of pretraining captions (the style also out of its images). */
export const HELD_OUT = { shape: 'heart', style: 'checkered' } as const satisfies { shape: Shape; style: Style };

/** Which scenes a dataset draws. */
export const SPLITS = ['pretrain', 'heldout-shape', 'heldout-style', 'all'] as const;
export type Split = (typeof SPLITS)[number];

/** One scene: everything the rasteriser needs, in pixels of a `size`×`size` image. */
export interface Scene {
  readonly size: number;
  readonly shape: Shape;
  readonly colour: Colour;
  readonly style: Style;
  readonly background: Background;
  /** Centre in pixels (continuous coordinates: pixel (x, y) covers [x, x+1) × [y, y+1)). */
  readonly cx: number;
  readonly cy: number;
  /** Half the shape's extent in pixels. */
  readonly radius: number;
  /** False when the caption says "shape" instead of the shape's name (pretraining only). */
  readonly shapeNamed?: boolean;
}

/** The word pretraining captions use for an unnamed shape. */
export const GENERIC_SHAPE_WORD = 'shape';
/** How often a pretraining caption says "shape" for a shape it could name. */
export const GENERIC_SHAPE_RATE = 0.05;

// Seed stream of scene draws (apart from the data pipeline's streams 1–6).
const SCENE_STREAM = 301;

/** The shapes a split draws from (pretraining draws the held-out shape, unnamed). */
export function shapesOf(split: Split): readonly Shape[] {
  if (split === 'heldout-shape') return [HELD_OUT.shape];
  if (split === 'all' || split === 'pretrain') return SHAPES;
  return NAMED_SHAPES;
}

/** The shapes pretraining captions name. */
export const NAMED_SHAPES: readonly Shape[] = SHAPES.filter((s) => s !== HELD_OUT.shape);

/** The styles a split draws from. */
export function stylesOf(split: Split): readonly Style[] {
  if (split === 'heldout-style') return [HELD_OUT.style];
  if (split === 'all') return STYLES;
  return STYLES.filter((s) => s !== HELD_OUT.style);
}

/** Scene `index` of a split: attributes uniform over the split's lists, size and position uniform. */
export function sampleScene(seed: number, split: Split, index: number, size: number): Scene {
  if (!Number.isInteger(size) || size < 16) throw new Error(`toy scene: size must be an integer ≥ 16, found ${size}`);
  const random = new SeededRandom(seed, SCENE_STREAM, SPLITS.indexOf(split), index);
  const pick = <E>(list: readonly E[]): E => list[random.uniformInt(list.length)]!;
  const shape = pick(shapesOf(split));
  const colour = pick(COLOUR_NAMES);
  const style = pick(stylesOf(split));
  const background = pick(BACKGROUND_NAMES);
  // Radius 25–40% of the side: big enough to read the shape at 32 px, small enough to move around.
  const radius = size * (0.25 + 0.15 * random.nextFloat());
  const margin = radius + 1;
  const cx = margin + (size - 2 * margin) * random.nextFloat();
  const cy = margin + (size - 2 * margin) * random.nextFloat();
  const scene = { size, shape, colour, style, background, cx, cy, radius };
  if (split !== 'pretrain') return scene;
  const named = shape !== HELD_OUT.shape && random.nextFloat() >= GENERIC_SHAPE_RATE;
  return { ...scene, shapeNamed: named };
}

/** The caption of a scene: "a red striped circle on a black background" ("… striped shape …" when unnamed). */
export function captionOf(scene: Pick<Scene, 'shape' | 'colour' | 'style' | 'background' | 'shapeNamed'>): string {
  const shape = scene.shapeNamed === false ? GENERIC_SHAPE_WORD : scene.shape;
  return `a ${scene.colour} ${scene.style} ${shape} on a ${scene.background} background`;
}

/** The concepts a caption names (the inverse of {@link captionOf}), or undefined for other text. */
export function parseCaption(caption: string): { shape: Shape; colour: Colour; style: Style; background: Background } | undefined {
  const m = /^a (\w+) (\w+) (\w+) on a (\w+) background$/.exec(caption.trim());
  if (m === null) return undefined;
  const [, colour, style, shape, background] = m as unknown as [string, string, string, string, string];
  if (!(COLOUR_NAMES as readonly string[]).includes(colour)) return undefined;
  if (!(STYLES as readonly string[]).includes(style)) return undefined;
  if (!(SHAPES as readonly string[]).includes(shape)) return undefined;
  if (!(BACKGROUND_NAMES as readonly string[]).includes(background)) return undefined;
  return { colour: colour as Colour, style: style as Style, shape: shape as Shape, background: background as Background };
}
