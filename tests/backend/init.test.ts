import { createRequire } from 'node:module';

import * as tf from '@tensorflow/tfjs';
import { afterEach, describe, expect, it, vi } from 'vitest';

import { currentBackend, initBackend, parseBackendRequest } from '../../src/backend.js';

function installed(pkg: string): boolean {
  try {
    createRequire(import.meta.url).resolve(pkg);
    return true;
  } catch {
    return false;
  }
}

const hasNode = installed('@tensorflow/tfjs-node');
const hasNodeGpu = installed('@tensorflow/tfjs-node-gpu');

function logger(): { log: (m: string) => void; lines: string[] } {
  const lines: string[] = [];
  return { log: (m: string) => lines.push(m), lines };
}

afterEach(() => {
  vi.unstubAllEnvs();
});

describe('initBackend', () => {
  it('initialises cpu, logs one line, and is idempotent', async () => {
    const { log, lines } = logger();
    const info = await initBackend({ backend: 'cpu', log });
    expect(info).toEqual({ name: 'cpu', kind: 'cpu' });
    expect(tf.getBackend()).toBe('cpu');
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/cpu/);
    expect(await initBackend({ backend: 'cpu', log })).toEqual(info);
    expect(lines).toHaveLength(1);
    expect(currentBackend()).toEqual(info);
  });

  it('initialises wasm with its thread count and the kernels it lacks', async () => {
    const { log, lines } = logger();
    const info = await initBackend({ backend: 'wasm', log });
    expect(info.name).toBe('wasm');
    expect(info.kind).toBe('wasm');
    expect(info.threads).toBeGreaterThanOrEqual(1);
    expect(tf.getBackend()).toBe('wasm');
    expect(lines).toEqual([expect.stringMatching(/wasm .*thread/)]);
    expect(tf.getKernel('Conv2DBackpropFilter', 'wasm')).toBeDefined();
    expect(tf.getKernel('UnsortedSegmentSum', 'wasm')).toBeDefined();
    // A real gradient through both, end to end.
    const g = tf.tidy(() => {
      const table = tf.randomNormal([10, 4]);
      const f = tf.randomNormal([3, 3, 4, 2]);
      return tf.grads((t: tf.Tensor, w: tf.Tensor) => {
        const e = tf.reshape(tf.gather(t, tf.tensor1d([1, 2, 3, 4, 5, 6, 7, 8, 9], 'int32')), [1, 3, 3, 4]);
        return tf.sum(tf.conv2d(e as tf.Tensor4D, w as tf.Tensor4D, 1, 'same'));
      })([table, f]);
    });
    expect(g.map((t) => t.shape)).toEqual([[10, 4], [3, 3, 4, 2]]);
    tf.dispose(g);
  });

  it('switches between backends on request', async () => {
    const { log, lines } = logger();
    await initBackend({ backend: 'cpu', log });
    await initBackend({ backend: 'wasm', log });
    await initBackend({ backend: 'cpu', log });
    expect(lines).toHaveLength(3);
    expect(tf.getBackend()).toBe('cpu');
  });

  it('honours SDWB_BACKEND, and opts.backend overrides it', async () => {
    vi.stubEnv('SDWB_BACKEND', 'CPU');
    expect((await initBackend({ log: () => {} })).name).toBe('cpu');
    expect((await initBackend({ backend: 'wasm', log: () => {} })).name).toBe('wasm');
    vi.stubEnv('SDWB_BACKEND', 'wasm');
    expect((await initBackend({ log: () => {} })).name).toBe('wasm');
  });

  it('rejects an unknown SDWB_BACKEND clearly', async () => {
    vi.stubEnv('SDWB_BACKEND', 'webgpu');
    await expect(initBackend({ log: () => {} })).rejects.toThrow(/SDWB_BACKEND='webgpu' is not one of: tensorflow, wasm, cpu/);
    expect(() => parseBackendRequest('gpu')).toThrow(/not one of/);
    expect(parseBackendRequest(' Node-GPU ')).toBe('node-gpu');
  });

  it.skipIf(hasNode || hasNodeGpu)('explains how to get tensorflow when it is requested but absent', async () => {
    const before = tf.getBackend();
    await expect(initBackend({ backend: 'tensorflow', log: () => {} })).rejects.toThrow(
      "backend 'tensorflow' requested but @tensorflow/tfjs-node is not installed: npm i @tensorflow/tfjs-node",
    );
    await expect(initBackend({ backend: 'node-gpu', log: () => {} })).rejects.toThrow(
      "backend 'node-gpu' requested but @tensorflow/tfjs-node-gpu is not installed: npm i @tensorflow/tfjs-node-gpu",
    );
    vi.stubEnv('SDWB_BACKEND', 'tensorflow');
    await expect(initBackend({ log: () => {} })).rejects.toThrow(/npm i @tensorflow\/tfjs-node/);
    expect(tf.getBackend()).toBe(before); // a failed request leaves the current backend alone
  });

  it.skipIf(hasNode || hasNodeGpu)('picks wasm automatically when no native backend is installed', async () => {
    vi.stubEnv('SDWB_BACKEND', '');
    await initBackend({ backend: 'cpu', log: () => {} });
    const { log, lines } = logger();
    const info = await initBackend({ log });
    expect(info.name).toBe('wasm');
    expect(lines).toHaveLength(1); // no noise about the absent optional packages
  });
});
