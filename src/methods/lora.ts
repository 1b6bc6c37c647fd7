/**
 * LoRA (Hu et al. 2021, "Low-Rank Adaptation of Large Language Models"): a frozen weight W
 * [out, in] is used as W' = W + m·(α/r)·B·A, with A ("down", lora_A) [r, in] and B ("up", lora_B)
 * [out, r] trained, r the rank, α the alpha and m the user's multiplier (1 while training).
 *
 * How it reaches the model: as parameter overrides. The model code reads weights through a
 * {@link Scope}; {@link loraScope} wraps the component's scope so that `<module>.weight` of an
 * adapted module resolves to W + m·(α/r)·B·A, computed from A and B at the moment the forward
 * reads it. Inside `loss` that is differentiable in A and B; for generation the same merged
 * weights are handed to the store as a {@link ModelPatch}'s `params`. Why not a hook in `linear`:
 * the UNet and text encoder stay exactly one definition each with no LoRA code in them, the
 * same patch mechanism serves fine-tunes and edits, and a merged weight costs one [out, in]
 * matmul per module per forward (r ≪ in, out), small next to the activations. The price is that
 * the merged weight exists in memory for the duration of the forward (the diffusers/kohya
 * "unmerged" form computes B·(A·x) instead, cheaper only when tokens ≪ features).
 *
 * A 1×1 convolution (SD 1.x `proj_in`/`proj_out`, which kohya adapts) is a Linear over channels,
 * so it takes the same LoRA with its delta laid out HWIO [1, 1, in, out]. Larger kernels (LoCon)
 * are refused.
 *
 * Initialisation (what step 0 computes = the base model): B = 0; A either "gaussian", N(0, 1/r²)
 * (peft's `init_lora_weights="gaussian"`, which diffusers' train_dreambooth_lora.py uses) or
 * "kaiming_uniform", U(−1/√in, 1/√in) (torch's kaiming_uniform_(a=√5) on [r, in], peft's and
 * kohya's default).
 */
import * as tf from '@tensorflow/tfjs';

import type { ParamStore, Scope } from '../ops/scope.js';
import type { TrainRandom } from '../train/rng-state.js';
import type { ParamOverride } from './types.js';

/** The model component a LoRA module lives in (the store of `model.unet` or `model.text`). */
export type LoraComponent = 'unet' | 'text';

/** What a LoRA adapts: a Linear (weight [out, in]) or a 1×1 convolution (weight HWIO [1, 1, in, out]). */
export type LoraModuleKind = 'linear' | 'conv1x1';

/** A module a LoRA can adapt, found in a component's parameters. */
export interface LoraTarget {
  readonly component: LoraComponent;
  /** The module's path relative to the component, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`. */
  readonly module: string;
  readonly kind: LoraModuleKind;
  readonly inFeatures: number;
  readonly outFeatures: number;
}

/** A LoRA on one module: A (down) [rank, in] and B (up) [out, rank], scaled by alpha / rank. */
export interface LoraAdapter<T> extends LoraTarget {
  readonly rank: number;
  readonly alpha: number;
  /** A, lora_A, lora_down: [rank, inFeatures]. */
  readonly down: T;
  /** B, lora_B, lora_up: [outFeatures, rank]. */
  readonly up: T;
}

/** Initialisations of A. */
export const LORA_INITS = ['gaussian', 'kaiming_uniform'] as const;
export type LoraInit = (typeof LORA_INITS)[number];

/** diffusers' train_dreambooth_lora.py targets in the UNet: the attention projections. */
export const DEFAULT_UNET_TARGETS: readonly string[] = ['to_q', 'to_k', 'to_v', 'to_out.0'];

/** diffusers' text-encoder targets: CLIP's attention projections. */
export const DEFAULT_TEXT_TARGETS: readonly string[] = ['q_proj', 'k_proj', 'v_proj', 'out_proj'];

/** Whether `module` is selected by target name `target`, peft's rule: equal, or ending in `.target`. */
export function matchesTarget(module: string, target: string): boolean {
  return module === target || module.endsWith(`.${target}`);
}

/** The kind and features of a module from its weight's internal shape, or an error naming it. */
export function moduleKindOf(where: string, module: string, shape: readonly number[]): { kind: LoraModuleKind; inFeatures: number; outFeatures: number } {
  if (shape.length === 2) return { kind: 'linear', outFeatures: shape[0]!, inFeatures: shape[1]! };
  if (shape.length === 4 && shape[0] === 1 && shape[1] === 1) return { kind: 'conv1x1', inFeatures: shape[2]!, outFeatures: shape[3]! };
  if (shape.length === 4) {
    throw new Error(`${where}: '${module}' is a ${shape[0]}×${shape[1]} convolution: conv LoRA (LoCon) is not supported yet; target Linear or 1×1 modules`);
  }
  throw new Error(`${where}: '${module}' has a weight of shape [${shape.join(', ')}], not a Linear or convolution`);
}

/**
 * The modules of `store` whose names match any of `targets` (peft's suffix rule), in parameter
 * order. Throws when nothing matches, listing the targets.
 */
export function findTargets(store: ParamStore<tf.Tensor>, component: LoraComponent, targets: readonly string[]): LoraTarget[] {
  const out: LoraTarget[] = [];
  for (const key of store.keys()) {
    if (!key.endsWith('.weight')) continue;
    const module = key.slice(0, -'.weight'.length);
    if (!targets.some((t) => matchesTarget(module, t))) continue;
    const shape = store.get(key)!.shape;
    out.push({ component, module, ...moduleKindOf(store.source, module, shape) });
  }
  if (out.length === 0) {
    throw new Error(`${store.source}: no ${component} module matches the LoRA targets ${targets.map((t) => `'${t}'`).join(', ')}`);
  }
  return out;
}

/** Initial A [rank, in] for `init` (B starts at zero so the adapted model equals the base). */
export function initialDown(random: TrainRandom, rank: number, inFeatures: number, init: LoraInit): Float32Array {
  const n = rank * inFeatures;
  if (init === 'gaussian') {
    const z = random.randn([rank, inFeatures]);
    return z.map((v) => Math.fround(v / rank));
  }
  // kaiming_uniform_(a=√5): gain √(2/(1+a²)) = √(1/3), bound gain·√(3/fan_in) = 1/√fan_in.
  const bound = 1 / Math.sqrt(inFeatures);
  return Float32Array.from({ length: n }, () => Math.fround((2 * random.uniform() - 1) * bound));
}

/** Trainable adapters (A initialised by `init`, B zero) for `targets`, drawn in order from `random`. */
export function createAdapters(
  targets: readonly LoraTarget[],
  o: { readonly rank: number; readonly alpha: number; readonly init: LoraInit },
  random: TrainRandom,
): LoraAdapter<tf.Variable>[] {
  return targets.map((t) => ({
    ...t,
    rank: o.rank,
    alpha: o.alpha,
    down: tf.variable(tf.tensor2d(initialDown(random, o.rank, t.inFeatures, o.init), [o.rank, t.inFeatures]), true),
    up: tf.variable(tf.zeros([t.outFeatures, o.rank]), true),
  }));
}

/** m·(α/r)·B·A as the module's weight delta, in the module's internal layout. */
export function loraDelta(adapter: LoraAdapter<tf.Tensor>, multiplier = 1): tf.Tensor {
  const scale = (multiplier * adapter.alpha) / adapter.rank;
  const delta = tf.mul(tf.matMul(adapter.up, adapter.down), scale); // [out,in]
  if (adapter.kind === 'linear') return delta;
  return tf.reshape(tf.transpose(delta), [1, 1, adapter.inFeatures, adapter.outFeatures]); // HWIO
}

/** W + m·(α/r)·B·A. */
export function mergedWeight(weight: tf.Tensor, adapter: LoraAdapter<tf.Tensor>, multiplier = 1): tf.Tensor {
  return tf.add(weight, loraDelta(adapter, multiplier));
}

/**
 * A view of `base` in which keys `resolve` answers for read the returned tensor instead. The base
 * parameter is still read first, so the store records the access and checks the shape.
 */
export function patchedScope(base: Scope<tf.Tensor>, resolve: (key: string, baseValue: tf.Tensor) => tf.Tensor | undefined, prefix = ''): Scope<tf.Tensor> {
  const full = (key: string) => (prefix === '' ? key : `${prefix}.${key}`);
  return {
    sub: (p) => patchedScope(base.sub(p), resolve, full(p)),
    param: (key, shape) => {
      const value = base.param(key, shape);
      return resolve(full(key), value) ?? value;
    },
  };
}

/** `base` with every adapted module's weight read as W + m·(α/r)·B·A (differentiable in A and B). */
export function loraScope(base: Scope<tf.Tensor>, adapters: ReadonlyMap<string, LoraAdapter<tf.Tensor>>, multiplier = 1): Scope<tf.Tensor> {
  return patchedScope(base, (key, w) => {
    if (!key.endsWith('.weight')) return undefined;
    const adapter = adapters.get(key.slice(0, -'.weight'.length));
    return adapter === undefined ? undefined : mergedWeight(w, adapter, multiplier);
  });
}

/** Adapters by module path, for {@link loraScope}. */
export function byModule<T>(adapters: readonly LoraAdapter<T>[]): Map<string, LoraAdapter<T>> {
  return new Map(adapters.map((a) => [a.module, a]));
}

/**
 * The merged weights of `adapters` as parameter overrides (new tensors the caller disposes),
 * reading the base weights from `stores`.
 */
export function mergedOverrides(
  stores: Readonly<Record<LoraComponent, ParamStore<tf.Tensor>>>,
  adapters: readonly LoraAdapter<tf.Tensor>[],
  multiplier: number,
): ParamOverride[] {
  return adapters.map((a) => {
    const key = `${a.module}.weight`;
    const weight = stores[a.component].get(key);
    if (weight === undefined) throw new Error(`${stores[a.component].source}: the LoRA adapts '${a.module}', which this model does not have`);
    return { component: a.component, key, value: tf.tidy(() => mergedWeight(weight, a, multiplier)) };
  });
}
