/**
 * Benchmark configs (`configs/bench/*.yaml`): which prompts, which models to compare (each a base
 * model plus optional add-ons), how to generate, which detectors, where results go. Read with the
 * same machinery as training configs — YAML/JSON, `--set key.path=value` overrides applied before
 * validation, one error line per problem — and a `preset:` that fills in a published protocol's
 * settings (`presets.ts`) wherever the config leaves them unset.
 */
import { z } from 'zod';

import { SAMPLER_KINDS } from '../schedulers/sampler.js';
import {
  applyOverrides,
  BACKEND_CHOICES,
  ConfigError,
  describeFields,
  formatConfigIssues,
  parseOverride,
  readConfigFile,
  type RawConfig,
} from '../train/config.js';
import { detectorConfigSchema, getDetectorPlugin } from './detectors/registry.js';
import type { DetectorCommonConfig } from './detectors/types.js';
import { applyPreset, PRESET_NAMES } from './presets.js';
import { PROMPT_SETS } from './prompts.js';

/** A benchmark config problem: one line per issue, each naming the field. */
export class EvalConfigError extends Error {
  override name = 'EvalConfigError';
  constructor(
    readonly source: string,
    readonly issues: readonly string[],
  ) {
    super(`${source}: invalid benchmark config:\n${issues.map((i) => `  ${i}`).join('\n')}`);
  }
}

const slug = z.string().regex(/^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/, 'letters, digits, _ . - (at most 64; it names folders and columns)');
const oneOrMany = z.union([z.string().min(1), z.array(z.string().min(1))]);

const columnsSchema = z.strictObject({
  prompt: z.string().min(1).optional().describe("The prompt column. Default 'prompt'."),
  id: z.string().min(1).nullable().optional().describe("Unique id per row (I2P/ESD: case_number). Default case_number if present, else the row's position."),
  seed: z.string().min(1).nullable().optional().describe('Per-prompt seed. Default evaluation_seed if present.'),
  guidance: z.string().min(1).nullable().optional().describe('Per-prompt CFG scale. Default evaluation_guidance if present.'),
  categories: z.string().min(1).nullable().optional().describe("Comma-separated labels (I2P's categories). Default categories if present."),
  label: z.string().min(1).nullable().optional().describe('What a row is about (artist, class). Default artist/class/label_str if present.'),
});

const promptsSchema = z
  .strictObject({
    set: z
      .enum(Object.keys(PROMPT_SETS) as [string, ...string[]])
      .optional()
      .describe(`A shipped prompt set: ${Object.keys(PROMPT_SETS).join(', ')}.`),
    csv: z.string().min(1).optional().describe('A CSV file of prompts (relative paths from the current folder).'),
    columns: columnsSchema.optional().describe('Column names, where they differ from the defaults.'),
    categories: z.array(z.string().min(1)).min(1).optional().describe('Keep rows whose categories include any of these (I2P: sexual, violence, …).'),
  })
  .superRefine((p, ctx) => {
    if ((p.set === undefined) === (p.csv === undefined)) ctx.addIssue({ code: 'custom', message: 'give exactly one of set (a shipped prompt set) and csv (a file)' });
  });

const modelSchema = z.strictObject({
  name: slug.describe('Name in results and the report (the first model is the baseline the others are compared with). Required.'),
  model: z.string().min(1).describe('A diffusers folder or single-file checkpoint (engine tfjs), or an `sdwb export` folder (engine onnx). Required.'),
  embedding: oneOrMany.optional().describe('Textual-inversion embedding file(s), as `sdwb generate --embedding`.'),
  hypernetwork: oneOrMany.optional().describe('Hypernetwork file(s), `file` or `file:strength`.'),
  lora: oneOrMany.optional().describe('LoRA file(s), `file` or `file:weight`.'),
  delta: oneOrMany.optional().describe('Weight delta(s) of a concept edit (ESD, UCE, …).'),
});

const size = z.number().int().min(8).max(8192);

/** The benchmark config schema (detector entries from the registry). */
export function evalConfigSchema() {
  return z
    .strictObject({
      preset: z
        .enum(PRESET_NAMES)
        .nullable()
        .default(null)
        .describe(`A published protocol whose settings fill unset fields: ${PRESET_NAMES.join(', ')}. Default null.`),
      prompts: promptsSchema.describe('Where the prompts come from. Required.'),
      limit: z.number().int().min(1).nullable().default(null).describe('Use only the first N prompts (after the category filter). Default null: all.'),
      models: z.array(modelSchema).min(1).describe('The models to compare; the first is the baseline. Required.'),
      engine: z.enum(['tfjs', 'onnx']).default('tfjs').describe('tfjs (diffusers folders, add-ons) or onnx (sdwb export folders via onnxruntime). Default tfjs.'),
      images_per_prompt: z
        .number()
        .int()
        .min(1)
        .max(1000)
        .default(1)
        .describe("Images per prompt and model; image k's noise is slice k of one batch drawn from the prompt's seed (as ESD's script draws them). Default 1."),
      steps: z.number().int().min(1).max(10_000).default(50).describe('Sampler steps. Default 50.'),
      sampler: z.enum(SAMPLER_KINDS).nullable().default(null).describe(`${SAMPLER_KINDS.join(', ')}. Default null: the model's scheduler.`),
      size: z
        .union([size, z.tuple([size, size])])
        .nullable()
        .default(null)
        .describe('Image size: a side, or [width, height]. Default null: the model default.'),
      guidance: z.number().min(0).max(1000).default(7.5).describe('CFG scale where the CSV gives none (or always, with guidance_from_csv false). Default 7.5.'),
      guidance_from_csv: z.boolean().default(true).describe("Use the prompt's guidance column when it has one. Default true."),
      seed: z
        .number()
        .int()
        .min(0)
        .max(2 ** 32 - 1)
        .default(0)
        .describe('Prompts without a CSV seed use seed + their row position. Default 0.'),
      seed_from_csv: z.boolean().default(true).describe("Use the prompt's seed column when it has one. Default true."),
      negative_prompt: z.string().default('').describe('Negative prompt for every image. Default "".'),
      detectors: z
        .array(detectorConfigSchema())
        .min(1)
        .prefault([{ type: 'nsfwjs' }])
        .describe('Detectors run on every image. Default [nsfwjs] (bundled, no download).'),
      output_dir: z.string().min(1).describe('Folder for images, rows, summary and report. Required.'),
      backend: z.enum(BACKEND_CHOICES).default('auto').describe('tfjs backend (generation on tfjs, nsfwjs). Default auto.'),
      threads: z.number().int().min(1).max(256).nullable().default(null).describe('onnxruntime threads for engine onnx. Default null: all cores.'),
      report: z
        .strictObject({
          thumbnail: z.number().int().min(16).max(1024).default(128).describe('Longest side of report thumbnails in pixels. Default 128.'),
          top_prompts: z.number().int().min(0).max(1000).default(8).describe('Prompts with the largest change shown as image grids. Default 8.'),
        })
        .default({ thumbnail: 128, top_prompts: 8 })
        .describe('Report layout.'),
    })
    .superRefine((cfg, ctx) => {
      const names = new Map<string, number>();
      cfg.models.forEach((m, i) => {
        const first = names.get(m.name);
        if (first !== undefined) ctx.addIssue({ code: 'custom', path: ['models', i, 'name'], message: `'${m.name}' is also the name of models.${first}; names must be unique` });
        names.set(m.name, i);
        const addons = (['embedding', 'hypernetwork', 'lora', 'delta'] as const).filter((k) => m[k] !== undefined);
        if (cfg.engine === 'onnx' && addons.length > 0) {
          ctx.addIssue({
            code: 'custom',
            path: ['models', i, addons[0]!],
            message: 'add-ons need engine tfjs (an ONNX export is a fixed graph: export the model with the add-on baked in instead)',
          });
        }
      });
      const detectorNames = new Map<string, number>();
      cfg.detectors.forEach((d, i) => {
        const dc = d as unknown as DetectorCommonConfig;
        const name = dc.name ?? dc.type;
        const first = detectorNames.get(name);
        if (first !== undefined) ctx.addIssue({ code: 'custom', path: ['detectors', i, 'name'], message: `two detectors named '${name}' (detectors.${first} too); give one a name` });
        detectorNames.set(name, i);
        const labels = getDetectorPlugin(dc.type).labelsOf(dc as never);
        const unknown = labels === undefined ? [] : (dc.classes ?? []).filter((c) => !labels.includes(c));
        if (unknown.length > 0) ctx.addIssue({ code: 'custom', path: ['detectors', i, 'classes'], message: `${unknown.join(', ')} not among ${dc.type}'s classes (${labels!.join(', ')})` });
      });
    });
}

/** A parsed benchmark config. */
export type EvalConfig = z.output<ReturnType<typeof evalConfigSchema>>;
/** One entry of `models:`. */
export type ModelEntry = EvalConfig['models'][number];

/** Validates a raw config document (overrides already applied); the preset fills unset fields first. */
export function parseEvalConfig(raw: RawConfig, source: string): EvalConfig {
  const schema = evalConfigSchema();
  const withPreset = applyPreset(raw, raw['preset']);
  const result = schema.safeParse(withPreset);
  if (result.success) return result.data;
  throw new EvalConfigError(source, formatConfigIssues(result.error.issues, schema, withPreset));
}

/** Reads a config file (optional: `--set` alone can make one), applies `--set` overrides, validates. */
export async function loadEvalConfig(file: string | undefined, overrides: readonly string[] = []): Promise<{ config: EvalConfig; raw: RawConfig; source: string }> {
  try {
    const base = file === undefined ? {} : await readConfigFile(file);
    const parsed = overrides.map(parseOverride);
    // The preset (possibly chosen by --set) fills the file's unset fields first, so --set can
    // also adjust what the preset brought (`--set detectors.0.threshold=0.7`).
    const preset = applyOverrides(base, parsed)['preset'];
    const raw = applyOverrides(applyPreset(base, preset), parsed);
    const source = file ?? '--set';
    return { config: parseEvalConfig(raw, source), raw, source };
  } catch (e) {
    if (e instanceof ConfigError) throw new EvalConfigError(e.source, e.issues);
    throw e;
  }
}

/** `field: description` lines of the benchmark config (for `sdwb eval --fields`). */
export function describeEvalFields(): string[] {
  return describeFields(evalConfigSchema());
}

/** Image width and height from `size` (null when the model default applies). */
export function configuredSize(cfg: Pick<EvalConfig, 'size'>): { width: number; height: number } | null {
  if (cfg.size === null) return null;
  return typeof cfg.size === 'number' ? { width: cfg.size, height: cfg.size } : { width: cfg.size[0], height: cfg.size[1] };
}
