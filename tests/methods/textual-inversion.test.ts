/**
 * Textual inversion: the gradient of the new rows against PyTorch autograd (train_grad fixture),
 * the row lookup, token handling, and the embedding files (A1111 and diffusers) read back.
 */
import { mkdtemp, readFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { initBackend } from '../../src/backend.js';
import { SafetensorsFile } from '../../src/io/safetensors.js';
import { readTorchCheckpoint, TorchTensorRef } from '../../src/io/torch-pickle.js';
import {
  loadEmbedding,
  multiVectorTokens,
  saveA1111Pt,
  saveA1111Safetensors,
  saveDiffusersEmbedding,
} from '../../src/methods/embedding-files.js';
import {
  applyEmbeddings,
  expandMultiVector,
  lookupWithNewRows,
  textualInversion,
  textualInversionConfigSchema,
  TOKEN_TABLE_KEY,
  type TextualInversionBatch,
  type TextualInversionState,
} from '../../src/methods/textual-inversion.js';
import type { SetupCtx, StepCtx } from '../../src/methods/types.js';
import { clipTextEncoder } from '../../src/models/clip/text-encoder.js';
import { tfOps } from '../../src/ops/tfjs-ops.js';
import { disposeStableDiffusion, loadStableDiffusion, type StableDiffusion } from '../../src/pipeline/load.js';
import { setupRandom, stepRandom } from '../../src/train/rng-state.js';
import { diff, get, readRef, toNhwc, TINY_SD, type RefTensor } from '../helpers/fixtures.js';

const TOL = 1e-4;

function tiConfig(extra: Record<string, unknown> = {}) {
  return textualInversionConfigSchema.parse({
    method: 'textual_inversion',
    model: TINY_SD,
    output_dir: '/tmp/unused',
    data: { dir: '/tmp/unused' },
    placeholder_token: '<tiny>',
    initializer_token: 'dog',
    ...extra,
  });
}

function setupCtx(model: StableDiffusion): SetupCtx {
  return { model: async () => model, random: setupRandom(0), log: () => {} };
}

let ref: Map<string, RefTensor>;
beforeAll(async () => {
  await initBackend({ backend: 'wasm', log: () => {} });
  ref = await readRef('train_grad.safetensors');
});

describe('the new rows’ gradient', () => {
  let model: StableDiffusion;
  afterAll(() => disposeStableDiffusion(model));

  it('equals PyTorch autograd of the token-embedding rows (train_grad.safetensors)', async () => {
    model = await loadStableDiffusion(TINY_SD);
    // The reference differentiates the whole table; its used rows become our 13 new rows, and the
    // prompts' ids are remapped onto them, so the forward is the same computation.
    const used = Array.from(get(ref, 'grad.text_encoder.token_embedding.used_ids').data);
    const s = (await textualInversion.setup(setupCtx(model), tiConfig({ num_vectors: used.length }))) as TextualInversionState;
    try {
      const table = model.text.store.get(TOKEN_TABLE_KEY)!;
      tf.tidy(() => s.rows.assign(tf.gather(table, tf.tensor1d(used, 'int32'))));
      const ids = get(ref, 'input_ids');
      const remapped = Array.from(ids.data, (id) => s.firstId + used.indexOf(id));
      expect(remapped.every((id) => id >= s.firstId)).toBe(true);
      const noisy = toNhwc(get(ref, 'noisy_latents'));
      const noise = toNhwc(get(ref, 'noise'));
      const batch: TextualInversionBatch = {
        ids: tf.tensor2d(remapped, [ids.shape[0]!, ids.shape[1]!], 'int32'),
        noisy: tf.tensor(noisy.data, noisy.shape),
        timesteps: tf.tensor1d(get(ref, 'timesteps').data, 'float32'),
        target: tf.tensor(noise.data, noise.shape),
      };
      const ctx: StepCtx = { step: 0, micro: 0, random: stepRandom(0, 0, 0) };
      const { value, grads } = tf.variableGrads(() => textualInversion.loss(ctx, s, batch), [s.rows]);
      const loss = diff([value.dataSync()[0]!], get(ref, 'loss').data);
      const grad = diff(grads[s.rows.name]!.dataSync(), get(ref, 'grad.text_encoder.token_embedding.rows').data);
      console.log(`[TI grad] loss rel ${loss.rel.toExponential(2)}; rows grad maxAbs ${grad.maxAbs.toExponential(2)} rel ${grad.rel.toExponential(2)}`);
      expect(loss.rel).toBeLessThanOrEqual(TOL);
      expect(grad.rel).toBeLessThanOrEqual(TOL);
      tf.dispose([value, grads, batch]);
    } finally {
      textualInversion.dispose(s);
    }
  });
});

describe('lookupWithNewRows', () => {
  it('equals gather(concat([table, rows]), ids), values and row gradients', () => {
    const table = tf.randomNormal([50, 8], 0, 1, 'float32', 1);
    const rowsInit = tf.randomNormal([3, 8], 0, 1, 'float32', 2);
    const ids = tf.tensor2d([[0, 50, 7, 52], [51, 49, 50, 3]], [2, 4], 'int32');
    const weights = tf.randomNormal([2, 4, 8], 0, 1, 'float32', 3);
    const f = (lookup: (rows: tf.Tensor) => tf.Tensor) => tf.grad((rows: tf.Tensor) => tf.sum(tf.mul(lookup(rows), weights)));
    const ours = lookupWithNewRows(table, rowsInit, 50, ids);
    const plain = tf.gather(tf.concat([table, rowsInit]), ids);
    expect(Array.from(ours.dataSync())).toEqual(Array.from(plain.dataSync()));
    const g1 = f((r) => lookupWithNewRows(table, r, 50, ids))(rowsInit);
    const g2 = f((r) => tf.gather(tf.concat([table, r]), ids))(rowsInit);
    expect(diff(g1.dataSync(), g2.dataSync()).maxAbs).toBeLessThan(1e-6);
    tf.dispose([table, rowsInit, ids, weights, ours, plain, g1, g2]);
  });
});

describe('tokens', () => {
  it('rejects an initializer that is not exactly one token, naming the pieces', async () => {
    const model = await loadStableDiffusion(TINY_SD);
    try {
      await expect(textualInversion.setup(setupCtx(model), tiConfig({ initializer_token: 'a fluffy cat' }))).rejects.toThrow(
        /initializer_token 'a fluffy cat': must be exactly one token, but the tokenizer splits it into 3 \(a<\/w> fluffy<\/w> cat<\/w>\)/,
      );
      await expect(textualInversion.setup(setupCtx(model), tiConfig({ placeholder_token: 'cat</w>' }))).rejects.toThrow(
        /placeholder_token 'cat<\/w>': already a token of this tokenizer \(id 2368\)/,
      );
    } finally {
      disposeStableDiffusion(model);
    }
  });

  it('multi-vector: tokens <t>, <t>_1, <t>_2 after the table, rows = the initializer row, prompts expanded', async () => {
    const model = await loadStableDiffusion(TINY_SD);
    const s = (await textualInversion.setup(setupCtx(model), tiConfig({ num_vectors: 3, placeholder_token: '<tri>' }))) as TextualInversionState;
    try {
      expect(s.tokens).toEqual(['<tri>', '<tri>_1', '<tri>_2']);
      expect(s.firstId).toBe(model.text.cfg.vocabSize);
      expect(model.tokenizer.contentIds('a <tri> <tri>_1 <tri>_2')).toEqual([model.tokenizer.contentIds('a')[0], 49408, 49409, 49410]);
      const dogId = model.tokenizer.contentIds('dog')[0]!;
      const dogRow = model.text.store.get(TOKEN_TABLE_KEY)!.slice([dogId, 0], [1, -1]);
      const rows = s.rows.arraySync() as number[][];
      const expected = Array.from(dogRow.dataSync());
      for (const r of rows) expect(r).toEqual(expected);
      dogRow.dispose();
      expect(textualInversion.generationPatch(s).rewritePrompt!('a <tri> on <tri>')).toBe('a <tri> <tri>_1 <tri>_2 on <tri> <tri>_1 <tri>_2');
      expect(expandMultiVector('a <tri> <tri>_1 <tri>_2', '<tri>', 3)).toBe('a <tri> <tri>_1 <tri>_2');
      expect(textualInversion.datasetOptions!(s)).toEqual({ placeholderToken: '<tri> <tri>_1 <tri>_2', template: 'object' });
    } finally {
      textualInversion.dispose(s);
      disposeStableDiffusion(model);
    }
  });

  it('prepare refuses captions without the placeholder', async () => {
    const model = await loadStableDiffusion(TINY_SD);
    const s = (await textualInversion.setup(setupCtx(model), tiConfig())) as TextualInversionState;
    try {
      const raw = { step: 0, micro: 0, images: { captions: ['a photo of a dog'], pixels: new Float32Array(32 * 32 * 3), count: 1, height: 32, width: 32 } };
      await expect(textualInversion.prepare({ step: 0, micro: 0, random: stepRandom(0, 0, 0) }, s, raw)).rejects.toThrow(
        /caption "a photo of a dog" does not contain the placeholder token '<tiny>'/,
      );
    } finally {
      textualInversion.dispose(s);
      disposeStableDiffusion(model);
    }
  });
});

describe('embedding files', () => {
  const vectors = Float32Array.from({ length: 2 * 32 }, (_, i) => Math.sin(i) * 0.1);

  it('A1111 safetensors: emb_params [n, width], trigger = file stem', async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-emb-'));
    const file = path.join(dir, 'my-thing.safetensors');
    await saveA1111Safetensors(file, { vectors, numVectors: 2, width: 32 }, { 'sd_workbench.method': 'textual_inversion' });
    const f = await SafetensorsFile.open(file);
    expect([...f.keys()]).toEqual(['emb_params']);
    expect(f.info('emb_params')).toMatchObject({ dtype: 'F32', shape: [2, 32] });
    await f.close();
    const e = await loadEmbedding(file);
    expect(e).toMatchObject({ token: 'my-thing', numVectors: 2, width: 32, format: 'a1111-safetensors' });
    expect(Array.from(e.vectors)).toEqual(Array.from(vectors));
  });

  it("A1111 .pt: torch pickle with A1111's keys in its order; trigger = file stem", async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-emb-'));
    const file = path.join(dir, 'my-thing.pt');
    await saveA1111Pt(file, { vectors, numVectors: 2, width: 32 }, { name: 'my-thing', step: 40, sdCheckpoint: 'abc1234567', sdCheckpointName: 'tiny-sd' });
    const ckpt = await readTorchCheckpoint(file);
    try {
      const root = ckpt.root as Map<unknown, unknown>;
      expect([...root.keys()]).toEqual(['string_to_token', 'string_to_param', 'name', 'step', 'sd_checkpoint', 'sd_checkpoint_name']);
      expect(root.get('string_to_token')).toEqual(new Map([['*', 265]]));
      const param = (root.get('string_to_param') as Map<unknown, unknown>).get('*');
      expect(param).toBeInstanceOf(TorchTensorRef);
      const t = param as TorchTensorRef;
      expect([t.dtype, [...t.shape], t.requiresGrad]).toEqual(['F32', [2, 32], true]);
      expect(Array.from(await t.readFloat32())).toEqual(Array.from(vectors));
      expect([root.get('name'), root.get('step'), root.get('sd_checkpoint'), root.get('sd_checkpoint_name')]).toEqual(['my-thing', 40, 'abc1234567', 'tiny-sd']);
    } finally {
      await ckpt.close();
    }
    const e = await loadEmbedding(file);
    expect(e).toMatchObject({ token: 'my-thing', numVectors: 2, width: 32, format: 'a1111-pt', step: 40 });
    expect(Array.from(e.vectors)).toEqual(Array.from(vectors));
  });

  it('diffusers learned_embeds.safetensors: {token: [n, width]} with format pt, trigger = token', async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-emb-'));
    const file = path.join(dir, 'learned_embeds.safetensors');
    await saveDiffusersEmbedding(file, '<my-thing>', { vectors, numVectors: 2, width: 32 });
    const f = await SafetensorsFile.open(file);
    expect([...f.keys()]).toEqual(['<my-thing>']);
    expect(f.info('<my-thing>')).toMatchObject({ dtype: 'F32', shape: [2, 32] });
    expect(f.metadata).toEqual({ format: 'pt' });
    await f.close();
    const e = await loadEmbedding(file);
    expect(e).toMatchObject({ token: '<my-thing>', numVectors: 2, width: 32, format: 'diffusers-safetensors' });
    expect(Array.from(e.vectors)).toEqual(Array.from(vectors));
    expect(multiVectorTokens('<my-thing>', 2)).toEqual(['<my-thing>', '<my-thing>_1']);
  });

  it('applied to a model, an embedding equal to a word’s row encodes like that word', async () => {
    const model = await loadStableDiffusion(TINY_SD);
    const dir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-emb-'));
    const file = path.join(dir, 'learned_embeds.safetensors');
    const catId = model.tokenizer.contentIds('cat')[0]!;
    const catRow = tf.tidy(() => tf.slice(model.text.store.get(TOKEN_TABLE_KEY)!, [catId, 0], [1, -1]));
    await saveDiffusersEmbedding(file, '<kitty>', { vectors: catRow.dataSync() as Float32Array, numVectors: 1, width: 32 });
    catRow.dispose();
    const applied = await textualInversion.applyArtifact(model, file);
    try {
      expect(applied.triggers).toEqual(['<kitty>']);
      const encode = (prompt: string, hook: boolean) =>
        tf.tidy(() => {
          const ids = tf.tensor2d([model.tokenizer.encode(applied.patch.rewritePrompt!(prompt))], undefined, 'int32');
          const opts = hook ? { tokenEmbeddings: applied.patch.tokenEmbeddings! } : {};
          return clipTextEncoder(tfOps, model.text.store.scope(), ids, model.text.cfg, opts).lastHiddenState.dataSync();
        });
      expect(Array.from(encode('a photo of <kitty>', true))).toEqual(Array.from(encode('a photo of cat', false)));
      expect(Array.from(encode('a photo of <kitty>', true))).not.toEqual(Array.from(encode('a photo of dog', false)));
    } finally {
      applied.dispose();
      disposeStableDiffusion(model);
    }
  });

  it('rejects an embedding of another width, naming both', async () => {
    const model = await loadStableDiffusion(TINY_SD);
    try {
      const e = { token: '<w>', vectors: new Float32Array(768), numVectors: 1, width: 768, format: 'diffusers-safetensors' as const, file: 'w.safetensors' };
      expect(() => applyEmbeddings(model, [e])).toThrow(/w.safetensors: embedding vectors are 768 wide, this model's text encoder is 32 wide \(an embedding for SD 1.x \(768\)/);
    } finally {
      disposeStableDiffusion(model);
    }
  });

  it('reads the sd-concepts-library diffusers .bin (birb-style, one 768-vector)', async () => {
    const file = '/work/shared/data/textual_inversion/embeddings/birb-style_learned_embeds.bin';
    const bytes = await readFile(file);
    expect(bytes.length).toBe(3819);
    const e = await loadEmbedding(file);
    expect(e).toMatchObject({ token: '<birb-style>', numVectors: 1, width: 768, format: 'diffusers-bin' });
    expect(e.vectors.every(Number.isFinite)).toBe(true);
  });
});
