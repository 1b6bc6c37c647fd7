/**
 * The from-scratch toy model folder loads as a Stable Diffusion pipeline whose architecture is the
 * spec's, with the real CLIP vocabulary, and the same seed writes the same weights.
 */
import { createHash } from 'node:crypto';
import { mkdtemp, readFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

import { beforeAll, describe, expect, it } from 'vitest';

import { initBackend } from '../../src/backend.js';
import { disposeStableDiffusion, loadStableDiffusion } from '../../src/pipeline/load.js';
import { toyModelSpecSchema, writeScratchModel } from '../../src/toy/model.js';

beforeAll(async () => {
  await initBackend({ backend: 'wasm', log: () => {} });
});

const sha = async (f: string) => createHash('sha256').update(await readFile(f)).digest('hex');

describe('scratch toy model', () => {
  it('loads with the spec architecture and the CLIP tokenizer; seeded weights', async () => {
    const root = await mkdtemp(path.join(os.tmpdir(), 'sdwb-toy-model-'));
    const spec = toyModelSpecSchema.parse({ unet_channels: [32, 64], vae_channels: [32, 64, 64], text_width: 48, text_layers: 1 });
    await writeScratchModel(path.join(root, 'a'), spec, 3);
    await writeScratchModel(path.join(root, 'b'), spec, 3);
    const model = await loadStableDiffusion(path.join(root, 'a'));
    try {
      expect(model.unet.cfg.blockChannels).toEqual([32, 64]);
      expect(model.vae.cfg.downscale).toBe(4);
      expect(model.text.cfg.width).toBe(48);
      expect(model.unet.cfg.contextDim[0]).toBe(48);
      // "a red circle" in the real CLIP vocabulary: red = 736, circle = 7117.
      expect(model.tokenizer.encode('a red circle').slice(0, 5)).toEqual([49406, 320, 736, 7117, 49407]);
      // Fresh GroupNorm weights are ones.
      expect([...(model.unet.store.get('conv_norm_out.weight')!.dataSync() as Float32Array)].every((v) => v === 1)).toBe(true);
    } finally {
      disposeStableDiffusion(model);
    }
    for (const f of ['unet/diffusion_pytorch_model.safetensors', 'text_encoder/model.safetensors', 'vae/diffusion_pytorch_model.safetensors']) {
      expect(await sha(path.join(root, 'a', f))).toBe(await sha(path.join(root, 'b', f)));
    }
  });
});
