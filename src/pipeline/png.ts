/**
 * Writing generated images as PNG files with AUTOMATIC1111's `parameters` text chunk, so any SD
 * UI's "PNG Info" shows (and can re-run) the settings that made them.
 */
import path from 'node:path';
import { mkdir, readdir } from 'node:fs/promises';
import sharp from 'sharp';
import { writeFileAtomic } from '../io/atomic.js';
import { addPngText, formatParameters, type GenerationParameters } from '../io/png-text.js';
import type { Image8 } from '../models/vae/vae.js';
import type { SamplerKind } from '../schedulers/sampler.js';
import type { GenerateResult } from './txt2img.js';

/** What the A1111 parameters record of the model that made an image; any engine's loaded model has it. */
export interface ModelIdentity {
  /** A1111's `Model hash`. */
  readonly modelHash: string;
  /** A1111's `Model`. */
  readonly name: string;
}

const A1111_SAMPLER_NAMES: Readonly<Record<SamplerKind, string>> = {
  ddim: 'DDIM',
  pndm: 'PLMS',
  lms: 'LMS',
  euler: 'Euler',
  euler_a: 'Euler a',
  dpmpp_2m: 'DPM++ 2M',
};

/** A1111's sampler name: `DDIM`, `PLMS`, `LMS`, `Euler`, `Euler a`, `DPM++ 2M`, with ` Karras` for Karras σ. */
export function a1111SamplerName(kind: SamplerKind, karras: boolean): string {
  return `${A1111_SAMPLER_NAMES[kind]}${karras ? ' Karras' : ''}`;
}

/** The A1111 parameters of image `index` of a run; `extra` (add-ons' `TI hashes`, `Hypernet`, …) comes last, as A1111 appends them. */
export function generationParameters(
  model: ModelIdentity,
  result: GenerateResult,
  index: number,
  extra: Readonly<Record<string, string>> = {},
): GenerationParameters {
  const s = result.settings;
  const settings: Record<string, string> = {
    Steps: String(s.steps),
    Sampler: a1111SamplerName(s.sampler, s.karras),
    'CFG scale': String(s.guidance),
    Seed: String(result.seed),
    Size: `${s.width}x${s.height}`,
    'Model hash': model.modelHash,
    Model: model.name,
  };
  if (s.strength !== undefined) settings['Denoising strength'] = String(s.strength);
  if (s.sampler === 'ddim' && s.eta !== 0) settings['Eta DDIM'] = String(s.eta);
  // A1111 counts the last layer as 1: its "Clip skip: 2" is our clipSkip 1.
  if (s.clipSkip > 0) settings['Clip skip'] = String(s.clipSkip + 1);
  Object.assign(settings, extra);
  return { prompt: result.prompts[index] ?? '', negativePrompt: result.negativePrompts[index] ?? '', settings };
}

/** An 8-bit RGB image as PNG bytes with text chunks. */
export async function encodePng(image: Image8, text: Readonly<Record<string, string>>): Promise<Uint8Array> {
  const png = await sharp(Buffer.from(image.data.buffer, image.data.byteOffset, image.data.byteLength), {
    raw: { width: image.width, height: image.height, channels: image.channels as 1 | 2 | 3 | 4 },
  })
    .png()
    .toBuffer();
  return addPngText(new Uint8Array(png.buffer, png.byteOffset, png.byteLength), text);
}

/** One past the largest `<index>-….png` in `dir` (0 for an empty or missing folder), so runs never overwrite. */
export async function nextImageIndex(dir: string): Promise<number> {
  const names = await readdir(dir).catch(() => [] as string[]);
  let next = 0;
  for (const name of names) {
    const m = /^(\d+)-.*\.png$/.exec(name);
    if (m !== null) next = Math.max(next, Number(m[1]) + 1);
  }
  return next;
}

/**
 * Write every image of a run to `outDir` as `<index>-<seed>.png`, indices continuing after the
 * folder's existing images, each atomically (temporary file + rename). Returns the paths written.
 */
export async function writeImages(
  model: ModelIdentity,
  result: GenerateResult,
  outDir: string,
  extra: Readonly<Record<string, string>> = {},
): Promise<string[]> {
  await mkdir(outDir, { recursive: true });
  const firstIndex = await nextImageIndex(outDir);
  const paths: string[] = [];
  for (const [i, image] of result.images.entries()) {
    const file = path.join(outDir, `${firstIndex + i}-${String(result.seed)}.png`);
    const bytes = await encodePng(image, { parameters: formatParameters(generationParameters(model, result, i, extra)) });
    await writeFileAtomic(file, async (handle) => {
      await handle.writeFile(bytes);
    });
    paths.push(file);
  }
  return paths;
}
