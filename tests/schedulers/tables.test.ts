/**
 * The noise-schedule tables against diffusers' float32 tensors (bit for bit) and the timestep
 * grids against values worked out by hand from diffusers' numpy formulas.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import {
  fma32,
  integerTimesteps,
  noiseSchedule,
  roundHalfEven,
  sigmaTimesteps,
  type NoiseSchedule,
} from '../../src/schedulers/tables.js';
import { get, readRef, type RefTensor } from '../helpers/fixtures.js';

let ref: Map<string, RefTensor>;
let sd: NoiseSchedule;

beforeAll(async () => {
  ref = await readRef('scheduler.safetensors');
  sd = noiseSchedule({ trainTimesteps: 1000, betaSchedule: 'scaled_linear', betaStart: 0.00085, betaEnd: 0.012 });
});

/** Indices where two float32 tables differ. */
function mismatches(actual: Float32Array, expected: Float32Array): number[] {
  const out: number[] = [];
  for (let i = 0; i < expected.length; i++) if (actual[i] !== expected[i]) out.push(i);
  return out;
}

describe('noise schedule (SD 1.x scaled_linear)', () => {
  it('betas equal diffusers bit for bit', () => {
    const bad = mismatches(sd.betas, get(ref, 'betas').data);
    expect(bad, `betas differ at ${bad.length} indices: ${bad.slice(0, 5).join(', ')}`).toEqual([]);
  });

  it('alphas_cumprod equal diffusers bit for bit', () => {
    const bad = mismatches(sd.alphasCumprod, get(ref, 'alphas_cumprod').data);
    expect(bad, `alphas_cumprod differ at ${bad.length} indices: ${bad.slice(0, 5).join(', ')}`).toEqual([]);
  });

  it('linear and cosine schedules follow their definitions', () => {
    const linear = noiseSchedule({ trainTimesteps: 1000, betaSchedule: 'linear', betaStart: 1e-4, betaEnd: 0.02 });
    expect(linear.betas[0]).toBe(Math.fround(1e-4));
    expect(linear.betas[999]).toBe(Math.fround(0.02));
    expect(linear.betas[500]).toBeCloseTo(1e-4 + (500 * (0.02 - 1e-4)) / 999, 8);
    const cosine = noiseSchedule({ trainTimesteps: 1000, betaSchedule: 'squaredcos_cap_v2', betaStart: 1, betaEnd: 1 });
    const alphaBar = (t: number) => Math.cos(((t + 0.008) / 1.008) * (Math.PI / 2)) ** 2;
    expect(cosine.betas[0]).toBe(Math.fround(1 - alphaBar(1 / 1000) / alphaBar(0)));
    expect(cosine.betas[999]).toBe(Math.fround(0.999)); // capped
  });

  it('zero terminal SNR keeps ᾱ₀ and sends ᾱ_T to 0', () => {
    const rescaled = noiseSchedule({
      trainTimesteps: 1000,
      betaSchedule: 'scaled_linear',
      betaStart: 0.00085,
      betaEnd: 0.012,
      rescaleZeroTerminalSnr: true,
    });
    expect(rescaled.alphasCumprod[999]).toBe(0);
    expect(rescaled.alphasCumprod[0]).toBeCloseTo(get(ref, 'alphas_cumprod').data[0]!, 6);
  });
});

describe('timestep grids', () => {
  it('leading (steps_offset 1) equals diffusers DDIM set_timesteps(10/20/50)', () => {
    for (const n of [10, 20, 50]) {
      expect(integerTimesteps('leading', n, 1000, 1)).toEqual(Array.from(get(ref, `ddim_timesteps_${n}`).data));
    }
  });

  it('trailing and linspace round half to even as numpy', () => {
    // np.round(np.arange(1000, 0, -62.5)) - 1: 812.5 → 812, 687.5 → 688, 562.5 → 562, …
    expect(integerTimesteps('trailing', 16, 1000, 0)).toEqual([
      999, 937, 874, 811, 749, 687, 624, 561, 499, 437, 374, 311, 249, 187, 124, 61,
    ]);
    // np.linspace(0, 999, 7) = 0, 166.5, 333, 499.5, 666, 832.5, 999
    expect(integerTimesteps('linspace', 7, 1000, 0)).toEqual([999, 832, 666, 500, 333, 166, 0]);
    // Euler/LMS keep linspace fractional (float32)
    expect(sigmaTimesteps('linspace', 7, 1000, 0)).toEqual([999, 832.5, 666, 499.5, 333, 166.5, 0]);
  });

  it('rejects step counts outside [1, T]', () => {
    expect(() => integerTimesteps('leading', 0, 1000, 1)).toThrow(/\[1, 1000\]/);
    expect(() => integerTimesteps('leading', 1001, 1000, 1)).toThrow(/\[1, 1000\]/);
  });
});

describe('float32 helpers', () => {
  it('fma32 rounds once, also where rounding the double sum would hit a tie', () => {
    const a = 1 + 2 ** -12;
    // a² = 1 + 2⁻¹¹ + 2⁻²⁴ exactly: a tie in float32, which rounds to even (down)
    expect(fma32(a, a, 0)).toBe(1 + 2 ** -11);
    // + 2⁻⁶⁰ lies just above the tie: the correct single rounding is up, although the double
    // sum 1 + 2⁻¹¹ + 2⁻²⁴ (the 2⁻⁶⁰ is lost) would round down again
    expect(fma32(a, a, 2 ** -60)).toBe(1 + 2 ** -11 + 2 ** -23);
    expect(fma32(a, a, -(2 ** -60))).toBe(1 + 2 ** -11);
  });

  it('roundHalfEven is numpy round', () => {
    expect([0.5, 1.5, 2.5, -0.5, -1.5, 812.5, 2.4, 2.6].map(roundHalfEven)).toEqual([0, 2, 2, -0, -2, 812, 2, 3]);
  });
});
