/**
 * One step of the standard diffusers fine-tuning loss through text encoder and UNet, against
 * PyTorch autograd: loss, prediction, and the gradients of UNet and text-encoder parameters,
 * including the token-embedding rows (textual-inversion style).
 */
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { initBackend } from '../../../src/backend.js';
import { hwioToOihw } from '../../../src/io/layout.js';
import { loadSafetensorsParams, paramStore } from '../../../src/io/weights.js';
import { clipTextEncoder } from '../../../src/models/clip/text-encoder.js';
import { loadTextEncoder, type LoadedTextEncoder } from '../../../src/models/clip/text-encoder-tfjs.js';
import { readUnetConfig, type UnetConfig } from '../../../src/models/unet/config.js';
import { unet } from '../../../src/models/unet/unet.js';
import type { ParamStore } from '../../../src/ops/scope.js';
import { tfOps } from '../../../src/ops/tfjs-ops.js';
import { diff, get, readRef, toNhwc, TINY_SD, type RefTensor } from '../../helpers/fixtures.js';

const UNET_DIR = path.join(TINY_SD, 'unet');
const TOL = 1e-4;
const TOKEN_TABLE = 'text_model.embeddings.token_embedding.weight';

/** The parameters the reference reports gradients for. */
const UNET_PARAMS = [
  'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight',
  'conv_in.weight',
  'time_embedding.linear_1.weight',
  'mid_block.resnets.0.conv1.weight',
  'up_blocks.1.attentions.0.proj_in.weight',
] as const;
const TEXT_PARAMS = ['text_model.encoder.layers.0.self_attn.q_proj.weight', TOKEN_TABLE] as const;

let cfg: UnetConfig;
let text: LoadedTextEncoder;
let unetStore: ParamStore<tf.Tensor>;
let unetWeights: Map<string, tf.Tensor>;
let ref: Map<string, RefTensor>;

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: () => {} });
  cfg = await readUnetConfig(UNET_DIR);
  unetWeights = await loadSafetensorsParams([path.join(UNET_DIR, 'diffusion_pytorch_model.safetensors')]);
  unetStore = paramStore(unetWeights, UNET_DIR);
  text = await loadTextEncoder(TINY_SD);
  ref = await readRef('train_grad.safetensors');
});

afterAll(() => {
  for (const t of unetWeights.values()) t.dispose();
});

interface StepResult {
  readonly loss: number;
  readonly textStates: Float32Array;
  readonly pred: Float32Array;
  readonly grads: Map<string, { data: Float32Array; shape: number[] }>;
}

/** Loss and gradients w.r.t. the reported parameters, which are fed in as overrides of the stores. */
function trainStep(): StepResult {
  let result: StepResult | undefined;
  tf.tidy(() => {
    const ids = get(ref, 'input_ids');
    const inputIds = tf.tensor(Int32Array.from(ids.data), ids.shape, 'int32');
    const x = toNhwc(get(ref, 'noisy_latents'));
    const noisy = tf.tensor(x.data, x.shape, 'float32');
    const n = toNhwc(get(ref, 'noise'));
    const noise = tf.tensor(n.data, n.shape, 'float32');
    const t = get(ref, 'timesteps');
    const timesteps = tf.tensor(Float32Array.from(t.data), t.shape, 'float32');

    const stores: [ParamStore<tf.Tensor>, string][] = [
      ...UNET_PARAMS.map((k): [ParamStore<tf.Tensor>, string] => [unetStore, k]),
      ...TEXT_PARAMS.map((k): [ParamStore<tf.Tensor>, string] => [text.store, k]),
    ];
    const initial = stores.map(([s, k]) => s.get(k)!);
    let textStates: tf.Tensor | undefined;
    let pred: tf.Tensor | undefined;
    const lossOf = (...params: tf.Tensor[]): tf.Scalar => {
      params.forEach((value, i) => stores[i]![0].override(stores[i]![1], value));
      // Kept: valueAndGrads disposes the forward's intermediates.
      textStates = tf.keep(clipTextEncoder(tfOps, text.store.scope(), inputIds, text.cfg).lastHiddenState);
      pred = tf.keep(unet(tfOps, unetStore.scope(), noisy, timesteps, textStates, cfg));
      return tf.mean(tf.square(tf.sub(pred, noise)));
    };
    const { value, grads } = tf.valueAndGrads(lossOf)(initial);
    unetStore.clearOverrides();
    text.store.clearOverrides();
    const out = new Map<string, { data: Float32Array; shape: number[] }>();
    grads.forEach((g, i) => out.set(stores[i]![1], { data: g.dataSync() as Float32Array, shape: g.shape }));
    result = {
      loss: value.dataSync()[0]!,
      textStates: textStates!.dataSync() as Float32Array,
      pred: pred!.dataSync() as Float32Array,
      grads: out,
    };
  });
  return result!;
}

// The cpu backend's convolution gradients are slow (~14 s here): opt in with SDWB_SLOW_TESTS=1.
const BACKENDS = process.env['SDWB_SLOW_TESTS'] === '1' ? (['wasm', 'cpu'] as const) : (['wasm'] as const);

describe.each(BACKENDS)('fine-tuning loss gradients on %s', (backend) => {
  it('match PyTorch autograd: loss, prediction, UNet and text-encoder gradients', async () => {
    await initBackend({ backend, log: () => {} });
    const step = trainStep();
    const report: string[] = [];
    const check = (name: string, actual: ArrayLike<number>, expected: ArrayLike<number>) => {
      const d = diff(actual, expected);
      report.push(`${name}: maxAbs ${d.maxAbs.toExponential(2)} rel ${d.rel.toExponential(2)}`);
      expect(d.rel, `${backend} ${name}: max-abs ${d.maxAbs} vs scale ${d.scale} (rel ${d.rel})`).toBeLessThanOrEqual(TOL);
    };

    check('loss', [step.loss], get(ref, 'loss').data);
    check('text_states', step.textStates, get(ref, 'text_states').data);
    check('model_pred', step.pred, toNhwc(get(ref, 'model_pred')).data);
    for (const key of UNET_PARAMS) {
      const g = step.grads.get(key)!;
      // Conv filter gradients come out HWIO; the reference is OIHW.
      const data = g.shape.length === 4 ? hwioToOihw(g.data, g.shape).data : g.data;
      check(`grad.unet.${key}`, data, get(ref, `grad.unet.${key}`).data);
    }
    const q = 'text_model.encoder.layers.0.self_attn.q_proj.weight';
    check(`grad.text_encoder.${q}`, step.grads.get(q)!.data, get(ref, `grad.text_encoder.${q}`).data);

    // Token table: the used rows match, every other row is exactly zero.
    const table = step.grads.get(TOKEN_TABLE)!;
    const width = table.shape[1]!;
    const used = Array.from(get(ref, 'grad.text_encoder.token_embedding.used_ids').data);
    const rows = new Float32Array(used.length * width);
    used.forEach((id, r) => rows.set(table.data.subarray(id * width, (id + 1) * width), r * width));
    check('grad.text_encoder.token_embedding.rows', rows, get(ref, 'grad.text_encoder.token_embedding.rows').data);
    const usedSet = new Set(used);
    let nonzeroElsewhere = 0;
    for (let row = 0; row < table.shape[0]!; row++) {
      if (usedSet.has(row)) continue;
      for (let c = 0; c < width; c++) if (table.data[row * width + c] !== 0) nonzeroElsewhere++;
    }
    expect(nonzeroElsewhere, 'gradient entries outside the used token rows').toBe(0);
    console.log(`[train grad ${backend}]\n  ${report.join('\n  ')}`);
  });
});
