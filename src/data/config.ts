/**
 * The `data:` section of a training config. Field names follow diffusers' training scripts
 * (`resolution`, `center_crop`, `random_flip`, `repeats`, `instance_prompt`) and kohya-ss
 * (`caption_extension`, `shuffle_caption`, `keep_tokens`, `caption_dropout_rate`) so configs read
 * like the flags people already know.
 */
import { z } from 'zod';

/** The image file extensions the folder scan accepts (lower case; matching ignores case). */
export const IMAGE_EXTENSIONS = ['.jpg', '.jpeg', '.png', '.webp', '.gif'] as const;

// Multiples of 8: the SD VAE downsamples by 8, so other sizes cannot round-trip through latents.
const size = z.number().int().min(8).max(8192).multipleOf(8, 'expected a multiple of 8 (the VAE downsampling factor)');

/** zod schema of the `data:` section; `DataConfig` is its parsed type. */
export const dataConfigSchema = z
  .strictObject({
    dir: z.string().min(1).describe(`Folder of training images (${IMAGE_EXTENSIONS.join(', ')}). Required.`),
    resolution: size
      .default(512)
      .describe('Square training size in pixels: images are resized so they cover it, then cropped. Default 512.'),
    width: size.optional().describe('Training width in pixels when not square. Default: resolution.'),
    height: size.optional().describe('Training height in pixels when not square. Default: resolution.'),
    center_crop: z
      .boolean()
      .default(true)
      .describe('true: crop the centre after resizing; false: a random crop per sample and epoch (seeded). Default true.'),
    random_flip: z
      .boolean()
      .default(false)
      .describe('Mirror each sample left–right with probability 0.5, drawn per sample and epoch (seeded). Default false.'),
    repeats: z
      .number()
      .int()
      .min(1)
      .default(1)
      .describe('How many times each image appears per epoch (diffusers textual inversion uses 100). Default 1.'),
    caption_extension: z
      .string()
      .regex(/^\.[^/\\]+$/, 'expected an extension starting with "." such as ".txt"')
      .default('.txt')
      .describe('Extension of sidecar caption files: name.png is captioned by name.txt. Default ".txt".'),
    template: z
      .enum(['object', 'style', 'none'])
      .default('none')
      .describe(
        "Textual-inversion prompt templates with {} replaced by the placeholder token: 'object' (\"a photo of a {}\", …), 'style' (\"a painting in the style of {}\", …) or 'none' (sidecar captions). Default 'none'.",
      ),
    instance_prompt: z
      .string()
      .optional()
      .describe('A fixed caption for every image (DreamBooth, e.g. "a photo of sks dog"); overrides sidecar captions. Default: unset.'),
    shuffle_caption: z
      .boolean()
      .default(false)
      .describe('Shuffle the comma-separated tags of each caption (seeded), keeping the first keep_tokens in place. Default false.'),
    keep_tokens: z
      .number()
      .int()
      .min(0)
      .default(0)
      .describe('Number of leading comma-separated tags that shuffle_caption leaves in place. Default 0.'),
    caption_dropout_rate: z
      .number()
      .min(0)
      .max(1)
      .default(0)
      .describe('Probability of replacing a caption by "" (trains the unconditional branch), drawn per sample and epoch (seeded). Default 0.'),
    on_bad_image: z
      .enum(['skip', 'fail'])
      .default('skip')
      .describe("Unreadable, corrupt or too-small images: 'skip' reports them by name and trains on the rest; 'fail' stops with the list. Default 'skip'."),
    upscale_small: z
      .boolean()
      .default(false)
      .describe('Enlarge images smaller than the training size instead of treating them as bad. Default false.'),
    background: z
      .string()
      .regex(/^#[0-9a-fA-F]{6}$/, 'expected a colour like "#ffffff"')
      .default('#ffffff')
      .describe('Colour that transparent pixels are flattened onto. Default "#ffffff" (white).'),
    cache_latents: z
      .boolean()
      .default(false)
      .describe('Cache VAE latents (mean and std) on disk, keyed by file content, crop, flip and VAE weights. Default false.'),
    recursive: z.boolean().default(false).describe('Also look for images in subfolders. Default false.'),
  })
  .superRefine((c, ctx) => {
    if (c.instance_prompt !== undefined && c.template !== 'none') {
      ctx.addIssue({
        code: 'custom',
        path: ['instance_prompt'],
        message: `set either instance_prompt or template, found both (template '${c.template}')`,
      });
    }
  });

/** The parsed `data:` section, defaults applied. */
export type DataConfig = z.infer<typeof dataConfigSchema>;
/** The `data:` section as written, before defaults. */
export type DataConfigInput = z.input<typeof dataConfigSchema>;

/** The training size (width, height) a data config asks for. */
export function targetSize(config: Pick<DataConfig, 'resolution' | 'width' | 'height'>): { width: number; height: number } {
  return { width: config.width ?? config.resolution, height: config.height ?? config.resolution };
}

/** Parses a `data:` section, applying defaults; errors name each bad key (`data.resolution: …`). */
export function parseDataConfig(value: unknown): DataConfig {
  const result = dataConfigSchema.safeParse(value);
  if (result.success) return result.data;
  const issues = result.error.issues.map((i) => {
    const key = ['data', ...i.path.map(String)].join('.');
    return i.code === 'invalid_type' && i.input === undefined ? `${key}: required, found it missing` : `${key}: ${i.message}`;
  });
  throw new Error(`data config: ${issues.join('; ')}`);
}
