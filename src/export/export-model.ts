/**
 * A loaded Stable Diffusion pipeline (plus add-ons) → Optimum's ONNX folder layout, the one
 * `ORTStableDiffusionPipeline` and diffusers' `OnnxStableDiffusionPipeline` load:
 *
 *   model_index.json                       OnnxStableDiffusionPipeline; provenance under `_sdwb_export`
 *   text_encoder/model.onnx, config.json   token rows of embeddings appended (vocab_size updated)
 *   unet/model.onnx (+ model.onnx_data)    weights with overrides applied, hooks recorded as nodes
 *   vae_encoder/model.onnx, config.json
 *   vae_decoder/model.onnx, config.json
 *   tokenizer/                             copied; embedding tokens in added_tokens.json
 *   scheduler/scheduler_config.json        copied
 *
 * How add-ons plug in: textual-inversion embeddings become rows appended to the token table
 * (ids V, V+1, … as the tokenizer assigns them); ESD/UCE edits and merged LoRA become parameter
 * overrides (checkpoint layout, same shapes); hypernetworks become UNet hooks whose ops are
 * recorded into the graph like the UNet's own (`hypernetworkHooks` in src/methods/hypernetwork.ts:
 * the hook code tfjs runs, its weights as initializers, the strength baked in).
 */
import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { writeFileAtomic } from '../io/atomic.js';
import { readJsonFile, readModelIndex } from '../io/diffusers.js';
import { ClipTokenizer } from '../models/clip/tokenizer.js';
import type { StableDiffusion } from '../pipeline/load.js';
import { ParamError } from '../ops/scope.js';
import { TOKEN_TABLE_KEY, textEncoderGraph, unetGraph, vaeDecoderGraph, vaeEncoderGraph, type UnetHooksFactory } from './components.js';
import { storeSource, withOverrides, type ParamSource } from './params.js';
import type { LayoutPolicy } from './recorder.js';
import { recordGraph, type GraphSpec } from './trace.js';
import { writeOnnxModel, type WrittenModel } from './write.js';

export type { UnetHooksFactory } from './components.js';

/** A textual-inversion embedding to bake in: one row per vector (tokens `t`, `t_1`, … for several). */
export interface EmbeddingRows {
  readonly token: string;
  readonly rows: readonly Float32Array[];
}

/** What an add-on was, for the provenance record (the CLI fills this from its flags). */
export interface AddOnRecord {
  readonly kind: 'embedding' | 'delta' | 'lora' | 'hypernetwork';
  readonly source: string;
  readonly weight?: number;
}

/** A hypernetwork recorded into the UNet (through `unetHooks`), for the provenance record and the model hash. */
export interface HypernetworkRecord {
  /** A1111's name for it: the file's stem. */
  readonly name: string;
  /** The file's name. */
  readonly source: string;
  /** SHA-256 of the file, hex (A1111's `Hypernet hash` is its first 10 digits). */
  readonly sha256: string;
  /** The strength baked in. */
  readonly strength: number;
  /** Context widths it has modules for. */
  readonly widths: readonly number[];
}

export interface ExportOptions {
  readonly embeddings?: readonly EmbeddingRows[];
  /**
   * Replacement weights by full key (`unet.`, `text_encoder.` or `vae.` + the diffusers key), in
   * checkpoint layout (conv filters OIHW) and the base shape.
   */
  readonly paramOverrides?: ReadonlyMap<string, Float32Array>;
  /** UNet hooks (hypernetworks), recorded into the UNet graph. */
  readonly unetHooks?: UnetHooksFactory;
  /** The hypernetworks `unetHooks` records, for the provenance (a hooks factory cannot describe itself). */
  readonly hypernetworks?: readonly HypernetworkRecord[];
  /** ONNX opset, 14 or later (default 17). */
  readonly opset?: number;
  /** Conv output layout inside the graph (default 'nchw', the faster one; see README.md). */
  readonly layout?: LayoutPolicy;
  /** Model file size above which weights go to `model.onnx_data` (default: protobuf's 2 GiB limit). */
  readonly externalDataThreshold?: number;
  /** Add-ons as the provenance should name them. */
  readonly addOns?: readonly AddOnRecord[];
  /** Write into an existing non-empty folder (component folders are replaced). */
  readonly overwrite?: boolean;
  readonly onProgress?: (message: string) => void;
}

export interface ExportReport {
  readonly outDir: string;
  readonly components: readonly (WrittenModel & { readonly component: string })[];
  /** Tokens added to the tokenizer, in id order. */
  readonly addedTokens: readonly string[];
  /** 10 hex digits: the base model hash, or a hash of base + add-ons when any are baked in. */
  readonly modelHash: string;
}

export const DEFAULT_OPSET = 17;
export const MIN_OPSET = 14;
/** The newest opset whose ops we emit as written here (Reduce* axes as inputs from 18 on). */
export const MAX_OPSET = 21;

const COMPONENT_PREFIXES = { unet: 'unet.', text_encoder: 'text_encoder.', vae: 'vae.' } as const;
type SourceComponent = keyof typeof COMPONENT_PREFIXES;

/** The tokens a multi-vector embedding occupies: `t`, `t_1`, … (diffusers' convention). */
export function embeddingTokens(e: EmbeddingRows): string[] {
  return e.rows.map((_, i) => (i === 0 ? e.token : `${e.token}_${i}`));
}

function sha256(parts: readonly (string | Uint8Array)[]): string {
  const h = createHash('sha256');
  for (const p of parts) h.update(p);
  return h.digest('hex');
}

function bytesOf(a: Float32Array): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

async function isDirectory(p: string): Promise<boolean> {
  return (await fs.stat(p).catch(() => undefined))?.isDirectory() ?? false;
}

/** Overrides split per component, checked against the base keys and shapes. */
function splitOverrides(model: StableDiffusion, overrides: ReadonlyMap<string, Float32Array>): Map<SourceComponent, Map<string, { data: Float32Array; shape: readonly number[] }>> {
  const sources: Record<SourceComponent, ParamSource> = {
    unet: storeSource(model.unet.store),
    text_encoder: storeSource(model.text.store),
    vae: storeSource(model.vae.store),
  };
  const out = new Map<SourceComponent, Map<string, { data: Float32Array; shape: readonly number[] }>>();
  for (const [full, data] of overrides) {
    const component = (Object.keys(COMPONENT_PREFIXES) as SourceComponent[]).find((c) => full.startsWith(COMPONENT_PREFIXES[c]));
    if (component === undefined) {
      throw new ParamError(`parameter override '${full}': the key must start with unet., text_encoder. or vae.`);
    }
    const key = full.slice(COMPONENT_PREFIXES[component].length);
    const shape = sources[component].shapeOf(key);
    if (shape === undefined) throw new ParamError(`parameter override '${full}': the ${component} has no parameter '${key}'`);
    const count = shape.reduce((a, b) => a * b, 1);
    if (data.length !== count) {
      throw new ParamError(`parameter override '${full}': ${data.length} values, the parameter has shape [${shape.join(', ')}] (${count} values, checkpoint layout)`);
    }
    const map = out.get(component) ?? new Map<string, { data: Float32Array; shape: readonly number[] }>();
    map.set(key, { data, shape });
    out.set(component, map);
  }
  return out;
}

/** Copies the tokenizer files and adds `tokens` (ids V, V+1, …) to added_tokens.json. */
async function writeTokenizer(srcDir: string, outDir: string, tokens: readonly string[], tableRows: number): Promise<void> {
  await fs.mkdir(outDir, { recursive: true });
  const names = await fs.readdir(srcDir);
  // tokenizer.json (fast tokenizers) would not know the new tokens: leave it out, transformers
  // rebuilds the fast tokenizer from vocab.json + merges.txt + added_tokens.json.
  for (const name of names) {
    if (name === 'tokenizer.json' || name === 'added_tokens.json') continue;
    const from = path.join(srcDir, name);
    if ((await fs.stat(from)).isFile()) await fs.copyFile(from, path.join(outDir, name));
  }
  const addedFile = path.join(srcDir, 'added_tokens.json');
  const existing = (await fs.stat(addedFile).catch(() => undefined)) ? ((await readJsonFile(addedFile)) as Record<string, number>) : {};
  if (tokens.length === 0 && Object.keys(existing).length === 0) return;
  const added: Record<string, number> = { ...existing };
  tokens.forEach((t, i) => {
    added[t] = tableRows + i;
  });
  await writeJson(path.join(outDir, 'added_tokens.json'), added);
}

/** Throws unless `tokens` are new to the tokenizer and would get ids right after the table's rows. */
async function checkNewTokens(srcDir: string, tokens: readonly string[], tableRows: number): Promise<void> {
  const tokenizer = await ClipTokenizer.fromDir(srcDir);
  if (tokenizer.vocabSize !== tableRows) {
    throw new Error(`${srcDir}: the tokenizer has ${tokenizer.vocabSize} tokens but the text encoder's table has ${tableRows} rows; embedding rows must follow the table`);
  }
  for (const t of tokens) {
    const known = tokenizer.tokenToId(t);
    if (known !== undefined) throw new Error(`embedding token '${t}' is already a token of this tokenizer (id ${known}); pick a new word`);
  }
}

async function writeJson(file: string, value: unknown): Promise<void> {
  await writeFileAtomic(file, async (h) => {
    await h.writeFile(`${JSON.stringify(value, null, 2)}\n`);
  });
}

/** Export `model` (loaded from a diffusers folder) with add-ons to `outDir` in Optimum's ONNX layout. */
export async function exportModel(model: StableDiffusion, outDir: string, opts: ExportOptions = {}): Promise<ExportReport> {
  const opset = opts.opset ?? DEFAULT_OPSET;
  if (!(Number.isInteger(opset) && opset >= MIN_OPSET && opset <= MAX_OPSET)) {
    throw new Error(`opset ${opset} is not supported (${MIN_OPSET}–${MAX_OPSET})`);
  }
  if ((opts.hypernetworks?.length ?? 0) > 0 && opts.unetHooks === undefined) {
    throw new Error('hypernetworks are listed for the provenance but no unetHooks record them (pass hypernetworkHooks(…) as unetHooks)');
  }
  const layout = opts.layout ?? 'nchw';
  const progress = opts.onProgress ?? (() => {});
  const out = path.resolve(outDir);

  // 1. Source folder and destination.
  if (!(await isDirectory(model.source))) {
    throw new Error(`${model.source}: ONNX export reads configs, tokenizer and scheduler from a diffusers folder; convert a single-file checkpoint first (sdwb convert)`);
  }
  const index = await readModelIndex(model.source);
  const dirOf = (name: string): string => {
    const c = index.components.find((e) => e.name === name);
    if (c === undefined) throw new Error(`${index.file}: no '${name}' component`);
    return c.dir;
  };
  const existing = await fs.readdir(out).catch(() => undefined);
  if (existing !== undefined && existing.length > 0 && opts.overwrite !== true) {
    throw new Error(`${out}: folder exists and is not empty (choose another --out, or overwrite)`);
  }

  // 2. Parameters: overrides, then embedding rows appended to the token table.
  const overrides = splitOverrides(model, opts.paramOverrides ?? new Map());
  const embeddings = opts.embeddings ?? [];
  const width = model.text.cfg.width;
  const tokens = embeddings.flatMap(embeddingTokens);
  if (new Set(tokens).size !== tokens.length) throw new Error(`embedding tokens repeat: ${tokens.join(', ')}`);
  for (const e of embeddings) {
    if (e.rows.length === 0) throw new Error(`embedding '${e.token}' has no rows`);
    for (const r of e.rows) {
      if (r.length !== width) throw new Error(`embedding '${e.token}': rows of ${r.length} values, the text encoder is ${width} wide`);
    }
  }
  const textOverrides = overrides.get('text_encoder') ?? new Map<string, { data: Float32Array; shape: readonly number[] }>();
  let textSource = withOverrides(storeSource(model.text.store), textOverrides);
  const vocab = model.text.cfg.vocabSize;
  if (tokens.length > 0) {
    const base = textSource.read(TOKEN_TABLE_KEY);
    const table = new Float32Array((vocab + tokens.length) * width);
    table.set(base);
    embeddings.flatMap((e) => e.rows).forEach((row, i) => table.set(row, (vocab + i) * width));
    textSource = withOverrides(textSource, new Map([[TOKEN_TABLE_KEY, { data: table, shape: [vocab + tokens.length, width] }]]));
  }
  const unetSource = withOverrides(storeSource(model.unet.store), overrides.get('unet') ?? new Map());
  const vaeSource = withOverrides(storeSource(model.vae.store), overrides.get('vae') ?? new Map());

  if (tokens.length > 0) await checkNewTokens(dirOf('tokenizer'), tokens, vocab);

  // 3. The graphs, into a fresh folder (component folders of an earlier export are replaced).
  for (const d of ['text_encoder', 'unet', 'vae_encoder', 'vae_decoder', 'tokenizer', 'scheduler']) {
    await fs.rm(path.join(out, d), { recursive: true, force: true });
  }
  await fs.mkdir(out, { recursive: true });
  const graphs: readonly (readonly [string, GraphSpec, ParamSource])[] = [
    ['text_encoder', textEncoderGraph(model.text.cfg, tokens.length), textSource],
    ['unet', unetGraph(model.unet.cfg, opts.unetHooks), unetSource],
    ['vae_encoder', vaeEncoderGraph(model.vae.cfg), vaeSource],
    ['vae_decoder', vaeDecoderGraph(model.vae.cfg), vaeSource],
  ];
  const written: (WrittenModel & { component: string })[] = [];
  for (const [component, spec, source] of graphs) {
    progress(`${component}: recording`);
    const graph = recordGraph(spec, source, { opset, layout });
    const dir = path.join(out, component);
    await fs.mkdir(dir, { recursive: true });
    progress(`${component}: writing ${graph.nodes.length} nodes, ${(graph.payloadBytes() / 2 ** 20).toFixed(1)} MiB of weights`);
    const w = await writeOnnxModel(graph, path.join(dir, 'model.onnx'), {
      opset,
      ...(opts.externalDataThreshold !== undefined ? { externalDataThreshold: opts.externalDataThreshold } : {}),
      producerVersion: await packageVersion(),
      metadata: { component, base_model_hash: model.modelHash, layout },
    });
    written.push({ ...w, component });
  }

  // 4. Configs, tokenizer, scheduler.
  const textConfig = (await readJsonFile(path.join(dirOf('text_encoder'), 'config.json'))) as Record<string, unknown>;
  await writeJson(path.join(out, 'text_encoder', 'config.json'), tokens.length > 0 ? { ...textConfig, vocab_size: vocab + tokens.length } : textConfig);
  await fs.copyFile(path.join(dirOf('unet'), 'config.json'), path.join(out, 'unet', 'config.json'));
  for (const d of ['vae_encoder', 'vae_decoder']) await fs.copyFile(path.join(dirOf('vae'), 'config.json'), path.join(out, d, 'config.json'));
  await writeTokenizer(dirOf('tokenizer'), path.join(out, 'tokenizer'), tokens, vocab);
  await fs.mkdir(path.join(out, 'scheduler'), { recursive: true });
  await fs.copyFile(path.join(dirOf('scheduler'), 'scheduler_config.json'), path.join(out, 'scheduler', 'scheduler_config.json'));

  // 5. model_index.json with provenance.
  const embeddingRecords = embeddings.map((e) => ({
    token: e.token,
    tokens: embeddingTokens(e),
    vectors: e.rows.length,
    sha256: sha256(e.rows.map(bytesOf)),
  }));
  const overrideKeys = [...(opts.paramOverrides?.keys() ?? [])].sort();
  const overridesDigest = overrideKeys.length === 0 ? undefined : sha256(overrideKeys.flatMap((k) => [k, bytesOf(opts.paramOverrides!.get(k)!)]));
  const modified = embeddings.length > 0 || overrideKeys.length > 0 || opts.unetHooks !== undefined;
  const addOns = opts.addOns ?? [];
  const hypernetworks = opts.hypernetworks ?? [];
  const hooksId = opts.unetHooks === undefined ? '' : `hooks${hypernetworks.length === 0 ? '' : JSON.stringify(hypernetworks)}`;
  const modelHash = modified ? sha256([model.modelHash, JSON.stringify(embeddingRecords), overridesDigest ?? '', JSON.stringify(addOns), hooksId]).slice(0, 10) : model.modelHash;
  const schedulerEntry = index.components.find((c) => c.name === 'scheduler');
  const onnx = ['onnxruntime', 'OnnxRuntimeModel'];
  await writeJson(path.join(out, 'model_index.json'), {
    _class_name: 'OnnxStableDiffusionPipeline',
    _diffusers_version: index.diffusersVersion ?? '0.30.3',
    feature_extractor: [null, null],
    requires_safety_checker: false,
    safety_checker: [null, null],
    scheduler: [schedulerEntry?.library ?? 'diffusers', schedulerEntry?.className ?? 'PNDMScheduler'],
    text_encoder: onnx,
    tokenizer: ['transformers', 'CLIPTokenizer'],
    unet: onnx,
    vae_decoder: onnx,
    vae_encoder: onnx,
    _sdwb_export: {
      exported_by: `sd-workbench ${await packageVersion()}`,
      base_model: model.name,
      base_model_hash: model.modelHash,
      model_hash: modelHash,
      opset,
      layout,
      weights: {
        text_encoder: model.text.files.map((f) => path.basename(f)),
        unet: model.unet.files.map((f) => path.basename(f)),
        vae: model.vae.files.map((f) => path.basename(f)),
      },
      add_ons: addOns,
      embeddings: embeddingRecords,
      param_overrides: overrideKeys.length === 0 ? undefined : { count: overrideKeys.length, keys: overrideKeys.length <= 64 ? overrideKeys : undefined, sha256: overridesDigest },
      unet_hooks: opts.unetHooks !== undefined,
      hypernetworks: hypernetworks.length === 0 ? undefined : hypernetworks,
    },
  });
  progress('done');
  return { outDir: out, components: written, addedTokens: tokens, modelHash };
}

let version: string | undefined;
async function packageVersion(): Promise<string> {
  if (version !== undefined) return version;
  const here = path.dirname(fileURLToPath(import.meta.url));
  for (const up of ['../../package.json', '../../../package.json']) {
    const pkg = (await readJsonFile(path.join(here, up)).catch(() => undefined)) as { name?: string; version?: string } | undefined;
    if (pkg?.name === 'sd-workbench' && typeof pkg.version === 'string') return (version = pkg.version);
  }
  return (version = '0.0.0');
}
