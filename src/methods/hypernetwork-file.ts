/**
 * AUTOMATIC1111 hypernetwork files (`modules/hypernetworks/hypernetwork.py`, `Hypernetwork.save`
 * / `.load`): a torch pickle of one dict
 *
 *   { <width: int>: (state_dict_k, state_dict_v), …,            one pair per enabled width
 *     'step', 'name', 'layer_structure', 'activation_func', 'is_layer_norm',
 *     'weight_initialization', 'sd_checkpoint', 'sd_checkpoint_name', 'activate_output',
 *     'use_dropout', 'dropout_structure', 'last_layer_dropout', 'optional_info' }
 *
 * Each state dict is a `HypernetworkModule`'s: its `linear` is a torch `Sequential` that holds,
 * per layer i of `layer_structure` (widths width·ls[i] → width·ls[i+1]), a Linear, then an
 * activation (not after the last Linear unless `activate_output`; none for 'linear'), then a
 * LayerNorm (with `is_layer_norm`), then a Dropout (when `dropout_structure[i+1] > 0`). Parameter
 * keys are the Sequential indices, so they depend on all of those settings: `[1, 2, 1]` with relu
 * is `linear.0.*`, `linear.2.*`; add layer norm and it is `linear.0/3.*` (Linear) and
 * `linear.2/4.*` (LayerNorm). Weights are torch layout, Linear weight [out, in].
 *
 * Files from the first A1111 versions have `linear1.*` / `linear2.*` keys (`fix_old_state_dict`
 * maps them to `linear.0.*` / `linear.1.*`) and lack the newer fields; missing fields take the
 * defaults A1111's loader uses.
 */
import path from 'node:path';

import { PickleTuple, readTorchCheckpoint, TorchTensorRef, type PickleValue } from '../io/torch-pickle.js';
import { PickleOrderedDict } from '../io/torch-pickle.js';
import { pyFloat, writeTorchCheckpoint, type TorchSaveKey, type TorchSaveValue } from '../io/torch-save.js';

/**
 * Activation names A1111 accepts that this tool implements: its own table ('swish' is torch's
 * Hardswish there) plus the lower-cased torch.nn activation classes without parameters or
 * randomness. PReLU (a trained slope), RReLU (random), Softmax-like, GLU (halves the width) and
 * those needing constructor arguments (Threshold, MultiheadAttention) are not.
 */
export const HYPERNETWORK_ACTIVATIONS = [
  'linear',
  'relu',
  'leakyrelu',
  'elu',
  'swish',
  'tanh',
  'sigmoid',
  'gelu',
  'mish',
  'silu',
  'hardswish',
  'relu6',
  'selu',
  'celu',
  'softplus',
  'softsign',
  'tanhshrink',
  'hardtanh',
  'hardsigmoid',
  'logsigmoid',
] as const;
export type HypernetworkActivation = (typeof HYPERNETWORK_ACTIVATIONS)[number];

/** A1111's weight initialisations (its `weight_initialization` field). */
export const HYPERNETWORK_WEIGHT_INITS = ['Normal', 'XavierUniform', 'XavierNormal', 'KaimingUniform', 'KaimingNormal'] as const;
export type HypernetworkWeightInit = (typeof HYPERNETWORK_WEIGHT_INITS)[number];

/** What decides a module's layers (and so its state-dict keys). */
export interface HypernetworkArch {
  /** Width multipliers, first and last 1 (A1111's `layer_structure`). */
  readonly layerStructure: readonly number[];
  readonly activation: HypernetworkActivation;
  /** Activation after the last Linear too. */
  readonly activateOutput: boolean;
  /** A LayerNorm after every Linear (and its activation). */
  readonly layerNorm: boolean;
  /** Dropout probability after layer i at index i + 1; same length as `layerStructure`, last 0. */
  readonly dropoutStructure: readonly number[];
}

/** One entry of a module's torch Sequential, with its index there. */
export type MlpLayer =
  | { readonly kind: 'linear'; readonly index: number; readonly inFeatures: number; readonly outFeatures: number }
  | { readonly kind: 'activation'; readonly index: number; readonly name: HypernetworkActivation }
  | { readonly kind: 'layer_norm'; readonly index: number; readonly features: number }
  | { readonly kind: 'dropout'; readonly index: number; readonly p: number };

/** A float32 tensor in torch layout. */
export interface FloatTensor {
  readonly shape: readonly number[];
  readonly data: Float32Array;
}

/** A module's parameters by state-dict key (`linear.0.weight`). */
export type ModuleStateDict = ReadonlyMap<string, FloatTensor>;

/** The contents of a hypernetwork file. */
export interface HypernetworkFileContents {
  readonly name: string;
  /** Steps trained. */
  readonly step: number;
  readonly arch: HypernetworkArch;
  /** Recorded only: how the weights were first drawn. */
  readonly weightInitialization: string;
  readonly useDropout: boolean;
  /** Short hash and name of the model it was trained on (A1111: the checkpoint's shorthash). */
  readonly sdCheckpoint: string | null;
  readonly sdCheckpointName: string | null;
  /** Free text A1111 prints when loading. */
  readonly optionalInfo: string | null;
  /** Context width → [the K module's, the V module's] parameters, in file order. */
  readonly modules: ReadonlyMap<number, readonly [ModuleStateDict, ModuleStateDict]>;
}

/** A1111's `parse_dropout_structure`: 0.3 after every hidden layer but the last, which `lastLayerDropout` decides. */
export function parseDropoutStructure(layerStructure: readonly number[], useDropout: boolean, lastLayerDropout: boolean): number[] {
  const n = layerStructure.length;
  if (!useDropout) return new Array<number>(n).fill(0);
  return [0, ...new Array<number>(Math.max(0, n - 3)).fill(0.3), lastLayerDropout ? 0.3 : 0, 0];
}

/** Problems with an architecture, one line each (empty when valid). */
export function checkArch(arch: HypernetworkArch): string[] {
  const problems: string[] = [];
  const ls = arch.layerStructure;
  if (ls.length < 2) problems.push(`layer_structure: expected at least 2 entries, found [${ls.join(', ')}]`);
  else if (ls[0] !== 1 || ls[ls.length - 1] !== 1) problems.push(`layer_structure: must start and end with 1 (the context width), found [${ls.join(', ')}]`);
  if (ls.some((m) => !(Number.isFinite(m) && m > 0))) problems.push(`layer_structure: multipliers must be positive numbers, found [${ls.join(', ')}]`);
  const ds = arch.dropoutStructure;
  if (ds.length !== ls.length) problems.push(`dropout_structure: expected ${ls.length} entries (one per layer_structure entry), found [${ds.join(', ')}]`);
  if (ds.some((p) => !(p >= 0 && p < 1))) problems.push(`dropout_structure: probabilities must be in [0, 1), found [${ds.join(', ')}]`);
  if (ds.length > 0 && ds[ds.length - 1] !== 0) problems.push(`dropout_structure: the last entry must be 0 (no dropout on the output), found [${ds.join(', ')}]`);
  return problems;
}

/** The torch Sequential of one module for context width `width`, as A1111's HypernetworkModule builds it. */
export function moduleLayout(width: number, arch: HypernetworkArch): MlpLayer[] {
  const ls = arch.layerStructure;
  const layers: MlpLayer[] = [];
  let index = 0;
  for (let i = 0; i < ls.length - 1; i++) {
    // Python's int(dim * multiplier): truncation of the float product.
    const inFeatures = Math.trunc(width * ls[i]!);
    const outFeatures = Math.trunc(width * ls[i + 1]!);
    layers.push({ kind: 'linear', index: index++, inFeatures, outFeatures });
    const last = i >= ls.length - 2;
    if (arch.activation !== 'linear' && (!last || arch.activateOutput)) layers.push({ kind: 'activation', index: index++, name: arch.activation });
    if (arch.layerNorm) layers.push({ kind: 'layer_norm', index: index++, features: outFeatures });
    const p = arch.dropoutStructure[i + 1] ?? 0;
    if (p > 0) layers.push({ kind: 'dropout', index: index++, p });
  }
  return layers;
}

/** The state-dict keys and shapes of one module, in Sequential order. */
export function moduleParams(width: number, arch: HypernetworkArch): { key: string; shape: number[] }[] {
  const out: { key: string; shape: number[] }[] = [];
  for (const l of moduleLayout(width, arch)) {
    if (l.kind === 'linear') {
      out.push({ key: `linear.${l.index}.weight`, shape: [l.outFeatures, l.inFeatures] });
      out.push({ key: `linear.${l.index}.bias`, shape: [l.outFeatures] });
    } else if (l.kind === 'layer_norm') {
      out.push({ key: `linear.${l.index}.weight`, shape: [l.features] });
      out.push({ key: `linear.${l.index}.bias`, shape: [l.features] });
    }
  }
  return out;
}

// =============================================================================================
// Writing

/**
 * Writes `contents` as A1111 saves a hypernetwork: int width keys first (in `modules` order),
 * then the settings in `Hypernetwork.save`'s order. State dicts are OrderedDicts with torch's
 * `_metadata` (as `Module.state_dict()` returns them), tensors plain (state_dict detaches), and
 * multipliers and probabilities Python floats (A1111 parses them from text with float()).
 */
export async function writeHypernetworkPt(file: string, contents: HypernetworkFileContents): Promise<void> {
  const problems = checkArch(contents.arch);
  if (problems.length > 0) throw new Error(`${file}: cannot write: ${problems.join('; ')}`);
  const root = new Map<TorchSaveKey, TorchSaveValue>();
  for (const [width, [k, v]] of contents.modules) {
    if (!Number.isSafeInteger(width) || width < 1) throw new Error(`${file}: module width ${width} is not a positive integer`);
    const pair = [stateDictValue(file, width, 'k', k, contents.arch), stateDictValue(file, width, 'v', v, contents.arch)];
    root.set(width, new PickleTuple(pair));
  }
  const ds = contents.arch.dropoutStructure;
  root.set('step', contents.step);
  root.set('name', contents.name);
  root.set('layer_structure', contents.arch.layerStructure.map((m) => pyFloat(m)));
  root.set('activation_func', contents.arch.activation);
  root.set('is_layer_norm', contents.arch.layerNorm);
  root.set('weight_initialization', contents.weightInitialization);
  root.set('sd_checkpoint', contents.sdCheckpoint);
  root.set('sd_checkpoint_name', contents.sdCheckpointName);
  root.set('activate_output', contents.arch.activateOutput);
  root.set('use_dropout', contents.useDropout);
  root.set('dropout_structure', ds.map((p) => pyFloat(p)));
  // A1111 derives it from the structure when saving.
  root.set('last_layer_dropout', ds.length >= 2 && ds[ds.length - 2] !== 0);
  root.set('optional_info', contents.optionalInfo);
  await writeTorchCheckpoint(file, root);
}

// PickleTuple's items are typed as read values; the writer accepts them as save values. The
// OrderedDict carries torch's `_metadata` ({module path: {'version': 1}} for the module, its
// Sequential and every entry of it), which `load_state_dict` reads for version migrations.
function stateDictValue(file: string, width: number, which: 'k' | 'v', dict: ModuleStateDict, arch: HypernetworkArch): PickleOrderedDict {
  const expected = moduleParams(width, arch);
  const problems = stateDictProblems(dict, expected);
  if (problems.length > 0) throw new Error(`${file}: cannot write module ${width} (${which}): ${problems.join('; ')}`);
  const out = new PickleOrderedDict();
  for (const { key } of expected) {
    const t = dict.get(key)!;
    out.set(key, { dtype: 'float32', shape: [...t.shape], data: t.data } as unknown as PickleValue);
  }
  const metadata = new PickleOrderedDict();
  const version = () => new Map<PickleValue, PickleValue>([['version', 1]]);
  metadata.set('', version());
  metadata.set('linear', version());
  for (const l of moduleLayout(width, arch)) metadata.set(`linear.${l.index}`, version());
  out.attributes = new Map<PickleValue, PickleValue>([['_metadata', metadata]]);
  return out;
}

function stateDictProblems(dict: ModuleStateDict, expected: readonly { key: string; shape: number[] }[]): string[] {
  const problems: string[] = [];
  const known = new Set(expected.map((e) => e.key));
  for (const { key, shape } of expected) {
    const t = dict.get(key);
    if (t === undefined) problems.push(`missing '${key}' [${shape.join(', ')}]`);
    else if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
      problems.push(`'${key}' has shape [${t.shape.join(', ')}], expected [${shape.join(', ')}]`);
    } else if (t.data.length !== shape.reduce((a, b) => a * b, 1)) problems.push(`'${key}' has ${t.data.length} values for shape [${shape.join(', ')}]`);
  }
  for (const key of dict.keys()) if (!known.has(key)) problems.push(`unexpected '${key}'`);
  return problems;
}

// =============================================================================================
// Reading

/** The A1111 name of a file: its stem (A1111 lists hypernetworks by it). */
export function hypernetworkStem(file: string): string {
  return path.basename(file).replace(/\.[^.]*$/, '');
}

/**
 * Reads an A1111 hypernetwork file (any version) without evaluating anything in it. Settings the
 * file lacks take A1111's loader defaults (layer_structure [1, 2, 1], no activation, activate_output
 * true, no layer norm, dropout from use_dropout / last_layer_dropout); every module is checked
 * against the layout those settings imply, naming the file, width and key on a mismatch.
 */
export async function readHypernetworkPt(file: string): Promise<HypernetworkFileContents> {
  const ckpt = await readTorchCheckpoint(file);
  try {
    const root = ckpt.root;
    if (!(root instanceof Map)) throw new Error(`${file}: not a hypernetwork (expected a dict of widths and settings, found ${describe(root)})`);
    const field = <V>(key: string, fallback: V, check: (v: PickleValue) => V | undefined, expected: string): V => {
      if (!root.has(key)) return fallback;
      const value = root.get(key)!;
      const parsed = check(value);
      if (parsed === undefined) throw new Error(`${file}: '${key}' should be ${expected}, found ${describe(value)}`);
      return parsed;
    };
    const numbers = (v: PickleValue) => (Array.isArray(v) && v.every((x) => typeof x === 'number') ? (v as number[]) : undefined);
    const bool = (v: PickleValue) => (typeof v === 'boolean' ? v : undefined);
    const optString = (v: PickleValue) => (v === null || typeof v === 'string' ? v : undefined);

    const layerStructure = field('layer_structure', [1, 2, 1], numbers, 'a list of numbers');
    const activationName = field<string | null>('activation_func', null, optString, 'a string or None');
    const activation = activationName === null ? 'linear' : activationName;
    if (!(HYPERNETWORK_ACTIVATIONS as readonly string[]).includes(activation)) {
      throw new Error(`${file}: activation_func '${activation}' is not supported (supported: ${HYPERNETWORK_ACTIVATIONS.join(', ')})`);
    }
    const weightInitialization = field('weight_initialization', 'Normal', (v) => (typeof v === 'string' ? v : undefined), 'a string');
    const layerNorm = field('is_layer_norm', false, bool, 'a bool');
    const savedDropout = field<number[] | null>('dropout_structure', null, (v) => (v === null ? null : numbers(v)), 'a list of numbers or None');
    const lastLayerDropout = field('last_layer_dropout', false, bool, 'a bool');
    const useDropout = (savedDropout !== null && savedDropout.some((p) => p !== 0)) || field('use_dropout', false, bool, 'a bool');
    const arch: HypernetworkArch = {
      layerStructure,
      activation: activation as HypernetworkActivation,
      // A1111's loader default: files older than the setting activated every layer.
      activateOutput: field('activate_output', true, bool, 'a bool'),
      layerNorm,
      dropoutStructure: savedDropout ?? parseDropoutStructure(layerStructure, useDropout, lastLayerDropout),
    };
    const problems = checkArch(arch);
    if (problems.length > 0) throw new Error(`${file}: ${problems.join('; ')}`);

    const modules = new Map<number, readonly [ModuleStateDict, ModuleStateDict]>();
    for (const [key, value] of root) {
      if (typeof key !== 'number') continue;
      if (!Number.isSafeInteger(key) || key < 1) throw new Error(`${file}: module key ${key} is not a positive width`);
      const pair = value instanceof PickleTuple || Array.isArray(value) ? (value instanceof PickleTuple ? value.items : value) : undefined;
      if (pair === undefined || pair.length !== 2) throw new Error(`${file}: module ${key}: expected a pair (state_dict_k, state_dict_v), found ${describe(value)}`);
      const k = await readStateDict(file, key, 'k', pair[0]!, arch);
      const v = await readStateDict(file, key, 'v', pair[1]!, arch);
      modules.set(key, [k, v]);
    }
    if (modules.size === 0) throw new Error(`${file}: holds no hypernetwork modules (no int width keys); is it a hypernetwork?`);
    const stepValue = field('step', 0, (v) => (v === null ? 0 : typeof v === 'number' && Number.isSafeInteger(v) ? v : undefined), 'an int');
    return {
      name: field('name', hypernetworkStem(file), (v) => (v === null ? hypernetworkStem(file) : typeof v === 'string' ? v : undefined), 'a string'),
      step: stepValue,
      arch,
      weightInitialization,
      useDropout,
      sdCheckpoint: field<string | null>('sd_checkpoint', null, optString, 'a string or None'),
      sdCheckpointName: field<string | null>('sd_checkpoint_name', null, optString, 'a string or None'),
      optionalInfo: field<string | null>('optional_info', null, optString, 'a string or None'),
      modules,
    };
  } finally {
    await ckpt.close();
  }
}

// The first A1111 hypernetworks were two Linears without activation, keyed linear1 / linear2.
const OLD_KEYS: Readonly<Record<string, string>> = {
  'linear1.weight': 'linear.0.weight',
  'linear1.bias': 'linear.0.bias',
  'linear2.weight': 'linear.1.weight',
  'linear2.bias': 'linear.1.bias',
};

async function readStateDict(file: string, width: number, which: 'k' | 'v', value: PickleValue, arch: HypernetworkArch): Promise<ModuleStateDict> {
  if (!(value instanceof Map)) throw new Error(`${file}: module ${width} (${which}): expected a state dict, found ${describe(value)}`);
  const out = new Map<string, FloatTensor>();
  for (const [rawKey, t] of value) {
    if (typeof rawKey !== 'string') throw new Error(`${file}: module ${width} (${which}): state-dict key ${describe(rawKey)} is not a string`);
    const key = OLD_KEYS[rawKey] ?? rawKey;
    if (!(t instanceof TorchTensorRef)) throw new Error(`${file}: module ${width} (${which}): '${rawKey}' is ${describe(t)}, expected a tensor`);
    if (!['F32', 'F16', 'BF16', 'F64'].includes(t.dtype)) throw new Error(`${file}: module ${width} (${which}): '${rawKey}' is ${t.dtype}, expected a float tensor`);
    out.set(key, { shape: [...t.shape], data: await t.readFloat32() });
  }
  const problems = stateDictProblems(out, moduleParams(width, arch));
  if (problems.length > 0) {
    const settings = `layer_structure [${arch.layerStructure.join(', ')}], activation ${arch.activation}${arch.activateOutput ? ' (also on the output)' : ''}, layer norm ${arch.layerNorm}, dropout [${arch.dropoutStructure.join(', ')}]`;
    throw new Error(`${file}: module ${width} (${which}) does not match its settings (${settings}): ${problems.join('; ')}`);
  }
  return out;
}

function describe(v: PickleValue | undefined): string {
  if (v === undefined) return 'nothing';
  if (v === null) return 'None';
  if (typeof v === 'string') return JSON.stringify(v);
  if (typeof v === 'number' || typeof v === 'boolean' || typeof v === 'bigint') return String(v);
  if (Array.isArray(v)) return `a list of ${v.length}`;
  if (v instanceof PickleTuple) return `a tuple of ${v.length}`;
  if (v instanceof Map) return `a dict of ${v.size}`;
  if (v instanceof TorchTensorRef) return `a tensor [${v.shape.join(', ')}]`;
  return 'an object';
}
