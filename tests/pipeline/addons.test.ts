/**
 * Add-ons at generation time: spec parsing, the registry lookup (with the not-yet-available
 * error), composition order (deltas replace, LoRAs add, hypernetworks chain), and whole runs —
 * an embedding changes the image only when its word is in the prompt, hypernetwork strength 0 is
 * the base model, a delta replaces its tensors for the run only — with A1111's infotext keys.
 */
import { createHash } from 'node:crypto';
import { mkdtemp, readFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { initBackend } from '../../src/backend.js';
import { writeSafetensors } from '../../src/io/safetensors.js';
import { hypernetwork, hypernetworkConfigSchema, type HypernetworkState } from '../../src/methods/hypernetwork.js';
import { METHODS } from '../../src/methods/registry.js';
import { TOKEN_TABLE_KEY } from '../../src/methods/textual-inversion.js';
import type { ModelPatch } from '../../src/methods/types.js';
import { composePatches, loadAddons, parseAddonSpec, type AddonSpec } from '../../src/pipeline/addons.js';
import { disposeStableDiffusion, loadStableDiffusion, type StableDiffusion } from '../../src/pipeline/load.js';
import { generate } from '../../src/pipeline/txt2img.js';
import { setupRandom } from '../../src/train/rng-state.js';
import { TINY_SD } from '../helpers/fixtures.js';

let dir: string;
let model: StableDiffusion;
beforeAll(async () => {
  await initBackend({ backend: 'wasm', log: () => {} });
  dir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-addons-'));
  model = await loadStableDiffusion(TINY_SD);
});
afterAll(() => disposeStableDiffusion(model));

const sha256 = async (file: string) => createHash('sha256').update(await readFile(file)).digest('hex');

/** Final latents of a short fixed run. */
async function latents(m: StableDiffusion, prompt: string, patch?: ModelPatch): Promise<number[]> {
  const r = await generate(m, { prompts: [prompt], steps: 3, seed: 7, sampler: 'ddim', guidance: 5, decode: false, ...(patch === undefined ? {} : { patch }) });
  return Array.from(r.latents);
}

/** An A1111 emb_params embedding of random vectors (far from any word's row). */
async function embeddingFile(name: string, seed: number, numVectors = 1): Promise<string> {
  const file = path.join(dir, `${name}.safetensors`);
  const data = tf.tidy(() => tf.randomNormal([numVectors, 32], 0, 1, 'float32', seed).dataSync() as Float32Array);
  await writeSafetensors(file, { emb_params: { dtype: 'F32', shape: [numVectors, 32], data } });
  return file;
}

describe('parseAddonSpec', () => {
  it('reads file[:strength], keeping colons that do not end in a number', () => {
    expect(parseAddonSpec('hypernetwork', 'style.pt')).toEqual({ kind: 'hypernetwork', file: 'style.pt', strength: 1 });
    expect(parseAddonSpec('hypernetwork', 'style.pt:0.8')).toEqual({ kind: 'hypernetwork', file: 'style.pt', strength: 0.8 });
    expect(parseAddonSpec('lora', 'C:\\loras\\a.safetensors:-0.5')).toEqual({ kind: 'lora', file: 'C:\\loras\\a.safetensors', strength: -0.5 });
    expect(parseAddonSpec('lora', 'dir:with:colons/a.safetensors')).toEqual({ kind: 'lora', file: 'dir:with:colons/a.safetensors', strength: 1 });
    expect(parseAddonSpec('hypernetwork', 'x.pt:1e-1').strength).toBe(0.1);
    expect(() => parseAddonSpec('embedding', 'cat.pt:0.5')).toThrow("--embedding 'cat.pt:0.5': embedding files take no strength (':0.5'); give the file alone");
    expect(() => parseAddonSpec('delta', ' ')).toThrow('--delta: expected a file, found an empty value');
  });
});

describe('method lookup', () => {
  it('a kind whose method is not registered is "not available yet", before anything loads', async () => {
    const noLora = METHODS.filter((m) => m.id !== 'lora' && m.id !== 'dreambooth');
    const spec: AddonSpec = { kind: 'lora', file: '/nonexistent.safetensors', strength: 1 };
    await expect(loadAddons(model, [spec], { methods: noLora })).rejects.toThrow(
      /^--lora: not available yet \(none of the methods lora, dreambooth is registered; known methods: textual_inversion, /,
    );
    const noHypernetwork = METHODS.filter((m) => m.id !== 'hypernetwork');
    await expect(loadAddons(model, [{ kind: 'hypernetwork', file: '/nonexistent.pt', strength: 1 }], { methods: noHypernetwork })).rejects.toThrow(
      /^--hypernetwork: not available yet \(method hypernetwork is not registered; known methods: textual_inversion, /,
    );
  });
});

describe('composePatches', () => {
  const key = 'conv_in.bias';
  const base = () => model.unet.store.get(key)!;
  const plus = (v: number) => tf.add(base(), v);

  it('deltas replace, LoRAs add their increment on top (in either order), a lone value passes unchanged', () => {
    const owned: tf.Tensor[] = [];
    const [delta, lora1, lora2] = [plus(10), plus(1), plus(2)];
    const patch = composePatches(
      model,
      [
        { kind: 'lora', patch: { params: [{ component: 'unet', key, value: lora1 }] } },
        { kind: 'delta', patch: { params: [{ component: 'unet', key, value: delta }] } },
        { kind: 'lora', patch: { params: [{ component: 'unet', key, value: lora2 }] } },
      ],
      owned,
    );
    expect(patch.params).toHaveLength(1);
    const want = Array.from(base().dataSync(), (b) => b + 13);
    Array.from(patch.params![0]!.value.dataSync()).forEach((v, i) => expect(v).toBeCloseTo(want[i]!, 4));
    expect(owned).toHaveLength(1);
    const lone = composePatches(model, [{ kind: 'lora', patch: { params: [{ component: 'unet', key, value: lora1 }] } }], []);
    expect(lone.params![0]!.value).toBe(lora1);
    expect(() => composePatches(model, [{ kind: 'delta', patch: { params: [{ component: 'unet', key: 'no.such.weight', value: lora1 }] } }], [])).toThrow(
      "add-ons: the delta overrides 'no.such.weight', which is not a parameter of this model's unet",
    );
    tf.dispose([delta, lora1, lora2, ...owned]);
  });

  it('hypernetwork hooks chain K through K and V through V; prompt rewrites in sequence', () => {
    const first: ModelPatch = { unetHooks: { attentionContext: (c) => ({ k: tf.add(c, 1), v: tf.add(c, 2) }) }, rewritePrompt: (p) => `${p} one` };
    const second: ModelPatch = { unetHooks: { attentionContext: (c) => ({ k: tf.mul(c, 3), v: tf.mul(c, 5) }) }, rewritePrompt: (p) => `${p} two` };
    const patch = composePatches(model, [{ kind: 'hypernetwork', patch: first }, { kind: 'hypernetwork', patch: second }], []);
    const out = tf.tidy(() => {
      const r = patch.unetHooks!.attentionContext!(tf.tensor1d([1, 10]), { path: 'x', width: 2, kind: 'cross' });
      return [Array.from(r.k.dataSync()), Array.from(r.v.dataSync())];
    });
    expect(out).toEqual([
      [6, 33],
      [15, 60],
    ]);
    expect(patch.rewritePrompt!('zero')).toBe('zero one two');
  });
});

describe('generate with add-ons', () => {
  it('an embedding changes the result only when its word is in the prompt; several load together; TI hashes recorded', async () => {
    const fresh = await loadStableDiffusion(TINY_SD); // embeddings add tokens to the tokenizer
    const thing = await embeddingFile('my-thing', 1);
    const other = await embeddingFile('other-thing', 2, 2);
    const base = await loadStableDiffusion(TINY_SD);
    const addons = await loadAddons(fresh, [
      { kind: 'embedding', file: thing, strength: 1 },
      { kind: 'embedding', file: other, strength: 1 },
    ]);
    try {
      expect(addons.triggers).toEqual(['my-thing', 'other-thing']);
      // A1111 lists the embeddings a run used: those whose word is in a prompt or negative prompt.
      const [thingHash, otherHash] = [(await sha256(thing)).slice(0, 12), (await sha256(other)).slice(0, 12)];
      expect(addons.infotextFor(['a photo of my-thing', 'blurry, other-thing'])).toEqual({ 'TI hashes': `my-thing: ${thingHash}, other-thing: ${otherHash}` });
      expect(addons.infotextFor(['a photo of other-thing', ''])).toEqual({ 'TI hashes': `other-thing: ${otherHash}` });
      expect(addons.infotextFor(['a photo of a cat', ''])).toEqual({});
      expect(addons.infotext).toEqual({ 'TI hashes': `my-thing: ${thingHash}, other-thing: ${otherHash}` }); // everything loaded
      const without = 'a photo of a cat';
      expect(await latents(fresh, without, addons.patch)).toEqual(await latents(base, without));
      for (const prompt of ['a photo of my-thing', 'a photo of other-thing']) {
        const withWord = await latents(fresh, prompt, addons.patch);
        expect(withWord).not.toEqual(await latents(base, prompt));
        expect(withWord).not.toEqual(await latents(base, without));
      }
      expect(await latents(fresh, 'a photo of my-thing', addons.patch)).not.toEqual(await latents(fresh, 'a photo of other-thing', addons.patch));
    } finally {
      addons.dispose();
      disposeStableDiffusion(fresh);
      disposeStableDiffusion(base);
    }
  });

  it('one embedding goes through the method’s applyArtifact: equal to its word’s own row, it generates like that word', async () => {
    const fresh = await loadStableDiffusion(TINY_SD);
    const catId = fresh.tokenizer.contentIds('cat')[0]!;
    const row = tf.tidy(() => tf.slice(fresh.text.store.get(TOKEN_TABLE_KEY)!, [catId, 0], [1, -1]).dataSync() as Float32Array);
    const file = path.join(dir, 'zz-kitty.safetensors');
    await writeSafetensors(file, { emb_params: { dtype: 'F32', shape: [1, 32], data: row } });
    const addons = await loadAddons(fresh, [{ kind: 'embedding', file, strength: 1 }]);
    try {
      expect(await latents(fresh, 'a photo of zz-kitty', addons.patch)).toEqual(await latents(fresh, 'a photo of cat'));
    } finally {
      addons.dispose();
      disposeStableDiffusion(fresh);
    }
  });

  it('hypernetwork strength 0 is the base model bit for bit; other strengths change it; Hypernet keys recorded', async () => {
    const cfg = hypernetworkConfigSchema.parse({
      method: 'hypernetwork',
      model: TINY_SD,
      output_dir: dir,
      data: { dir },
      enable_sizes: [32, 64],
      weight_initialization: 'XavierNormal',
      hypernetwork_name: 'tiny-style',
    });
    const s = (await hypernetwork.setup({ model: async () => model, random: setupRandom(1), log: () => {} }, cfg)) as HypernetworkState;
    const file = path.join(dir, 'tiny-style.pt');
    try {
      await (await hypernetwork.artifacts(s, 1))[0]!.write(file);
    } finally {
      hypernetwork.dispose(s);
    }
    const prompt = 'a painting of a house';
    const base = await latents(model, prompt);
    const results = new Map<number, number[]>();
    for (const strength of [0, 0.8]) {
      const addons = await loadAddons(model, [{ kind: 'hypernetwork', file, strength }]);
      try {
        results.set(strength, await latents(model, prompt, addons.patch));
        expect(addons.infotextFor([prompt])).toEqual({ Hypernet: 'tiny-style', 'Hypernet hash': (await sha256(file)).slice(0, 10), 'Hypernet strength': String(strength) });
      } finally {
        addons.dispose();
      }
    }
    expect(results.get(0)).toEqual(base);
    expect(results.get(0.8)).not.toEqual(base);
    const full = await loadAddons(model, [{ kind: 'hypernetwork', file, strength: 1 }]);
    expect(full.infotextFor([prompt])).not.toHaveProperty('Hypernet strength'); // A1111 wrote it only below 1
    full.dispose();
  });

  it('a delta replaces its tensors for the run only; Delta hashes recorded', async () => {
    // A bare UNet state dict, as the official ESD code saves its edits.
    const key = 'conv_in.bias';
    const before = Array.from(model.unet.store.get(key)!.dataSync());
    const file = path.join(dir, 'edit.safetensors');
    await writeSafetensors(file, { [key]: { dtype: 'F32', shape: [before.length], data: Float32Array.from(before, (v) => v + 0.5) } });
    const prompt = 'a photo of a dog';
    const base = await latents(model, prompt);
    const addons = await loadAddons(model, [{ kind: 'delta', file, strength: 1 }]);
    try {
      expect(addons.infotextFor([prompt])).toEqual({ 'Delta hashes': `edit: ${(await sha256(file)).slice(0, 12)}` });
      expect(await latents(model, prompt, addons.patch)).not.toEqual(base);
      expect(Array.from(model.unet.store.get(key)!.dataSync())).toEqual(before);
      expect(await latents(model, prompt)).toEqual(base);
    } finally {
      addons.dispose();
    }
  });
});
