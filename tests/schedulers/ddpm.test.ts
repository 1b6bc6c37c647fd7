/**
 * The forward process and prediction conversions against diffusers' DDPMScheduler outputs.
 */
import * as tf from '@tensorflow/tfjs';
import { beforeAll, describe, expect, it } from 'vitest';
import { initBackend } from '../../src/backend.js';
import { tfOps } from '../../src/ops/tfjs-ops.js';
import { addNoise, getVelocity, predictX0, trainingTarget } from '../../src/schedulers/ddpm.js';
import { noiseSchedule, type NoiseSchedule } from '../../src/schedulers/tables.js';
import { diff, get, readRef, toNhwc, type RefTensor } from '../helpers/fixtures.js';

const TOL = 1e-4;
let ref: Map<string, RefTensor>;
let train: Map<string, RefTensor>;
let sd: NoiseSchedule;

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: () => {} });
  ref = await readRef('scheduler.safetensors');
  train = await readRef('train_grad.safetensors');
  sd = noiseSchedule({ trainTimesteps: 1000, betaSchedule: 'scaled_linear', betaStart: 0.00085, betaEnd: 0.012 });
});

/** A reference NCHW tensor as an NHWC tfjs tensor. */
function nhwc(m: Map<string, RefTensor>, key: string): tf.Tensor {
  const t = toNhwc(get(m, key));
  return tf.tensor(t.data, t.shape);
}

function expectExact(actual: tf.Tensor, m: Map<string, RefTensor>, key: string): void {
  const d = diff(actual.dataSync(), toNhwc(get(m, key)).data);
  expect(d.maxAbs, `${key}: max abs error ${d.maxAbs} (scale ${d.scale})`).toBe(0);
}

describe('DDPM forward process', () => {
  it('add_noise equals diffusers bit for bit', () => {
    const timesteps = Array.from(get(ref, 'add_noise.timesteps').data);
    tf.tidy(() => expectExact(addNoise(tfOps, sd, nhwc(ref, 'add_noise.original'), nhwc(ref, 'add_noise.noise'), timesteps), ref, 'add_noise.noisy'));
    const trainSteps = Array.from(get(train, 'timesteps').data);
    tf.tidy(() => expectExact(addNoise(tfOps, sd, nhwc(train, 'latents'), nhwc(train, 'noise'), trainSteps), train, 'noisy_latents'));
  });

  it('get_velocity equals diffusers bit for bit, and is the v_prediction training target', () => {
    const timesteps = Array.from(get(ref, 'add_noise.timesteps').data);
    tf.tidy(() => {
      const x0 = nhwc(ref, 'add_noise.original');
      const eps = nhwc(ref, 'add_noise.noise');
      expectExact(getVelocity(tfOps, sd, x0, eps, timesteps), ref, 'get_velocity');
      expectExact(trainingTarget(tfOps, sd, 'v_prediction', x0, eps, timesteps), ref, 'get_velocity');
      expectExact(trainingTarget(tfOps, sd, 'epsilon', x0, eps, timesteps), ref, 'add_noise.noise');
    });
  });

  it('predictX0 recovers the clean latents from x_t and the true ε or v', () => {
    const timesteps = Array.from(get(ref, 'add_noise.timesteps').data);
    const expected = toNhwc(get(ref, 'add_noise.original')).data;
    for (const [prediction, key] of [
      ['epsilon', 'add_noise.noise'],
      ['v_prediction', 'get_velocity'],
    ] as const) {
      const x0 = tf.tidy(() => predictX0(tfOps, sd, prediction, nhwc(ref, key), nhwc(ref, 'add_noise.noisy'), timesteps).dataSync());
      const d = diff(x0, expected);
      // t = 999 divides by √ᾱ ≈ 0.068: float32 rounding of x_t is amplified ~15×
      expect(d.rel, `${prediction}: x0 rel error ${d.rel}`).toBeLessThan(TOL);
    }
  });

  it('rejects timesteps outside the table and batch mismatches', () => {
    tf.tidy(() => {
      const x = tf.zeros([2, 2, 2, 4]);
      expect(() => addNoise(tfOps, sd, x, x, [0, 1000])).toThrow(/timestep 1000/);
      expect(() => addNoise(tfOps, sd, x, x, [0])).toThrow(/1 timesteps for a batch of 2/);
    });
  });
});
