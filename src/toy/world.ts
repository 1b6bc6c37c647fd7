/**
 * The toy world's vocabulary and its seeded scene sampler: one shape of one colour and one style
 * on a plain background, captioned "a red striped circle on a black background".
 *
 * Two concepts are held out of pretraining captions. Both are drawn in the `pretrain` split but
 * never named, because a tiny model cannot invent what it has never drawn (sessions 3–5 measured
 * it: textual inversion of a never-drawn heart and a hypernetwork for a never-drawn checkered
 * style stalled near 50 %); what the methods learn is how to ask for something the generator can
 * already make:
 * - the held-out shape (heart) is captioned "shape", as are one in twenty of the other shapes'
 *   captions; textual inversion finds a word for it;
 * - the held-out style (checkered) is captioned "patterned", as are one in twenty of the other
 *   styles' captions, and another one in twenty of those leave the style word out — so a caption
 *   without a style word means "one of the named styles", and a hypernetwork must change that
 *   default to checkered.
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
  /** How the caption gives the style (pretraining only; absent means by name). */
  readonly styleWord?: StyleWord;
}

/** A caption names the style, says "patterned", or leaves the style out. */
export type StyleWord = 'named' | 'generic' | 'omitted';

/** The word pretraining captions use for an unnamed shape. */
export const GENERIC_SHAPE_WORD = 'shape';
/** How often a pretraining caption says "shape" for a shape it could name. */
export const GENERIC_SHAPE_RATE = 0.05;
/** The word pretraining captions use for an unnamed style. */
export const GENERIC_STYLE_WORD = 'patterned';
/** How often a pretraining caption says "patterned" for a style it could name. */
export const GENERIC_STYLE_RATE = 0.05;
/** How often a pretraining caption of a named style leaves the style word out. */
export const STYLELESS_RATE = 0.05;

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

/** The styles pretraining captions name. */
export const NAMED_STYLES: readonly Style[] = STYLES.filter((s) => s !== HELD_OUT.style);

/** The styles a split draws from (pretraining draws the held-out style, unnamed). */
export function stylesOf(split: Split): readonly Style[] {
  if (split === 'heldout-style') return [HELD_OUT.style];
  if (split === 'all' || split === 'pretrain') return STYLES;
  return NAMED_STYLES;
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
  const u = random.nextFloat();
  const styleWord: StyleWord = style === HELD_OUT.style || u < GENERIC_STYLE_RATE ? 'generic' : u < GENERIC_STYLE_RATE + STYLELESS_RATE ? 'omitted' : 'named';
  return { ...scene, shapeNamed: named, styleWord };
}

/** The caption of a scene: "a red striped circle on a black background" ("… patterned shape …", "a red circle …" in pretraining). */
export function captionOf(scene: Pick<Scene, 'shape' | 'colour' | 'style' | 'background' | 'shapeNamed' | 'styleWord'>): string {
  const shape = scene.shapeNamed === false ? GENERIC_SHAPE_WORD : scene.shape;
  const style = scene.styleWord === 'generic' ? `${GENERIC_STYLE_WORD} ` : scene.styleWord === 'omitted' ? '' : `${scene.style} `;
  return `a ${scene.colour} ${style}${shape} on a ${scene.background} background`;
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
