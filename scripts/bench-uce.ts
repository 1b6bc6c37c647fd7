/**
 * UCE benchmark (not a test) at full SD 1.5 size on the CPU: the closed-form solve and the edit of
 * all 32 cross-attention K/V weights (16 to_k + 16 to_v, 320/640/1280 × 768) from random text
 * states, for a few concept counts; the textbook per-layer solve W'·A = B for comparison (time and
 * agreement); and the text-encoder pass for the prompts of an artist-erasure run on a randomly
 * initialised SD 1.5-shaped CLIP text encoder (12 layers, width 768).
 *
 * Shapes come from ../shared/fixtures/manifests/sd15.json (the diffusers configs of SD 1.5).
 *
 * Usage: npm run bench:uce -- [--no-text] [--backend wasm|cpu|tensorflow]
 * (package.json: "bench:uce": "tsx scripts/bench-uce.ts")
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import * as tf from '@tensorflow/tfjs';

import { initBackend, type BackendName } from '../src/backend.js';
import { paramStore } from '../src/io/weights.js';
import { cholesky, choleskySolveInPlace } from '../src/methods/linalg.js';
import { applyUce, lastTokenStates, solveUce, ucePrompts, type UceInputs } from '../src/methods/uce.js';
import { clipTextManifest } from '../src/models/components.js';
import { parseClipTextConfig } from '../src/models/clip/config.js';
import { defaultTokenizer } from '../src/models/clip/tokenizer.js';
import { parseUnetConfig } from '../src/models/unet/config.js';
import { isCrossAttnKV } from '../src/models/unet/params.js';
import { unetManifest } from '../src/models/unet/unet.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const SD15_MANIFEST = path.resolve(here, '../../shared/fixtures/manifests/sd15.json');

const args = process.argv.slice(2);
const withText = !args.includes('--no-text');
const backend = (args.find((_, i) => args[i - 1] === '--backend') ?? 'wasm') as BackendName;

/** Deterministic N(0, 1) draws (Box–Muller over a 32-bit LCG): the bench needs shapes, not quality. */
function normals(seed: number): (n: number, scale?: number) => Float64Array {
  let state = seed >>> 0;
  const uniform = () => {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    return (state + 0.5) / 2 ** 32;
  };
  return (n, scale = 1) => {
    const out = new Float64Array(n);
    for (let i = 0; i < n; i++) out[i] = scale * Math.sqrt(-2 * Math.log(uniform())) * Math.cos(2 * Math.PI * uniform());
    return out;
  };
}

function ms(t0: number): number {
  return performance.now() - t0;
}

function fmt(x: number): string {
  return x >= 100 ? x.toFixed(0) : x.toFixed(1);
}

interface Sd15 {
  readonly kv: readonly { readonly key: string; readonly dOut: number; readonly dIn: number }[];
  readonly unetJson: unknown;
  readonly textJson: unknown;
}

async function sd15(): Promise<Sd15> {
  const manifest = JSON.parse(await readFile(SD15_MANIFEST, 'utf8')) as {
    components: { unet: { diffusers_config: unknown }; text_encoder: { diffusers_config: unknown } };
  };
  const unetJson = manifest.components.unet.diffusers_config;
  const shapes = unetManifest(parseUnetConfig(unetJson, SD15_MANIFEST));
  const kv = [...shapes]
    .filter(([k]) => isCrossAttnKV(k) && k.endsWith('.weight'))
    .map(([key, [dOut, dIn]]) => ({ key, dOut: dOut!, dIn: dIn! }));
  return { kv, unetJson, textJson: manifest.components.text_encoder.diffusers_config };
}

/** Random UCE inputs of width d: c vectors with CLIP-like norms (≈ √d), guides shared like "art". */
function randomInputs(d: number, erase: number, preserve: number, seed: number): UceInputs {
  const draw = normals(seed);
  const guide = draw(d);
  return {
    width: d,
    erase: Array.from({ length: erase }, () => ({ c: draw(d), guide })),
    preserve: Array.from({ length: preserve }, () => draw(d)),
    lambda: 0.5,
    eraseScale: 1,
    preserveScale: 1,
  };
}

/** The textbook form for one layer: B = λW + s_e Σ v*ᵢcᵢᵀ + s_p Σ W cⱼcⱼᵀ, then W' = B·A⁻¹ (A's factor given). */
function directEdit(inputs: UceInputs, factor: ReturnType<typeof cholesky>, w: Float32Array, dOut: number): Float32Array {
  const d = inputs.width;
  const b = new Float64Array(dOut * d);
  for (let i = 0; i < b.length; i++) b[i] = inputs.lambda * w[i]!;
  const wTimes = (c: Float64Array) => {
    const out = new Float64Array(dOut);
    for (let o = 0; o < dOut; o++) {
      let s = 0;
      for (let k = 0; k < d; k++) s += w[o * d + k]! * c[k]!;
      out[o] = s;
    }
    return out;
  };
  const addOuter = (v: Float64Array, c: Float64Array, scale: number) => {
    for (let o = 0; o < dOut; o++) {
      const s = scale * v[o]!;
      for (let k = 0; k < d; k++) b[o * d + k] = b[o * d + k]! + s * c[k]!;
    }
  };
  for (const e of inputs.erase) addOuter(wTimes(e.guide), e.c, inputs.eraseScale);
  for (const c of inputs.preserve) addOuter(wTimes(c), c, inputs.preserveScale);
  // W'·A = B with A symmetric ⇔ A·W'ᵀ = Bᵀ: the rows of W' are solutions for the rows of B.
  choleskySolveInPlace(factor, b);
  return Float32Array.from(b);
}

function relDiff(a: Float32Array, b: Float32Array): number {
  let maxAbs = 0;
  let scale = 0;
  for (let i = 0; i < a.length; i++) {
    maxAbs = Math.max(maxAbs, Math.abs(a[i]! - b[i]!));
    scale = Math.max(scale, Math.abs(b[i]!));
  }
  return maxAbs / scale;
}

/** Edits every weight with the rank/dense products on the tfjs backend; returns the edited data and the time. */
async function timedApply(sol: ReturnType<typeof solveUce>, weights: ReadonlyMap<string, tf.Tensor>): Promise<{ ms: number; out: Map<string, Float32Array> }> {
  const t0 = performance.now();
  const edited = applyUce(sol, weights);
  const out = new Map<string, Float32Array>();
  for (const [k, t] of edited) out.set(k, (await t.data()) as Float32Array);
  const t = ms(t0);
  tf.dispose([...edited.values()]);
  return { ms: t, out };
}

async function benchSolve(model: Sd15): Promise<void> {
  const info = await initBackend({ backend, log: () => {} });
  const d = model.kv[0]!.dIn;
  const draw = normals(7);
  const data = new Map(model.kv.map((l) => [l.key, Float32Array.from(draw(l.dOut * l.dIn, 0.02))]));
  const weights = new Map(model.kv.map((l) => [l.key, tf.tensor2d(data.get(l.key)!, [l.dOut, l.dIn])]));
  const totalRows = model.kv.reduce((a, l) => a + l.dOut, 0);
  console.log(`SD 1.5 cross-attention K/V: ${model.kv.length} weights (${totalRows} rows × ${d}); A, Cholesky and solve in float64 JS; products on tfjs ${info.name}${info.threads === undefined ? '' : ` (${info.threads} threads)`}\n`);
  console.log('concepts (erase prompts / preserve)      | A + Cholesky + solve | edit 32 weights | total');
  const cases = [
    { label: '1 artist, templates (6 / 0)', erase: 6, preserve: 0 },
    { label: '10 artists, templates (60 / 10)', erase: 60, preserve: 10 },
    { label: '100 artists, templates (600 / 500)', erase: 600, preserve: 500 },
    { label: '1000 artists, no templates (1000 / 1000)', erase: 1000, preserve: 1000 },
  ];
  await timedApply(solveUce(randomInputs(d, 1, 0, 3)), weights); // warm-up: kernels, XNNPACK operators
  for (const c of cases) {
    const inputs = randomInputs(d, c.erase, c.preserve, 11);
    // Best of 3: the machine is shared.
    let tSolve = Infinity;
    let tEdit = Infinity;
    for (let rep = 0; rep < 3; rep++) {
      const t0 = performance.now();
      const sol = solveUce(inputs);
      tSolve = Math.min(tSolve, ms(t0));
      tEdit = Math.min(tEdit, (await timedApply(sol, weights)).ms);
    }
    console.log(`${c.label.padEnd(41)}| ${fmt(tSolve).padStart(17)} ms | ${fmt(tEdit).padStart(12)} ms | ${fmt(tSolve + tEdit).padStart(6)} ms`);
  }

  console.log("\nTextbook per-layer solve W'·A = B in float64 JS (B formed per layer, A factored once) vs the above (10 artists, templates):");
  const inputs = randomInputs(d, 60, 10, 11);
  const sol = solveUce(inputs);
  const { out: fast } = await timedApply(sol, weights);
  const a = new Float64Array(d * d);
  for (let i = 0; i < d; i++) a[i * d + i] = inputs.lambda;
  for (const [c, s] of [...inputs.erase.map((e) => [e.c, inputs.eraseScale] as const), ...inputs.preserve.map((p) => [p, inputs.preserveScale] as const)]) {
    for (let r = 0; r < d; r++) for (let k = 0; k <= r; k++) a[r * d + k] = a[r * d + k]! + s * c[r]! * c[k]!;
  }
  const t0 = performance.now();
  const factor = cholesky(a, d);
  console.log(`  Cholesky of A (${d}×${d}): ${fmt(ms(t0))} ms`);
  let estimate = 0;
  for (const dOut of [320, 640, 1280]) {
    const layer = model.kv.find((l) => l.dOut === dOut)!;
    const t1 = performance.now();
    const direct = directEdit(inputs, factor, data.get(layer.key)!, dOut);
    const t = ms(t1);
    estimate += t * model.kv.filter((l) => l.dOut === dOut).length;
    console.log(`  ${dOut}×${d}: ${fmt(t)} ms per layer; max rel difference to the rank form ${relDiff(fast.get(layer.key)!, direct).toExponential(2)}`);
  }
  console.log(`  all 32 weights the textbook way ≈ ${fmt(estimate / 1000)} s`);
  tf.dispose([...weights.values()]);
}

async function benchText(model: Sd15): Promise<void> {
  const cfg = parseClipTextConfig(model.textJson, SD15_MANIFEST);
  const t0 = performance.now();
  const tensors = new Map<string, tf.Tensor>();
  for (const [key, shape] of clipTextManifest(cfg)) {
    const isNormWeight = /layer_norm\d?\.weight$|final_layer_norm\.weight$/.test(key);
    const isBias = key.endsWith('.bias');
    tensors.set(key, isNormWeight ? tf.ones(shape) : isBias ? tf.zeros(shape) : tf.randomNormal(shape, 0, 0.02, 'float32', 1));
  }
  const text = { cfg, store: paramStore(tensors, 'random SD 1.5 text encoder'), files: [] };
  const tokenizer = await defaultTokenizer('sd1');
  console.log(`\nText encoder (random SD 1.5 CLIP: ${cfg.numLayers} layers, width ${cfg.width}) on tfjs ${tf.getBackend()}; weights made in ${fmt(ms(t0))} ms`);
  const artists = ['Van Gogh', 'Kelly McKernan', 'Thomas Kinkade', 'Pablo Picasso', 'Tyler Edlin', 'Kilian Eng', 'Claude Monet', 'Salvador Dali', 'Leonardo da Vinci', 'Rembrandt'];
  const preserve = ['Frida Kahlo', 'Johannes Vermeer', 'a photo of a dog', 'Gustav Klimt', 'Edvard Munch'];
  const prompts = ucePrompts({ concepts: artists, guide_concepts: undefined, preserve_concepts: preserve, concept_type: 'art', templates: true });
  const all = [...prompts.erase.flatMap((e) => [e.prompt, e.guide]), ...prompts.preserve];
  const distinct = new Set(all).size;
  await lastTokenStates({ tokenizer, text }, ['warm up']);
  const t1 = performance.now();
  await lastTokenStates({ tokenizer, text }, all);
  const tText = ms(t1);
  console.log(`  ${distinct} distinct prompts (10 artists × 6 with templates, "art", 5 preserve), last-token states: ${fmt(tText)} ms (${fmt(tText / distinct)} ms/prompt)`);
  const ids = [tokenizer.encode('painting by Van Gogh')];
  const t2 = performance.now();
  const { encodeText } = await import('../src/models/clip/text-encoder-tfjs.js');
  const full = encodeText(text.store, cfg, ids);
  await full.data();
  full.dispose();
  console.log(`  for scale: one prompt through all 77 positions: ${fmt(ms(t2))} ms (UCE feeds only the tokens up to the last real one: the encoder is causal)`);
  for (const t of tensors.values()) t.dispose();
}

async function main(): Promise<void> {
  console.log(`node ${process.version}\n`);
  const model = await sd15();
  await benchSolve(model);
  if (withText) await benchText(model);
}

await main();
