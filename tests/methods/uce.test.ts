/**
 * UCE: the edited K/V weights against the official `UCE()` output on the tiny fixture
 * (erasure-reference/uce.safetensors), the text states it uses against transformers', the rank
 * form against the textbook closed form, the prompt lists of the official script, the Cholesky
 * solver, and the method run through the training loop: only attn2.to_k/to_v change, and the
 * saved delta reproduces the edit.
 */
import { mkdtemp, readFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { initBackend } from '../../src/backend.js';
import { SafetensorsFile } from '../../src/io/safetensors.js';
import { readDelta } from '../../src/methods/delta.js';
import { cholesky, NotPositiveDefiniteError, solveSpd } from '../../src/methods/linalg.js';
import { trainingConfigSchema } from '../../src/methods/registry.js';
import { applyUce, lastTokenStates, solveUce, uce, uceConfigSchema, uceEdit, ucePrompts, type UceInputs } from '../../src/methods/uce.js';
import { isCrossAttnKV } from '../../src/models/unet/params.js';
import { disposeStableDiffusion, loadStableDiffusion, type StableDiffusion } from '../../src/pipeline/load.js';
import { ConfigError, loadTrainingConfig } from '../../src/train/config.js';
import { train } from '../../src/train/loop.js';
import { setupRandom } from '../../src/train/rng-state.js';
import { diff, ERASURE_REF, get, readRef, TINY_REF, TINY_SD, type RefTensor } from '../helpers/fixtures.js';

const TOL = 1e-4;
const CONFIG = path.resolve(import.meta.dirname, '../../configs/uce-artists.yaml');

interface UceParams {
  readonly edit_concepts: string[];
  readonly guide_concepts: string[];
  readonly preserve_concepts: string[];
  readonly erase_scale: number;
  readonly preserve_scale: number;
  readonly lamb: number;
}

let params: UceParams;
let ref: Map<string, RefTensor>;
let model: StableDiffusion;

/** The reference call's arguments (params.json) as a config. */
function referenceConfig(extra: Record<string, unknown> = {}) {
  return uceConfigSchema.parse({
    method: 'uce',
    model: TINY_SD,
    output_dir: '/tmp/unused',
    concepts: params.edit_concepts,
    guide_concepts: params.guide_concepts,
    preserve_concepts: params.preserve_concepts,
    lambda: params.lamb,
    erase_scale: params.erase_scale,
    preserve_scale: params.preserve_scale,
    ...extra,
  });
}

beforeAll(async () => {
  await initBackend({ backend: 'wasm', log: () => {} });
  params = JSON.parse(await readFile(path.join(ERASURE_REF, 'params.json'), 'utf8')) as UceParams;
  ref = await readRef(path.join(ERASURE_REF, 'uce.safetensors'));
  model = await loadStableDiffusion(TINY_SD);
});

afterAll(() => disposeStableDiffusion(model));

describe('UCE against the official function (uce.safetensors)', () => {
  it('edits exactly the 8 cross-attention K/V weights to the reference values', async () => {
    const result = await uceEdit(model, referenceConfig());
    try {
      expect([...result.weights.keys()].sort()).toEqual([...ref.keys()].sort());
      for (const [key, expected] of ref) {
        const edited = result.weights.get(key)!;
        expect(edited.shape).toEqual(expected.shape);
        const d = diff(await edited.data(), expected.data);
        expect(d.rel, key).toBeLessThanOrEqual(TOL);
        // The edit is not a no-op: the original weight is far from the reference.
        const before = diff(await model.unet.store.get(key)!.data(), expected.data);
        expect(before.rel, key).toBeGreaterThan(0.1);
      }
    } finally {
      tf.dispose([...result.weights.values()]);
    }
  });

  it('matches with either product form (thin rank products or the shared d×d P)', async () => {
    const cfg = referenceConfig();
    const prompts = ucePrompts(cfg);
    const states = await lastTokenStates(model, [...prompts.erase.flatMap((e) => [e.prompt, e.guide]), ...prompts.preserve]);
    const sol = solveUce({
      width: model.text.cfg.width,
      erase: prompts.erase.map((e) => ({ c: states.get(e.prompt)!, guide: states.get(e.guide)! })),
      preserve: prompts.preserve.map((p) => states.get(p)!),
      lambda: cfg.lambda,
      eraseScale: cfg.erase_scale,
      preserveScale: cfg.preserve_scale,
    });
    const weights = new Map([...ref.keys()].map((k) => [k, model.unet.store.get(k)!]));
    for (const form of ['rank', 'dense'] as const) {
      const edited = applyUce(sol, weights, form);
      try {
        for (const [key, expected] of ref) expect(diff(await edited.get(key)!.data(), expected.data).rel, `${form} ${key}`).toBeLessThanOrEqual(TOL);
      } finally {
        tf.dispose([...edited.values()]);
      }
    }
  });
});

describe('text states', () => {
  it("are transformers' last hidden state at the last real token (BOS for '', position 75 when truncated)", async () => {
    const tokens = JSON.parse(await readFile(path.join(TINY_REF, 'tokens.json'), 'utf8')) as {
      prompts: { key: string; text: string; attention_mask: number[] }[];
    };
    const text = await readRef('text_encoder.safetensors');
    const hidden = get(text, 'last_hidden_state'); // [5, 77, 32]
    const keys = ['empty', 'astronaut', 'van_gogh_style', 'emoji', 'long'];
    const prompts = keys.map((k) => tokens.prompts.find((p) => p.key === k)!);
    const states = await lastTokenStates(model, prompts.map((p) => p.text));
    const width = hidden.shape[2]!;
    const seen = new Set<number>();
    prompts.forEach((p, b) => {
      const index = p.attention_mask.reduce((a, x) => a + x, 0) - 2;
      seen.add(index);
      const offset = (b * 77 + index) * width;
      expect(diff(states.get(p.text)!, hidden.data.subarray(offset, offset + width)).rel, p.key).toBeLessThanOrEqual(1e-5);
    });
    expect(seen.has(0) && seen.has(75)).toBe(true);
  });
});

/** The textbook closed form in float64 with an explicit Gauss–Jordan inverse (independent of the code under test). */
function textbook(inputs: UceInputs, w: Float64Array, dOut: number): Float64Array {
  const d = inputs.width;
  const a = new Float64Array(d * d);
  const b = new Float64Array(dOut * d);
  for (let i = 0; i < d; i++) a[i * d + i] = inputs.lambda;
  for (let i = 0; i < dOut * d; i++) b[i] = inputs.lambda * w[i]!;
  const wc = (c: Float64Array) => Array.from({ length: dOut }, (_, o) => c.reduce((s, x, k) => s + w[o * d + k]! * x, 0));
  const term = (v: number[], c: Float64Array, s: number) => {
    for (let r = 0; r < d; r++) for (let k = 0; k < d; k++) a[r * d + k] = a[r * d + k]! + s * c[r]! * c[k]!;
    for (let o = 0; o < dOut; o++) for (let k = 0; k < d; k++) b[o * d + k] = b[o * d + k]! + s * v[o]! * c[k]!;
  };
  for (const e of inputs.erase) term(wc(e.guide), e.c, inputs.eraseScale);
  for (const c of inputs.preserve) term(wc(c), c, inputs.preserveScale);
  // Gauss–Jordan with partial pivoting on [A | I].
  const inv = new Float64Array(d * d);
  for (let i = 0; i < d; i++) inv[i * d + i] = 1;
  for (let col = 0; col < d; col++) {
    let pivot = col;
    for (let r = col + 1; r < d; r++) if (Math.abs(a[r * d + col]!) > Math.abs(a[pivot * d + col]!)) pivot = r;
    for (let k = 0; k < d; k++) {
      [a[col * d + k], a[pivot * d + k]] = [a[pivot * d + k]!, a[col * d + k]!];
      [inv[col * d + k], inv[pivot * d + k]] = [inv[pivot * d + k]!, inv[col * d + k]!];
    }
    const p = a[col * d + col]!;
    for (let k = 0; k < d; k++) {
      a[col * d + k] = a[col * d + k]! / p;
      inv[col * d + k] = inv[col * d + k]! / p;
    }
    for (let r = 0; r < d; r++) {
      if (r === col) continue;
      const f = a[r * d + col]!;
      for (let k = 0; k < d; k++) {
        a[r * d + k] = a[r * d + k]! - f * a[col * d + k]!;
        inv[r * d + k] = inv[r * d + k]! - f * inv[col * d + k]!;
      }
    }
  }
  const out = new Float64Array(dOut * d);
  for (let o = 0; o < dOut; o++) for (let k = 0; k < d; k++) for (let j = 0; j < d; j++) out[o * d + k] = out[o * d + k]! + b[o * d + j]! * inv[j * d + k]!;
  return out;
}

describe('closed form', () => {
  // Fixed small numbers (no RNG): c vectors from a sine table.
  const vec = (d: number, seed: number) => Float64Array.from({ length: d }, (_, k) => Math.sin(1.3 * seed + 0.7 * k * (seed + 1)) * (1 + (k % 3)));
  const d = 6;
  const inputs: UceInputs = {
    width: d,
    erase: [0, 1, 2, 3, 4].map((i) => ({ c: vec(d, i), guide: vec(d, 10 + (i % 2)) })),
    preserve: [vec(d, 20), vec(d, 21)],
    lambda: 0.3,
    eraseScale: 1.5,
    preserveScale: 0.7,
  };

  it('the rank and dense forms equal (λW + s_e Σ v*cᵀ + s_p Σ Wc cᵀ)(λI + s_e Σ ccᵀ + s_p Σ ccᵀ)⁻¹', async () => {
    const dOut = 4;
    const w = Float64Array.from({ length: dOut * d }, (_, i) => Math.cos(0.37 * i) * 0.5);
    const expected = textbook(inputs, w, dOut);
    const sol = solveUce(inputs);
    for (const form of ['rank', 'dense'] as const) {
      const weights = new Map([['w', tf.tensor2d(Float32Array.from(w), [dOut, d])]]);
      const out = applyUce(sol, weights, form);
      expect(diff(await out.get('w')!.data(), expected).rel, form).toBeLessThan(1e-5);
      tf.dispose([...out.values(), ...weights.values()]);
    }
  });

  it('with λ = 0 and fewer concepts than the width, says to raise λ', () => {
    expect(() => solveUce({ ...inputs, lambda: 0, erase: inputs.erase.slice(0, 2), preserve: [] })).toThrow(/singular.*lambda > 0/);
  });
});

describe('Cholesky', () => {
  // The classic example: A = L Lᵀ with L = [[2,0,0],[6,1,0],[-8,5,3]].
  const a = Float64Array.from([4, 12, -16, 12, 37, -43, -16, -43, 98]);

  it('factors and solves exactly', () => {
    expect([...cholesky(a, 3).lower]).toEqual([2, 0, 0, 6, 1, 0, -8, 5, 3]);
    // A·[1, 2, 3] = [-20, -43, 192]; A·[1, 0, 0] = first column.
    const x = solveSpd(a, 3, Float64Array.from([-20, -43, 192, 4, 12, -16]));
    [1, 2, 3, 1, 0, 0].forEach((v, i) => expect(x[i]).toBeCloseTo(v, 10));
  });

  it('rejects a matrix that is not positive definite', () => {
    expect(() => cholesky(Float64Array.from([1, 2, 2, 1]), 2, 'test matrix')).toThrow(NotPositiveDefiniteError);
  });
});

describe('prompts', () => {
  it('builds the official erase list: concepts, then each concept in the five templates, toward its guide', () => {
    const p = ucePrompts({ concepts: ['Van Gogh', 'Kelly McKernan'], concept_type: 'art', templates: true, preserve_concepts: ['Claude Monet'] });
    const templated = (c: string) => [`painting by ${c}`, `art by ${c}`, `artwork by ${c}`, `picture by ${c}`, `style of ${c}`];
    expect(p.erase.map((e) => e.prompt)).toEqual(['Van Gogh', 'Kelly McKernan', ...templated('Van Gogh'), ...templated('Kelly McKernan')]);
    expect(new Set(p.erase.map((e) => e.guide))).toEqual(new Set(['art']));
    expect(p.preserve).toEqual(['Claude Monet']);
  });

  it('objects: guide "" and the object templates; per-concept guides follow their concept', () => {
    const p = ucePrompts({ concepts: ['cat', 'car'], guide_concepts: ['dog', 'truck'], concept_type: 'object', templates: true, preserve_concepts: [] });
    expect(p.erase.slice(2, 7).map((e) => e.prompt)).toEqual(['image of cat', 'photo of cat', 'portrait of cat', 'picture of cat', 'painting of cat']);
    expect(p.erase.map((e) => e.guide)).toEqual(['dog', 'truck', ...Array(5).fill('dog'), ...Array(5).fill('truck')]);
    expect(ucePrompts({ concepts: ['cat'], concept_type: 'object', templates: false, preserve_concepts: [] }).erase).toEqual([{ prompt: 'cat', guide: '' }]);
  });
});

describe('config', () => {
  it('configs/uce-artists.yaml parses as a uce run with the official defaults', async () => {
    const { config } = await loadTrainingConfig(CONFIG, [], trainingConfigSchema());
    expect(config).toMatchObject({
      method: 'uce',
      steps: 0,
      concepts: ['Van Gogh', 'Kelly McKernan'],
      concept_type: 'art',
      preserve_concepts: ['Claude Monet', 'a photo of a dog'],
      lambda: 0.5,
      erase_scale: 1,
      preserve_scale: 1,
      templates: false,
    });
  });

  it('rejects optimizer steps and a guide list of the wrong length, naming the field', async () => {
    await expect(loadTrainingConfig(CONFIG, ['steps=10'], trainingConfigSchema())).rejects.toThrow(/steps: .*closed-form/);
    await expect(loadTrainingConfig(CONFIG, ['guide_concepts=[a, b, c]'], trainingConfigSchema())).rejects.toThrow(ConfigError);
    await expect(loadTrainingConfig(CONFIG, ['guide_concepts=[a, b, c]'], trainingConfigSchema())).rejects.toThrow(/guide_concepts: expected one guide/);
  });
});

describe('UCE through the training loop', () => {
  it('writes a delta of only the attn2.to_k/to_v weights that reproduces the reference when applied', async () => {
    const out = await mkdtemp(path.join(os.tmpdir(), 'sdwb-uce-'));
    const logs: string[] = [];
    const result = await train(referenceConfig({ output_dir: out, backend: 'wasm' }), { progress: false, log: (l) => logs.push(l) });
    expect(result.steps).toEqual([]);
    expect(result.outputs).toEqual([path.join(out, 'uce-Van_Gogh-and-1-more.safetensors')]);
    expect(logs.join('\n')).toMatch(/uce: 2 erase prompt\(s\) toward "art", 2 preserved/);

    // The file: the 8 K/V weights under their bare diffusers names (as the official UCE saves
    // them), float32, with provenance.
    const file = await SafetensorsFile.open(result.outputs[0]!);
    try {
      expect([...file.keys()].sort()).toEqual([...ref.keys()].sort());
      for (const key of file.keys()) {
        expect(isCrossAttnKV(key)).toBe(true);
        expect(file.info(key).dtype).toBe('F32');
        expect(diff(await file.readFloat32(key), get(ref, key).data).rel, key).toBeLessThanOrEqual(TOL);
      }
      expect(file.metadata['sd_workbench.method']).toBe('uce');
      expect(file.metadata['sd_workbench.concept']).toBe('Van Gogh; Kelly McKernan');
      expect(file.metadata['sd_workbench.lambda']).toBe('0.5');
    } finally {
      await file.close();
    }
    expect((await readDelta(result.outputs[0]!)).info).toMatchObject({ method: 'uce', baseModel: 'tiny-sd' });

    // Applied to a fresh model: the K/V weights become the reference's, everything else stays the base tensor.
    const fresh = await loadStableDiffusion(TINY_SD);
    const applied = await uce.applyArtifact(fresh, result.outputs[0]!);
    try {
      const before = new Map([...fresh.unet.store.keys()].map((k) => [k, fresh.unet.store.get(k)!]));
      for (const o of applied.patch.params ?? []) fresh.unet.store.override(o.key, o.value);
      for (const [key, base] of before) {
        const now = fresh.unet.store.get(key)!;
        if (ref.has(key)) expect(diff(await now.data(), get(ref, key).data).rel, key).toBeLessThanOrEqual(TOL);
        else expect(now, key).toBe(base);
      }
      expect((applied.patch.params ?? []).every((o) => o.component === 'unet')).toBe(true);
    } finally {
      fresh.unet.store.clearOverrides();
      applied.dispose();
      disposeStableDiffusion(fresh);
    }
  });

  it('leaves the base weights of the model it edits untouched and frees what it made', async () => {
    const original = await SafetensorsFile.open(path.join(TINY_SD, 'unet/diffusion_pytorch_model.safetensors'));
    try {
      const tensorsBefore = tf.memory().numTensors;
      const state = await uce.setup({ model: async () => model, random: setupRandom(0), log: () => {} }, referenceConfig());
      // Only the 8 edited weights outlive setup, and dispose frees them.
      expect(tf.memory().numTensors).toBe(tensorsBefore + ref.size);
      try {
        for (const key of ref.keys()) expect([...(await model.unet.store.get(key)!.data())]).toEqual([...(await original.readFloat32(key))]);
        const patch = uce.generationPatch(state);
        expect(patch.params?.map((o) => o.key).sort()).toEqual([...ref.keys()].sort());
      } finally {
        uce.dispose(state);
      }
      expect(tf.memory().numTensors).toBe(tensorsBefore);
    } finally {
      await original.close();
    }
  });
});
