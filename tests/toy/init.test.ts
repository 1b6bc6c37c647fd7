/**
 * From-scratch initialisation: the distributions PyTorch and transformers give a fresh module
 * (bounds and spreads computed here from the formulas, not read back from the code), seeded and
 * independent of the order parameters are listed in.
 */
import { describe, expect, it } from 'vitest';

import { clipTextInit, initParameters, torchDefaultInit } from '../../src/models/init.js';

const manifest = new Map<string, number[]>([
  ['conv_in.weight', [64, 16, 3, 3]],
  ['conv_in.bias', [64]],
  ['proj.weight', [128, 256]],
  ['proj.bias', [128]],
  ['norm.weight', [64]],
  ['norm.bias', [64]],
]);

function stats(xs: Float32Array): { min: number; max: number; mean: number; std: number } {
  let sum = 0;
  let sq = 0;
  let min = Infinity;
  let max = -Infinity;
  for (const x of xs) {
    sum += x;
    sq += x * x;
    min = Math.min(min, x);
    max = Math.max(max, x);
  }
  const mean = sum / xs.length;
  return { min, max, mean, std: Math.sqrt(sq / xs.length - mean * mean) };
}

describe('torch default init', () => {
  const p = initParameters(manifest, torchDefaultInit, 7);
  it('Linear/Conv weights and biases are U(±1/√fan_in), norms ones and zeros', () => {
    const convBound = 1 / Math.sqrt(16 * 9);
    const w = stats(p.get('conv_in.weight')!.data);
    expect(w.max).toBeLessThanOrEqual(convBound);
    expect(w.min).toBeGreaterThanOrEqual(-convBound);
    expect(w.std).toBeCloseTo(convBound / Math.sqrt(3), 3);
    const b = stats(p.get('conv_in.bias')!.data);
    expect(Math.max(Math.abs(b.min), b.max)).toBeLessThanOrEqual(convBound);
    expect(b.max - b.min).toBeGreaterThan(convBound); // spread over the range, not constant
    const linBound = 1 / Math.sqrt(256);
    const l = stats(p.get('proj.weight')!.data);
    expect(l.max).toBeLessThanOrEqual(linBound);
    expect(l.std).toBeCloseTo(linBound / Math.sqrt(3), 3);
    expect([...p.get('norm.weight')!.data].every((v) => v === 1)).toBe(true);
    expect([...p.get('norm.bias')!.data].every((v) => v === 0)).toBe(true);
  });

  it('is seeded per parameter: same seed same values, whatever the order; another seed differs', () => {
    const reversed = initParameters(new Map([...manifest].reverse()), torchDefaultInit, 7);
    for (const [k, v] of p) expect(reversed.get(k)!.data).toEqual(v.data);
    expect(initParameters(manifest, torchDefaultInit, 8).get('proj.weight')!.data).not.toEqual(p.get('proj.weight')!.data);
  });
});

describe('CLIP text init', () => {
  it('embeddings N(0, 0.02), attention and MLP normals as transformers scales them, biases 0', () => {
    const d = 64;
    const layers = 2;
    const m = new Map<string, number[]>([
      ['text_model.embeddings.token_embedding.weight', [4000, d]],
      ['text_model.encoder.layers.0.self_attn.q_proj.weight', [d, d]],
      ['text_model.encoder.layers.0.self_attn.q_proj.bias', [d]],
      ['text_model.encoder.layers.0.self_attn.out_proj.weight', [d, d]],
      ['text_model.encoder.layers.0.mlp.fc1.weight', [4 * d, d]],
      ['text_model.encoder.layers.0.layer_norm1.weight', [d]],
    ]);
    const p = initParameters(m, clipTextInit({ width: d, numLayers: layers }), 1);
    const std = (k: string) => stats(p.get(k)!.data).std;
    expect(std('text_model.embeddings.token_embedding.weight')).toBeCloseTo(0.02, 3);
    expect(std('text_model.encoder.layers.0.self_attn.q_proj.weight') / (d ** -0.5 * (2 * layers) ** -0.5)).toBeCloseTo(1, 1);
    expect(std('text_model.encoder.layers.0.self_attn.out_proj.weight') / d ** -0.5).toBeCloseTo(1, 1);
    expect(std('text_model.encoder.layers.0.mlp.fc1.weight') / (2 * d) ** -0.5).toBeCloseTo(1, 1);
    expect([...p.get('text_model.encoder.layers.0.self_attn.q_proj.bias')!.data].every((v) => v === 0)).toBe(true);
    expect([...p.get('text_model.encoder.layers.0.layer_norm1.weight')!.data].every((v) => v === 1)).toBe(true);
  });
});
