/**
 * LoRA files: the key layouts people exchange, read into one form ({@link LoraFileContent}: per
 * module A, B and alpha) and written back in any of them.
 *
 * Layouts (module = the diffusers/transformers module path, e.g.
 * `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`, `text_model.encoder.layers.0.self_attn.q_proj`):
 *
 *   kohya          `lora_unet_<module with . → _>.lora_down.weight` / `.lora_up.weight` / `.alpha`,
 *                  `lora_te_<…>` for the text encoder; kohya-ss sd-scripts `networks/lora.py`,
 *                  A1111, ComfyUI. Metadata `ss_*` (sd-scripts' training record).
 *   peft           `unet.<module>.lora_A.weight` / `.lora_B.weight`, `text_encoder.<…>` (peft's
 *                  state-dict names; `base_model.model.` prefixes accepted). α in the
 *                  `lora_adapter_metadata` JSON (`unet.lora_alpha`, `unet.alpha_pattern`).
 *   diffusers      what diffusers' `save_lora_weights` writes today (`convert_state_dict_to_diffusers`
 *                  of the peft dict): `unet.<…>.to_q.lora.down.weight` / `lora.up` for to_q/k/v/out.0,
 *                  `text_encoder.<…>.q_proj.lora_linear_layer.down.weight` / `up` for q/k/v/out_proj,
 *                  peft names for other modules; α as for peft.
 *   diffusers-old  attention processors (`unet.save_attn_procs`, diffusers < 0.21):
 *                  `<attention>.processor.to_q_lora.down.weight` / `up`, `to_out_lora` for to_out.0;
 *                  text encoder `<…>.self_attn.to_q_lora.down.weight` for q_proj. No α (read as
 *                  α = rank); writing folds α/r into B.
 *
 * A missing α means α = rank (scale 1), as kohya and diffusers read it. Tensors are stored in
 * PyTorch layout (1×1 conv LoRAs as [r, in, 1, 1] / [out, r, 1, 1]); 3×3 conv LoRAs (LoCon),
 * LyCORIS (LoHa, LoKr), DoRA and SDXL's two text encoders are refused with a message saying so.
 *
 * kohya names lose the dots; they are split back into module names with a vocabulary of the
 * multi-word names SD 1.x/2.x modules use ({@link KOHYA_JOINED_NAMES}), checked to round-trip on
 * every module path of a UNet and CLIP text encoder.
 */
import { createHash } from 'node:crypto';

import { isFloatDType } from '../io/dtypes.js';
import { serializeSafetensors, writeSafetensors, type TensorToWrite } from '../io/safetensors.js';
import { openTensorSource } from '../io/single-file.js';
import { moduleKindOf, type LoraAdapter, type LoraComponent } from './lora.js';

/** The key layouts this module reads and writes. */
export const LORA_LAYOUTS = ['kohya', 'peft', 'diffusers', 'diffusers-old'] as const;
export type LoraLayout = (typeof LORA_LAYOUTS)[number];

/** A float tensor in PyTorch layout. */
export interface PlainTensor {
  readonly shape: readonly number[];
  readonly data: Float32Array;
}

/** One module's LoRA as stored. */
export interface LoraModuleData {
  readonly component: LoraComponent;
  /** diffusers/transformers module path relative to the component. */
  readonly module: string;
  readonly rank: number;
  /** α (the file's, or the rank when it has none). */
  readonly alpha: number;
  /** A / lora_down / lora_A: [rank, in] (1×1 conv: [rank, in, 1, 1]). */
  readonly down: PlainTensor;
  /** B / lora_up / lora_B: [out, rank] (1×1 conv: [out, rank, 1, 1]). */
  readonly up: PlainTensor;
}

/** A LoRA file's contents in layout-free form. */
export interface LoraFileContent {
  /** Where it came from, for errors. */
  readonly source: string;
  /** The layout it was read in (the layout written for new ones). */
  readonly layout: LoraLayout;
  readonly modules: readonly LoraModuleData[];
  /** The file's `__metadata__`. */
  readonly metadata: Readonly<Record<string, string>>;
}

/** diffusers' safetensors metadata key holding the LoraConfig of each component. */
export const LORA_ADAPTER_METADATA_KEY = 'lora_adapter_metadata';

const KOHYA_PREFIX: Readonly<Record<LoraComponent, string>> = { unet: 'lora_unet', text: 'lora_te' };
const DIFFUSERS_PREFIX: Readonly<Record<LoraComponent, string>> = { unet: 'unet', text: 'text_encoder' };

// =============================================================================================
// kohya module names

/**
 * Module-name words of SD 1.x/2.x UNets and CLIP text encoders that contain "_", which kohya's
 * "." → "_" flattening merges with their neighbours. Everything else is one word per piece.
 */
export const KOHYA_JOINED_NAMES: readonly string[] = [
  'down_blocks',
  'up_blocks',
  'mid_block',
  'transformer_blocks',
  'to_q',
  'to_k',
  'to_v',
  'to_out',
  'add_k_proj',
  'add_v_proj',
  'proj_in',
  'proj_out',
  'time_emb_proj',
  'conv_shortcut',
  'conv_in',
  'conv_out',
  'conv_norm_out',
  'time_embedding',
  'linear_1',
  'linear_2',
  'text_model',
  'self_attn',
  'q_proj',
  'k_proj',
  'v_proj',
  'out_proj',
  'final_layer_norm',
  'layer_norm1',
  'layer_norm2',
  'token_embedding',
  'position_embedding',
];
const JOINED = new Set(KOHYA_JOINED_NAMES);
const MAX_JOINED_PIECES = Math.max(...KOHYA_JOINED_NAMES.map((n) => n.split('_').length));

/** kohya's name of a module: `lora_unet_down_blocks_0_…_to_q`, `lora_te_text_model_…_q_proj`. */
export function kohyaName(component: LoraComponent, module: string): string {
  return `${KOHYA_PREFIX[component]}_${module.replace(/\./g, '_')}`;
}

/** The component and module path of a kohya name (inverse of {@link kohyaName}). */
export function parseKohyaName(name: string): { component: LoraComponent; module: string } {
  let component: LoraComponent;
  let rest: string;
  if (name.startsWith('lora_unet_')) {
    component = 'unet';
    rest = name.slice('lora_unet_'.length);
  } else if (name.startsWith('lora_te_')) {
    component = 'text';
    rest = name.slice('lora_te_'.length);
  } else if (/^lora_te\d_/.test(name)) {
    throw new Error(`'${name}': a LoRA for SDXL's two text encoders (lora_te1_/lora_te2_); only SD 1.x/2.x LoRAs are supported`);
  } else {
    throw new Error(`'${name}': not a kohya LoRA module name (expected lora_unet_… or lora_te_…)`);
  }
  const pieces = rest.split('_');
  const words: string[] = [];
  for (let i = 0; i < pieces.length; ) {
    let taken = 1;
    for (let n = Math.min(MAX_JOINED_PIECES, pieces.length - i); n > 1; n--) {
      if (JOINED.has(pieces.slice(i, i + n).join('_'))) {
        taken = n;
        break;
      }
    }
    words.push(pieces.slice(i, i + taken).join('_'));
    i += taken;
  }
  return { component, module: words.join('.') };
}

// =============================================================================================
// Reading

/** What one key of a LoRA file is. */
type KeyRole = { readonly component: LoraComponent; readonly module: string; readonly part: 'down' | 'up' | 'alpha'; readonly layout: LoraLayout };

const UNSUPPORTED_SUFFIXES: ReadonlyArray<readonly [RegExp, string]> = [
  [/\.(hada_w[12]_[ab]|hada_t[12])$/, 'LyCORIS LoHa'],
  [/\.(lokr_w[12](_[ab])?|lokr_t2)$/, 'LyCORIS LoKr'],
  [/\.lora_mid\.weight$/, 'LoCon with a Tucker (lora_mid) factor'],
  [/\.(dora_scale|lora_magnitude_vector(\.[^.]+)?(\.weight)?)$/, 'DoRA'],
  [/\.(diff|diff_b|on_input|oft_blocks|oft_diag)$/, 'LyCORIS full/OFT'],
];

const OLD_ATTN: Readonly<Record<string, { readonly unet: string; readonly text: string }>> = {
  to_q: { unet: 'to_q', text: 'q_proj' },
  to_k: { unet: 'to_k', text: 'k_proj' },
  to_v: { unet: 'to_v', text: 'v_proj' },
  to_out: { unet: 'to_out.0', text: 'out_proj' },
};

function componentOfPath(module: string): LoraComponent {
  return module.startsWith('text_model.') ? 'text' : 'unet';
}

/** The role of a non-kohya key, or undefined when it is none of the known forms. */
function diffusersKeyRole(key: string): KeyRole | undefined {
  let rest = key;
  let component: LoraComponent | undefined;
  if (rest.startsWith('unet.')) {
    component = 'unet';
    rest = rest.slice('unet.'.length);
  } else if (rest.startsWith('text_encoder.')) {
    component = 'text';
    rest = rest.slice('text_encoder.'.length);
  } else if (rest.startsWith('base_model.model.')) {
    rest = rest.slice('base_model.model.'.length);
  }
  const at = (module: string, part: KeyRole['part'], layout: LoraLayout): KeyRole => ({ component: component ?? componentOfPath(module), module, part, layout });
  let m = /^(.+)\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight$/.exec(rest);
  if (m !== null) return at(m[1]!, m[2] === 'A' ? 'down' : 'up', 'peft');
  m = /^(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$/.exec(rest);
  if (m !== null) return at(m[1]!, m[2] as 'down' | 'up', 'diffusers');
  m = /^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$/.exec(rest);
  if (m !== null) return { component: component ?? 'unet', module: `${m[1]}.${OLD_ATTN[m[2]!]!.unet}`, part: m[3] as 'down' | 'up', layout: 'diffusers-old' };
  m = /^(.+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$/.exec(rest);
  if (m !== null) {
    const c = component ?? componentOfPath(m[1]!);
    return { component: c, module: `${m[1]}.${OLD_ATTN[m[2]!]![c]}`, part: m[3] as 'down' | 'up', layout: 'diffusers-old' };
  }
  m = /^(.+)\.alpha$/.exec(rest);
  if (m !== null) return at(m[1]!, 'alpha', 'peft');
  return undefined;
}

function keyRole(source: string, key: string): KeyRole {
  for (const [pattern, what] of UNSUPPORTED_SUFFIXES) {
    if (pattern.test(key)) throw new Error(`${source}: '${key}' belongs to a ${what} network, which is not supported yet (plain LoRA only)`);
  }
  if (key.startsWith('lora_unet_') || /^lora_te\d?_/.test(key)) {
    const m = /^([^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)$/.exec(key);
    if (m === null) throw new Error(`${source}: '${key}': expected <name>.lora_down.weight, <name>.lora_up.weight or <name>.alpha in a kohya LoRA`);
    const { component, module } = parseKohyaName(m[1]!);
    return { component, module, part: m[2] === 'alpha' ? 'alpha' : m[2] === 'lora_down.weight' ? 'down' : 'up', layout: 'kohya' };
  }
  const role = diffusersKeyRole(key);
  if (role === undefined) {
    throw new Error(
      `${source}: '${key}' is not a LoRA tensor of a known layout (kohya lora_unet_*.lora_down.weight, peft *.lora_A.weight, diffusers *.lora.down.weight / *.lora_linear_layer.down.weight, attention-processor *.processor.to_q_lora.down.weight)`,
    );
  }
  return role;
}

/** α per module from diffusers' `lora_adapter_metadata` (its LoraConfig per component), if present. */
function metadataAlpha(metadata: Readonly<Record<string, string>>, component: LoraComponent, module: string): number | undefined {
  const raw = metadata[LORA_ADAPTER_METADATA_KEY];
  if (raw === undefined) return undefined;
  let config: Record<string, unknown>;
  try {
    config = JSON.parse(raw) as Record<string, unknown>;
  } catch {
    return undefined;
  }
  const prefix = DIFFUSERS_PREFIX[component];
  const pattern = config[`${prefix}.alpha_pattern`];
  if (typeof pattern === 'object' && pattern !== null) {
    for (const [key, value] of Object.entries(pattern as Record<string, unknown>)) {
      if (typeof value === 'number' && (module === key || module.endsWith(`.${key}`))) return value;
    }
  }
  const alpha = config[`${prefix}.lora_alpha`];
  return typeof alpha === 'number' ? alpha : undefined;
}

function describeShape(s: readonly number[]): string {
  return `[${s.join(', ')}]`;
}

/**
 * The LoRA in `tensors` (any of the layouts, keys as stored). Every key must be a LoRA tensor;
 * each module needs both A and B of consistent shapes. Errors name `source` and the key.
 */
export function parseLoraTensors(source: string, tensors: ReadonlyMap<string, PlainTensor>, metadata: Readonly<Record<string, string>> = {}): LoraFileContent {
  interface Parts {
    component: LoraComponent;
    module: string;
    down?: PlainTensor;
    up?: PlainTensor;
    alpha?: number;
    keys: string[];
  }
  const modules = new Map<string, Parts>();
  const layouts = new Set<LoraLayout>();
  for (const [key, tensor] of tensors) {
    const role = keyRole(source, key);
    if (role.part !== 'alpha') layouts.add(role.layout);
    const id = `${role.component}:${role.module}`;
    const parts = modules.get(id) ?? { component: role.component, module: role.module, keys: [] };
    parts.keys.push(key);
    if (role.part === 'alpha') {
      if (tensor.data.length !== 1) throw new Error(`${source}: '${key}': alpha should be one number, found shape ${describeShape(tensor.shape)}`);
      parts.alpha = tensor.data[0]!;
    } else {
      if (parts[role.part] !== undefined) throw new Error(`${source}: '${key}': a second ${role.part} matrix for ${role.module}`);
      parts[role.part] = tensor;
    }
    modules.set(id, parts);
  }
  if (modules.size === 0) throw new Error(`${source}: no LoRA tensors in the file`);
  const out: LoraModuleData[] = [];
  for (const p of modules.values()) {
    const name = `${source}: ${p.component === 'unet' ? 'UNet' : 'text encoder'} module '${p.module}' (${p.keys.join(', ')})`;
    if (p.down === undefined || p.up === undefined) throw new Error(`${name}: has no ${p.down === undefined ? 'down (A)' : 'up (B)'} matrix`);
    const [down, up] = [p.down.shape, p.up.shape];
    const conv = down.length === 4;
    if (conv && (down[2] !== 1 || down[3] !== 1)) {
      throw new Error(`${name}: a ${down[2]}×${down[3]} convolution LoRA (LoCon): conv LoRA is not supported yet`);
    }
    const okDown = down.length === 2 || conv;
    const okUp = up.length === (conv ? 4 : 2) && (!conv || (up[2] === 1 && up[3] === 1));
    if (!okDown || !okUp || up[1] !== down[0]) {
      throw new Error(`${name}: down ${describeShape(down)} and up ${describeShape(up)} are not [rank, in] and [out, rank] (1×1 conv: with trailing 1, 1)`);
    }
    const rank = down[0]!;
    const alpha = p.alpha ?? metadataAlpha(metadata, p.component, p.module) ?? rank;
    out.push({ component: p.component, module: p.module, rank, alpha, down: p.down, up: p.up });
  }
  const layout: LoraLayout = layouts.has('kohya') ? 'kohya' : layouts.has('diffusers-old') ? 'diffusers-old' : layouts.has('diffusers') ? 'diffusers' : 'peft';
  return { source, layout, modules: out, metadata };
}

/** Reads a LoRA file: `.safetensors`, or a PyTorch pickle (`.bin`, `.pt`, `.ckpt`) through the safe reader. */
export async function readLoraFile(file: string): Promise<LoraFileContent> {
  const source = await openTensorSource(file);
  try {
    const tensors = new Map<string, PlainTensor>();
    for (const [key, ref] of source.tensors) {
      if (!isFloatDType(ref.dtype)) throw new Error(`${file}: '${key}' is ${ref.dtype}; LoRA tensors are floats`);
      tensors.set(key, { shape: [...ref.shape], data: await ref.readFloat32() });
    }
    return parseLoraTensors(file, tensors, source.metadata);
  } finally {
    await source.close();
  }
}

/** A file's modules as adapters of plain tensors (A [r, in], B [out, r]); kind from the stored shapes. */
export function loraModulesAsAdapters(content: LoraFileContent): LoraAdapter<PlainTensor>[] {
  return content.modules.map((m) => {
    const kind = m.down.shape.length === 4 ? 'conv1x1' : 'linear';
    return {
      component: m.component,
      module: m.module,
      kind,
      inFeatures: m.down.shape[1]!,
      outFeatures: m.up.shape[0]!,
      rank: m.rank,
      alpha: m.alpha,
      down: { shape: [m.rank, m.down.shape[1]!], data: m.down.data },
      up: { shape: [m.up.shape[0]!, m.rank], data: m.up.data },
    };
  });
}

/**
 * Checks a file's modules against a model's weights: each must exist and have the in/out
 * features the LoRA implies. `weightShape(component, key)`: the internal shape, or undefined.
 */
export function checkLoraAgainstModel(content: LoraFileContent, weightShape: (component: LoraComponent, key: string) => readonly number[] | undefined): void {
  const missing: string[] = [];
  for (const m of content.modules) {
    const shape = weightShape(m.component, `${m.module}.weight`);
    if (shape === undefined) {
      missing.push(`${m.component === 'unet' ? 'UNet' : 'text encoder'} '${m.module}'`);
      continue;
    }
    const target = moduleKindOf(content.source, m.module, shape);
    const inF = m.down.shape[1]!;
    const outF = m.up.shape[0]!;
    const kind = m.down.shape.length === 4 ? 'conv1x1' : 'linear';
    if (target.inFeatures !== inF || target.outFeatures !== outF || (kind === 'conv1x1' && target.kind !== 'conv1x1')) {
      throw new Error(
        `${content.source}: the LoRA of '${m.module}' maps ${inF} → ${outF} features (${kind}), the model's module is ${target.inFeatures} → ${target.outFeatures} (${target.kind}): a LoRA for another model`,
      );
    }
  }
  if (missing.length > 0) {
    const shown = missing.length > 6 ? `${missing.slice(0, 6).join(', ')}, … (${missing.length} in all)` : missing.join(', ');
    throw new Error(`${content.source}: the LoRA adapts modules this model does not have: ${shown} (a LoRA for another architecture, e.g. SDXL?)`);
  }
}

// =============================================================================================
// Writing

function uniform(values: readonly number[]): number | undefined {
  return values.every((v) => v === values[0]) ? values[0] : undefined;
}

/** diffusers' `lora_adapter_metadata`: a LoraConfig per component, with patterns for modules that differ. */
function adapterMetadata(modules: readonly LoraModuleData[]): string {
  const config: Record<string, unknown> = {};
  for (const component of ['unet', 'text'] as const) {
    const ms = modules.filter((m) => m.component === component);
    if (ms.length === 0) continue;
    const prefix = DIFFUSERS_PREFIX[component];
    const r = ms[0]!.rank;
    const alpha = ms[0]!.alpha;
    config[`${prefix}.r`] = r;
    config[`${prefix}.lora_alpha`] = alpha;
    config[`${prefix}.target_modules`] = ms.map((m) => m.module);
    const rankPattern = Object.fromEntries(ms.filter((m) => m.rank !== r).map((m) => [m.module, m.rank]));
    const alphaPattern = Object.fromEntries(ms.filter((m) => m.alpha !== alpha).map((m) => [m.module, m.alpha]));
    config[`${prefix}.rank_pattern`] = rankPattern;
    config[`${prefix}.alpha_pattern`] = alphaPattern;
  }
  return JSON.stringify(config);
}

/** The names of A and B of a module in a non-kohya layout. */
function diffusersNames(layout: Exclude<LoraLayout, 'kohya'>, m: LoraModuleData): { down: string; up: string } {
  const base = `${DIFFUSERS_PREFIX[m.component]}.${m.module}`;
  const last = m.module.slice(m.module.lastIndexOf('.') + 1);
  if (layout === 'diffusers-old') {
    const old = Object.entries(OLD_ATTN).find(([, v]) => m.module.endsWith(`.${v[m.component]}`));
    if (old === undefined) {
      throw new Error(`'${m.module}': the attention-processor layout (diffusers-old) only holds attention q/k/v/out LoRAs; use peft or diffusers`);
    }
    const owner = m.module.slice(0, m.module.length - old[1][m.component].length - 1);
    const prefix = `${DIFFUSERS_PREFIX[m.component]}.${owner}${m.component === 'unet' ? '.processor' : ''}.${old[0]}_lora`;
    return { down: `${prefix}.down.weight`, up: `${prefix}.up.weight` };
  }
  if (layout === 'diffusers') {
    // convert_state_dict_to_diffusers renames only these; other modules keep peft's names.
    if (m.component === 'unet' && (['to_q', 'to_k', 'to_v'].includes(last) || m.module.endsWith('.to_out.0'))) {
      return { down: `${base}.lora.down.weight`, up: `${base}.lora.up.weight` };
    }
    if (m.component === 'text' && ['q_proj', 'k_proj', 'v_proj', 'out_proj'].includes(last)) {
      return { down: `${base}.lora_linear_layer.down.weight`, up: `${base}.lora_linear_layer.up.weight` };
    }
  }
  return { down: `${base}.lora_A.weight`, up: `${base}.lora_B.weight` };
}

/** The tensors and metadata of `content` in `layout` (float32). `metadata` is added to the header. */
export function loraFileTensors(
  content: Pick<LoraFileContent, 'modules'>,
  layout: LoraLayout,
  metadata: Readonly<Record<string, string>> = {},
): { tensors: Map<string, TensorToWrite>; metadata: Record<string, string> } {
  const tensors = new Map<string, TensorToWrite>();
  const put = (name: string, t: PlainTensor) => {
    if (tensors.has(name)) throw new Error(`LoRA layout ${layout}: two tensors named '${name}'`);
    tensors.set(name, { dtype: 'F32', shape: t.shape, data: t.data });
  };
  const header: Record<string, string> = { ...metadata };
  if (layout === 'kohya') {
    for (const m of content.modules) {
      const name = kohyaName(m.component, m.module);
      put(`${name}.lora_down.weight`, m.down);
      put(`${name}.lora_up.weight`, m.up);
      put(`${name}.alpha`, { shape: [], data: Float32Array.of(m.alpha) });
    }
    const rank = uniform(content.modules.map((m) => m.rank));
    const alpha = uniform(content.modules.map((m) => m.alpha));
    header['ss_network_module'] ??= 'networks.lora';
    // sd-scripts' resize_lora writes "Dynamic" when ranks differ per module.
    header['ss_network_dim'] ??= rank === undefined ? 'Dynamic' : String(rank);
    header['ss_network_alpha'] ??= alpha === undefined ? 'Dynamic' : String(alpha);
  } else {
    for (const m of content.modules) {
      const names = diffusersNames(layout, m);
      put(names.down, m.down);
      // The attention-processor layout has no α (its loaders use scale 1): fold α/r into B.
      const scale = m.alpha / m.rank;
      put(names.up, layout === 'diffusers-old' && scale !== 1 ? { shape: m.up.shape, data: m.up.data.map((v) => Math.fround(v * scale)) } : m.up);
    }
    header['format'] ??= 'pt';
    if (layout !== 'diffusers-old') header[LORA_ADAPTER_METADATA_KEY] = adapterMetadata(content.modules);
  }
  return { tensors, metadata: header };
}

/**
 * sd-scripts' `sshs_model_hash` / `sshs_legacy_hash` of a kohya file (what A1111 shows for a
 * LoRA): sha256 of the tensor bytes after the header, and sha256 of 64 KiB at 1 MiB of the file
 * written with only its `ss_*` metadata (first 8 hex digits).
 */
export function kohyaHashes(tensors: ReadonlyMap<string, TensorToWrite>, metadata: Readonly<Record<string, string>>): { modelHash: string; legacyHash: string } {
  const ss = Object.fromEntries(Object.entries(metadata).filter(([k]) => k.startsWith('ss_')));
  const bytes = serializeSafetensors(tensors, ss);
  const headerLength = Number(new DataView(bytes.buffer, bytes.byteOffset, 8).getBigUint64(0, true));
  const modelHash = createHash('sha256').update(bytes.subarray(8 + headerLength)).digest('hex');
  const legacyHash = createHash('sha256').update(bytes.subarray(0x100000, 0x110000)).digest('hex').slice(0, 8);
  return { modelHash, legacyHash };
}

/** Writes `content` as a `.safetensors` LoRA in `layout` (atomically); kohya files get sd-scripts' hashes. */
export async function writeLoraFile(
  file: string,
  content: Pick<LoraFileContent, 'modules'>,
  layout: LoraLayout,
  metadata: Readonly<Record<string, string>> = {},
): Promise<void> {
  const { tensors, metadata: header } = loraFileTensors(content, layout, metadata);
  if (layout === 'kohya') {
    const { modelHash, legacyHash } = kohyaHashes(tensors, header);
    header['sshs_model_hash'] = modelHash;
    header['sshs_legacy_hash'] = legacyHash;
  }
  await writeSafetensors(file, tensors, header);
}

/**
 * Converts a LoRA file to another layout. Metadata carries over except the keys that describe the
 * old layout (diffusers' adapter config, sd-scripts' hashes of the old bytes).
 */
export async function convertLoraFile(input: string, output: string, layout: LoraLayout): Promise<LoraFileContent> {
  const content = await readLoraFile(input);
  const kept = Object.fromEntries(
    Object.entries(content.metadata).filter(([k]) => k !== LORA_ADAPTER_METADATA_KEY && k !== 'sshs_model_hash' && k !== 'sshs_legacy_hash'),
  );
  await writeLoraFile(output, content, layout, kept);
  return content;
}
