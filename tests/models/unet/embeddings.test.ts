/**
 * Sinusoidal timestep features: bit-level agreement with PyTorch's float32 table (the fixture's
 * `time_proj`), and the textbook formula for fractional timesteps.
 */
import * as tf from '@tensorflow/tfjs';
import { beforeAll, describe, expect, it } from 'vitest';
import { initBackend } from '../../../src/backend.js';
import { expf32Torch, timestepFeatures } from '../../../src/models/unet/embeddings.js';
import { tfOps } from '../../../src/ops/tfjs-ops.js';
import { diff, get, readRef } from '../../helpers/fixtures.js';

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: () => {} });
});

function features(timesteps: number[], dim: number, freqShift = 0, flipSinToCos = true): Float32Array {
  return tf.tidy(
    () => timestepFeatures(tfOps, tf.tensor1d(timesteps, 'float32'), { dim, flipSinToCos, freqShift }).dataSync() as Float32Array,
  );
}

describe('timestep features', () => {
  it('reproduce diffusers’ time_proj to float32 rounding (torch’s own exp for the frequencies)', async () => {
    const ref = await readRef('unet.safetensors');
    const t = Array.from(get(ref, 'timesteps').data);
    const d = diff(features(t, 32), get(ref, 'intermediate.time_proj').data);
    // Only sin/cos of the same float32 angles may differ, by an ulp of the result.
    expect(d.maxAbs, `time_proj max-abs ${d.maxAbs}`).toBeLessThanOrEqual(1.2e-7);
  });

  it('follow the textbook formula for fractional timesteps, freq_shift and both orders', () => {
    const ts = [0.5, 123.456, 999.9];
    for (const [shift, flip] of [
      [0, true],
      [1, false],
    ] as const) {
      const dim = 320;
      const half = dim / 2;
      const expected = new Float64Array(ts.length * dim);
      ts.forEach((t, b) => {
        for (let i = 0; i < half; i++) {
          const angle = t * Math.exp((-Math.log(10000) * i) / (half - shift));
          expected[b * dim + (flip ? half : 0) + i] = Math.sin(angle);
          expected[b * dim + (flip ? 0 : half) + i] = Math.cos(angle);
        }
      });
      const d = diff(features(ts, dim, shift, flip), expected);
      // float32 angles near 1000 carry ~6e-5 absolute rounding, inherent to diffusers' float32 maths.
      expect(d.maxAbs, `shift ${shift} flip ${flip}: max-abs ${d.maxAbs}`).toBeLessThanOrEqual(1e-4);
    }
  });

  it('uses an exp within one float32 ulp of the exact one', () => {
    for (let x = -10; x <= 10; x += 0.0137) {
      const xf = Math.fround(x);
      const exact = Math.exp(xf);
      const ulp = 2 ** (Math.floor(Math.log2(exact)) - 23);
      expect(Math.abs(expf32Torch(xf) - exact)).toBeLessThanOrEqual(ulp);
    }
  });
});
