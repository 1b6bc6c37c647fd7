/**
 * CLIPTextModel parity with transformers (fixtures/tiny-sd-reference/text_encoder.safetensors)
 * on the wasm and cpu backends, the strict parameter checks, the pooling rules, clip skip, the
 * tokenizer → encoder path, and the token-table gradient that textual inversion trains through.
 */
import path from 'node:path';
import { readFileSync } from 'node:fs';
import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { initBackend } from '../../../src/backend.js';
import { SafetensorsFile } from '../../../src/io/safetensors.js';
import { ParamError, ParamStore } from '../../../src/ops/scope.js';
import { tfOps } from '../../../src/ops/tfjs-ops.js';
import { parseClipTextConfig, type ClipTextConfig } from '../../../src/models/clip/config.js';
import {
  CAUSAL_MASK_VALUE,
  checkAllUsed,
  clipTextEncoder,
  pooledPositions,
  textStatesForUnet,
} from '../../../src/models/clip/text-encoder.js';
import { encodeText, loadTextEncoder, type LoadedTextEncoder } from '../../../src/models/clip/text-encoder-tfjs.js';
import { ClipTokenizer } from '../../../src/models/clip/tokenizer.js';
import { diff, get, readRef, TINY_REF, TINY_SD, type RefTensor } from '../../helpers/fixtures.js';

const TOL = 1e-4;
const PROMPT_KEYS = ['empty', 'astronaut', 'van_gogh_style', 'emoji', 'long'] as const;
const TOKEN_TABLE = 'text_model.embeddings.token_embedding.weight';

interface Reference {
  readonly ids: Int32Array;
  readonly idsShape: [number, number];
  readonly states: Map<string, RefTensor>;
}

async function readReference(): Promise<Reference> {
  const file = path.join(TINY_REF, 'text_encoder.safetensors');
  const f = await SafetensorsFile.open(file);
  try {
    const [b, s] = f.info('input_ids').shape as [number, number];
    return { ids: await f.readInt('input_ids'), idsShape: [b, s], states: await readRef(file) };
  } finally {
    await f.close();
  }
}

/** A fresh store over the same tensors, optionally with some entries replaced or added. */
function storeWith(te: LoadedTextEncoder, changes: Record<string, tf.Tensor> = {}): ParamStore<tf.Tensor> {
  const m = new Map<string, tf.Tensor>();
  for (const k of te.store.keys()) m.set(k, te.store.get(k)!);
  for (const [k, v] of Object.entries(changes)) m.set(k, v);
  return new ParamStore(m, (t) => t.shape, te.store.source);
}

function fmt(x: number): string {
  return x.toExponential(2);
}

/** Measured errors, printed once at the end for the record. */
const measured: string[] = [];

afterAll(() => {
  if (measured.length > 0) console.info(`CLIP text encoder parity (max-abs / relative to scale):\n  ${measured.join('\n  ')}`);
});

let ref: Reference;

beforeAll(async () => {
  ref = await readReference();
});

describe.each(['wasm', 'cpu'] as const)('CLIP text encoder on %s', (backend) => {
  let te: LoadedTextEncoder;

  beforeAll(async () => {
    await initBackend({ backend, log: () => {} });
    te = await loadTextEncoder(TINY_SD);
  });

  afterAll(() => {
    for (const k of te.store.keys()) te.store.get(k)!.dispose();
  });

  it('reproduces every transformers output within 1e-4 relative, using every parameter', () => {
    te.store.resetAccess();
    const errors = tf.tidy(() => {
      const p = te.store.scope();
      const ids = tf.tensor2d(ref.ids, ref.idsShape, 'int32');
      const out = clipTextEncoder(tfOps, p, ids, te.cfg, { hiddenStates: true });
      const hidden = out.hiddenStates!;
      const actual: Record<string, tf.Tensor> = {
        last_hidden_state: out.lastHiddenState,
        hidden_states: tf.stack([...hidden]),
        penultimate_hidden_state: hidden[hidden.length - 2]!,
        penultimate_final_ln: textStatesForUnet(tfOps, p, te.cfg, out, { clipSkip: 1 }),
        pooler_output: out.pooled,
      };
      return Object.entries(actual).map(([key, t]) => {
        const want = get(ref.states, key);
        expect(t.shape, key).toEqual(want.shape);
        return { key, ...diff(t.dataSync(), want.data) };
      });
    });
    for (const e of errors) measured.push(`${backend} ${e.key}: ${fmt(e.maxAbs)} / ${fmt(e.rel)}`);
    for (const e of errors) {
      expect(e.rel, `${backend} ${e.key}: max-abs ${fmt(e.maxAbs)}, relative ${fmt(e.rel)} (scale ${e.scale.toFixed(3)})`).toBeLessThanOrEqual(TOL);
    }
    expect(() => checkAllUsed(te.store)).not.toThrow();
  });

  it('clipSkip 0 is the last hidden state and clipSkip 1 the final-LN penultimate layer', () => {
    tf.tidy(() => {
      const p = te.store.scope();
      const ids = tf.tensor2d(ref.ids, ref.idsShape, 'int32');
      const out = clipTextEncoder(tfOps, p, ids, te.cfg, { hiddenStates: true });
      expect(textStatesForUnet(tfOps, p, te.cfg, out)).toBe(out.lastHiddenState);
      const skip1 = diff(textStatesForUnet(tfOps, p, te.cfg, out, { clipSkip: 1 }).dataSync(), get(ref.states, 'penultimate_final_ln').data);
      expect(skip1.rel).toBeLessThanOrEqual(TOL);
      expect(() => textStatesForUnet(tfOps, p, te.cfg, out, { clipSkip: 3 })).toThrow(/clipSkip must be an integer in \[0, 2\]/);
      const plain = clipTextEncoder(tfOps, p, ids, te.cfg);
      expect(plain.hiddenStates).toBeUndefined();
      expect(() => textStatesForUnet(tfOps, p, te.cfg, plain, { clipSkip: 1 })).toThrow(/hiddenStates: true/);
    });
  });

  it('the causal mask value gives exactly the softmax of the unmasked scores (weights above the diagonal exactly 0)', () => {
    tf.tidy(() => {
      const s = 6;
      const scores = tf.randomNormal([2, s, s], 0, 30, 'float32', 7);
      const upper = tf.tensor2d(Array.from({ length: s * s }, (_, i) => (i % s > Math.floor(i / s) ? 1 : 0)), [s, s]);
      const viaFinfoMin = tf.softmax(tf.add(scores, tf.mul(upper, CAUSAL_MASK_VALUE))).dataSync();
      const viaMinusInf = tf.softmax(tf.where(tf.cast(upper, 'bool'), tf.fill([2, s, s], -Infinity), scores)).dataSync();
      expect(Array.from(viaFinfoMin)).toEqual(Array.from(viaMinusInf));
      for (let i = 0; i < viaFinfoMin.length; i++) {
        const [q, k] = [Math.floor(i / s) % s, i % s];
        if (k > q) expect(viaFinfoMin[i]).toBe(0);
      }
    });
  });

  it('encodeText on the reference ids returns the last hidden state, and clipSkip 1 the penultimate + LN', () => {
    const rows = Array.from({ length: ref.idsShape[0] }, (_, b) => Array.from(ref.ids.subarray(b * 77, (b + 1) * 77)));
    const states = encodeText(te.store, te.cfg, rows);
    const skipped = encodeText(te.store, te.cfg, rows, { clipSkip: 1 });
    try {
      expect(diff(states.dataSync(), get(ref.states, 'last_hidden_state').data).rel).toBeLessThanOrEqual(TOL);
      expect(diff(skipped.dataSync(), get(ref.states, 'penultimate_final_ln').data).rel).toBeLessThanOrEqual(TOL);
    } finally {
      tf.dispose([states, skipped]);
    }
    expect(() => encodeText(te.store, te.cfg, [[49406, 49408]])).toThrow(/token id 49408 .*outside the vocabulary \[0, 49408\)/);
    expect(() => encodeText(te.store, te.cfg, [[1, 2], [3]])).toThrow(/row 1 has 1 tokens, row 0 has 2/);
  });
});

describe('strict parameters', () => {
  let te: LoadedTextEncoder;

  beforeAll(async () => {
    await initBackend({ backend: 'cpu', log: () => {} });
    te = await loadTextEncoder(TINY_SD);
  });

  afterAll(() => {
    for (const k of te.store.keys()) te.store.get(k)!.dispose();
  });

  it('the fixture has exactly the transformers keys (no position_ids buffer) and the config reads as expected', () => {
    const keys = [...te.store.keys()];
    expect(keys).toHaveLength(2 + 2 * 16 + 2);
    expect(keys).toContain(TOKEN_TABLE);
    expect(keys).toContain('text_model.encoder.layers.1.self_attn.out_proj.bias');
    expect(keys.some((k) => k.endsWith('position_ids'))).toBe(false);
    expect(te.cfg).toMatchObject({ width: 32, mlpWidth: 37, numLayers: 2, numHeads: 4, maxPositions: 77, activation: 'quick_gelu', eosTokenId: 2 });
  });

  it('a wrong-shaped parameter is a ParamError naming the key and both shapes', () => {
    const key = 'text_model.encoder.layers.1.mlp.fc1.weight';
    const transposed = tf.transpose(te.store.get(key)!);
    try {
      const store = storeWith(te, { [key]: transposed });
      const ids = tf.tensor2d(ref.ids, ref.idsShape, 'int32');
      let caught: unknown;
      try {
        tf.tidy(() => {
          clipTextEncoder(tfOps, store.scope(), ids, te.cfg);
        });
      } catch (e) {
        caught = e;
      }
      ids.dispose();
      expect(caught).toBeInstanceOf(ParamError);
      const err = caught as ParamError;
      expect(err.message).toContain(`'${key}'`);
      expect(err.message).toContain('[32, 37]');
      expect(err.message).toContain('[37, 32]');
      expect(err.message).toContain('model.safetensors');
      expect(err.problems).toEqual([{ key, problem: 'shape', expected: [37, 32], found: [32, 37] }]);
    } finally {
      transposed.dispose();
    }
  });

  it('checkAllUsed names keys the forward never read, but ignores the position_ids buffer', () => {
    const extraKey = 'text_model.encoder.layers.2.mlp.fc1.bias';
    const extra = tf.zeros([37]);
    const positionIds = tf.range(0, 77, 1, 'int32').reshape([1, 77]);
    try {
      const store = storeWith(te, { [extraKey]: extra, 'text_model.embeddings.position_ids': positionIds });
      tf.tidy(() => {
        clipTextEncoder(tfOps, store.scope(), tf.tensor2d(ref.ids, ref.idsShape, 'int32'), te.cfg);
      });
      expect(store.unusedKeys().sort()).toEqual(['text_model.embeddings.position_ids', extraKey]);
      expect(() => checkAllUsed(store)).toThrow(ParamError);
      expect(() => checkAllUsed(store)).toThrow(new RegExp(`1 parameter\\(s\\) not used by the model: ${extraKey.replaceAll('.', '\\.')}$`));
    } finally {
      tf.dispose([extra, positionIds]);
    }
  });

  it('with a tokenEmbeddings hook the table is not read, and an identical lookup gives the same states', () => {
    const store = storeWith(te);
    const table = te.store.get(TOKEN_TABLE)!;
    const [hooked, plain] = tf.tidy(() => {
      const ids = tf.tensor2d(ref.ids, ref.idsShape, 'int32');
      const a = clipTextEncoder(tfOps, store.scope(), ids, te.cfg, { tokenEmbeddings: (i) => tf.gather(table, i) });
      return [a.lastHiddenState.dataSync(), clipTextEncoder(tfOps, te.store.scope(), ids, te.cfg).lastHiddenState.dataSync()];
    });
    expect(store.unusedKeys()).toEqual([TOKEN_TABLE]);
    expect(Array.from(hooked!)).toEqual(Array.from(plain!));
  });
});

describe('pooling and config', () => {
  const base = parseClipTextConfig(
    JSON.parse(readFileSync(path.join(TINY_SD, 'text_encoder/config.json'), 'utf8')),
    'text_encoder/config.json',
  );

  beforeAll(async () => {
    await initBackend({ backend: 'cpu', log: () => {} });
  });

  it('eos_token_id 2 pools at argmax(ids) (legacy); any other eos id at its first occurrence', () => {
    // Row 0: a textual-inversion token (49408) sorts above <|endoftext|> (49407), so the two rules
    // differ; row 1 has no eos at all (torch's argmax of all-false is 0).
    const ids = [49406, 49408, 320, 49407, 49407, 49406, 320, 320, 320, 320];
    const positions = (cfg: ClipTextConfig) =>
      tf.tidy(() => Array.from(pooledPositions(tfOps, tf.tensor2d(ids, [2, 5], 'int32'), cfg).dataSync()));
    expect(positions(base)).toEqual([1, 0]);
    expect(positions({ ...base, eosTokenId: 49407 })).toEqual([3, 0]);
  });

  it('the new eos rule pools the same rows as the legacy rule on plain prompts', async () => {
    const te = await loadTextEncoder(TINY_SD);
    try {
      const pooled = tf.tidy(() => {
        const ids = tf.tensor2d(ref.ids, ref.idsShape, 'int32');
        return clipTextEncoder(tfOps, te.store.scope(), ids, { ...te.cfg, eosTokenId: 49407 }).pooled.dataSync();
      });
      expect(diff(pooled, get(ref.states, 'pooler_output').data).rel).toBeLessThanOrEqual(TOL);
    } finally {
      for (const k of te.store.keys()) te.store.get(k)!.dispose();
    }
  });

  it('config: transformers defaults for absent keys, errors naming the file and key', () => {
    expect(parseClipTextConfig({ hidden_size: 768, num_attention_heads: 12 }, 'c.json')).toMatchObject({
      width: 768,
      numHeads: 12,
      numLayers: 12,
      mlpWidth: 2048,
      activation: 'quick_gelu',
      eosTokenId: 49407,
    });
    expect(() => parseClipTextConfig({ hidden_act: 'relu' }, '/m/text_encoder/config.json')).toThrow(
      /\/m\/text_encoder\/config\.json: 'hidden_act'/,
    );
    expect(() => parseClipTextConfig({ hidden_size: 30, num_attention_heads: 4 }, 'c.json')).toThrow(
      /c\.json: 'num_attention_heads': hidden_size must be divisible/,
    );
  });
});

describe('tokenizer → input ids', () => {
  it('ClipTokenizer reproduces the fixture input_ids of the five reference prompts', async () => {
    const tokens = JSON.parse(readFileSync(path.join(TINY_REF, 'tokens.json'), 'utf8')) as {
      prompts: { key: string; text: string }[];
    };
    const tokenizer = await ClipTokenizer.fromDir(path.join(TINY_SD, 'tokenizer'));
    PROMPT_KEYS.forEach((key, b) => {
      const prompt = tokens.prompts.find((p) => p.key === key);
      expect(prompt, key).toBeDefined();
      expect(tokenizer.encode(prompt!.text), key).toEqual(Array.from(ref.ids.subarray(b * 77, (b + 1) * 77)));
    });
  });
});

describe('token-table gradient (textual inversion trains through it)', () => {
  /** d sum(lastHiddenState) / d token table on `backend`, plus sum(lastHiddenState) itself. */
  async function tableGrad(backend: 'wasm' | 'cpu'): Promise<{ grad: Float32Array; te: LoadedTextEncoder }> {
    await initBackend({ backend, log: () => {} });
    const te = await loadTextEncoder(TINY_SD);
    const grad = tf.tidy(() => {
      const ids = tf.tensor2d(ref.ids, ref.idsShape, 'int32');
      const g = tf.grad((table: tf.Tensor) => {
        te.store.override(TOKEN_TABLE, table);
        try {
          return tf.sum(clipTextEncoder(tfOps, te.store.scope(), ids, te.cfg).lastHiddenState);
        } finally {
          te.store.clearOverrides();
        }
      })(te.store.get(TOKEN_TABLE)!);
      return g.dataSync() as Float32Array;
    });
    return { grad, te };
  }

  function sumStates(te: LoadedTextEncoder, table: tf.Tensor): number {
    te.store.override(TOKEN_TABLE, table);
    try {
      const data = tf.tidy(() =>
        clipTextEncoder(tfOps, te.store.scope(), tf.tensor2d(ref.ids, ref.idsShape, 'int32'), te.cfg).lastHiddenState.dataSync(),
      );
      let s = 0;
      for (const v of data) s += v;
      return s;
    } finally {
      te.store.clearOverrides();
    }
  }

  it('runs on wasm, equals cpu within 1e-4 relative, is zero off the used rows and matches finite differences', async () => {
    const wasm = await tableGrad('wasm');
    for (const k of wasm.te.store.keys()) wasm.te.store.get(k)!.dispose();
    const cpu = await tableGrad('cpu');
    const width = cpu.te.cfg.width;

    const d = diff(wasm.grad, cpu.grad);
    measured.push(`token-table gradient wasm vs cpu: ${fmt(d.maxAbs)} / ${fmt(d.rel)}`);
    expect(d.rel, `wasm vs cpu gradient: max-abs ${fmt(d.maxAbs)}, relative ${fmt(d.rel)}`).toBeLessThanOrEqual(TOL);

    const used = new Set(ref.ids);
    for (let row = 0; row < cpu.grad.length / width; row++) {
      const norm = Math.hypot(...cpu.grad.subarray(row * width, (row + 1) * width));
      if (used.has(row)) expect(norm, `row ${row}`).toBeGreaterThan(0);
      else if (norm !== 0) expect.fail(`gradient row ${row} is non-zero but token ${row} is not in the input`);
    }

    // Central difference of sum(states) along the gradient direction g/|g| must equal |g|.
    let squares = 0;
    for (const g of cpu.grad) squares += g * g;
    const gNorm = Math.sqrt(squares);
    const eps = 5e-4;
    const table = cpu.te.store.get(TOKEN_TABLE)!;
    const direction = tf.tensor(cpu.grad.map((g) => g / gNorm), table.shape);
    const plus = tf.add(table, tf.mul(direction, eps));
    const minus = tf.sub(table, tf.mul(direction, eps));
    try {
      const slope = (sumStates(cpu.te, plus) - sumStates(cpu.te, minus)) / (2 * eps);
      measured.push(`finite-difference slope ${slope.toFixed(5)} vs |grad| ${gNorm.toFixed(5)}`);
      expect(Math.abs(slope - gNorm) / gNorm).toBeLessThan(1e-3);
    } finally {
      tf.dispose([direction, plus, minus]);
      for (const k of cpu.te.store.keys()) cpu.te.store.get(k)!.dispose();
    }
  });
});
