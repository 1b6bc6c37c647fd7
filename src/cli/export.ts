/**
 * `sdwb export`: a model (diffusers folder or single-file checkpoint) with add-ons baked in →
 * Optimum's ONNX folder layout, for `sdwb generate --engine onnx` and ORTStableDiffusionPipeline.
 * Add-on flags are `sdwb generate`'s (same syntax, same loader, same composition): embeddings
 * become token-table rows, deltas and LoRAs the parameters they compose to, hypernetworks UNet
 * hooks recorded as nodes (the hook code tfjs runs, weights as initializers, strength baked in,
 * several chained in flag order as generate chains them). Progress goes to stderr; the files
 * written go to stdout.
 */
import { promises as fs } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { InvalidArgumentError, Option, type Command } from 'commander';
import { initBackend } from '../backend.js';
import { exportModel, DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, type EmbeddingRows, type HypernetworkRecord, type UnetHooksFactory } from '../export/export-model.js';
import type { LayoutPolicy } from '../export/recorder.js';
import { hwioToOihw } from '../io/layout.js';
import { convertSingleFileToDiffusers } from '../io/single-file.js';
import { loadEmbedding } from '../methods/embedding-files.js';
import { hypernetworkStem } from '../methods/hypernetwork-file.js';
import { hypernetworkHooks, readHypernetworkFor } from '../methods/hypernetwork.js';
import type { ModelPatch } from '../methods/types.js';
import type { UnetHooks } from '../models/unet/unet.js';
import type { Ops } from '../ops/ops.js';
import {
  ADDON_KINDS,
  ADDON_METHODS,
  AddonSpecError,
  chainContextHooks,
  checkAddonsAvailable,
  loadAddons,
  parseAddonSpec,
  sha256File,
  type AddonSpec,
  type LoadedAddons,
} from '../pipeline/addons.js';
import { disposeStableDiffusion, loadStableDiffusion, type StableDiffusion } from '../pipeline/load.js';
import { runCommand, UsageError } from './errors.js';

interface ExportFlags {
  model: string;
  out: string;
  embedding: string[];
  delta: string[];
  hypernetwork: string[];
  lora: string[];
  opset: number;
  layout: LayoutPolicy;
  externalData?: boolean;
  variant?: string;
  overwrite?: boolean;
}

const collect = (v: string, prev: string[]): string[] => [...prev, v];

function opsetArg(v: string): number {
  const n = Number(v);
  if (!/^\d+$/.test(v.trim()) || n < MIN_OPSET || n > MAX_OPSET) throw new InvalidArgumentError(`--opset must be an integer in [${MIN_OPSET}, ${MAX_OPSET}], got '${v}'`);
  return n;
}

/** The add-on flags as `sdwb generate` parses them (same syntax, same files), checked before any model loads. */
function addonSpecs(flags: ExportFlags): AddonSpec[] {
  try {
    const specs = ADDON_KINDS.flatMap((kind) => flags[kind].map((text) => parseAddonSpec(kind, text)));
    checkAddonsAvailable(specs);
    return specs;
  } catch (e) {
    if (e instanceof AddonSpecError) throw new UsageError(e.message);
    throw e;
  }
}

/** Textual-inversion files (any format sdwb reads) as rows, triggered by their word as in `sdwb generate`. */
async function readEmbeddings(specs: readonly AddonSpec[]): Promise<EmbeddingRows[]> {
  const rows: EmbeddingRows[] = [];
  for (const spec of specs) {
    const e = await loadEmbedding(spec.file);
    rows.push({ token: e.token, rows: Array.from({ length: e.numVectors }, (_, i) => e.vectors.slice(i * e.width, (i + 1) * e.width)) });
  }
  return rows;
}

/**
 * Hypernetwork files as one UNet-hooks factory for the recorder, chained in flag order (K through
 * every K module, V through every V, as `sdwb generate` composes them), with their provenance.
 */
async function readHypernetworks(model: StableDiffusion, specs: readonly AddonSpec[]): Promise<{ hooks?: UnetHooksFactory; records: HypernetworkRecord[] }> {
  const factories: UnetHooksFactory[] = [];
  const records: HypernetworkRecord[] = [];
  for (const spec of specs) {
    const contents = await readHypernetworkFor(model.unet.cfg, spec.file);
    factories.push(hypernetworkHooks(contents, spec.strength));
    records.push({ name: hypernetworkStem(spec.file), source: path.basename(spec.file), sha256: await sha256File(spec.file), strength: spec.strength, widths: [...contents.modules.keys()] });
  }
  if (factories.length === 0) return { records };
  const hooks = <T>(o: Ops<T>): UnetHooks<T> => ({ attentionContext: chainContextHooks(factories.map((f) => f(o).attentionContext!)) });
  return { hooks, records };
}

/** The parameter overrides of composed add-ons (deltas replace, LoRAs add), as full keys in checkpoint layout. */
function overridesOf(patch: ModelPatch): Map<string, Float32Array> {
  const out = new Map<string, Float32Array>();
  for (const o of patch.params ?? []) {
    const data = o.value.dataSync() as Float32Array;
    const prefix = o.component === 'text' ? 'text_encoder' : o.component;
    out.set(`${prefix}.${o.key}`, o.value.rank === 4 ? hwioToOihw(data, o.value.shape).data : Float32Array.from(data));
  }
  return out;
}

async function run(flags: ExportFlags): Promise<void> {
  const specs = addonSpecs(flags);
  const stat = await fs.stat(flags.model).catch(() => undefined);
  if (stat === undefined) throw new Error(`${flags.model}: no such file or folder`);
  // Export computes nothing: the pure-JS backend keeps weights in ordinary arrays, with no
  // 4 GB wasm heap limit on a full-size model.
  await initBackend({ backend: 'cpu', log: () => {} });
  let folder = flags.model;
  let scratch: string | undefined;
  if (!stat.isDirectory()) {
    scratch = await fs.mkdtemp(path.join(tmpdir(), 'sdwb-export-'));
    folder = path.join(scratch, 'model');
    process.stderr.write(`converting ${flags.model} to a diffusers folder first\n`);
    await convertSingleFileToDiffusers(flags.model, folder, {});
  }
  try {
    const model = await loadStableDiffusion(folder, flags.variant === undefined ? {} : { variant: flags.variant });
    let addons: LoadedAddons | undefined;
    try {
      const embeddingSpecs = specs.filter((s) => s.kind === 'embedding');
      // Hypernetworks are recorded from their files (hooks over Ops); loadAddons would make tfjs hooks.
      const weightSpecs = specs.filter((s) => s.kind === 'delta' || s.kind === 'lora');
      const embeddings = await readEmbeddings(embeddingSpecs);
      const hypernetworks = await readHypernetworks(model, specs.filter((s) => s.kind === 'hypernetwork'));
      if (weightSpecs.length > 0) {
        addons = await loadAddons(model, weightSpecs);
        for (const w of addons.warnings) process.stderr.write(`warning: ${w}\n`);
      }
      const report = await exportModel(model, flags.out, {
        embeddings,
        paramOverrides: addons === undefined ? new Map() : overridesOf(addons.patch),
        ...(hypernetworks.hooks === undefined ? {} : { unetHooks: hypernetworks.hooks, hypernetworks: hypernetworks.records }),
        opset: flags.opset,
        layout: flags.layout,
        ...(flags.externalData === true ? { externalDataThreshold: 0 } : {}),
        addOns: specs.map((s) => ({ kind: s.kind, source: path.basename(s.file), ...(ADDON_METHODS[s.kind].weighted ? { weight: s.strength } : {}) })),
        overwrite: flags.overwrite === true,
        onProgress: (m) => process.stderr.write(`${m}\n`),
      });
      for (const c of report.components) {
        process.stdout.write(`${c.component}: ${c.file}${c.externalData !== undefined ? ` (+ ${path.basename(c.externalData)})` : ''}, ${c.nodes} nodes, ${(c.payloadBytes / 2 ** 20).toFixed(1)} MiB\n`);
      }
      if (report.addedTokens.length > 0) process.stdout.write(`added tokens: ${report.addedTokens.join(' ')}\n`);
      process.stdout.write(`model hash: ${report.modelHash}\n`);
    } finally {
      addons?.dispose();
      disposeStableDiffusion(model);
    }
  } finally {
    if (scratch !== undefined) await fs.rm(scratch, { recursive: true, force: true });
  }
}

/** `sdwb export`: ONNX export of a model with embeddings, weight deltas, LoRAs and hypernetworks baked in. */
export function registerExport(program: Command): void {
  program
    .command('export')
    .description("export a model to ONNX (Optimum's layout: text_encoder, unet, vae_encoder, vae_decoder) with add-ons baked in")
    .requiredOption('--model <dir|file>', 'diffusers model folder or single-file checkpoint (.safetensors)')
    .requiredOption('--out <dir>', 'output folder')
    .option('--embedding <file>', 'textual-inversion embedding to bake into the text encoder (as sdwb generate takes it); repeatable', collect, [])
    .option('--delta <file>', 'weight delta (ESD, UCE, …) to bake in: replaces the tensors it holds; repeatable', collect, [])
    .option('--lora <file[:weight]>', 'LoRA to merge at a weight (default 1); repeatable', collect, [])
    .option('--hypernetwork <file[:strength]>', 'A1111 hypernetwork to record into the UNet at a strength (default 1); repeatable, chained in order', collect, [])
    .option('--opset <n>', `ONNX opset (${MIN_OPSET}–${MAX_OPSET})`, opsetArg, DEFAULT_OPSET)
    .addOption(new Option('--layout <layout>', 'conv layout inside the graphs (nchw: fastest on onnxruntime)').choices(['nchw', 'nhwc']).default('nchw'))
    .option('--external-data', 'always write weights to model.onnx_data (default: only above protobuf’s 2 GiB limit)')
    .option('--variant <name>', 'weight variant to load (fp16; exported as fp32)')
    .option('--overwrite', 'write into an existing non-empty folder')
    .action((flags: ExportFlags) => runCommand('export', () => run(flags)));
}
