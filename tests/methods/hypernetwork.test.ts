/**
 * Hypernetworks: the module layout and file keys against A1111's Sequential construction, the
 * activations against torch's definitions, the initialisations, strength 0 = the base UNet bit for
 * bit, save → load = the same outputs, and an A1111-layout file built by hand (the value tree
 * torch.save would pickle) loading to a hand-computed MLP.
 */
import { mkdtemp } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { initBackend } from '../../src/backend.js';
import { PickleOrderedDict, PickleTuple, readTorchCheckpoint, TorchTensorRef, type PickleValue } from '../../src/io/torch-pickle.js';
import { pyFloat, writeTorchCheckpoint, type TorchSaveKey, type TorchSaveValue } from '../../src/io/torch-save.js';
import { moduleLayout, moduleParams, parseDropoutStructure, readHypernetworkPt, type HypernetworkArch } from '../../src/methods/hypernetwork-file.js';
import {
  applyActivation,
  applyHypernetworkFile,
  attentionWidths,
  hypernetwork,
  hypernetworkConfigSchema,
  hypernetworkHook,
  initialStateDict,
  moduleTensors,
  type HypernetworkState,
  type HypernetworkTensors,
} from '../../src/methods/hypernetwork.js';
import { getMethod, trainingConfigSchema } from '../../src/methods/registry.js';
import type { SetupCtx } from '../../src/methods/types.js';
import { unet, type UnetHooks } from '../../src/models/unet/unet.js';
import { tfOps } from '../../src/ops/tfjs-ops.js';
import { disposeStableDiffusion, loadStableDiffusion, type StableDiffusion } from '../../src/pipeline/load.js';
import { loadTrainingConfig, parseTrainingConfig } from '../../src/train/config.js';
import { setupRandom } from '../../src/train/rng-state.js';
import { TINY_SD } from '../helpers/fixtures.js';

const ROOT = path.resolve(import.meta.dirname, '../..');

function hnConfig(extra: Record<string, unknown> = {}) {
  return hypernetworkConfigSchema.parse({
    method: 'hypernetwork',
    model: TINY_SD,
    output_dir: '/tmp/unused/my-hn',
    data: { dir: '/tmp/unused' },
    enable_sizes: [32, 64],
    ...extra,
  });
}

function setupCtx(model: StableDiffusion, seed = 0): SetupCtx {
  return { model: async () => model, random: setupRandom(seed), log: () => {} };
}

/** mulberry32: test values independent of the code under test. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function values(n: number, seed: number, scale = 1, offset = 0): Float32Array {
  const r = prng(seed);
  return Float32Array.from({ length: n }, () => offset + (2 * r() - 1) * scale);
}

let model: StableDiffusion;
beforeAll(async () => {
  await initBackend({ backend: 'wasm', log: () => {} });
  model = await loadStableDiffusion(TINY_SD);
});
afterAll(() => disposeStableDiffusion(model));

/** One UNet forward on fixed inputs (8×8 latents, 5 context tokens). */
function unetOutput(hooks: UnetHooks<tf.Tensor> = {}): Float32Array {
  return tf.tidy(() => {
    const sample = tf.tensor4d(values(8 * 8 * 4, 1), [1, 8, 8, 4]);
    const context = tf.tensor3d(values(5 * 32, 2), [1, 5, 32]);
    const out = unet(tfOps, model.unet.store.scope(), sample, tf.tensor1d([500]), context, model.unet.cfg, hooks);
    return out.dataSync() as Float32Array;
  });
}

describe('module layout (A1111 HypernetworkModule Sequential indices)', () => {
  const arch = (o: Partial<HypernetworkArch>): HypernetworkArch => ({
    layerStructure: [1, 2, 1],
    activation: 'linear',
    activateOutput: false,
    layerNorm: false,
    dropoutStructure: [0, 0, 0],
    ...o,
  });
  const keys = (width: number, a: HypernetworkArch) => moduleParams(width, a).map((p) => `${p.key} [${p.shape.join(',')}]`);

  it('linear [1, 2, 1]: two Linears at 0 and 1, weights [out, in]', () => {
    expect(keys(320, arch({}))).toEqual(['linear.0.weight [640,320]', 'linear.0.bias [640]', 'linear.1.weight [320,640]', 'linear.1.bias [320]']);
  });

  it('an activation takes an index after every Linear but the last (unless activate_output)', () => {
    expect(moduleLayout(8, arch({ activation: 'relu' })).map((l) => `${l.index}:${l.kind}`)).toEqual(['0:linear', '1:activation', '2:linear']);
    expect(moduleLayout(8, arch({ activation: 'relu', activateOutput: true })).map((l) => `${l.index}:${l.kind}`)).toEqual([
      '0:linear',
      '1:activation',
      '2:linear',
      '3:activation',
    ]);
  });

  it('layer norm after each Linear (and its activation), dropout from dropout_structure[i + 1]', () => {
    const a = arch({ activation: 'leakyrelu', layerNorm: true, dropoutStructure: [0, 0.3, 0] });
    expect(moduleLayout(8, a).map((l) => `${l.index}:${l.kind}`)).toEqual(['0:linear', '1:activation', '2:layer_norm', '3:dropout', '4:linear', '5:layer_norm']);
    expect(keys(8, a)).toEqual([
      'linear.0.weight [16,8]',
      'linear.0.bias [16]',
      'linear.2.weight [16]',
      'linear.2.bias [16]',
      'linear.4.weight [8,16]',
      'linear.4.bias [8]',
      'linear.5.weight [8]',
      'linear.5.bias [8]',
    ]);
  });

  it("widths are int(width × multiplier); A1111's parse_dropout_structure", () => {
    expect(keys(10, arch({ layerStructure: [1, 1.5, 0.25, 1], dropoutStructure: [0, 0, 0, 0] }))).toEqual([
      'linear.0.weight [15,10]',
      'linear.0.bias [15]',
      'linear.1.weight [2,15]',
      'linear.1.bias [2]',
      'linear.2.weight [10,2]',
      'linear.2.bias [10]',
    ]);
    expect(parseDropoutStructure([1, 2, 1], false, true)).toEqual([0, 0, 0]);
    expect(parseDropoutStructure([1, 2, 1], true, true)).toEqual([0, 0.3, 0]);
    expect(parseDropoutStructure([1, 2, 1], true, false)).toEqual([0, 0, 0]);
    expect(parseDropoutStructure([1, 2, 4, 2, 1], true, false)).toEqual([0, 0.3, 0.3, 0, 0]);
  });
});

describe('activations (torch definitions of the A1111 names)', () => {
  const xs = [-25, -4, -3, -1.5, -0.5, -1e-3, 0, 1e-3, 0.5, 1.5, 3, 4, 25];
  const sigmoid = (x: number) => 1 / (1 + Math.exp(-x));
  const softplus = (x: number) => (x > 20 ? x : Math.log1p(Math.exp(x)));
  const erf = (x: number) => {
    // Abramowitz–Stegun 7.1.26 is too coarse; integrate the series instead (|x| ≤ 25/√2 fine in double).
    if (Math.abs(x) > 5) return Math.sign(x);
    let sum = 0;
    let term = x;
    for (let n = 0; n < 200; n++) {
      sum += term / (2 * n + 1);
      term *= (-x * x) / (n + 1);
    }
    return (2 / Math.sqrt(Math.PI)) * sum;
  };
  const SELU_ALPHA = 1.6732632423543772;
  const SELU_SCALE = 1.0507009873554805;
  const expected: Record<string, (x: number) => number> = {
    linear: (x) => x,
    relu: (x) => Math.max(0, x),
    leakyrelu: (x) => (x >= 0 ? x : 0.01 * x),
    elu: (x) => (x > 0 ? x : Math.expm1(x)),
    swish: (x) => (x * Math.min(Math.max(x + 3, 0), 6)) / 6,
    hardswish: (x) => (x * Math.min(Math.max(x + 3, 0), 6)) / 6,
    tanh: Math.tanh,
    sigmoid,
    gelu: (x) => 0.5 * x * (1 + erf(x / Math.SQRT2)),
    mish: (x) => x * Math.tanh(softplus(x)),
    silu: (x) => x * sigmoid(x),
    relu6: (x) => Math.min(Math.max(x, 0), 6),
    selu: (x) => SELU_SCALE * (x > 0 ? x : SELU_ALPHA * Math.expm1(x)),
    celu: (x) => Math.max(0, x) + Math.min(0, Math.expm1(x)),
    softplus,
    softsign: (x) => x / (1 + Math.abs(x)),
    tanhshrink: (x) => x - Math.tanh(x),
    hardtanh: (x) => Math.min(Math.max(x, -1), 1),
    hardsigmoid: (x) => Math.min(Math.max(x / 6 + 0.5, 0), 1),
    logsigmoid: (x) => -softplus(-x),
  };

  it.each(Object.keys(expected))('%s: values as torch defines it, and a gradient on this backend', (name) => {
    const f = expected[name]!;
    const act = name as Parameters<typeof applyActivation>[0];
    const got = tf.tidy(() => applyActivation(act, tf.tensor1d(xs)).dataSync());
    for (const [i, x] of xs.entries()) expect(got[i]!, `${name}(${x})`).toBeCloseTo(f(x), 5);
    const grad = tf.tidy(() => tf.grad((x: tf.Tensor) => tf.sum(applyActivation(act, x)))(tf.tensor1d([-0.7, 0.4, 2])).dataSync());
    // Central differences of the reference definition.
    [-0.7, 0.4, 2].forEach((x, i) => expect(grad[i]!, `${name}'(${x})`).toBeCloseTo((f(x + 1e-4) - f(x - 1e-4)) / 2e-4, 3));
  });

  it("takes torch's gradient at the kink x = 0 (exact zeros occur: zero biases, zero inputs)", () => {
    // torch: relu/relu6 backward 0 at 0, leaky_relu the slope, elu/selu the x ≤ 0 branch.
    const atZero: Partial<Record<string, number>> = {
      relu: 0,
      relu6: 0,
      leakyrelu: 0.01,
      elu: 1,
      celu: 1,
      selu: SELU_SCALE * SELU_ALPHA,
      softplus: 0.5,
      logsigmoid: 0.5,
      mish: Math.tanh(Math.LN2),
      softsign: 1,
    };
    for (const [name, expectedGrad] of Object.entries(atZero)) {
      const act = name as Parameters<typeof applyActivation>[0];
      const grad = tf.tidy(() => tf.grad((x: tf.Tensor) => tf.sum(applyActivation(act, x)))(tf.tensor1d([0])).dataSync());
      expect(grad[0]!, `${name}'(0)`).toBeCloseTo(expectedGrad!, 5);
    }
  });
});

describe('initial weights (A1111 HypernetworkModule.__init__)', () => {
  const std = (a: Float32Array) => Math.sqrt(a.reduce((s, v) => s + v * v, 0) / a.length);
  const arch: HypernetworkArch = { layerStructure: [1, 2, 1], activation: 'relu', activateOutput: false, layerNorm: true, dropoutStructure: [0, 0, 0] };

  it('Normal: N(0, 0.01) weights, zero biases; LayerNorm weights N(0, 0.01) whatever the init', () => {
    for (const init of ['Normal', 'XavierUniform'] as const) {
      const d = initialStateDict(64, arch, init, setupRandom(3));
      expect([...d.keys()]).toEqual(['linear.0.weight', 'linear.0.bias', 'linear.2.weight', 'linear.2.bias', 'linear.3.weight', 'linear.3.bias', 'linear.4.weight', 'linear.4.bias']);
      expect(std(d.get('linear.2.weight')!.data)).toBeCloseTo(0.01, 2);
      for (const b of ['linear.0.bias', 'linear.2.bias', 'linear.3.bias', 'linear.4.bias']) expect(d.get(b)!.data.every((v) => v === 0)).toBe(true);
    }
    const normal = initialStateDict(64, arch, 'Normal', setupRandom(3));
    expect(Math.abs(std(normal.get('linear.0.weight')!.data) / 0.01 - 1)).toBeLessThan(0.05);
  });

  it('Xavier and Kaiming: torch bounds and standard deviations for fan_in 64, fan_out 128', () => {
    const w = (init: 'XavierUniform' | 'XavierNormal' | 'KaimingUniform' | 'KaimingNormal') => initialStateDict(64, arch, init, setupRandom(4)).get('linear.0.weight')!.data;
    const maxAbs = (a: Float32Array) => a.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
    const xavierBound = Math.sqrt(6 / (64 + 128));
    expect(maxAbs(w('XavierUniform'))).toBeLessThanOrEqual(xavierBound);
    expect(maxAbs(w('XavierUniform'))).toBeGreaterThan(0.99 * xavierBound);
    expect(Math.abs(std(w('XavierNormal')) / Math.sqrt(2 / (64 + 128)) - 1)).toBeLessThan(0.05);
    const kaimingBound = Math.sqrt(6 / 64); // gain √2 · √(3 / fan_in)
    expect(maxAbs(w('KaimingUniform'))).toBeLessThanOrEqual(kaimingBound);
    expect(maxAbs(w('KaimingUniform'))).toBeGreaterThan(0.99 * kaimingBound);
    expect(Math.abs(std(w('KaimingNormal')) / Math.sqrt(2 / 64) - 1)).toBeLessThan(0.05);
  });
});

describe('the attention hook on the tiny UNet', () => {
  it("finds the model's attention context widths: 32 (cross and self) and 64 (self)", () => {
    const widths = attentionWidths(model.unet.cfg);
    expect([...widths].map(([w, k]) => [w, [...k].sort()])).toEqual([
      [32, ['cross', 'self']],
      [64, ['self']],
    ]);
  });

  it('strength 0 reproduces the base UNet bit for bit; strength 1 changes it', async () => {
    const s = (await hypernetwork.setup(setupCtx(model), hnConfig({ weight_initialization: 'XavierNormal', activation_func: 'relu' }))) as HypernetworkState;
    const dir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-hn-'));
    try {
      const [artifact] = await hypernetwork.artifacts(s, 7);
      const file = path.join(dir, artifact!.file);
      await artifact!.write(file);
      const base = unetOutput();
      for (const strength of [0, 1]) {
        const applied = await applyHypernetworkFile(model, file, { strength });
        try {
          const out = unetOutput(applied.patch.unetHooks);
          if (strength === 0) expect(Array.from(out)).toEqual(Array.from(base));
          else {
            const maxDiff = out.reduce((m, v, i) => Math.max(m, Math.abs(v - base[i]!)), 0);
            expect(maxDiff).toBeGreaterThan(1e-3);
          }
        } finally {
          applied.dispose();
        }
      }
    } finally {
      hypernetwork.dispose(s);
    }
  });

  it('save → load gives the same UNet output as the in-training patch, and the same settings', async () => {
    const cfg = hnConfig({ weight_initialization: 'KaimingUniform', activation_func: 'mish', is_layer_norm: true, use_dropout: true, layer_structure: [1, 1.5, 1] });
    const s = (await hypernetwork.setup(setupCtx(model, 5), cfg)) as HypernetworkState;
    const dir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-hn-'));
    try {
      const [artifact] = await hypernetwork.artifacts(s, 12);
      expect(artifact!.file).toBe('my-hn.pt');
      const file = path.join(dir, artifact!.file);
      await artifact!.write(file);
      const inTraining = unetOutput(hypernetwork.generationPatch(s).unetHooks);
      const applied = await hypernetwork.applyArtifact(model, file);
      try {
        expect(Array.from(unetOutput(applied.patch.unetHooks))).toEqual(Array.from(inTraining));
      } finally {
        applied.dispose();
      }
      const read = await readHypernetworkPt(file);
      expect(read).toMatchObject({
        name: 'my-hn',
        step: 12,
        weightInitialization: 'KaimingUniform',
        useDropout: true,
        sdCheckpoint: model.modelHash,
        sdCheckpointName: model.name,
        arch: { layerStructure: [1, 1.5, 1], activation: 'mish', activateOutput: false, layerNorm: true, dropoutStructure: [0, 0.3, 0] },
      });
      expect([...read.modules.keys()]).toEqual([32, 64]);
    } finally {
      hypernetwork.dispose(s);
    }
  });

  it('dropout: only with a seed (training), reproducible per seed, zeroes about p of the units and scales the rest by 1/(1 − p)', () => {
    // Hidden units all 1 (zero weights, bias 1), then Dropout(0.3), then a Linear that copies
    // hidden unit o to output o: K(x) − x is the dropout mask itself.
    const width = 32;
    const arch: HypernetworkArch = { layerStructure: [1, 2, 1], activation: 'linear', activateOutput: false, layerNorm: false, dropoutStructure: [0, 0.3, 0] };
    const copy = new Float32Array(width * 2 * width);
    for (let o = 0; o < width; o++) copy[o * 2 * width + o] = 1;
    const dict = new Map([
      ['linear.0.weight', { shape: [2 * width, width], data: new Float32Array(2 * width * width) }],
      ['linear.0.bias', { shape: [2 * width], data: new Float32Array(2 * width).fill(1) }],
      ['linear.2.weight', { shape: [width, 2 * width], data: copy }],
      ['linear.2.bias', { shape: [width], data: new Float32Array(width) }],
    ]);
    const make = (_key: string, t: { shape: readonly number[]; data: Float32Array }) => tf.tensor(t.data, [...t.shape]);
    const net: HypernetworkTensors = { arch, modules: new Map([[width, [moduleTensors(width, arch, dict, make), moduleTensors(width, arch, dict, make)] as const]]) };
    const x = tf.zeros([2, 100, width]);
    const run = (seed?: number) =>
      tf.tidy(() => {
        const kv = hypernetworkHook(net, seed === undefined ? { strength: 1 } : { strength: 1, dropoutSeed: seed })(x, { path: 't', width, kind: 'cross' });
        return [Array.from(kv.k.dataSync()), Array.from(kv.v.dataSync())] as const;
      });
    expect(run()[0].every((v) => v === 1)).toBe(true); // no seed: no dropout (generation)
    const [k1, v1] = run(1);
    expect(run(1)[0]).toEqual(k1);
    expect(run(2)[0]).not.toEqual(k1);
    expect(v1).not.toEqual(k1); // K and V draw their own masks
    const zeros = k1.filter((v) => v === 0).length / k1.length;
    expect(k1.every((v) => v === 0 || Math.abs(v - 1 / 0.7) < 1e-6)).toBe(true);
    expect(zeros).toBeGreaterThan(0.27);
    expect(zeros).toBeLessThan(0.33);
    x.dispose();
    tf.dispose([...net.modules.values()].flatMap((pair) => pair.flatMap((m) => m.layers.flatMap((l) => ('weight' in l ? [l.weight, l.bias] : [])))));
  });
});

// =============================================================================================
// A1111-layout files built by hand

/** A torch state dict as `Module.state_dict()` returns it: an OrderedDict with `_metadata`. */
function stateDict(entries: readonly [string, TorchSaveValue][], modules: readonly string[]): PickleOrderedDict {
  const od = new PickleOrderedDict();
  for (const [k, v] of entries) od.set(k, v as unknown as PickleValue);
  const meta = new PickleOrderedDict();
  for (const m of ['', 'linear', ...modules]) meta.set(m, new Map<PickleValue, PickleValue>([['version', 1]]));
  od.attributes = new Map<PickleValue, PickleValue>([['_metadata', meta]]);
  return od;
}

const tensor = (shape: number[], data: Float32Array): TorchSaveValue => ({ dtype: 'float32', shape, data });

interface HandModule {
  w0: Float32Array; // [64, 32]
  b0: Float32Array; // [64]
  ln2w: Float32Array;
  ln2b: Float32Array;
  w4: Float32Array; // [32, 64]
  b4: Float32Array;
  ln5w: Float32Array;
  ln5b: Float32Array;
}

function handModule(seed: number): HandModule {
  return {
    w0: values(64 * 32, seed, 0.3),
    b0: values(64, seed + 1, 0.1),
    ln2w: values(64, seed + 2, 0.2, 1),
    ln2b: values(64, seed + 3, 0.1),
    w4: values(32 * 64, seed + 4, 0.3),
    b4: values(32, seed + 5, 0.1),
    ln5w: values(32, seed + 6, 0.2, 1),
    ln5b: values(32, seed + 7, 0.1),
  };
}

/** x + strength · LN5(W4 · LN2(leakyrelu(W0 x + b0)) + b4), in float64, per token. */
function handMlp(m: HandModule, x: readonly number[], strength: number): number[] {
  const linear = (w: Float32Array, b: Float32Array, v: readonly number[], out: number) =>
    Array.from({ length: out }, (_, o) => v.reduce((s, vi, i) => s + w[o * v.length + i]! * vi, b[o]!));
  const ln = (v: number[], w: Float32Array, b: Float32Array) => {
    const mean = v.reduce((s, a) => s + a, 0) / v.length;
    const variance = v.reduce((s, a) => s + (a - mean) ** 2, 0) / v.length;
    return v.map((a, i) => ((a - mean) / Math.sqrt(variance + 1e-5)) * w[i]! + b[i]!);
  };
  let h = linear(m.w0, m.b0, x, 64).map((v) => (v >= 0 ? v : 0.01 * v));
  h = ln(h, m.ln2w, m.ln2b);
  h = ln(linear(m.w4, m.b4, h, 32), m.ln5w, m.ln5b);
  return x.map((v, i) => v + strength * h[i]!);
}

function handEntries(m: HandModule): [string, TorchSaveValue][] {
  return [
    ['linear.0.weight', tensor([64, 32], m.w0)],
    ['linear.0.bias', tensor([64], m.b0)],
    ['linear.2.weight', tensor([64], m.ln2w)],
    ['linear.2.bias', tensor([64], m.ln2b)],
    ['linear.4.weight', tensor([32, 64], m.w4)],
    ['linear.4.bias', tensor([32], m.b4)],
    ['linear.5.weight', tensor([32], m.ln5w)],
    ['linear.5.bias', tensor([32], m.ln5b)],
  ];
}

/** The dict Hypernetwork.save builds for one 32-wide pair: leakyrelu, layer norm, dropout [0, 0.3, 0]. */
function a1111Tree(k: HandModule, v: HandModule): Map<TorchSaveKey, TorchSaveValue> {
  const modules = ['linear.0', 'linear.1', 'linear.2', 'linear.3', 'linear.4', 'linear.5'];
  return new Map<TorchSaveKey, TorchSaveValue>([
    [32, new PickleTuple([stateDict(handEntries(k), modules), stateDict(handEntries(v), modules)])],
    ['step', 1234],
    ['name', 'hand-made'],
    ['layer_structure', [pyFloat(1), pyFloat(2), pyFloat(1)]],
    ['activation_func', 'leakyrelu'],
    ['is_layer_norm', true],
    ['weight_initialization', 'XavierNormal'],
    ['sd_checkpoint', '0123456789'],
    ['sd_checkpoint_name', 'some-model'],
    ['activate_output', false],
    ['use_dropout', true],
    ['dropout_structure', [pyFloat(0), pyFloat(0.3), pyFloat(0)]],
    ['last_layer_dropout', true],
    ['optional_info', null],
  ]);
}

describe('A1111-layout files', () => {
  it('a hand-built file loads and computes the hand-computed MLP (K and V, strength 1 and 0.5)', async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-hn-a1111-'));
    const file = path.join(dir, 'hand-made.pt');
    const k = handModule(100);
    const v = handModule(200);
    await writeTorchCheckpoint(file, a1111Tree(k, v));
    const read = await readHypernetworkPt(file);
    expect(read).toMatchObject({
      name: 'hand-made',
      step: 1234,
      weightInitialization: 'XavierNormal',
      useDropout: true,
      sdCheckpoint: '0123456789',
      sdCheckpointName: 'some-model',
      arch: { layerStructure: [1, 2, 1], activation: 'leakyrelu', activateOutput: false, layerNorm: true, dropoutStructure: [0, 0.3, 0] },
    });
    const tokens = [Array.from(values(32, 7, 1.5)), Array.from(values(32, 8, 0.5, 0.2)), Array.from(values(32, 9, 3))];
    for (const strength of [1, 0.5]) {
      const applied = await applyHypernetworkFile(model, file, { strength });
      try {
        const hook = applied.patch.unetHooks!.attentionContext!;
        const x = tf.tensor3d(tokens.flat(), [1, 3, 32]);
        const kv = hook(x, { path: 'test', width: 32, kind: 'cross' });
        const [gotK, gotV] = [kv.k.dataSync(), kv.v.dataSync()];
        const x64 = tf.ones([1, 2, 64]);
        const other = hook(x64, { path: 'test', width: 64, kind: 'self' });
        const untouched = [other.k === x64, other.v === x64];
        tf.dispose([x, kv.k, kv.v, x64]);
        expect(untouched).toEqual([true, true]); // no 64 module: that context passes unchanged
        const wantK = tokens.flatMap((t) => handMlp(k, t, strength));
        const wantV = tokens.flatMap((t) => handMlp(v, t, strength));
        const maxErr = (got: ArrayLike<number>, want: number[]) => want.reduce((m, w, i) => Math.max(m, Math.abs(got[i]! - w)), 0);
        expect(maxErr(gotK, wantK)).toBeLessThan(2e-5);
        expect(maxErr(gotV, wantV)).toBeLessThan(2e-5);
        expect(maxErr(gotK, wantV)).toBeGreaterThan(1e-2);
      } finally {
        applied.dispose();
      }
    }
  });

  it('our files have the same tree: int keys first, (OrderedDict, OrderedDict) with _metadata, settings in save order', async () => {
    const s = (await hypernetwork.setup(setupCtx(model), hnConfig({ activation_func: 'relu', is_layer_norm: true }))) as HypernetworkState;
    const dir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-hn-'));
    try {
      const [artifact] = await hypernetwork.artifacts(s, 3);
      const file = path.join(dir, 'x.pt');
      await artifact!.write(file);
      const ckpt = await readTorchCheckpoint(file);
      try {
        const root = ckpt.root as Map<PickleValue, PickleValue>;
        expect([...root.keys()]).toEqual([
          32,
          64,
          'step',
          'name',
          'layer_structure',
          'activation_func',
          'is_layer_norm',
          'weight_initialization',
          'sd_checkpoint',
          'sd_checkpoint_name',
          'activate_output',
          'use_dropout',
          'dropout_structure',
          'last_layer_dropout',
          'optional_info',
        ]);
        const pair = root.get(64) as PickleTuple;
        expect(pair).toBeInstanceOf(PickleTuple);
        const k = pair.items[0] as PickleOrderedDict;
        expect(k).toBeInstanceOf(PickleOrderedDict);
        expect([...k.keys()]).toEqual(['linear.0.weight', 'linear.0.bias', 'linear.2.weight', 'linear.2.bias', 'linear.3.weight', 'linear.3.bias', 'linear.4.weight', 'linear.4.bias']);
        const w = k.get('linear.3.weight') as TorchTensorRef;
        expect([w.dtype, [...w.shape], w.requiresGrad, w.isParameter]).toEqual(['F32', [64, 128], false, false]);
        const meta = (k.attributes as Map<PickleValue, PickleValue>).get('_metadata') as Map<PickleValue, PickleValue>;
        expect([...meta.keys()]).toEqual(['', 'linear', 'linear.0', 'linear.1', 'linear.2', 'linear.3', 'linear.4']);
        expect(root.get('layer_structure')).toEqual([1, 2, 1]);
        expect([root.get('step'), root.get('name'), root.get('activation_func'), root.get('is_layer_norm'), root.get('last_layer_dropout')]).toEqual([3, 'my-hn', 'relu', true, false]);
        expect(JSON.parse(root.get('optional_info') as string)).toMatchObject({ 'sd_workbench.method': 'hypernetwork', 'sd_workbench.base_model_hash': model.modelHash });
      } finally {
        await ckpt.close();
      }
    } finally {
      hypernetwork.dispose(s);
    }
  });

  it('the first A1111 layout (linear1/linear2, no settings) loads as two Linears without activation', async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-hn-old-'));
    const file = path.join(dir, 'old.pt');
    const w1 = values(64 * 32, 1, 0.2);
    const w2 = values(32 * 64, 2, 0.2);
    const zeros = (n: number) => new Float32Array(n);
    const sd = () => new Map<TorchSaveKey, TorchSaveValue>([
      ['linear1.weight', tensor([64, 32], w1)],
      ['linear1.bias', tensor([64], zeros(64))],
      ['linear2.weight', tensor([32, 64], w2)],
      ['linear2.bias', tensor([32], zeros(32))],
    ]);
    await writeTorchCheckpoint(file, new Map<TorchSaveKey, TorchSaveValue>([[32, new PickleTuple([sd(), sd()] as unknown as PickleValue[])]]));
    const read = await readHypernetworkPt(file);
    expect(read.name).toBe('old');
    expect(read.arch).toEqual({ layerStructure: [1, 2, 1], activation: 'linear', activateOutput: true, layerNorm: false, dropoutStructure: [0, 0, 0] });
    expect([...read.modules.get(32)![0].keys()]).toEqual(['linear.0.weight', 'linear.0.bias', 'linear.1.weight', 'linear.1.bias']);
    const applied = await hypernetwork.applyArtifact(model, file);
    try {
      const x = Array.from(values(32, 3));
      const got = tf.tidy(() => applied.patch.unetHooks!.attentionContext!(tf.tensor3d(x, [1, 1, 32]), { path: 't', width: 32, kind: 'cross' }).k.dataSync());
      const h = Array.from({ length: 64 }, (_, o) => x.reduce((s, xi, i) => s + w1[o * 32 + i]! * xi, 0));
      const want = x.map((xi, o) => xi + h.reduce((s, hi, i) => s + w2[o * 64 + i]! * hi, 0));
      want.forEach((w, i) => expect(got[i]!).toBeCloseTo(w, 4));
    } finally {
      applied.dispose();
    }
  });

  it('errors name the file, the module and the key; a file for other widths is refused', async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-hn-bad-'));
    const k = handModule(1);
    const tree = a1111Tree(k, k);
    tree.set('is_layer_norm', false);
    const wrong = path.join(dir, 'wrong.pt');
    await writeTorchCheckpoint(wrong, tree);
    await expect(readHypernetworkPt(wrong)).rejects.toThrow(
      /wrong\.pt: module 32 \(k\) does not match its settings \(layer_structure \[1, 2, 1\], activation leakyrelu, layer norm false, dropout \[0, 0\.3, 0\]\): .*'linear\.0\.weight'|wrong\.pt: module 32 \(k\) does not match its settings .*missing 'linear\.3\.weight'/,
    );
    const sd768 = await mkdtemp(path.join(os.tmpdir(), 'sdwb-hn-768-'));
    const big = path.join(sd768, 'sd15.pt');
    const entries = (w: number) => new Map<TorchSaveKey, TorchSaveValue>([
      ['linear.0.weight', tensor([2 * w, w], new Float32Array(2 * w * w))],
      ['linear.0.bias', tensor([2 * w], new Float32Array(2 * w))],
      ['linear.1.weight', tensor([w, 2 * w], new Float32Array(2 * w * w))],
      ['linear.1.bias', tensor([w], new Float32Array(w))],
    ]);
    await writeTorchCheckpoint(big, new Map<TorchSaveKey, TorchSaveValue>([[768, new PickleTuple([entries(768), entries(768)] as unknown as PickleValue[])], ['sd_checkpoint_name', 'v1-5-pruned']]));
    await expect(hypernetwork.applyArtifact(model, big)).rejects.toThrow(
      /sd15\.pt: hypernetwork modules for widths 768, but this model's attention contexts are 32 \(cross, self\), 64 \(self\): it was made for another model \(v1-5-pruned\)/,
    );
  });
});

describe('config', () => {
  it('configs/hypernetwork.yaml parses through the registry with A1111 defaults and lr 5e-6', async () => {
    const { config } = await loadTrainingConfig(path.join(ROOT, 'configs/hypernetwork.yaml'), [], trainingConfigSchema());
    expect(getMethod(config.method)).toBe(hypernetwork);
    expect(config).toMatchObject({ method: 'hypernetwork', learning_rate: 5e-6, layer_structure: [1, 2, 1], activation_func: 'linear', enable_sizes: [768, 320, 640, 1280] });
    const defaults = hnConfig({ enable_sizes: undefined });
    expect(defaults).toMatchObject({ enable_sizes: [768, 320, 640, 1280], weight_initialization: 'Normal', is_layer_norm: false, use_dropout: false, activate_output: false, learning_rate: 5e-6 });
    expect(hypernetworkConfigSchema.shape.learning_rate.description).toMatch(/1e-5 .*collapsing to noise/);
  });

  it('rejects bad structures one line each', () => {
    const parse = (extra: Record<string, unknown>) => () =>
      parseTrainingConfig({ method: 'hypernetwork', model: 'm', output_dir: 'o', data: { dir: 'd' }, ...extra }, trainingConfigSchema(), 'hn.yaml');
    expect(parse({ layer_structure: [2, 1] })).toThrow(/layer_structure: must start and end with 1/);
    expect(parse({ use_dropout: true, dropout_structure: [0, 0.3] })).toThrow(/dropout_structure: expected 3 entries/);
    expect(parse({ dropout_structure: [0, 0.3, 0] })).toThrow(/dropout_structure: has non-zero entries but use_dropout is false/);
    expect(parse({ activation_func: 'prelu' })).toThrow(/activation_func: expected one of "linear", "relu"/);
    expect(parse({ enable_sizes: [32, 32] })).toThrow(/enable_sizes: 32 is listed twice/);
  });

  it('setup refuses sizes that are no attention width of the model, listing the widths', async () => {
    await expect(hypernetwork.setup(setupCtx(model), hnConfig({ enable_sizes: [768, 32] }))).rejects.toThrow(
      /enable_sizes: 768 is not the context width of any attention of this model, whose widths are 32 \(cross, self\), 64 \(self\); set enable_sizes to some of 32, 64/,
    );
  });
});
