/**
 * The toy concept classifier: a small CNN with one softmax head per attribute (shape, colour,
 * style, background), trained on freshly rendered toy scenes of every concept (held-out ones
 * included: it must recognise what textual inversion and DreamBooth later teach the model).
 *
 * Architecture (NHWC, written over `Ops` like every model here, PyTorch-style names):
 *   x = 2·(u/255) − 1, [B, S, S, 3]
 *   conv_in 3→c₀ (3×3) → SiLU; then for each level: conv 3×3 stride 2 → SiLU, conv 3×3 → SiLU
 *   global mean over H, W → [B, c_last]; heads.<attribute>: Linear c_last → classes
 * Global pooling makes it indifferent to where the shape sits; strided levels give a receptive
 * field larger than the biggest shape at 32 px.
 */
import * as tf from '@tensorflow/tfjs';

import { SafetensorsFile, writeSafetensors, type TensorToWrite } from '../io/safetensors.js';
import { hwioToOihw, isConvFilter, oihwToHwio } from '../io/layout.js';
import { initParameters, torchDefaultInit } from '../models/init.js';
import type { Image8 } from '../models/vae/vae.js';
import { conv2d, linear, silu } from '../ops/nn.js';
import type { Ops } from '../ops/ops.js';
import { ManifestScope, ParamStore, type Scope } from '../ops/scope.js';
import { shapeOps, type ShapeOnly } from '../ops/shape-ops.js';
import { tfOps } from '../ops/tfjs-ops.js';
import { AdamOptimizer } from '../train/optimizer.js';
import { toySamples } from './dataset.js';
import { BACKGROUND_NAMES, COLOUR_NAMES, SHAPES, STYLES, type Scene, type Split } from './world.js';

/** The attribute heads and their labels, in output order. */
export const HEADS = {
  shape: SHAPES,
  colour: COLOUR_NAMES,
  style: STYLES,
  background: BACKGROUND_NAMES,
} as const satisfies Record<string, readonly string[]>;
export type Head = keyof typeof HEADS;
export const HEAD_NAMES = Object.keys(HEADS) as readonly Head[];

/** Classifier size: channels of the stem and of each stride-2 level. */
export interface ClassifierConfig {
  readonly imageSize: number;
  readonly channels: readonly number[];
}

export const DEFAULT_CLASSIFIER: ClassifierConfig = { imageSize: 32, channels: [16, 32, 64, 64] };

/** The logits of every head for images NHWC [B, S, S, 3] in [−1, 1]. */
export function classifierForward<T>(o: Ops<T>, p: Scope<T>, x: T, cfg: ClassifierConfig): Record<Head, T> {
  const ch = cfg.channels;
  let h = silu(o, conv2d(o, p.sub('conv_in'), x, { inCh: 3, outCh: ch[0]!, kernel: 3 }));
  for (let i = 1; i < ch.length; i++) {
    const level = p.sub('levels').sub(String(i - 1));
    h = silu(o, conv2d(o, level.sub('down'), h, { inCh: ch[i - 1]!, outCh: ch[i]!, kernel: 3, stride: 2 })); // halves H, W
    h = silu(o, conv2d(o, level.sub('conv'), h, { inCh: ch[i]!, outCh: ch[i]!, kernel: 3 }));
  }
  const last = ch[ch.length - 1]!;
  const pooled = o.mean(h, [1, 2], false); // [B, last]
  const out = {} as Record<Head, T>;
  for (const head of HEAD_NAMES) out[head] = linear(o, p.sub('heads').sub(head), pooled, last, HEADS[head].length);
  return out;
}

/** Every parameter and its PyTorch-layout shape (conv filters OIHW). */
export function classifierManifest(cfg: ClassifierConfig): Map<string, number[]> {
  const scope = new ManifestScope<ShapeOnly>((_k, shape) => ({ shape: [...shape] }));
  classifierForward(shapeOps, scope, { shape: [1, cfg.imageSize, cfg.imageSize, 3] }, cfg);
  return new Map([...scope.entries].map(([k, s]) => [k, s.length === 4 ? [s[3]!, s[2]!, s[0]!, s[1]!] : [...s]]));
}

/** A classifier's weights as tfjs tensors (internal layout). */
export interface ClassifierWeights {
  readonly cfg: ClassifierConfig;
  readonly params: Map<string, tf.Tensor>;
}

/** Seeded PyTorch-default initial weights. */
export function initClassifier(cfg: ClassifierConfig, seed: number): ClassifierWeights {
  const params = new Map<string, tf.Tensor>();
  for (const [key, p] of initParameters(classifierManifest(cfg), torchDefaultInit, seed)) {
    const internal = isConvFilter(p.shape) ? oihwToHwio(p.data, p.shape) : p;
    params.set(key, tf.tensor(internal.data, internal.shape, 'float32'));
  }
  return { cfg, params };
}

/** Images → float32 NHWC in [−1, 1]. */
export function imagesToInput(images: readonly Image8[]): tf.Tensor4D {
  const first = images[0]!;
  const data = new Float32Array(images.length * first.width * first.height * 3);
  images.forEach((img, n) => {
    const off = n * img.width * img.height * 3;
    for (let i = 0; i < img.data.length; i++) data[off + i] = (2 * img.data[i]!) / 255 - 1;
  });
  return tf.tensor4d(data, [images.length, first.height, first.width, 3]);
}

function scopeOf(params: ReadonlyMap<string, tf.Tensor>): Scope<tf.Tensor> {
  return new ParamStore<tf.Tensor>(params, (t) => t.shape, 'toy classifier').scope();
}

function labelIndex(scene: Scene, head: Head): number {
  const value = scene[head];
  return (HEADS[head] as readonly string[]).indexOf(value);
}

/** Per-head probabilities for a batch of images: head → [B][classes]. */
export function classifyBatch(w: ClassifierWeights, images: readonly Image8[]): Record<Head, number[][]> {
  const probs = tf.tidy(() => {
    const logits = classifierForward(tfOps, scopeOf(w.params), imagesToInput(images), w.cfg);
    return HEAD_NAMES.map((h) => tf.softmax(logits[h]));
  });
  const out = {} as Record<Head, number[][]>;
  HEAD_NAMES.forEach((h, i) => {
    out[h] = probs[i]!.arraySync() as number[][];
  });
  tf.dispose(probs);
  return out;
}

/** Accuracy per head on scenes `from`…`from+count−1` of a split. */
export function evaluateClassifier(w: ClassifierWeights, o: { seed: number; split: Split; count: number; from?: number }): Record<Head, number> {
  const correct = Object.fromEntries(HEAD_NAMES.map((h) => [h, 0])) as Record<Head, number>;
  const chunk = 128;
  for (let at = 0; at < o.count; at += chunk) {
    const samples = toySamples({ seed: o.seed, split: o.split, size: w.cfg.imageSize, from: (o.from ?? 0) + at, count: Math.min(chunk, o.count - at) });
    const probs = classifyBatch(w, samples.map((s) => s.image));
    samples.forEach((s, i) => {
      for (const h of HEAD_NAMES) {
        const row = probs[h][i]!;
        if (row.indexOf(Math.max(...row)) === labelIndex(s.scene, h)) correct[h]++;
      }
    });
  }
  return Object.fromEntries(HEAD_NAMES.map((h) => [h, correct[h] / o.count])) as Record<Head, number>;
}

/** How {@link trainClassifier} trains. */
export interface ClassifierTrainOptions {
  readonly seed: number;
  readonly steps: number;
  readonly batchSize: number;
  readonly learningRate: number;
  /** Debug: train on the first batch at every step (the loss of a model that can fit must fall). */
  readonly fixedBatch?: boolean;
  /** Called after each step with the step (1-based) and the summed cross-entropy. */
  readonly onStep?: (step: number, loss: number) => void;
}

/**
 * Trains a fresh classifier with AdamW on an endless stream of new scenes of every concept (split
 * `all`, seed `seed`): each step renders the next `batchSize` scenes, so it never sees one twice.
 */
export function trainClassifier(cfg: ClassifierConfig, o: ClassifierTrainOptions): ClassifierWeights {
  const w = initClassifier(cfg, o.seed);
  const vars = new Map([...w.params].map(([k, t]) => [k, tf.variable(t, true, `toy_classifier.${k}.${o.seed}.${Math.random().toString(36).slice(2)}`)]));
  tf.dispose([...w.params.values()]);
  const optimizer = new AdamOptimizer([...vars.values()], { kind: 'adamw', lr: o.learningRate, betas: [0.9, 0.999], eps: 1e-8, weightDecay: 1e-4 });
  try {
    for (let step = 0; step < o.steps; step++) {
      const samples = toySamples({ seed: o.seed, split: 'all', size: cfg.imageSize, from: o.fixedBatch === true ? 0 : step * o.batchSize, count: o.batchSize });
      const x = imagesToInput(samples.map((s) => s.image));
      const labels = HEAD_NAMES.map((h) => tf.oneHot(tf.tensor1d(samples.map((s) => labelIndex(s.scene, h)), 'int32'), HEADS[h].length));
      const { value, grads } = tf.variableGrads(() => {
        const logits = classifierForward(tfOps, scopeOf(vars), x, cfg);
        const terms = HEAD_NAMES.map((h, i) => tf.losses.softmaxCrossEntropy(labels[i]!, logits[h]));
        return tf.addN(terms) as tf.Scalar;
      });
      const loss = value.dataSync()[0]!;
      optimizer.step(grads);
      tf.dispose([value, x, ...labels, ...Object.values(grads)]);
      o.onStep?.(step + 1, loss);
    }
  } finally {
    optimizer.dispose();
  }
  const params = new Map<string, tf.Tensor>();
  for (const [k, v] of vars) {
    params.set(k, tf.clone(v));
    v.dispose();
  }
  return { cfg, params };
}

// Metadata keys of a saved classifier.
const META = { format: 'sd_workbench.toy_classifier', config: 'sd_workbench.config', heads: 'sd_workbench.heads' } as const;

/** Saves weights as safetensors (PyTorch layout) with the config, heads and `extra` in the metadata. */
export async function saveClassifier(file: string, w: ClassifierWeights, extra: Readonly<Record<string, string>> = {}): Promise<void> {
  const tensors: Record<string, TensorToWrite> = {};
  for (const [k, t] of w.params) {
    const data = Float32Array.from(t.dataSync() as Float32Array);
    const stored = t.shape.length === 4 ? hwioToOihw(data, t.shape) : { data, shape: [...t.shape] };
    tensors[k] = { dtype: 'F32', shape: stored.shape, data: stored.data };
  }
  await writeSafetensors(file, tensors, { ...extra, [META.format]: '1', [META.config]: JSON.stringify(w.cfg), [META.heads]: JSON.stringify(HEADS) });
}

/** Loads a classifier saved by {@link saveClassifier}, checking its heads against this world's. */
export async function loadClassifier(file: string): Promise<ClassifierWeights & { readonly metadata: Readonly<Record<string, string>> }> {
  const f = await SafetensorsFile.open(file);
  try {
    const metadata = f.metadata;
    if (metadata[META.format] !== '1') throw new Error(`${file}: not a toy classifier (no ${META.format} metadata)`);
    if (metadata[META.heads] !== JSON.stringify(HEADS)) throw new Error(`${file}: its heads ${metadata[META.heads]} differ from this toy world's ${JSON.stringify(HEADS)}`);
    const cfg = JSON.parse(metadata[META.config] ?? 'null') as ClassifierConfig;
    const manifest = classifierManifest(cfg);
    const params = new Map<string, tf.Tensor>();
    for (const [key, shape] of manifest) {
      if (!f.keys().includes(key)) throw new Error(`${file}: missing '${key}'`);
      const data = await f.readFloat32(key);
      const internal = isConvFilter(shape) ? oihwToHwio(data, shape) : { data, shape };
      params.set(key, tf.tensor(internal.data, internal.shape, 'float32'));
    }
    return { cfg, params, metadata };
  } finally {
    await f.close();
  }
}
