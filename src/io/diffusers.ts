/**
 * Reading a diffusers pipeline folder (`save_pretrained` layout): `model_index.json`, one folder
 * per component with its `config.json` and weights as single, sharded or variant safetensors.
 *
 * This module finds and validates files; it does not interpret component configs (each model owns
 * its schema) and it never reads tensor data.
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { z } from 'zod';

export class ModelFolderError extends Error {
  constructor(
    message: string,
    readonly file: string,
  ) {
    super(message);
    this.name = 'ModelFolderError';
  }
}

/** Weight file stems per component kind: diffusers models vs transformers models. */
const WEIGHT_STEMS = ['diffusion_pytorch_model', 'model'] as const;

const modelIndexSchema = z
  .object({
    _class_name: z.string(),
    _diffusers_version: z.string().optional(),
  })
  .catchall(z.unknown());

export interface ComponentEntry {
  readonly name: string;
  /** `[library, class]` as model_index.json gives it, e.g. `['diffusers', 'UNet2DConditionModel']`. */
  readonly library: string;
  readonly className: string;
  readonly dir: string;
}

export interface ModelIndex {
  readonly file: string;
  readonly pipelineClass: string;
  readonly diffusersVersion?: string;
  readonly components: readonly ComponentEntry[];
}

export interface WeightFiles {
  /** Safetensors files holding the component's tensors, in shard order. */
  readonly files: readonly string[];
  /** The variant used (`fp16`), or undefined for the default weights. */
  readonly variant?: string;
  /** For sharded weights: tensor name → shard file (absolute). */
  readonly shardOf?: ReadonlyMap<string, string>;
}

/** Parse a JSON file, naming the file in any error. */
export async function readJsonFile(file: string): Promise<unknown> {
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new ModelFolderError(
      code === 'ENOENT' ? `${file}: file not found` : `${file}: cannot read (${code ?? String(e)})`,
      file,
    );
  }
  try {
    return JSON.parse(text) as unknown;
  } catch (e) {
    throw new ModelFolderError(`${file}: invalid JSON (${(e as Error).message})`, file);
  }
}

/** Validate `value` (read from `file`) with `schema`, turning zod issues into one clear error. */
export function parseWithSchema<S extends z.ZodType>(schema: S, value: unknown, file: string): z.infer<S> {
  const r = schema.safeParse(value);
  if (r.success) return r.data;
  throw new ModelFolderError(`${file}: ${formatIssues(r.error)}`, file);
}

/** One line per zod issue: `key.path: message`. */
export function formatIssues(err: z.ZodError): string {
  return err.issues
    .map((i) => {
      const where = i.path.length > 0 ? i.path.join('.') : '(root)';
      if (i.code === 'invalid_type' && i.input === undefined) return `missing required key '${where}'`;
      return `'${where}': ${i.message}`;
    })
    .join('; ');
}

async function exists(file: string): Promise<boolean> {
  try {
    await fs.access(file);
    return true;
  } catch {
    return false;
  }
}

/** Read and validate `<dir>/model_index.json`. */
export async function readModelIndex(dir: string): Promise<ModelIndex> {
  const file = path.join(dir, 'model_index.json');
  const raw = parseWithSchema(modelIndexSchema, await readJsonFile(file), file);
  const components: ComponentEntry[] = [];
  for (const [name, value] of Object.entries(raw)) {
    if (name.startsWith('_')) continue;
    // Components are `[library, class]`; `[null, null]` marks an absent optional component, and
    // scalar entries (e.g. `requires_safety_checker`) are pipeline options.
    if (!Array.isArray(value)) continue;
    const [library, className] = value as unknown[];
    if (library === null && className === null) continue;
    if (typeof library !== 'string' || typeof className !== 'string' || value.length !== 2) {
      throw new ModelFolderError(
        `${file}: component '${name}' should be [library, class], found ${JSON.stringify(value)}`,
        file,
      );
    }
    components.push({ name, library, className, dir: path.join(dir, name) });
  }
  return {
    file,
    pipelineClass: raw._class_name,
    ...(raw._diffusers_version !== undefined ? { diffusersVersion: raw._diffusers_version } : {}),
    components,
  };
}

/** Read `<componentDir>/<configName>` as raw JSON (the component's own schema validates it). */
export async function readComponentConfig(componentDir: string, configName = 'config.json'): Promise<unknown> {
  return readJsonFile(path.join(componentDir, configName));
}

const shardIndexSchema = z.object({
  metadata: z.record(z.string(), z.unknown()).optional(),
  weight_map: z.record(z.string(), z.string()),
});

/**
 * Find a component's safetensors weights: `<stem>[.<variant>].safetensors`, or the sharded form
 * `<stem>.safetensors.index[.<variant>].json` with its shards. Without `variant`, the default
 * weights are preferred and an `fp16` variant is used when it is the only one present.
 */
export async function findWeightFiles(componentDir: string, variant?: string): Promise<WeightFiles> {
  const variants = variant !== undefined ? [variant] : [undefined, 'fp16'];
  for (const v of variants) {
    for (const stem of WEIGHT_STEMS) {
      const single = path.join(componentDir, v ? `${stem}.${v}.safetensors` : `${stem}.safetensors`);
      if (await exists(single)) return { files: [single], ...(v ? { variant: v } : {}) };
      const indexFile = path.join(componentDir, v ? `${stem}.safetensors.index.${v}.json` : `${stem}.safetensors.index.json`);
      if (await exists(indexFile)) return readShardIndex(componentDir, indexFile, v);
    }
  }
  const entries = await fs.readdir(componentDir).catch(() => undefined);
  if (entries === undefined) throw new ModelFolderError(`${componentDir}: component folder not found`, componentDir);
  const pickles = entries.filter((e) => e.endsWith('.bin') || e.endsWith('.ckpt') || e.endsWith('.pt'));
  const wanted = variant ? ` (variant '${variant}')` : '';
  const hint =
    pickles.length > 0
      ? `; found only pickle weights (${pickles.join(', ')}), which this loader does not read: convert them to safetensors`
      : '';
  throw new ModelFolderError(`${componentDir}: no safetensors weights${wanted}${hint}`, componentDir);
}

async function readShardIndex(componentDir: string, indexFile: string, variant: string | undefined): Promise<WeightFiles> {
  const index = parseWithSchema(shardIndexSchema, await readJsonFile(indexFile), indexFile);
  const shardOf = new Map<string, string>();
  const files: string[] = [];
  for (const [tensor, shard] of Object.entries(index.weight_map)) {
    // Shard names come from an untrusted file: keep them inside the component folder.
    if (shard !== path.basename(shard) || shard === '..' || shard === '.') {
      throw new ModelFolderError(`${indexFile}: shard name '${shard}' for '${tensor}' is not a plain file name`, indexFile);
    }
    const abs = path.join(componentDir, shard);
    if (!files.includes(abs)) files.push(abs);
    shardOf.set(tensor, abs);
  }
  for (const f of files) {
    if (!(await exists(f))) throw new ModelFolderError(`${indexFile}: shard '${path.basename(f)}' is missing`, indexFile);
  }
  files.sort();
  return { files, shardOf, ...(variant ? { variant } : {}) };
}
