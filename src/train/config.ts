/**
 * Training run configs: YAML or JSON files validated by zod, with command-line overrides.
 *
 * One schema per method (`method:` selects it; `src/methods/registry.ts` joins them in a
 * discriminated union). Every method's schema starts from {@link commonFields} — the fields the
 * generic loop reads — with the method's own defaults where they differ (textual inversion's
 * learning rate, …). Field names follow diffusers' training scripts (`learning_rate`,
 * `gradient_accumulation_steps`, `lr_scheduler`, `adam_beta1`, `max_grad_norm`, …) so configs read
 * like the flags people already know; every default is stated in the field's `.describe()`.
 *
 * `--set key.path=value` overrides (values parsed as YAML scalars or flow lists) are applied to
 * the raw document before validation, so an override is checked exactly like the file. Errors
 * come one line per problem, each naming the field path and, for choices, the allowed values.
 * Relative paths are kept as written and resolved against the current folder, as command-line
 * paths are.
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';

import { parse as parseYaml, YAMLParseError } from 'yaml';
import { z } from 'zod';

import { dataConfigSchema } from '../data/config.js';
import { LR_SCHEDULE_NAMES, type LrSchedule } from './lr-schedule.js';

/** A config problem: one line per issue, each naming the field. */
export class ConfigError extends Error {
  override name = 'ConfigError';
  constructor(
    readonly source: string,
    readonly issues: readonly string[],
  ) {
    super(`${source}: invalid training config:\n${issues.map((i) => `  ${i}`).join('\n')}`);
  }
}

/** tfjs backends a config may ask for (see `src/backend.ts`). */
export const BACKEND_CHOICES = ['auto', 'wasm', 'cpu', 'tensorflow', 'node', 'node-gpu'] as const;

/** Defaults a method may set differently from the generic ones. */
export interface CommonDefaults {
  readonly steps?: number;
  readonly learning_rate?: number;
  readonly batch_size?: number;
  readonly gradient_accumulation_steps?: number;
  readonly lr_scheduler?: (typeof LR_SCHEDULE_NAMES)[number];
  readonly adam_weight_decay?: number;
  readonly save_every?: number;
}

// Sizes must survive the VAE's 8× downsampling (SD); tiny test models use smaller factors that 8 divides.
const pixelSize = z.number().int().min(8).max(8192).multipleOf(8, 'expected a multiple of 8 (the VAE downsampling factor)');

/**
 * The fields every method config has, as a zod shape to spread into the method's `z.strictObject`.
 * `d` changes defaults (and their descriptions) for one method.
 */
export function commonFields(d: CommonDefaults = {}) {
  const steps = d.steps;
  const lr = d.learning_rate ?? 1e-4;
  const accumulation = d.gradient_accumulation_steps ?? 1;
  const batch = d.batch_size ?? 1;
  const scheduler = d.lr_scheduler ?? 'constant';
  const weightDecay = d.adam_weight_decay ?? 1e-2;
  const saveEvery = d.save_every ?? 500;
  const stepsField = z.number().int().min(1);
  return {
    model: z
      .string()
      .min(1)
      .describe('Base model: a diffusers model folder (model_index.json, unet/, vae/, …) or a single-file checkpoint (.safetensors, .ckpt). Required.'),
    output_dir: z
      .string()
      .min(1)
      .describe('Folder for the trained files, checkpoint-<step>/ folders, metrics.jsonl, TensorBoard logs and samples. Required.'),
    steps: (steps === undefined ? stepsField : stepsField.default(steps)).describe(
      `Optimizer steps to train; each sees batch_size × gradient_accumulation_steps samples.${steps === undefined ? ' Required.' : ` Default ${steps}.`}`,
    ),
    seed: z
      .number()
      .int()
      .min(0)
      .max(2 ** 32 - 1)
      .default(0)
      .describe('Seed of every random choice: data order and augmentation, timesteps, noise, initial weights. Default 0.'),
    batch_size: z.number().int().min(1).default(batch).describe(`Samples per micro-batch (diffusers' train_batch_size). Default ${batch}.`),
    learning_rate: z.number().positive().default(lr).describe(`Peak learning rate. Default ${lr}.`),
    scale_lr: z
      .boolean()
      .default(false)
      .describe(
        'Multiply learning_rate by batch_size × gradient_accumulation_steps (diffusers --scale_lr, which its textual-inversion README turns on). Default false.',
      ),
    gradient_accumulation_steps: z
      .number()
      .int()
      .min(1)
      .default(accumulation)
      .describe(`Micro-batches whose mean gradient makes one optimizer step. Default ${accumulation}.`),
    lr_scheduler: z
      .enum(LR_SCHEDULE_NAMES)
      .default(scheduler)
      .describe(`Learning-rate schedule, diffusers' get_scheduler names (${LR_SCHEDULE_NAMES.join(', ')}). Default ${scheduler}.`),
    lr_warmup_steps: z.number().int().min(0).default(0).describe('Linear warmup from 0 over this many steps. Default 0.'),
    lr_num_cycles: z
      .number()
      .positive()
      .optional()
      .describe('cosine: periods of the cosine (default 0.5); cosine_with_restarts: number of restarts (default 1).'),
    lr_power: z.number().positive().default(1).describe('polynomial: decay exponent. Default 1.'),
    lr_step_rules: z
      .string()
      .optional()
      .describe('piecewise_constant: diffusers step rules such as "1:10,0.1:20,0.01" (multiplier:until_step, …, final multiplier). Required for that schedule.'),
    max_grad_norm: z
      .number()
      .positive()
      .nullable()
      .default(null)
      .describe('Clip the global L2 norm of the gradients to this value (torch clip_grad_norm_). Default null: no clipping.'),
    adam_beta1: z.number().min(0).lt(1).default(0.9).describe('AdamW β₁. Default 0.9.'),
    adam_beta2: z.number().min(0).lt(1).default(0.999).describe('AdamW β₂. Default 0.999.'),
    adam_epsilon: z.number().positive().default(1e-8).describe('AdamW ε. Default 1e-8.'),
    adam_weight_decay: z.number().min(0).default(weightDecay).describe(`AdamW decoupled weight decay. Default ${weightDecay}.`),
    save_every: z
      .number()
      .int()
      .min(1)
      .default(saveEvery)
      .describe(`Write checkpoint-<step>/ (weights, optimizer, RNG and data state) every this many steps, and always at the end. Default ${saveEvery}.`),
    keep_checkpoints: z
      .number()
      .int()
      .min(1)
      .nullable()
      .default(null)
      .describe('Keep only the newest this many checkpoint folders (diffusers checkpoints_total_limit). Default null: keep all.'),
    sample_every: z
      .number()
      .int()
      .min(1)
      .nullable()
      .default(null)
      .describe('Generate sample images every this many steps (and at the end). Default null: no samples.'),
    sample_prompts: z
      .array(z.string())
      .default([])
      .describe('Prompts of the sample images (a textual-inversion run can use its placeholder token). Default [].'),
    sample_seed: z.number().int().min(0).default(0).describe('Seed of the sample images: the same noise at every sampling step. Default 0.'),
    sample_steps: z.number().int().min(1).default(20).describe('Sampler steps per sample image. Default 20.'),
    sample_guidance_scale: z.number().min(0).default(7.5).describe('Classifier-free guidance of the sample images. Default 7.5.'),
    sample_negative_prompt: z.string().default('').describe('Negative prompt of the sample images. Default "".'),
    log_every: z.number().int().min(1).default(1).describe('Write metrics.jsonl and TensorBoard scalars every this many steps. Default 1.'),
    max_nonfinite_steps: z
      .number()
      .int()
      .min(1)
      .default(5)
      .describe('Steps whose loss or gradients are NaN/Inf are skipped; stop after this many in a row. Default 5.'),
    backend: z
      .enum(BACKEND_CHOICES)
      .default('auto')
      .describe('tfjs backend. Default auto (SDWB_BACKEND, else tfjs-node-gpu, tfjs-node, wasm, cpu).'),
    resolution: pixelSize
      .optional()
      .describe('Training size in pixels; copied to data.resolution (set it in one place only). Default: data.resolution.'),
    noise_offset: z
      .number()
      .min(0)
      .default(0)
      .describe('Add noise_offset × N(0,1) per sample and channel to the training noise (Guttenberg 2023). Default 0.'),
    prediction_type: z
      .enum(['epsilon', 'v_prediction'])
      .nullable()
      .default(null)
      .describe("Train for this target instead of the scheduler config's prediction_type. Default null: the model's."),
    fixed_noise: z
      .boolean()
      .default(false)
      .describe(
        'Debug: draw the noise and timesteps of step 0 and reuse them at every step, so the objective is fixed and the loss must fall. Default false.',
      ),
  };
}

/**
 * Cross-field rules of the common fields, for a method schema's `.superRefine` (zod checks each
 * field alone; these need two).
 */
export function checkCommonFields(cfg: CommonTrainingConfig, ctx: z.RefinementCtx): void {
  if (cfg.lr_scheduler === 'piecewise_constant' && cfg.lr_step_rules === undefined) {
    ctx.addIssue({ code: 'custom', path: ['lr_step_rules'], message: "required when lr_scheduler is 'piecewise_constant', found it missing" });
  }
  if (cfg.sample_every !== null && cfg.sample_prompts.length === 0) {
    ctx.addIssue({ code: 'custom', path: ['sample_prompts'], message: 'sample_every is set but there are no sample_prompts to generate' });
  }
}

/** The parsed common part of every method config. */
export const commonConfigSchema = z.object(commonFields());
export type CommonTrainingConfig = z.infer<typeof commonConfigSchema>;

/** The `data:` field for methods that read images (the `src/data` schema, required). */
export const dataField = dataConfigSchema;

/** Any method's parsed config: the common fields plus `method` and the method's own fields. */
export type MethodConfig = CommonTrainingConfig & { readonly method: string };

/** The LR schedule a parsed config describes (lr already scaled when scale_lr is set). */
export function lrScheduleOf(cfg: CommonTrainingConfig): LrSchedule {
  const baseLr = effectiveLearningRate(cfg);
  const warmupSteps = cfg.lr_warmup_steps;
  const totalSteps = cfg.steps;
  switch (cfg.lr_scheduler) {
    case 'constant':
      return { name: 'constant', baseLr };
    case 'constant_with_warmup':
      return { name: 'constant_with_warmup', baseLr, warmupSteps };
    case 'linear':
      return { name: 'linear', baseLr, warmupSteps, totalSteps };
    case 'cosine':
      return { name: 'cosine', baseLr, warmupSteps, totalSteps, ...(cfg.lr_num_cycles === undefined ? {} : { numCycles: cfg.lr_num_cycles }) };
    case 'cosine_with_restarts':
      return {
        name: 'cosine_with_restarts',
        baseLr,
        warmupSteps,
        totalSteps,
        ...(cfg.lr_num_cycles === undefined ? {} : { numCycles: cfg.lr_num_cycles }),
      };
    case 'polynomial':
      return { name: 'polynomial', baseLr, warmupSteps, totalSteps, power: cfg.lr_power };
    case 'piecewise_constant':
      if (cfg.lr_step_rules === undefined) {
        throw new ConfigError('config', ["lr_step_rules: required when lr_scheduler is 'piecewise_constant', found it missing"]);
      }
      return { name: 'piecewise_constant', baseLr, stepRules: cfg.lr_step_rules };
  }
}

/** learning_rate, times batch_size × gradient_accumulation_steps when scale_lr is set. */
export function effectiveLearningRate(cfg: CommonTrainingConfig): number {
  return cfg.scale_lr ? cfg.learning_rate * cfg.batch_size * cfg.gradient_accumulation_steps : cfg.learning_rate;
}

// =============================================================================================
// Reading files and overrides

/** A config document before validation (the YAML/JSON object, overrides applied). */
export type RawConfig = Record<string, unknown>;

/** Reads a YAML (.yaml/.yml) or JSON (.json) config file into a plain object. */
export async function readConfigFile(file: string): Promise<RawConfig> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new ConfigError(file, [code === 'ENOENT' ? 'file not found' : `cannot read (${code ?? String(e)})`]);
  }
  return parseConfigText(text, file);
}

/** Parses config text: JSON for `.json` names, YAML otherwise (YAML 1.2 also reads JSON). */
export function parseConfigText(text: string, source: string): RawConfig {
  let value: unknown;
  try {
    value = path.extname(source).toLowerCase() === '.json' ? JSON.parse(text) : parseYaml(text, { prettyErrors: true });
  } catch (e) {
    const message = e instanceof YAMLParseError ? e.message.split('\n')[0]! : (e as Error).message;
    throw new ConfigError(source, [`not valid ${path.extname(source).toLowerCase() === '.json' ? 'JSON' : 'YAML'}: ${message}`]);
  }
  if (value === null || value === undefined) return {};
  if (typeof value !== 'object' || Array.isArray(value)) {
    throw new ConfigError(source, [`expected a mapping of fields (method: …, model: …), found ${Array.isArray(value) ? 'a list' : typeof value}`]);
  }
  return value as RawConfig;
}

/** One `--set` override: the dotted path and the value parsed as YAML. */
export interface ConfigOverride {
  readonly path: readonly string[];
  readonly value: unknown;
  /** The text as given, for error messages. */
  readonly text: string;
}

/**
 * Parses `key.path=value`. The value is read as a YAML flow value: `5e-4` and `3000` are numbers,
 * `true` a boolean, `[a, b]` a list, `null` unsets a field, anything else a string.
 */
export function parseOverride(text: string): ConfigOverride {
  const eq = text.indexOf('=');
  if (eq <= 0) throw new ConfigError('--set', [`'${text}': expected key.path=value`]);
  const key = text.slice(0, eq).trim();
  const raw = text.slice(eq + 1);
  const parts = key.split('.');
  if (parts.some((p) => p === '')) throw new ConfigError('--set', [`'${text}': empty field name in '${key}'`]);
  let value: unknown;
  if (raw.trim() === '') value = '';
  else {
    try {
      value = parseYaml(raw);
    } catch (e) {
      throw new ConfigError('--set', [`${key}: cannot read '${raw}' as a YAML value (${(e as Error).message.split('\n')[0]})`]);
    }
  }
  return { path: parts, value, text };
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** A copy of `raw` with each override applied in order (later ones win). */
export function applyOverrides(raw: RawConfig, overrides: readonly ConfigOverride[]): RawConfig {
  const root: RawConfig = structuredClone(raw);
  for (const o of overrides) {
    let node: Record<string, unknown> | unknown[] = root;
    for (let i = 0; i < o.path.length - 1; i++) {
      const key = o.path[i]!;
      const next: unknown = Array.isArray(node) ? node[Number(key)] : node[key];
      if (next === undefined || next === null) {
        const created: Record<string, unknown> = {};
        if (Array.isArray(node)) node[arrayIndex(node, key, o)] = created;
        else node[key] = created;
        node = created;
      } else if (isRecord(next) || Array.isArray(next)) {
        node = next;
      } else {
        throw new ConfigError('--set', [`${o.path.slice(0, i + 1).join('.')}: is ${JSON.stringify(next)}, not a section, so '${o.text}' cannot set a field inside it`]);
      }
    }
    const last = o.path[o.path.length - 1]!;
    if (Array.isArray(node)) node[arrayIndex(node, last, o)] = o.value;
    else node[last] = o.value;
  }
  return root;
}

function arrayIndex(list: unknown[], key: string, o: ConfigOverride): number {
  const i = Number(key);
  if (!Number.isInteger(i) || i < 0 || i > list.length) {
    throw new ConfigError('--set', [`${o.path.join('.')}: '${key}' is not an index of a list of ${list.length} (0…${list.length})`]);
  }
  return i;
}

// The top-level `resolution` is a shorthand for `data.resolution`; one value, one place.
function mergeResolution(raw: RawConfig): { raw: RawConfig; issues: string[] } {
  const top = raw['resolution'];
  const data = raw['data'];
  if (top === undefined || top === null || !isRecord(data)) return { raw, issues: [] };
  const inner = data['resolution'];
  if (inner !== undefined && inner !== null && inner !== top) {
    return { raw, issues: [`resolution: ${JSON.stringify(top)} differs from data.resolution ${JSON.stringify(inner)}; set one of them`] };
  }
  return { raw: { ...raw, data: { ...data, resolution: top } }, issues: [] };
}

/** Validates a raw config with `schema`; throws a {@link ConfigError} listing every issue. */
export function parseTrainingConfig<S extends z.ZodType>(raw: RawConfig, schema: S, source: string): z.output<S> {
  const merged = mergeResolution(raw);
  if (merged.issues.length > 0) throw new ConfigError(source, merged.issues);
  const result = schema.safeParse(merged.raw);
  if (result.success) return result.data;
  throw new ConfigError(source, formatConfigIssues(result.error.issues, schema, merged.raw));
}

/** Reads `file` (optional: overrides alone can make a config), applies overrides, validates. */
export async function loadTrainingConfig<S extends z.ZodType>(
  file: string | undefined,
  overrides: readonly string[],
  schema: S,
): Promise<{ readonly config: z.output<S>; readonly raw: RawConfig }> {
  const base = file === undefined ? {} : await readConfigFile(file);
  const raw = applyOverrides(base, overrides.map(parseOverride));
  const source = file ?? '--set';
  return { config: parseTrainingConfig(raw, schema, source), raw };
}

// =============================================================================================
// Error messages

type Issue = z.core.$ZodIssue;

/** One line per issue: `field.path: what is wrong (allowed values / expected)`. */
export function formatConfigIssues(issues: readonly Issue[], schema: z.ZodType, raw: unknown): string[] {
  const lines: string[] = [];
  for (const issue of issues) {
    const where = issue.path.map(String).join('.');
    const label = where === '' ? '(top level)' : where;
    switch (issue.code) {
      case 'unrecognized_keys':
        for (const key of issue.keys) {
          const full = where === '' ? key : `${where}.${key}`;
          const known = knownKeys(schema, raw, issue.path.map(String));
          const guess = closest(key, known);
          lines.push(`${full}: unknown field${guess === undefined ? '' : ` (did you mean '${guess}'?)`}`);
        }
        break;
      case 'invalid_value':
        lines.push(`${label}: expected one of ${issue.values.map((v) => JSON.stringify(v)).join(', ')}; found ${describeFound(valueAt(raw, issue.path))}`);
        break;
      case 'invalid_union': {
        const disc = (issue as { discriminator?: string; options?: readonly unknown[] }).discriminator;
        const options = (issue as { options?: readonly unknown[] }).options;
        if (disc !== undefined && options !== undefined) {
          const found = valueAt(raw, issue.path.length > 0 && issue.path[issue.path.length - 1] === disc ? issue.path : [...issue.path, disc]);
          lines.push(
            `${where === '' ? disc : where}: expected one of ${options.map((v) => JSON.stringify(v)).join(', ')}; found ${found === undefined ? 'it missing' : describeFound(found)}`,
          );
        } else lines.push(`${label}: ${issue.message}`);
        break;
      }
      case 'invalid_type':
        if (valueAt(raw, issue.path) === undefined) lines.push(`${label}: required, found it missing`);
        else lines.push(`${label}: expected ${issue.expected}; found ${describeFound(valueAt(raw, issue.path))}`);
        break;
      case 'too_small':
      case 'too_big': {
        const found = valueAt(raw, issue.path);
        const bound = issue.code === 'too_small' ? issue.minimum : issue.maximum;
        const op = issue.code === 'too_small' ? (issue.inclusive === false ? '>' : '≥') : issue.inclusive === false ? '<' : '≤';
        const what = Array.isArray(found) ? `${op} ${String(bound)} entries` : typeof found === 'string' ? `${op} ${String(bound)} characters` : `a number ${op} ${String(bound)}`;
        lines.push(`${label}: expected ${what}; found ${describeFound(found)}`);
        break;
      }
      default:
        lines.push(`${label}: ${issue.message}`);
    }
  }
  return lines;
}

function describeFound(v: unknown): string {
  if (v === undefined) return 'nothing';
  if (typeof v === 'string') return JSON.stringify(v);
  if (Array.isArray(v)) return `a list ${JSON.stringify(v)}`;
  if (isRecord(v)) return 'a section';
  return `${JSON.stringify(v)} (${typeof v})`;
}

function valueAt(raw: unknown, p: readonly PropertyKey[]): unknown {
  let node = raw;
  for (const key of p) {
    if (isRecord(node)) node = node[String(key)];
    else if (Array.isArray(node)) node = node[Number(key)];
    else return undefined;
  }
  return node;
}

// Field names of the object schema at `p` (following the discriminated union by the raw `method`).
function knownKeys(schema: z.ZodType, raw: unknown, p: readonly string[]): string[] {
  let node: z.ZodType | undefined = selectUnionOption(schema, raw);
  for (const key of p) {
    const shape = objectShape(node);
    node = shape?.[key];
    node = unwrap(node);
  }
  return Object.keys(objectShape(node) ?? {});
}

function unwrap(s: z.ZodType | undefined): z.ZodType | undefined {
  let node = s;
  for (let i = 0; i < 8 && node !== undefined; i++) {
    if (node instanceof z.ZodDefault || node instanceof z.ZodOptional || node instanceof z.ZodNullable) {
      node = node.unwrap() as z.ZodType;
    } else break;
  }
  return node;
}

function objectShape(s: z.ZodType | undefined): Record<string, z.ZodType> | undefined {
  const node = unwrap(s);
  return node instanceof z.ZodObject ? (node.shape as Record<string, z.ZodType>) : undefined;
}

function selectUnionOption(schema: z.ZodType, raw: unknown): z.ZodType | undefined {
  if (!(schema instanceof z.ZodDiscriminatedUnion)) return schema;
  const method = isRecord(raw) ? raw['method'] : undefined;
  for (const option of schema.options as readonly z.ZodType[]) {
    const shape = objectShape(option);
    const disc = shape?.['method'];
    if (disc instanceof z.ZodLiteral && disc.values.has(method as never)) return option;
  }
  return undefined;
}

// The known name within edit distance 2 (or sharing a long prefix) of a mistyped one.
function closest(name: string, known: readonly string[]): string | undefined {
  let best: string | undefined;
  let bestDistance = Infinity;
  for (const k of known) {
    const d = editDistance(name.toLowerCase(), k.toLowerCase());
    if (d < bestDistance) {
      best = k;
      bestDistance = d;
    }
  }
  return best !== undefined && bestDistance <= Math.max(2, Math.floor(name.length / 4)) ? best : undefined;
}

function editDistance(a: string, b: string): number {
  const row = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    let diagonal = row[0]!;
    row[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const above = row[j]!;
      row[j] = Math.min(above + 1, row[j - 1]! + 1, diagonal + (a[i - 1] === b[j - 1] ? 0 : 1));
      diagonal = above;
    }
  }
  return row[b.length]!;
}

/** Lines `field: description` for a method schema (for `sdwb train --fields`). */
export function describeFields(schema: z.ZodType): string[] {
  const shape = objectShape(schema) ?? {};
  const lines: string[] = [];
  for (const [key, field] of Object.entries(shape)) {
    lines.push(`${key}: ${field.description ?? ''}`.trimEnd());
    const inner = objectShape(field);
    if (inner !== undefined) {
      for (const [sub, subField] of Object.entries(inner)) lines.push(`${key}.${sub}: ${subField.description ?? ''}`.trimEnd());
    }
  }
  return lines;
}
