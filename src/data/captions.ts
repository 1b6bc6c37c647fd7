/**
 * Captions for training images: sidecar text files (kohya-ss convention), textual-inversion
 * prompt templates (diffusers' `textual_inversion.py`), a fixed DreamBooth instance prompt, and
 * the kohya caption augmentations (tag shuffling, caption dropout).
 */
import { readFile } from 'node:fs/promises';

import type { SeededRandom } from './rng.js';

/** diffusers' `imagenet_templates_small`: the textual-inversion prompts for an object. */
export const OBJECT_TEMPLATES: readonly string[] = Object.freeze([
  'a photo of a {}',
  'a rendering of a {}',
  'a cropped photo of the {}',
  'the photo of a {}',
  'a photo of a clean {}',
  'a photo of a dirty {}',
  'a dark photo of the {}',
  'a photo of my {}',
  'a photo of the cool {}',
  'a close-up photo of a {}',
  'a bright photo of the {}',
  'a cropped photo of a {}',
  'a photo of the {}',
  'a good photo of the {}',
  'a photo of one {}',
  'a close-up photo of the {}',
  'a rendition of the {}',
  'a photo of the clean {}',
  'a rendition of a {}',
  'a photo of a nice {}',
  'a good photo of a {}',
  'a photo of the nice {}',
  'a photo of the small {}',
  'a photo of the weird {}',
  'a photo of the large {}',
  'a photo of a cool {}',
  'a photo of a small {}',
]);

/** diffusers' `imagenet_style_templates_small`: the textual-inversion prompts for a style. */
export const STYLE_TEMPLATES: readonly string[] = Object.freeze([
  'a painting in the style of {}',
  'a rendering in the style of {}',
  'a cropped painting in the style of {}',
  'the painting in the style of {}',
  'a clean painting in the style of {}',
  'a dirty painting in the style of {}',
  'a dark painting in the style of {}',
  'a picture in the style of {}',
  'a cool painting in the style of {}',
  'a close-up painting in the style of {}',
  'a bright painting in the style of {}',
  'a cropped painting in the style of {}',
  'a good painting in the style of {}',
  'a close-up painting in the style of {}',
  'a rendition in the style of {}',
  'a nice painting in the style of {}',
  'a small painting in the style of {}',
  'a weird painting in the style of {}',
  'a large painting in the style of {}',
]);

/** Which template list a textual-inversion run draws from ('none': captions come from elsewhere). */
export type TemplateKind = 'object' | 'style' | 'none';

/** The template list for a kind, or an empty list for 'none'. */
export function templatesFor(kind: TemplateKind): readonly string[] {
  return kind === 'object' ? OBJECT_TEMPLATES : kind === 'style' ? STYLE_TEMPLATES : [];
}

/** Fills every `{}` of a template with the placeholder token (Python's `str.format` with one argument). */
export function fillTemplate(template: string, placeholder: string): string {
  return template.split('{}').join(placeholder);
}

/** The sidecar caption path for an image: same folder and stem, `extension` instead of the image's. */
export function sidecarPath(imagePath: string, extension: string): string {
  const slash = Math.max(imagePath.lastIndexOf('/'), imagePath.lastIndexOf('\\'));
  const dot = imagePath.lastIndexOf('.');
  const stem = dot > slash + 1 ? imagePath.slice(0, dot) : imagePath;
  return stem + extension;
}

/**
 * Reads a sidecar caption: the first non-empty line, trimmed (kohya reads the first line; blank
 * leading lines are skipped here so an editor's stray newline does not erase the caption).
 * Returns undefined when the file does not exist.
 */
export async function readSidecarCaption(path: string): Promise<string | undefined> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (cause) {
    if ((cause as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new Error(`caption ${path}: cannot read (${cause instanceof Error ? cause.message : String(cause)})`, { cause });
  }
  if (text.startsWith('\uFEFF')) text = text.slice(1);
  for (const line of text.split(/\r?\n/)) {
    const trimmed = line.trim();
    if (trimmed !== '') return trimmed;
  }
  return '';
}

/**
 * kohya's `shuffle_caption`: splits on commas, keeps the first `keepTokens` tags in place and
 * shuffles the rest; tags are trimmed, empty ones dropped, and the result joined with ", ".
 */
export function shuffleCaption(caption: string, keepTokens: number, random: SeededRandom): string {
  const tags = caption
    .split(',')
    .map((t) => t.trim())
    .filter((t) => t !== '');
  const kept = tags.slice(0, keepTokens);
  const rest = random.shuffle(tags.slice(keepTokens));
  return [...kept, ...rest].join(', ');
}
