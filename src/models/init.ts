/**
 * Seeded from-scratch initialisation of a component from its manifest (names → PyTorch-layout
 * shapes, from `unetManifest` / `vaeManifest` / `clipTextManifest`), with the initial
 * distributions the reference libraries give a freshly constructed model:
 *
 * - diffusers' UNet2DConditionModel and AutoencoderKL add no init of their own, so PyTorch's
 *   module defaults apply: nn.Linear / nn.Conv2d weights kaiming_uniform(a = √5), which is
 *   U(−1/√fan_in, 1/√fan_in), and biases U(−1/√fan_in, 1/√fan_in) with fan_in = in · kh · kw;
 *   nn.GroupNorm / nn.LayerNorm weight 1, bias 0.
 * - transformers' CLIPTextModel (`CLIPPreTrainedModel._init_weights`, factor f = initializer_factor,
 *   range = initializer_range): token and position embeddings N(0, range·f); attention q/k/v
 *   N(0, d^-½ (2L)^-½ f), out_proj N(0, d^-½ f); MLP fc1 N(0, (2d)^-½ f), fc2 N(0, d^-½ (2L)^-½ f);
 *   every Linear bias 0; LayerNorm 1 / 0 (d = hidden size, L = layers).
 *
 * Each parameter draws from its own generator keyed by (seed, hash of its name), so a value does
 * not depend on which other parameters exist or their order, and a run is reproducible.
 */
import { SeededRandom } from '../data/rng.js';
import { TorchGenerator } from '../schedulers/rng.js';
import type { ClipTextConfig } from './clip/config.js';

/** How one parameter starts. */
export type InitRule =
  | { readonly kind: 'uniform'; readonly bound: number }
  | { readonly kind: 'normal'; readonly std: number }
  | { readonly kind: 'constant'; readonly value: number };

/** Picks the rule of a parameter from its key, its shape and the whole manifest (for biases' fan-in). */
export type InitRuleFn = (key: string, shape: readonly number[], manifest: ReadonlyMap<string, readonly number[]>) => InitRule;

// Seed stream of parameter initialisation.
const INIT_STREAM = 401;

/** fan_in of a PyTorch Linear [out, in] or Conv2d [out, in, kh, kw] weight. */
export function fanIn(shape: readonly number[]): number {
  return shape.slice(1).reduce((a, b) => a * b, 1);
}

/** PyTorch's default init of nn.Linear / nn.Conv2d / norm layers, by key and shape. */
export const torchDefaultInit: InitRuleFn = (key, shape, manifest) => {
  const name = key.slice(key.lastIndexOf('.') + 1);
  if (shape.length === 1) {
    const weightShape = manifest.get(`${key.slice(0, key.lastIndexOf('.'))}.weight`);
    // A 1-D weight, or the bias beside one, belongs to a norm layer (Linear/Conv weights are ≥ 2-D).
    if (name === 'weight') return { kind: 'constant', value: 1 };
    if (weightShape === undefined || weightShape.length === 1) return { kind: 'constant', value: 0 };
    return { kind: 'uniform', bound: 1 / Math.sqrt(fanIn(weightShape)) };
  }
  // kaiming_uniform(a = √5): gain √(2/(1+5)) times √(3/fan_in) = 1/√fan_in.
  return { kind: 'uniform', bound: 1 / Math.sqrt(fanIn(shape)) };
};

/** transformers' CLIPTextModel init for a config (`initializerRange` 0.02, `factor` 1 as its defaults). */
export function clipTextInit(cfg: Pick<ClipTextConfig, 'width' | 'numLayers'>, initializerRange = 0.02, factor = 1): InitRuleFn {
  const d = cfg.width;
  const inProjStd = d ** -0.5 * (2 * cfg.numLayers) ** -0.5 * factor;
  const outProjStd = d ** -0.5 * factor;
  const fcStd = (2 * d) ** -0.5 * factor;
  return (key, shape) => {
    if (shape.length === 1) return { kind: 'constant', value: key.endsWith('.weight') && /layer_norm|final_layer_norm/.test(key) ? 1 : 0 };
    if (/embeddings\.(token|position)_embedding\.weight$/.test(key)) return { kind: 'normal', std: initializerRange * factor };
    if (/self_attn\.(q|k|v)_proj\.weight$/.test(key)) return { kind: 'normal', std: inProjStd };
    if (/self_attn\.out_proj\.weight$/.test(key)) return { kind: 'normal', std: outProjStd };
    if (/mlp\.fc1\.weight$/.test(key)) return { kind: 'normal', std: fcStd };
    if (/mlp\.fc2\.weight$/.test(key)) return { kind: 'normal', std: inProjStd };
    throw new Error(`clip text init: no rule for '${key}' [${shape.join(', ')}]`);
  };
}

// FNV-1a over the key's UTF-16 code units: a stable 32-bit name hash for the generator key.
function nameHash(key: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < key.length; i++) {
    h ^= key.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h;
}

/** The values of one parameter under `rule`, drawn from the generator keyed by (seed, key). */
export function initValues(key: string, shape: readonly number[], rule: InitRule, seed: number): Float32Array {
  const n = shape.reduce((a, b) => a * b, 1);
  const random = new SeededRandom(seed, INIT_STREAM, nameHash(key));
  switch (rule.kind) {
    case 'constant':
      return new Float32Array(n).fill(rule.value);
    case 'uniform': {
      const out = new Float32Array(n);
      for (let i = 0; i < n; i++) out[i] = (2 * random.nextFloat() - 1) * rule.bound;
      return out;
    }
    case 'normal': {
      // TorchGenerator draws at least 16 values; draw that many and keep the first n.
      const values = new TorchGenerator(random.nextUint32()).randn([Math.max(16, n)]);
      const out = values.length === n ? values : values.slice(0, n);
      for (let i = 0; i < n; i++) out[i] = out[i]! * rule.std;
      return out;
    }
  }
}

/** Every parameter of a manifest, initialised by `rule` (PyTorch layout, float32). */
export function initParameters(manifest: ReadonlyMap<string, readonly number[]>, rule: InitRuleFn, seed: number): Map<string, { shape: number[]; data: Float32Array }> {
  const out = new Map<string, { shape: number[]; data: Float32Array }>();
  for (const [key, shape] of manifest) out.set(key, { shape: [...shape], data: initValues(key, shape, rule(key, shape, manifest), seed) });
  return out;
}
