/**
 * Hypernetworks through the ONNX export. The hook tfjs trains and generates with
 * (`hypernetworkContextHook` in src/methods/hypernetwork.ts) is recorded by the Ops recorder: every
 * A1111 activation's MLP through onnxruntime equals tfjs at sizes other than the traced ones, and
 * the tiny UNet with a hypernetwork file baked in equals the tfjs UNet with the same file and
 * strength; strength 0 is the base export bit for bit; each module's weights are stored once;
 * the provenance names the file.
 */
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import * as ort from 'onnxruntime-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { initBackend } from '../../src/backend.js';
import { exportModel, type ExportReport, type HypernetworkRecord } from '../../src/export/export-model.js';
import type { ParamSource } from '../../src/export/params.js';
import { recordGraph, type GraphSpec } from '../../src/export/trace.js';
import { writeOnnxModel } from '../../src/export/write.js';
import { nchwToNhwc } from '../../src/io/layout.js';
import { HYPERNETWORK_ACTIVATIONS, type HypernetworkArch, type HypernetworkFileContents } from '../../src/methods/hypernetwork-file.js';
import { applyHypernetworkFile, hypernetworkFromContents, hypernetworkHook, hypernetworkHooks, readHypernetworkFor } from '../../src/methods/hypernetwork.js';
import { unet } from '../../src/models/unet/unet.js';
import type { Ops } from '../../src/ops/ops.js';
import type { Scope } from '../../src/ops/scope.js';
import { tfOps } from '../../src/ops/tfjs-ops.js';
import { disposeStableDiffusion, loadStableDiffusion, type StableDiffusion } from '../../src/pipeline/load.js';
import { diff, get, readRef, TINY_SD, toNhwc } from '../helpers/fixtures.js';
import { testHypernetwork, writeTestHypernetwork } from '../helpers/hypernetwork.js';

const TOL = 1e-4;
const STRENGTH = 0.7;
// Every layer kind: activation (also on the output), LayerNorm, and a Dropout that must vanish.
const ARCH: HypernetworkArch = { layerStructure: [1, 2, 1], activation: 'mish', activateOutput: true, layerNorm: true, dropoutStructure: [0, 0.3, 0] };
const NO_PARAMS: ParamSource = { description: 'none', keys: () => [], shapeOf: () => undefined, read: () => new Float32Array() };

let model: StableDiffusion;
let root: string;
let file: string;
let contents: HypernetworkFileContents;
let plain: ExportReport;
let hooked: ExportReport;
let zero: ExportReport;
let record: HypernetworkRecord;
const measured = new Map<string, number>();

function expectClose(actual: ArrayLike<number>, expected: ArrayLike<number>, what: string, tol = TOL): void {
  const d = diff(actual, expected);
  measured.set(what, Math.max(measured.get(what) ?? 0, d.rel));
  expect(d.rel, `${what}: max-abs ${d.maxAbs} vs scale ${d.scale}`).toBeLessThanOrEqual(tol);
}

beforeAll(async () => {
  await initBackend({ backend: 'wasm', log: () => {} });
  model = await loadStableDiffusion(TINY_SD);
  root = await fs.mkdtemp(path.join(os.tmpdir(), 'sdwb-hn-export-test-'));
  file = path.join(root, 'tiny-hn.pt');
  await writeTestHypernetwork(file, [32, 64], ARCH, 1);
  // Read back as the CLI does: the file, not the in-memory contents, is what is exported.
  contents = await readHypernetworkFor(model.unet.cfg, file);
  record = { name: 'tiny-hn', source: 'tiny-hn.pt', sha256: 'f'.repeat(64), strength: STRENGTH, widths: [32, 64] };
  plain = await exportModel(model, path.join(root, 'plain'));
  hooked = await exportModel(model, path.join(root, 'hooked'), { unetHooks: hypernetworkHooks(contents, STRENGTH), hypernetworks: [record] });
  zero = await exportModel(model, path.join(root, 'zero'), { unetHooks: hypernetworkHooks(contents, 0), hypernetworks: [{ ...record, strength: 0 }] });
});

afterAll(async () => {
  if (model !== undefined) disposeStableDiffusion(model);
  if (root !== undefined) await fs.rm(root, { recursive: true, force: true });
  console.log(`[hypernetwork onnx vs tfjs, rel error] ${[...measured].map(([k, v]) => `${k} ${v.toExponential(2)}`).join(', ')}`);
});

describe('the hypernetwork MLP recorded over Ops', () => {
  it.each(HYPERNETWORK_ACTIVATIONS)('%s: K and V through onnxruntime equal tfjs (batch and tokens other than traced, inputs up to ±100)', async (activation) => {
    const width = 16;
    const arch: HypernetworkArch = { layerStructure: [1, 1.5, 1], activation, activateOutput: true, layerNorm: false, dropoutStructure: [0, 0.2, 0] };
    const hn = testHypernetwork('act', [width], arch, 7);
    const info = { path: 'test.attn2', width, kind: 'cross' as const };
    const spec: GraphSpec = {
      name: `hypernetwork_${activation}`,
      symbols: [
        { name: 'batch', base: 2 },
        { name: 'tokens', base: 3 },
      ],
      inputs: [{ name: 'context', dtype: 'float32', dims: [{ symbol: 0 }, { symbol: 1 }, width] }],
      outputs: [{ name: 'k' }, { name: 'v' }],
      forward: <T>(o: Ops<T>, _p: Scope<T>, [context]: readonly T[]): readonly T[] => {
        const kv = hypernetworkHooks(hn, 0.8)(o).attentionContext!(context!, info);
        return [kv.k, kv.v];
      },
    };
    const onnxFile = path.join(root, `${activation}.onnx`);
    await writeOnnxModel(recordGraph(spec, NO_PARAMS, { opset: 17, layout: 'nchw' }), onnxFile, { opset: 17 });
    // Wide inputs reach the regions where exp overflows float32 (|x| > 88) after the first Linear.
    const values = Float32Array.from({ length: 3 * 5 * width }, (_, i) => 100 * Math.sin(i * 1.7) * Math.abs(Math.cos(i * 0.31)));
    const session = await ort.InferenceSession.create(onnxFile, { intraOpNumThreads: 1 });
    try {
      const out = await session.run({ context: new ort.Tensor('float32', values, [3, 5, width]) });
      const net = hypernetworkFromContents(hn);
      const [k, v] = tf.tidy(() => {
        const kv = hypernetworkHook(net, { strength: 0.8 })(tf.tensor3d(values, [3, 5, width]), info);
        return [kv.k.dataSync() as Float32Array, kv.v.dataSync() as Float32Array] as const;
      });
      tf.dispose([...net.modules.values()].flatMap((pair) => pair.flatMap((m) => m.layers.flatMap((l) => ('weight' in l ? [l.weight, l.bias] : [])))));
      expect(out.k!.dims).toEqual([3, 5, width]);
      expect(k.every(Number.isFinite)).toBe(true);
      expectClose(out.k!.data as Float32Array, k, 'MLP k');
      expectClose(out.v!.data as Float32Array, v, 'MLP v');
    } finally {
      await session.release();
    }
  });
});

describe('sdwb export with a hypernetwork file', () => {
  async function unetOut(dir: string): Promise<Float32Array> {
    const ref = await readRef('unet.safetensors');
    const sample = get(ref, 'sample');
    const states = get(ref, 'encoder_hidden_states');
    const session = await ort.InferenceSession.create(path.join(dir, 'unet', 'model.onnx'), { intraOpNumThreads: 1 });
    try {
      const out = await session.run({
        sample: new ort.Tensor('float32', sample.data, sample.shape),
        timestep: new ort.Tensor('float32', Float32Array.from(get(ref, 'timesteps').data), [2]),
        encoder_hidden_states: new ort.Tensor('float32', states.data, states.shape),
      });
      return nchwToNhwc(out.out_sample!.data as Float32Array, [...out.out_sample!.dims]).data;
    } finally {
      await session.release();
    }
  }

  it('the UNet equals the tfjs UNet with the same file at the same strength (what sdwb generate --hypernetwork applies), and differs from the base', async () => {
    const ref = await readRef('unet.safetensors');
    const x = toNhwc(get(ref, 'sample'));
    const states = get(ref, 'encoder_hidden_states');
    const t = Float32Array.from(get(ref, 'timesteps').data);
    const applied = await applyHypernetworkFile(model, file, { strength: STRENGTH });
    let expected: Float32Array;
    try {
      expected = tf.tidy(() => {
        const sample = tf.tensor4d(x.data, x.shape as [number, number, number, number]);
        const context = tf.tensor3d(states.data, states.shape as [number, number, number]);
        return unet(tfOps, model.unet.store.scope(), sample, tf.tensor1d(t), context, model.unet.cfg, applied.patch.unetHooks).dataSync() as Float32Array;
      });
    } finally {
      applied.dispose();
    }
    const got = await unetOut(hooked.outDir);
    expectClose(got, expected, 'unet with hypernetwork vs tfjs');
    expect(diff(got, await unetOut(plain.outDir)).maxAbs).toBeGreaterThan(1e-2);
  });

  it('stores each module once (the 32-wide pair serves self- and cross-attention) and nothing else of size', () => {
    const unetOf = (r: ExportReport) => r.components.find((c) => c.component === 'unet')!;
    let hnBytes = 0;
    for (const [k, v] of contents.modules.values()) for (const t of [...k.values(), ...v.values()]) hnBytes += t.data.byteLength;
    const extra = unetOf(hooked).payloadBytes - unetOf(plain).payloadBytes;
    expect(extra).toBeGreaterThanOrEqual(hnBytes);
    expect(extra).toBeLessThan(hnBytes + 1024); // a few scalar constants (eps, strength)
  });

  it('strength 0 is the base export: the same UNet graph size and bit-identical outputs', async () => {
    const unetOf = (r: ExportReport) => r.components.find((c) => c.component === 'unet')!;
    expect(unetOf(zero).nodes).toBe(unetOf(plain).nodes);
    expect(unetOf(zero).payloadBytes).toBe(unetOf(plain).payloadBytes);
    expect(Array.from(await unetOut(zero.outDir))).toEqual(Array.from(await unetOut(plain.outDir)));
  });

  it('records the hypernetwork in model_index.json and hashes it into the model hash', async () => {
    const index = JSON.parse(await fs.readFile(path.join(hooked.outDir, 'model_index.json'), 'utf8')) as { _sdwb_export: { unet_hooks: boolean; hypernetworks: unknown; model_hash: string } };
    expect(index._sdwb_export.unet_hooks).toBe(true);
    expect(index._sdwb_export.hypernetworks).toEqual([record]);
    expect(index._sdwb_export.model_hash).toBe(hooked.modelHash);
    expect(new Set([plain.modelHash, hooked.modelHash, zero.modelHash]).size).toBe(3);
    const base = JSON.parse(await fs.readFile(path.join(plain.outDir, 'model_index.json'), 'utf8')) as { _sdwb_export: Record<string, unknown> };
    expect(base._sdwb_export.hypernetworks).toBeUndefined();
    await expect(exportModel(model, path.join(root, 'x'), { hypernetworks: [record] })).rejects.toThrow(/no unetHooks record them/);
  });
});
