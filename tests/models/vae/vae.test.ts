/**
 * AutoencoderKL parity against diffusers on the tiny SD fixture (wasm and cpu), the deprecated
 * attention names, the image conversions of VaeImageProcessor, and tiled decoding.
 */
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { initBackend } from '../../../src/backend.js';
import { loadSafetensorsParams, paramStore } from '../../../src/io/weights.js';
import { readVaeConfig, type VaeConfig } from '../../../src/models/vae/config.js';
import {
  decodeInTiles,
  denormalize,
  imageToTensor,
  renameDeprecatedVaeAttentionKey,
  samplePosterior,
  tensorToImage,
  tileGeometry,
  unscaleLatents,
  vaeDecode,
  vaeDecodeTiled,
  vaeEncode,
} from '../../../src/models/vae/vae.js';
import { tfOps } from '../../../src/ops/tfjs-ops.js';
import { diff, get, readRef, TINY_SD, toNhwc, type RefTensor } from '../../helpers/fixtures.js';

const VAE_DIR = path.join(TINY_SD, 'vae');
const WEIGHTS = path.join(VAE_DIR, 'diffusion_pytorch_model.safetensors');
const TOL = 1e-4;

let cfg: VaeConfig;
let ref: Map<string, RefTensor>;
let sampling: Map<string, RefTensor>;
let weights: Map<string, tf.Tensor>;

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: () => {} });
  cfg = await readVaeConfig(VAE_DIR);
  ref = await readRef('vae.safetensors');
  sampling = await readRef('sampling.safetensors');
  weights = await loadSafetensorsParams([WEIGHTS]);
});

afterAll(() => {
  for (const t of weights.values()) t.dispose();
});

/** A reference NCHW tensor as NHWC tfjs. */
function input(m: Map<string, RefTensor>, key: string): tf.Tensor {
  const t = toNhwc(get(m, key));
  return tf.tensor(t.data, t.shape);
}

describe.each(['wasm', 'cpu'] as const)('AutoencoderKL on %s', (backend) => {
  it('matches diffusers: posterior, sample from the stored ε, both decodes; every weight used', async () => {
    await initBackend({ backend, log: () => {} });
    const store = paramStore(weights, WEIGHTS);
    const results = tf.tidy(() => {
      const posterior = vaeEncode(tfOps, store.scope(), input(ref, 'image'), cfg);
      const z = samplePosterior(tfOps, posterior, input(ref, 'eps'));
      const outputs = {
        moments: posterior.moments,
        posterior_mean: posterior.mean,
        posterior_logvar: posterior.logvar,
        posterior_std: posterior.std,
        latent_sample: z,
        decoded_mean: vaeDecode(tfOps, store.scope(), posterior.mean, cfg),
        decoded_sample: vaeDecode(tfOps, store.scope(), z, cfg),
      };
      return Object.entries(outputs).map(([key, t]) => [key, t.dataSync() as Float32Array] as const);
    });
    expect(store.unusedKeys()).toEqual([]);
    const report: string[] = [];
    for (const [key, actual] of results) {
      const d = diff(actual, toNhwc(get(ref, key)).data);
      report.push(`${key}: maxAbs ${d.maxAbs.toExponential(2)} rel ${d.rel.toExponential(2)}`);
      expect(d.rel, `${backend} ${key}: max-abs ${d.maxAbs} vs scale ${d.scale} (rel ${d.rel})`).toBeLessThanOrEqual(TOL);
    }
    console.log(`[vae ${backend}]\n  ${report.join('\n  ')}`);
  });

  it('decodes the reference run: final_latents / scaling_factor → decoded_raw', async () => {
    await initBackend({ backend, log: () => {} });
    const store = paramStore(weights, WEIGHTS);
    expect(Math.fround(cfg.scalingFactor)).toBe(get(ref, 'scaling_factor').data[0]!);
    const decoded = tf.tidy(
      () => vaeDecode(tfOps, store.scope(), unscaleLatents(tfOps, input(sampling, 'final_latents'), cfg), cfg).dataSync() as Float32Array,
    );
    const d = diff(decoded, toNhwc(get(sampling, 'decoded_raw')).data);
    expect(d.rel, `${backend} decoded_raw: max-abs ${d.maxAbs} vs scale ${d.scale}`).toBeLessThanOrEqual(TOL);
  });
});

describe('deprecated attention names', () => {
  it('a checkpoint with query/key/value/proj_attn loads through the rename and decodes identically', async () => {
    await initBackend({ backend: 'wasm', log: () => {} });
    const toOld: Record<string, string> = { to_q: 'query', to_k: 'key', to_v: 'value', 'to_out.0': 'proj_attn' };
    const old = new Map<string, tf.Tensor>();
    for (const [k, t] of weights) old.set(k.replace(/\.(to_q|to_k|to_v|to_out\.0)\./, (_, n: string) => `.${toOld[n]}.`), t);
    expect([...old.keys()].filter((k) => /\.(query|key|value|proj_attn)\.(weight|bias)$/.test(k)).length).toBe(16);
    const renamed = new Map([...old].map(([k, t]) => [renameDeprecatedVaeAttentionKey(k), t]));
    expect([...renamed.keys()].sort()).toEqual([...weights.keys()].sort());
    expect(renameDeprecatedVaeAttentionKey('encoder.down_blocks.0.resnets.0.conv1.weight')).toBe('encoder.down_blocks.0.resnets.0.conv1.weight');
    const store = paramStore(renamed, 'old-style');
    const decoded = tf.tidy(() => vaeDecode(tfOps, store.scope(), input(ref, 'posterior_mean'), cfg).dataSync());
    expect(diff(decoded, toNhwc(get(ref, 'decoded_mean')).data).rel).toBeLessThanOrEqual(TOL);
  });
});

describe('VaeImageProcessor conversions', () => {
  it('denormalize gives the pipeline image (x/2 + 0.5 clamped) exactly', () => {
    const raw = toNhwc(get(sampling, 'decoded_raw')).data;
    const expected = toNhwc(get(sampling, 'image')).data;
    expect(diff(raw.map(denormalize), expected).maxAbs).toBe(0);
  });

  it('tensorToImage rounds the [0, 1] image ×255 half to even, as numpy', () => {
    const raw = toNhwc(get(sampling, 'decoded_raw'));
    const [image] = tensorToImage(raw.data, raw.shape as [number, number, number, number]);
    const pt = toNhwc(get(sampling, 'image')).data;
    const expected = Array.from(pt, (v) => {
      const scaled = Math.fround(v * 255);
      const r = Math.round(scaled);
      return r - scaled === 0.5 && r % 2 === 1 ? r - 1 : r;
    });
    expect(image!.width).toBe(32);
    expect(image!.channels).toBe(3);
    expect(Array.from(image!.data)).toEqual(expected);
  });

  it('imageToTensor maps 8-bit pixels to 2u/255 − 1 (the reference photo, /127.5 − 1)', () => {
    const photo = toNhwc(get(ref, 'image'));
    const size = 32 * 32 * 3;
    const pixels = Uint8Array.from(photo.data.subarray(0, size), (v) => Math.round((v + 1) * 127.5));
    const { data, shape } = imageToTensor([{ width: 32, height: 32, channels: 3, data: pixels }]);
    expect(shape).toEqual([1, 32, 32, 3]);
    expect(diff(data, photo.data.subarray(0, size)).maxAbs).toBeLessThan(1e-6);
    expect(() => imageToTensor([{ width: 32, height: 32, channels: 3, data: pixels }, { width: 16, height: 32, channels: 3, data: pixels }])).toThrow(
      /image 1 is 16×32×3/,
    );
  });
});

describe('tiled decoding', () => {
  // A 16×16 latent in 8×8 tiles: origins 0, 6, 12 (stride ⌊8·0.75⌋), 4 blended pixels, 12 kept.
  const geometry = () => tileGeometry(cfg, { tileLatent: 8 });

  it('follows diffusers: stride ⌊tile·0.75⌋, blend ⌊tile·f·0.25⌋, keep tile·f − blend', () => {
    expect(geometry()).toEqual({ tileLatent: 8, strideLatent: 6, blendPixels: 4, keepPixels: 12 });
    // SD 1.x (sample_size 512, f = 8): 64-latent tiles every 48, 128 blended, 384 kept
    expect(tileGeometry({ ...cfg, sampleSize: 512, downscale: 8 })).toEqual({ tileLatent: 64, strideLatent: 48, blendPixels: 128, keepPixels: 384 });
  });

  it('with a position-independent decoder, tiling is exact', async () => {
    await initBackend({ backend: 'cpu', log: () => {} });
    const [tiled, whole] = tf.tidy(() => {
      const z = input(ref, 'posterior_mean');
      const local = (t: tf.Tensor) => tf.tanh(tfOps.upsampleNearest2x(t));
      return [decodeInTiles(tfOps, z, local, geometry()).dataSync(), local(z).dataSync()];
    });
    expect(diff(tiled!, whole!).maxAbs).toBe(0);
  });

  it('blends linearly between tiles: constant tiles k give the ramp (1 − y/4)·above + (y/4)·below', async () => {
    await initBackend({ backend: 'cpu', log: () => {} });
    let tileIndex = 0;
    const column = tf.tidy(() => {
      const z = tf.zeros([1, 16, 4, 1]); // one column of tiles, three rows
      const constantTile = (t: tf.Tensor) => tf.fill([1, 2 * t.shape[1]!, 2 * t.shape[2]!, 1], tileIndex++);
      return Array.from(decodeInTiles(tfOps, z, constantTile, geometry()).dataSync()).filter((_, k) => k % 8 === 0);
    });
    // rows 0–11 of tile 0; rows 12–15 blend tile 0 into tile 1 (k/4); rows 16–23 tile 1; rows 24–27 blend into tile 2; rows 28–31 tile 2
    const expected = [
      ...Array<number>(12).fill(0),
      ...[0, 1, 2, 3].map((k) => k / 4),
      ...Array<number>(8).fill(1),
      ...[0, 1, 2, 3].map((k) => 1 + k / 4),
      ...Array<number>(4).fill(2),
    ];
    expect(column).toEqual(expected);
  });

  it('the VAE decodes one tile exactly; 8-latent tiles differ from untiled decoding everywhere (documented)', async () => {
    await initBackend({ backend: 'wasm', log: () => {} });
    const store = paramStore(weights, WEIGHTS);
    const [untiled, oneTile, tiled] = tf.tidy(() => {
      const z = input(ref, 'posterior_mean');
      return [
        vaeDecode(tfOps, store.scope(), z, cfg).dataSync(),
        vaeDecodeTiled(tfOps, store.scope(), z, cfg).dataSync(), // default tile (16) holds the whole latent
        vaeDecodeTiled(tfOps, store.scope(), z, cfg, { tileLatent: 8 }).dataSync(),
      ];
    });
    expect(diff(oneTile, untiled).maxAbs).toBe(0);
    // Each tile has its own GroupNorm statistics and mid-block attention: the result is a
    // different (seam-blended) image, not an approximation of the untiled one.
    const d = diff(tiled, untiled);
    console.log(`[vae tiling] 8-latent tiles vs untiled on a 16×16 latent: max-abs ${d.maxAbs.toFixed(3)} (scale ${d.scale.toFixed(3)})`);
    expect(tiled.length).toBe(untiled.length);
    expect(tiled.every(Number.isFinite)).toBe(true);
    expect(d.maxAbs).toBeGreaterThan(1e-3);
  });
});
