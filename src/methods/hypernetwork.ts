/**
 * Hypernetworks as AUTOMATIC1111 trains and applies them (`modules/hypernetworks/hypernetwork.py`,
 * after NovelAI's design): for each enabled context width D, a pair of residual MLPs
 *
 *   K(c) = c + MLP_k(c)·s,   V(c) = c + MLP_v(c)·s
 *
 * applied to the context of every attention before `to_k` and `to_v` (Q untouched), chosen by the
 * context's last dimension only. So on SD 1.x the 768 pair reaches every cross-attention (text
 * states) and the 320 / 640 / 1280 pairs reach self-attention (whose context is the normed hidden
 * states); on SD 2.x cross-attention is 1024 wide. s is the strength at generation time and 1 in
 * training, as A1111's `HypernetworkModule.forward` does. The hook is `UnetHooks.attentionContext`.
 *
 * MLP_k and MLP_v are torch Sequentials of Linear → activation → LayerNorm → Dropout per layer of
 * `layer_structure` (see `hypernetwork-file.ts` for the exact layout, which fixes the file keys).
 * They are written once over `Ops<T>` (`hypernetworkContextHook`; Linear, LayerNorm and the
 * activations are nn.ts composites): tfjs runs that code for training and generation, and the ONNX
 * recorder records it (`hypernetworkHooks`). Only Dropout's random masks stay tfjs-side, passed in
 * by training; generation and export run in eval mode, where Dropout is the identity.
 *
 * Loss: the standard diffusion loss on the `data:` images with their captions (as textual
 * inversion's, DDPM eq. 4 noising, ε or v target), training only the hypernetwork: the text
 * states are computed in `prepare` (the text encoder is frozen and untouched by the hook).
 */
import path from 'node:path';

import * as tf from '@tensorflow/tfjs';
import { z } from 'zod';

import { encodeText } from '../models/clip/text-encoder-tfjs.js';
import type { UnetConfig } from '../models/unet/config.js';
import { unet, type UnetHooks } from '../models/unet/unet.js';
import { samplePosterior, scaleLatents } from '../models/vae/vae.js';
import { elu, gelu, hardSigmoid, hardSwish, layerNorm, leakyRelu, linear, logSigmoid, mish, relu, relu6, selu, silu, softplus, softsign } from '../ops/nn.js';
import type { Ops } from '../ops/ops.js';
import { ManifestScope, type Scope } from '../ops/scope.js';
import { shapeOps, type ShapeOnly } from '../ops/shape-ops.js';
import { tfOps } from '../ops/tfjs-ops.js';
import type { StableDiffusion } from '../pipeline/load.js';
import type { PredictionType } from '../schedulers/config.js';
import { addNoise, trainingTarget } from '../schedulers/ddpm.js';
import { noiseSchedule, type NoiseSchedule } from '../schedulers/tables.js';
import { checkCommonFields, commonFields, dataField } from '../train/config.js';
import type { TrainRandom } from '../train/rng-state.js';
import {
  checkArch,
  HYPERNETWORK_ACTIVATIONS,
  HYPERNETWORK_WEIGHT_INITS,
  moduleLayout,
  parseDropoutStructure,
  readHypernetworkPt,
  writeHypernetworkPt,
  type FloatTensor,
  type HypernetworkActivation,
  type HypernetworkArch,
  type HypernetworkFileContents,
  type HypernetworkWeightInit,
  type ModuleStateDict,
} from './hypernetwork-file.js';
import type { AppliedArtifact, Artifact, ModelPatch, TrainingMethod } from './types.js';
import { drawTrainingNoise, posteriorMoments } from './diffusion-batch.js';

const LR_DESCRIPTION =
  "Peak learning rate. Default 5e-6: users of A1111's default 1e-5 report hypernetworks collapsing to noise after a few thousand steps, and guides recommend 5e-6 or lower (or a falling schedule).";

/** Config of a hypernetwork run; defaults as A1111's "Create hypernetwork" tab unless stated. */
export const hypernetworkConfigSchema = z
  .strictObject({
    method: z.literal('hypernetwork').describe('Train an AUTOMATIC1111 hypernetwork (residual MLPs on the attention K/V context).'),
    ...commonFields({ steps: 10000, learning_rate: 5e-6, save_every: 500 }),
    learning_rate: z.number().positive().default(5e-6).describe(LR_DESCRIPTION),
    data: dataField.describe('Training images with captions (the data section of src/data; sidecar .txt captions by default). data.dir is required.'),
    hypernetwork_name: z
      .string()
      .regex(/^[A-Za-z0-9][A-Za-z0-9._ -]*$/, 'expected a file-name-safe name (letters, digits, . _ - and spaces)')
      .optional()
      .describe("Name of the .pt file and inside it (A1111 lists hypernetworks by file name). Default: output_dir's folder name."),
    enable_sizes: z
      .array(z.number().int().min(1))
      .min(1)
      .default([768, 320, 640, 1280])
      .describe(
        'Context widths that get a K/V module pair: 768 (SD 1.x cross-attention; 1024 on SD 2.x) and 320/640/1280 (self-attention at each UNet level). Every size must occur in the model. Default [768, 320, 640, 1280].',
      ),
    layer_structure: z
      .array(z.number().positive())
      .min(2)
      .default([1, 2, 1])
      .describe('Widths of the MLP layers as multiples of the context width, starting and ending with 1. Default [1, 2, 1].'),
    activation_func: z
      .enum(HYPERNETWORK_ACTIVATIONS)
      .default('linear')
      .describe(
        "Activation after each hidden layer (A1111 names; 'swish' is torch's Hardswish there, 'leakyrelu' has slope 0.01, 'gelu' is exact). Default linear (none).",
      ),
    activate_output: z.boolean().default(false).describe('Also apply the activation after the last layer. Default false.'),
    is_layer_norm: z.boolean().default(false).describe('A LayerNorm after each layer (A1111 initialises its weight like a Linear\'s, N(0, 0.01)). Default false.'),
    use_dropout: z.boolean().default(false).describe('Dropout after hidden layers during training (never when generating). Default false.'),
    dropout_structure: z
      .array(z.number().min(0).lt(1))
      .optional()
      .describe(
        'Dropout probability after each layer, one entry per layer_structure entry, last 0 (e.g. [0, 0.3, 0]). Default: 0.3 after every hidden layer but the last, which last_layer_dropout decides.',
      ),
    last_layer_dropout: z
      .boolean()
      .default(true)
      .describe('Without dropout_structure: dropout after the last hidden layer too (A1111\'s default). Default true.'),
    weight_initialization: z
      .enum(HYPERNETWORK_WEIGHT_INITS)
      .default('Normal')
      .describe('Initial weights: Normal (N(0, 0.01), zero biases), XavierUniform/XavierNormal, KaimingUniform/KaimingNormal (zero biases). Default Normal.'),
  })
  .superRefine((c, ctx) => {
    checkCommonFields(c, ctx);
    const seen = new Set<number>();
    for (const size of c.enable_sizes) {
      if (seen.has(size)) ctx.addIssue({ code: 'custom', path: ['enable_sizes'], message: `${size} is listed twice` });
      seen.add(size);
    }
    if (c.dropout_structure !== undefined && !c.use_dropout && c.dropout_structure.some((p) => p > 0)) {
      ctx.addIssue({ code: 'custom', path: ['dropout_structure'], message: 'has non-zero entries but use_dropout is false; set use_dropout: true' });
    }
    for (const problem of checkArch(archOf(c))) {
      const field = problem.slice(0, problem.indexOf(':'));
      ctx.addIssue({ code: 'custom', path: [field], message: problem.slice(field.length + 2) });
    }
  });

export type HypernetworkConfig = z.infer<typeof hypernetworkConfigSchema>;

type ArchFields = 'layer_structure' | 'activation_func' | 'activate_output' | 'is_layer_norm' | 'use_dropout' | 'dropout_structure' | 'last_layer_dropout';

/** The module layout a config asks for. */
export function archOf(cfg: Pick<HypernetworkConfig, ArchFields>): HypernetworkArch {
  const ls = cfg.layer_structure;
  return {
    layerStructure: ls,
    activation: cfg.activation_func,
    activateOutput: cfg.activate_output,
    layerNorm: cfg.is_layer_norm,
    dropoutStructure: cfg.use_dropout ? (cfg.dropout_structure ?? parseDropoutStructure(ls, true, cfg.last_layer_dropout)) : new Array<number>(ls.length).fill(0),
  };
}

// =============================================================================================
// The modules, over Ops: one definition for training and generation (tfjs) and ONNX export

/** One Sequential entry with its parameters: tfjs tensors (variables while training) or recorded constants. */
export type HypernetworkLayer<T> =
  | { readonly kind: 'linear'; readonly index: number; readonly weight: T; readonly bias: T }
  | { readonly kind: 'activation'; readonly index: number; readonly name: HypernetworkActivation }
  | { readonly kind: 'layer_norm'; readonly index: number; readonly weight: T; readonly bias: T }
  | { readonly kind: 'dropout'; readonly index: number; readonly p: number };

/** One residual MLP (A1111's HypernetworkModule). */
export interface HypernetworkModule<T> {
  readonly width: number;
  readonly layers: readonly HypernetworkLayer<T>[];
}

/** The K and the V module of one context width. */
export type HypernetworkPair<T> = readonly [HypernetworkModule<T>, HypernetworkModule<T>];

/** One residual MLP on tfjs. */
export type HypernetworkModuleTensors = HypernetworkModule<tf.Tensor>;

/** A hypernetwork on tfjs: per context width, the K and the V module. */
export interface HypernetworkTensors {
  readonly arch: HypernetworkArch;
  readonly modules: ReadonlyMap<number, HypernetworkPair<tf.Tensor>>;
}

/** An `attentionContext` hook: the context → what to_k and to_v read (tfjs unless `T` says otherwise). */
export type ContextHook<T = tf.Tensor> = NonNullable<UnetHooks<T>['attentionContext']>;

/** How a hypernetwork runs over any {@link Ops}: strength, and dropout (training only). */
export interface HypernetworkOpsRun<T> {
  /** A1111's multiplier s in c + MLP(c)·s; 1 in training. */
  readonly strength: number;
  /**
   * Dropout(p) of a hidden state. Only training passes one: random masks are not an Ops
   * operation, and in eval mode (generation, export) torch's Dropout is the identity.
   */
  readonly dropout?: (h: T, p: number) => T;
}

/** How a hypernetwork runs on tfjs: strength, and dropout (training only). */
export interface HypernetworkRun {
  /** A1111's multiplier s in c + MLP(c)·s; 1 in training. */
  readonly strength: number;
  /** Dropout masks from this seed (one stream per dropout application, in call order); absent: no dropout. */
  readonly dropoutSeed?: number;
}

// torch's definitions of the A1111 names (torch.nn.* docs), each a composite of nn.ts. A1111's
// 'swish' is Hardswish; CELU with torch's default α = 1 is ELU.
const ACTIVATIONS: Readonly<Record<HypernetworkActivation, <T>(o: Ops<T>, x: T) => T>> = {
  linear: (_o, x) => x,
  relu: (o, x) => relu(o, x),
  leakyrelu: (o, x) => leakyRelu(o, x, 0.01),
  elu: (o, x) => elu(o, x),
  swish: (o, x) => hardSwish(o, x),
  hardswish: (o, x) => hardSwish(o, x),
  tanh: (o, x) => o.tanh(x),
  sigmoid: (o, x) => o.sigmoid(x),
  gelu: (o, x) => gelu(o, x),
  mish: (o, x) => mish(o, x),
  silu: (o, x) => silu(o, x),
  relu6: (o, x) => relu6(o, x),
  selu: (o, x) => selu(o, x),
  celu: (o, x) => elu(o, x),
  softplus: (o, x) => softplus(o, x),
  softsign: (o, x) => softsign(o, x),
  tanhshrink: (o, x) => o.sub(x, o.tanh(x)),
  hardtanh: (o, x) => o.clip(x, -1, 1),
  hardsigmoid: (o, x) => hardSigmoid(o, x),
  logsigmoid: (o, x) => logSigmoid(o, x),
};

/** Applies activation `name` elementwise over any {@link Ops} (torch's definition of the A1111 name). */
export function hypernetworkActivation<T>(o: Ops<T>, name: HypernetworkActivation, x: T): T {
  return ACTIVATIONS[name](o, x);
}

/** Applies activation `name` elementwise on tfjs. */
export function applyActivation(name: HypernetworkActivation, x: tf.Tensor): tf.Tensor {
  return hypernetworkActivation(tfOps, name, x);
}

// A Scope over one layer's two tensors, so nn.ts's linear and layerNorm (the model code's own)
// compute the layers; it checks the shapes they ask for.
function layerScope<T>(o: Ops<T>, width: number, layer: { readonly index: number; readonly weight: T; readonly bias: T }): Scope<T> {
  const scope: Scope<T> = {
    sub: () => scope,
    param: (key, shape) => {
      const t = key === 'weight' ? layer.weight : key === 'bias' ? layer.bias : undefined;
      const found = t === undefined ? undefined : o.shape(t);
      if (found === undefined || found.length !== shape.length || found.some((d, i) => d !== shape[i])) {
        throw new Error(`hypernetwork module ${width}: 'linear.${layer.index}.${key}' is ${found === undefined ? 'not a parameter' : `[${found.join(', ')}]`}, expected [${shape.join(', ')}]`);
      }
      return t!;
    },
  };
  return scope;
}

/** Dropout masks of one training forward: each application (in call order) gets its own seeded stream. */
export class DropoutStreams {
  private next = 0;
  constructor(private readonly seed: number) {}
  mask(shape: readonly number[], p: number): tf.Tensor {
    // torch.nn.Dropout: keep with probability 1 − p, scale kept values by 1/(1 − p).
    const u = tf.randomUniform([...shape], 0, 1, 'float32', this.seed + this.next++);
    return tf.div(tf.cast(tf.greaterEqual(u, p), 'float32'), 1 - p);
  }
}

/** c + MLP(c)·strength for a context [..., D] over any {@link Ops}. */
export function applyModule<T>(o: Ops<T>, m: HypernetworkModule<T>, context: T, run: HypernetworkOpsRun<T>): T {
  let h = context;
  for (const l of m.layers) {
    switch (l.kind) {
      case 'linear': {
        const [outF, inF] = o.shape(l.weight) as [number, number]; // torch Linear: h Wᵀ + b, W [out, in]
        h = linear(o, layerScope(o, m.width, l), h, inF, outF);
        break;
      }
      case 'activation':
        h = hypernetworkActivation(o, l.name, h);
        break;
      case 'layer_norm':
        h = layerNorm(o, layerScope(o, m.width, l), h, o.shape(l.weight)[0]!, 1e-5); // torch LayerNorm eps
        break;
      case 'dropout':
        if (run.dropout !== undefined) h = run.dropout(h, l.p);
        break;
    }
  }
  return o.add(context, run.strength === 1 ? h : o.mul(h, run.strength));
}

function checkStrength(strength: number): void {
  if (!Number.isFinite(strength)) throw new Error(`hypernetwork strength must be a finite number, got ${strength}`);
}

/**
 * The `attentionContext` hook of a hypernetwork over any {@link Ops}: contexts of a width
 * `modules` has a pair for → (K(c), V(c)); others untouched. The one definition that tfjs
 * training and generation run and the ONNX export records.
 */
export function hypernetworkContextHook<T>(o: Ops<T>, modules: (width: number) => HypernetworkPair<T> | undefined, run: HypernetworkOpsRun<T>): ContextHook<T> {
  checkStrength(run.strength);
  return (context, info) => {
    // c + MLP(c)·0 = c: skipping the modules keeps strength 0 bit-identical to the base model, and
    // an exported graph free of unused weights.
    if (run.strength === 0) return { k: context, v: context };
    const pair = modules(info.width);
    if (pair === undefined) return { k: context, v: context };
    return { k: applyModule(o, pair[0], context, run), v: applyModule(o, pair[1], context, run) };
  };
}

/** The tfjs `attentionContext` hook of a hypernetwork, with seeded dropout when `run.dropoutSeed` is given (training). */
export function hypernetworkHook(net: HypernetworkTensors, run: HypernetworkRun): ContextHook {
  checkStrength(run.strength);
  const streams = run.dropoutSeed === undefined ? undefined : new DropoutStreams(run.dropoutSeed);
  const dropout = streams === undefined ? {} : { dropout: (h: tf.Tensor, p: number) => tf.mul(h, streams.mask(h.shape, p)) };
  return hypernetworkContextHook(tfOps, (width) => net.modules.get(width), { strength: run.strength, ...dropout });
}

/**
 * A hypernetwork's UNet hooks for any {@link Ops}, as the ONNX export takes them: weights become
 * constants (initializers when recorded), made once per width on first use in each traced
 * forward (so a module reached by several attentions is stored once, and widths the model lacks
 * not at all), with `strength` baked in and no dropout (eval mode).
 */
export function hypernetworkHooks(contents: HypernetworkFileContents, strength: number): <T>(o: Ops<T>) => UnetHooks<T> {
  checkStrength(strength);
  return <T>(o: Ops<T>): UnetHooks<T> => {
    const made = new Map<number, HypernetworkPair<T>>();
    const make = (_key: string, t: FloatTensor): T => o.constant(t.data, t.shape);
    const modules = (width: number): HypernetworkPair<T> | undefined => {
      const dicts = contents.modules.get(width);
      if (dicts === undefined) return undefined;
      let pair = made.get(width);
      if (pair === undefined) {
        pair = [moduleTensors(width, contents.arch, dicts[0], make), moduleTensors(width, contents.arch, dicts[1], make)];
        made.set(width, pair);
      }
      return pair;
    };
    return { attentionContext: hypernetworkContextHook(o, modules, { strength }) };
  };
}

/** A module's parameters from a file's (or a checkpoint's) state dict; `make` decides what they become (tensor, variable, constant). */
export function moduleTensors<T>(width: number, arch: HypernetworkArch, dict: ModuleStateDict, make: (key: string, t: FloatTensor) => T): HypernetworkModule<T> {
  const get = (key: string): T => {
    const t = dict.get(key);
    if (t === undefined) throw new Error(`hypernetwork module ${width}: missing '${key}'`);
    return make(key, t);
  };
  const layers = moduleLayout(width, arch).map((l): HypernetworkLayer<T> => {
    switch (l.kind) {
      case 'linear':
      case 'layer_norm':
        return { kind: l.kind, index: l.index, weight: get(`linear.${l.index}.weight`), bias: get(`linear.${l.index}.bias`) };
      case 'activation':
        return { kind: 'activation', index: l.index, name: l.name };
      case 'dropout':
        return { kind: 'dropout', index: l.index, p: l.p };
    }
  });
  return { width, layers };
}

/** Every tensor of a hypernetwork (to dispose or to save). */
function allTensors(net: HypernetworkTensors): tf.Tensor[] {
  return [...net.modules.values()].flatMap((pair) => pair.flatMap((m) => m.layers.flatMap((l) => ('weight' in l ? [l.weight, l.bias] : []))));
}

/** A module's current values as a state dict. */
async function stateDictOf(m: HypernetworkModuleTensors): Promise<Map<string, FloatTensor>> {
  const out = new Map<string, FloatTensor>();
  for (const l of m.layers) {
    if (l.kind !== 'linear' && l.kind !== 'layer_norm') continue;
    out.set(`linear.${l.index}.weight`, { shape: [...l.weight.shape], data: Float32Array.from(await l.weight.data<'float32'>()) });
    out.set(`linear.${l.index}.bias`, { shape: [...l.bias.shape], data: Float32Array.from(await l.bias.data<'float32'>()) });
  }
  return out;
}

/**
 * A1111's initial weights for one module: Linear weights by `init` with zero biases (torch's
 * xavier_*, and kaiming_* with a = 0, fan_in, gain √2 for both the 'relu' and 'leaky_relu' choice
 * A1111 makes); LayerNorm weights N(0, 0.01) and zero biases whatever `init` is (A1111 puts
 * LayerNorm in its "Normal" branch). Draws in Sequential order from `random`.
 */
export function initialStateDict(width: number, arch: HypernetworkArch, init: HypernetworkWeightInit, random: TrainRandom): Map<string, FloatTensor> {
  const out = new Map<string, FloatTensor>();
  const normal = (n: number, std: number) => random.randn([n]).map((v) => v * std);
  const uniform = (n: number, bound: number) => Float32Array.from({ length: n }, () => (2 * random.uniform() - 1) * bound);
  for (const l of moduleLayout(width, arch)) {
    if (l.kind === 'layer_norm') {
      out.set(`linear.${l.index}.weight`, { shape: [l.features], data: normal(l.features, 0.01) });
      out.set(`linear.${l.index}.bias`, { shape: [l.features], data: new Float32Array(l.features) });
    } else if (l.kind === 'linear') {
      const n = l.inFeatures * l.outFeatures;
      const [fanIn, fanOut] = [l.inFeatures, l.outFeatures];
      const weight =
        init === 'Normal'
          ? normal(n, 0.01)
          : init === 'XavierUniform'
            ? uniform(n, Math.sqrt(6 / (fanIn + fanOut)))
            : init === 'XavierNormal'
              ? normal(n, Math.sqrt(2 / (fanIn + fanOut)))
              : init === 'KaimingUniform'
                ? uniform(n, Math.sqrt(2) * Math.sqrt(3 / fanIn))
                : normal(n, Math.sqrt(2) / Math.sqrt(fanIn));
      out.set(`linear.${l.index}.weight`, { shape: [l.outFeatures, l.inFeatures], data: weight });
      out.set(`linear.${l.index}.bias`, { shape: [l.outFeatures], data: new Float32Array(l.outFeatures) });
    }
  }
  return out;
}

/**
 * The context widths of the model's attentions and their kinds, from a shape-only forward (so
 * every layout the UNet code supports is covered without re-deriving it).
 */
export function attentionWidths(cfg: UnetConfig): Map<number, Set<'self' | 'cross'>> {
  const scope = new ManifestScope<ShapeOnly>((_key, shape) => ({ shape: [...shape] }));
  const side = 2 ** (cfg.blockChannels.length - 1);
  const widths = new Map<number, Set<'self' | 'cross'>>();
  const sample: ShapeOnly = { shape: [1, side, side, cfg.inChannels] };
  unet(shapeOps, scope, sample, { shape: [1] }, { shape: [1, 1, cfg.contextDim[0]!] }, cfg, {
    attentionContext: (context, info) => {
      const kinds = widths.get(info.width) ?? new Set<'self' | 'cross'>();
      kinds.add(info.kind);
      widths.set(info.width, kinds);
      return { k: context, v: context };
    },
  });
  return widths;
}

function describeWidths(widths: ReadonlyMap<number, ReadonlySet<'self' | 'cross'>>): string {
  return [...widths].map(([w, kinds]) => `${w} (${[...kinds].sort().join(', ')})`).join(', ');
}

// =============================================================================================
// The training method

/** State after setup. */
export interface HypernetworkState {
  readonly cfg: HypernetworkConfig;
  readonly model: StableDiffusion;
  readonly name: string;
  readonly net: HypernetworkTensors;
  /** Checkpoint name → variable. */
  readonly variables: Readonly<Record<string, tf.Variable>>;
  readonly schedule: NoiseSchedule;
  readonly prediction: PredictionType;
}

/** A prepared micro-batch (a type alias, so it is a `tf.TensorContainer` the loop can free). */
export type HypernetworkBatch = {
  /** Frozen text states [B, S, D]. */
  readonly context: tf.Tensor;
  /** x_t, NHWC [B, h, w, C]. */
  readonly noisy: tf.Tensor;
  /** float32 [B]. */
  readonly timesteps: tf.Tensor;
  /** ε or v, NHWC. */
  readonly target: tf.Tensor;
  /** Seed of this micro-batch's dropout masks. */
  readonly dropoutSeed: number;
};

/** The .pt name: the configured one, else output_dir's folder name made file-safe. */
export function hypernetworkFileName(cfg: Pick<HypernetworkConfig, 'hypernetwork_name' | 'output_dir'>): string {
  if (cfg.hypernetwork_name !== undefined) return cfg.hypernetwork_name;
  const stem = path.basename(path.resolve(cfg.output_dir)).replace(/[^A-Za-z0-9._-]/g, '-').replace(/^[.-]+/, '');
  return stem === '' ? 'hypernetwork' : stem;
}

/** NCHW-drawn normals as NHWC (a seed gives torch's values in torch's layout). */

/** Options of {@link applyHypernetworkFile}. */
export interface HypernetworkApplyOptions {
  /** A1111's multiplier (`<hypernet:name:s>`); default 1. */
  readonly strength?: number;
}

/**
 * Applies an A1111 hypernetwork file to a model at `strength`: a patch with its attention-context
 * hook. Fails when none of its widths occurs in the model (a hypernetwork for another model).
 */
export async function applyHypernetworkFile(model: StableDiffusion, file: string, options: HypernetworkApplyOptions = {}): Promise<AppliedArtifact> {
  const strength = options.strength ?? 1;
  const contents = await readHypernetworkFor(model.unet.cfg, file);
  const net = hypernetworkFromContents(contents);
  const patch: ModelPatch = { unetHooks: { attentionContext: hypernetworkHook(net, { strength }) } };
  return { patch, triggers: [], dispose: () => tf.dispose(allTensors(net)) };
}

/**
 * Reads an A1111 hypernetwork file for a UNet of config `cfg`; fails when none of its widths
 * occurs in the model (a hypernetwork for another model).
 */
export async function readHypernetworkFor(cfg: UnetConfig, file: string): Promise<HypernetworkFileContents> {
  const contents = await readHypernetworkPt(file);
  const widths = attentionWidths(cfg);
  const sizes = [...contents.modules.keys()];
  if (!sizes.some((w) => widths.has(w))) {
    const madeFor = contents.sdCheckpointName === null ? '' : ` (${contents.sdCheckpointName})`;
    throw new Error(
      `${file}: hypernetwork modules for widths ${sizes.join(', ')}, but this model's attention contexts are ${describeWidths(widths)}: it was made for another model${madeFor}`,
    );
  }
  return contents;
}

/** A loaded file as tensors. */
export function hypernetworkFromContents(contents: HypernetworkFileContents): HypernetworkTensors {
  const modules = new Map<number, readonly [HypernetworkModuleTensors, HypernetworkModuleTensors]>();
  const make = (_key: string, t: FloatTensor) => tf.tensor(t.data, [...t.shape], 'float32');
  for (const [width, [k, v]] of contents.modules) modules.set(width, [moduleTensors(width, contents.arch, k, make), moduleTensors(width, contents.arch, v, make)]);
  return { arch: contents.arch, modules };
}

/** Hypernetwork training as a method. */
export const hypernetwork: TrainingMethod<HypernetworkConfig, HypernetworkState, HypernetworkBatch> = {
  id: 'hypernetwork',
  description: 'Hypernetwork (AUTOMATIC1111): residual MLPs on the attention K/V context, saved as A1111 .pt files.',
  configSchema: hypernetworkConfigSchema,

  async setup(ctx, cfg) {
    const model = await ctx.model();
    const widths = attentionWidths(model.unet.cfg);
    const unused = cfg.enable_sizes.filter((w) => !widths.has(w));
    if (unused.length > 0) {
      const verb = unused.length === 1 ? 'is' : 'are';
      throw new Error(
        `enable_sizes: ${unused.join(', ')} ${verb} not the context width of any attention of this model, whose widths are ${describeWidths(widths)}; set enable_sizes to some of ${[...widths.keys()].join(', ')}`,
      );
    }
    const arch = archOf(cfg);
    const variables: Record<string, tf.Variable> = {};
    const modules = new Map<number, readonly [HypernetworkModuleTensors, HypernetworkModuleTensors]>();
    for (const width of cfg.enable_sizes) {
      const pair = (['k', 'v'] as const).map((which) => {
        const dict = initialStateDict(width, arch, cfg.weight_initialization, ctx.random);
        return moduleTensors(width, arch, dict, (key, t) => {
          const v = tf.variable(tf.tensor(t.data, [...t.shape], 'float32'), true);
          variables[`hypernetwork.${width}.${which}.${key}`] = v;
          return v;
        });
      });
      modules.set(width, [pair[0]!, pair[1]!]);
    }
    const net: HypernetworkTensors = { arch, modules };
    const count = Object.values(variables).reduce((a, v) => a + v.size, 0);
    const prediction = cfg.prediction_type ?? model.scheduler.predictionType;
    const name = hypernetworkFileName(cfg);
    const sizes = cfg.enable_sizes.map((w) => `${w} (${[...widths.get(w)!].sort().join(', ')})`).join(', ');
    const extras = `${arch.layerNorm ? ', layer norm' : ''}${arch.dropoutStructure.some((p) => p > 0) ? `, dropout [${arch.dropoutStructure.join(', ')}]` : ''}`;
    ctx.log(
      `hypernetwork '${name}': widths ${sizes}; layers [${arch.layerStructure.join(', ')}], ${arch.activation}${extras}; ${count} trainable values, ${cfg.weight_initialization} init; ${prediction} target`,
    );
    return { cfg, model, name, net, variables, schedule: noiseSchedule(model.scheduler), prediction };
  },

  trainable: (s) => s.variables,

  // Templates with {} (data.template object/style) name the hypernetwork, as A1111's [name].
  datasetOptions: (s) => ({ placeholderToken: s.name }),

  async prepare(ctx, s, raw) {
    const images = raw.images;
    if (images === undefined) throw new Error('hypernetwork training needs images (a data: section)');
    const { model } = s;
    const vae = model.vae.cfg;
    const latentShape = [images.height / vae.downscale, images.width / vae.downscale, vae.latentChannels] as const;
    const { posteriorEps, noise, timesteps } = drawTrainingNoise(ctx.random, images.count, latentShape, {
      noiseOffset: s.cfg.noise_offset,
      trainTimesteps: s.schedule.trainTimesteps,
    });
    // Drawn after the diffusion draws, so those match textual inversion's stream.
    const dropoutSeed = ctx.random.randint(2 ** 31 - 1, 1)[0]!;
    const posterior = posteriorMoments(model.vae.store.scope(), vae, images, 'hypernetwork');
    const x0 = scaleLatents(tfOps, samplePosterior(tfOps, posterior, posteriorEps), vae);
    const ids = images.captions.map((caption) => model.tokenizer.encode(caption));
    return {
      context: encodeText(model.text.store, model.text.cfg, ids),
      noisy: addNoise(tfOps, s.schedule, x0, noise, timesteps),
      timesteps: tf.tensor1d(timesteps, 'float32'),
      target: trainingTarget(tfOps, s.schedule, s.prediction, x0, noise, timesteps),
      dropoutSeed,
    };
  },

  loss(_ctx, s, b) {
    const { model } = s;
    const hook = hypernetworkHook(s.net, { strength: 1, dropoutSeed: b.dropoutSeed });
    const pred = unet(tfOps, model.unet.store.scope(), b.noisy, b.timesteps, b.context, model.unet.cfg, { attentionContext: hook });
    return tf.mean(tf.square(tf.sub(pred, b.target))) as tf.Scalar;
  },

  async artifacts(s, step) {
    const modules = new Map<number, readonly [ModuleStateDict, ModuleStateDict]>();
    for (const [width, [k, v]] of s.net.modules) modules.set(width, [await stateDictOf(k), await stateDictOf(v)]);
    const provenance = {
      'sd_workbench.method': 'hypernetwork',
      'sd_workbench.step': String(step),
      'sd_workbench.base_model': s.model.name,
      'sd_workbench.base_model_hash': s.model.modelHash,
      'sd_workbench.config': JSON.stringify(shareableConfig(s.cfg)),
    };
    const contents: HypernetworkFileContents = {
      name: s.name,
      step,
      arch: s.net.arch,
      weightInitialization: s.cfg.weight_initialization,
      useDropout: s.cfg.use_dropout,
      sdCheckpoint: s.model.modelHash,
      sdCheckpointName: s.model.name,
      optionalInfo: JSON.stringify(provenance),
      modules,
    };
    const artifact: Artifact = {
      file: `${s.name}.pt`,
      format: `A1111 hypernetwork (widths ${[...modules.keys()].join(', ')}); sdwb generate --hypernetwork ${s.name}.pt[:strength], or A1111's models/hypernetworks`,
      write: (target) => writeHypernetworkPt(target, contents),
    };
    return [artifact];
  },

  generationPatch(s) {
    return { unetHooks: { attentionContext: hypernetworkHook(s.net, { strength: 1 }) } };
  },

  // The optional third argument carries the strength (`--hypernetwork file:s`); see src/pipeline/addons.ts.
  applyArtifact(model: StableDiffusion, file: string, options?: HypernetworkApplyOptions) {
    return applyHypernetworkFile(model, file, options);
  },

  dispose(s) {
    tf.dispose(Object.values(s.variables));
  },
};

// The run config for file metadata, with local paths cut to their last component.
function shareableConfig(cfg: HypernetworkConfig): HypernetworkConfig {
  const base = (p: string) => path.basename(p);
  return { ...cfg, model: base(cfg.model), output_dir: base(cfg.output_dir), data: { ...cfg.data, dir: base(cfg.data.dir) } };
}
