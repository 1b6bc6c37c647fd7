/**
 * The recording Ops implementation op by op: small forwards that use every op of the interface
 * (with lazy layouts: NHWC feature maps through convs, transposes feeding matmuls, reductions,
 * slices and concats on dynamic axes) run through onnxruntime at sizes other than the traced
 * ones and equal tfjs; both layout policies and opsets 14 and 18 (Reduce axes as attribute vs
 * input). Plus the size fitting and its errors.
 */
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import * as ort from 'onnxruntime-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { initBackend } from '../../src/backend.js';
import type { ParamSource } from '../../src/export/params.js';
import type { LayoutPolicy } from '../../src/export/recorder.js';
import { constDim, fitDim, type SymbolSpec } from '../../src/export/symbolic.js';
import { recordGraph, type GraphSpec } from '../../src/export/trace.js';
import { writeOnnxModel } from '../../src/export/write.js';
import { nchwToNhwc, nhwcToNchw } from '../../src/io/layout.js';
import { paramStore } from '../../src/io/weights.js';
import { storeSource } from '../../src/export/params.js';
import { conv2d, groupNorm, layerNorm, linear } from '../../src/ops/nn.js';
import type { Ops } from '../../src/ops/ops.js';
import type { Scope } from '../../src/ops/scope.js';
import { tfOps } from '../../src/ops/tfjs-ops.js';
import { diff } from '../helpers/fixtures.js';

let dir: string;
let params: Map<string, tf.Tensor>;
let source: ParamSource;

function normal(shape: number[], seed: number): tf.Tensor {
  return tf.randomNormal(shape, 0, 1, 'float32', seed);
}

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: () => {} });
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'sdwb-recorder-test-'));
  params = new Map<string, tf.Tensor>([
    ['conv.weight', normal([3, 3, 6, 8], 1)], // HWIO
    ['conv.bias', normal([8], 2)],
    ['down.weight', normal([3, 3, 8, 8], 3)],
    ['norm.weight', normal([8], 4)],
    ['norm.bias', normal([8], 5)],
    ['ln.weight', normal([8], 6)],
    ['ln.bias', normal([8], 7)],
    ['proj.weight', normal([5, 8], 8)],
    ['proj.bias', normal([5], 9)],
    ['table', normal([10, 5], 10)],
  ]);
  source = storeSource(paramStore(params, 'test parameters'));
});

afterAll(async () => {
  for (const t of params.values()) t.dispose();
  await fs.rm(dir, { recursive: true, force: true });
});

/**
 * A forward touching every op: image x NHWC [B,H,W,6], tokens ids int32 [B,4] → three outputs
 * (an NHWC map, token features, per-sample scalars).
 */
function forward<T>(o: Ops<T>, p: Scope<T>, [x, ids]: readonly T[]): readonly T[] {
  const [b, h, w] = o.shape(x!) as [number, number, number, number];
  // Feature maps: conv, GroupNorm's reshapes, SiLU, stride-2 conv with asymmetric padding, upsampling, skip concat.
  let y = conv2d(o, p.sub('conv'), x!, { inCh: 6, outCh: 8, kernel: 3 });
  y = groupNorm(o, p.sub('norm'), y, 8, 2, 1e-5);
  y = o.mul(y, o.sigmoid(y));
  const down = o.conv2d(y, p.sub('down').param('weight', [3, 3, 8, 8]), { stride: 2, pad: [0, 1, 0, 1] }); // [B,H/2,W/2,8]
  const up = o.upsampleNearest2x(o.tanh(down)); // [B,H,W,8]
  let map = o.concat([o.slice(y, [0, 0, 0, 0], [-1, -1, -1, 4]), o.slice(up, [0, 0, 0, 4], [-1, -1, -1, 4])], 3); // [B,H,W,8]
  map = o.concat([o.slice(map, [0, 0, 0, 0], [-1, h / 2, -1, -1]), o.slice(map, [0, h / 2, 0, 0], [-1, -1, -1, -1])], 1); // halves along a dynamic axis
  map = o.clip(o.sub(o.exp(o.neg(o.square(map))), o.sqrt(o.add(o.erf(map), 2))), -0.5, Number.MAX_VALUE);

  // Tokens: NHWC → [B, HW, C] (materialised), LayerNorm, attention-like products with transposes.
  const tokens = layerNorm(o, p.sub('ln'), o.reshape(map, [b, h * w, 8]), 8, 1e-5); // [B,HW,8]
  const heads = o.transpose(o.reshape(tokens, [b, h * w, 2, 4]), [0, 2, 1, 3]); // [B,2,HW,4]
  const scores = o.softmax(o.mul(o.matMul(heads, heads, { transposeB: true }), 0.5)); // [B,2,HW,HW]
  const mixed = o.matMul(scores, heads); // [B,2,HW,4]
  const gram = o.matMul(mixed, mixed, { transposeA: true }); // [B,2,4,4]
  const feats = linear(o, p.sub('proj'), o.reshape(o.transpose(mixed, [0, 2, 1, 3]), [b, h * w, 8]), 8, 5); // [B,HW,5]
  const looked = o.gather(p.param('table', [10, 5]), ids!); // [B,4,5]
  const pooled = o.div(o.sum(feats, [1], false), o.reshape(o.add(o.mean(o.cos(looked), [1, 2], true), 3), [-1, 1])); // [B,5] / [B,1]
  const best = o.cast(o.argMax(o.log(o.add(o.sin(pooled), 2)), 1), 'float32'); // [B]
  const stats = o.concat([o.reshape(best, [-1, 1]), o.reshape(o.sum(gram, [1, 2, 3], false), [-1, 1])], 1); // [B,2]
  return [map, pooled, stats];
}

const symbols: readonly SymbolSpec[] = [
  { name: 'batch', base: 2 },
  { name: 'height', base: 4 },
  { name: 'width', base: 6 },
];

const spec: GraphSpec = {
  name: 'ops',
  symbols,
  inputs: [
    { name: 'x', dtype: 'float32', dims: [{ symbol: 0 }, { symbol: 1 }, { symbol: 2 }, 6], layout: [0, 3, 1, 2] },
    { name: 'ids', dtype: 'int32', dims: [{ symbol: 0 }, 4] },
  ],
  outputs: [{ name: 'map', layout: [0, 3, 1, 2] }, { name: 'pooled' }, { name: 'stats' }],
  forward,
};

async function runBoth(file: string, b: number, h: number, w: number, seed: number): Promise<{ got: Float32Array[]; want: Float32Array[] }> {
  const x = normal([b, h, w, 6], seed);
  const idsData = Int32Array.from({ length: b * 4 }, (_, i) => (i * 7 + seed) % 10);
  const want = tf.tidy(() => forward(tfOps, paramStore(params, 'p').scope(), [x, tf.tensor2d(idsData, [b, 4], 'int32')]).map((t) => t.dataSync() as Float32Array));
  const s = await ort.InferenceSession.create(file);
  try {
    const xs = nhwcToNchw(x.dataSync() as Float32Array, x.shape);
    const out = await s.run({ x: new ort.Tensor('float32', xs.data, xs.shape), ids: new ort.Tensor('int32', idsData, [b, 4]) });
    const map = out.map!;
    return { got: [nchwToNhwc(map.data as Float32Array, [...map.dims]).data, out.pooled!.data as Float32Array, out.stats!.data as Float32Array], want };
  } finally {
    await s.release();
    x.dispose();
  }
}

describe.each([
  ['nchw', 17],
  ['nhwc', 17],
  ['nchw', 14],
  ['nchw', 18],
] as const)('recorded graph, %s layout, opset %i', (layout: LayoutPolicy, opset: number) => {
  it('equals tfjs at the traced sizes and at other batch, height and width', async () => {
    const file = path.join(dir, `ops-${layout}-${opset}.onnx`);
    await writeOnnxModel(recordGraph(spec, source, { opset, layout }), file, { opset });
    for (const [b, h, w, seed] of [
      [2, 4, 6, 1],
      [1, 8, 2, 2],
      [3, 6, 10, 3],
    ] as const) {
      const { got, want } = await runBoth(file, b, h, w, seed);
      got.forEach((g, i) => {
        const d = diff(g, want[i]!);
        expect(d.rel, `output ${i} at ${b}×${h}×${w}: ${JSON.stringify(d)}`).toBeLessThanOrEqual(1e-5);
      });
    }
  });
});

describe('size fitting', () => {
  const syms: readonly SymbolSpec[] = [
    { name: 'batch', base: 2 },
    { name: 'height', base: 16 },
  ];
  it('fits monomials with fractional coefficients and checks them on the tripled trace', () => {
    // traces: base (2, 16), batch doubled (4, 16), height doubled (2, 32), all tripled (6, 48)
    expect(fitDim([64, 128, 128, 576], syms)).toEqual({ num: 2, den: 1, exps: [1, 1] }); // 2·batch·height
    expect(fitDim([4, 4, 8, 12], syms)).toEqual({ num: 1, den: 4, exps: [0, 1] }); // height / 4
    expect(fitDim([-1, -1, -1, -1], syms)).toEqual(constDim(-1, 2));
    expect(fitDim([1e-5, 1e-5, 1e-5, 1e-5], syms)).toEqual(constDim(1e-5, 2));
    expect(() => fitDim([17, 17, 33, 49], syms)).toThrow(/do not scale as a power of height/); // height + 1
    expect(() => fitDim([18, 20, 34, 54], syms)).toThrow(/power of batch/); // batch + height
  });

  it('rejects a size-dependent constant that an output needs, and drops one that none needs', () => {
    const base: GraphSpec = {
      name: 'toy',
      symbols: [{ name: 'batch', base: 2 }],
      inputs: [{ name: 'x', dtype: 'float32', dims: [{ symbol: 0 }, 3] }],
      outputs: [{ name: 'y' }],
      forward: () => [],
    };
    const empty: ParamSource = { description: 'none', keys: () => [], shapeOf: () => undefined, read: () => new Float32Array() };
    const bakes = (used: boolean): GraphSpec => ({
      ...base,
      forward: <T>(o: Ops<T>, _p: Scope<T>, [x]: readonly T[]): readonly T[] => {
        const [b] = o.shape(x!) as [number];
        const offsets = o.constant(Array.from({ length: b }, (_, i) => i), [b, 1]); // arange(batch), baked
        return [used ? o.add(x!, offsets) : o.mul(x!, 2)];
      },
    });
    expect(() => recordGraph(bakes(true), empty, { opset: 17, layout: 'nchw' })).toThrow(/bakes input sizes into float constant \[2, 1\].*cannot be dynamic/);
    const g = recordGraph(bakes(false), empty, { opset: 17, layout: 'nchw' });
    expect([...g.initializers.values()].some((i) => i.sizeDependent !== undefined)).toBe(false);

    const branchy: GraphSpec = {
      ...base,
      forward: <T>(o: Ops<T>, _p: Scope<T>, [x]: readonly T[]): readonly T[] => [o.shape(x!)[0]! > 3 ? o.exp(x!) : o.neg(x!)],
    };
    expect(() => recordGraph(branchy, empty, { opset: 17, layout: 'nchw' })).toThrow(/op #0 is neg at base sizes but exp at batch=4: the op sequence depends on the input size/);

    const offByOne: GraphSpec = {
      ...base,
      forward: <T>(o: Ops<T>, _p: Scope<T>, [x]: readonly T[]): readonly T[] => {
        const [b] = o.shape(x!) as [number];
        return [o.slice(o.concat([x!, x!], 0), [1, 0], [b, 3])];
      },
    };
    // A start and a size of different powers: the end is summed at runtime.
    expect(() => recordGraph(offByOne, empty, { opset: 17, layout: 'nchw' })).not.toThrow();
    const notMonomial: GraphSpec = {
      ...base,
      forward: <T>(o: Ops<T>, _p: Scope<T>, [x]: readonly T[]): readonly T[] => {
        const [b] = o.shape(x!) as [number];
        return [o.slice(o.concat([x!, x!], 0), [0, 0], [b + 1, 3])];
      },
    };
    expect(() => recordGraph(notMonomial, empty, { opset: 17, layout: 'nchw' })).toThrow(/op #1 \(slice\) output dim 0: sizes 3, 5, 7 do not scale as a power of batch/);
    const sizedScalar: GraphSpec = {
      ...base,
      forward: <T>(o: Ops<T>, _p: Scope<T>, [x]: readonly T[]): readonly T[] => [o.div(x!, o.shape(x!)[0]!)],
    };
    expect(() => recordGraph(sizedScalar, empty, { opset: 17, layout: 'nchw' })).toThrow(/op #0 \(div\) takes a number computed from the input size/);
  });

  it('reports parameters the graph never reads', () => {
    const partial: GraphSpec = {
      ...spec,
      forward: <T>(o: Ops<T>, p: Scope<T>, [x]: readonly T[]): readonly T[] => [conv2d(o, p.sub('conv'), x!, { inCh: 6, outCh: 8, kernel: 3 })],
      inputs: [spec.inputs[0]!],
      outputs: [{ name: 'y', layout: [0, 3, 1, 2] }],
    };
    expect(() => recordGraph(partial, source, { opset: 17, layout: 'nchw' })).toThrow(/8 parameter\(s\) not used by the ops graph: down.weight, norm.weight/);
  });
});
