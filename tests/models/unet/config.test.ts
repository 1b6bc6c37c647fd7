/**
 * UNet config translation and parameter manifests: the manifest a config implies must be exactly
 * the checkpoint's key set (tiny fixture file, full-size SD 1.5 manifest from diffusers).
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { SafetensorsFile } from '../../../src/io/safetensors.js';
import { parseUnetConfig, readUnetConfig, UnetConfigError } from '../../../src/models/unet/config.js';
import { unetManifest } from '../../../src/models/unet/unet.js';
import { SHARED, TINY_SD } from '../../helpers/fixtures.js';

const UNET_DIR = path.join(TINY_SD, 'unet');

interface ManifestEntry {
  readonly diffusers: string;
  readonly shape: number[];
  readonly ldm: string;
}

async function sd15Unet(): Promise<{ tensors: ManifestEntry[]; diffusers_config: Record<string, unknown> }> {
  const json = JSON.parse(await readFile(path.join(SHARED, 'fixtures/manifests/sd15.json'), 'utf8')) as {
    components: { unet: { tensors: ManifestEntry[]; diffusers_config: Record<string, unknown> } };
  };
  return json.components.unet;
}

function sorted(m: ReadonlyMap<string, readonly number[]>): [string, number[]][] {
  return [...m].map(([k, s]): [string, number[]] => [k, [...s]]).sort((a, b) => (a[0] < b[0] ? -1 : 1));
}

/** The SD 1.5 UNet config as its model card's `unet/config.json` has it (structural keys only). */
const SD15_CONFIG = {
  in_channels: 4,
  out_channels: 4,
  block_out_channels: [320, 640, 1280, 1280],
  down_block_types: ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
  up_block_types: ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'],
  attention_head_dim: 8,
  cross_attention_dim: 768,
  layers_per_block: 2,
  norm_num_groups: 32,
};

describe('UNet config', () => {
  it('translates the tiny config: attention_head_dim 8 means 8 heads per block', async () => {
    const cfg = await readUnetConfig(UNET_DIR);
    expect(cfg.numHeads).toEqual([8, 8]);
    expect(cfg.blockChannels).toEqual([32, 64]);
    expect(cfg.layersPerBlock).toEqual([1, 1]);
    expect(cfg.contextDim).toEqual([32, 32]);
    expect(cfg.timeEmbedDim).toBe(128);
    expect(cfg.groups).toBe(8);
  });

  it('reads SD 2.x per-block head counts and explicit num_attention_heads', () => {
    const sd2 = parseUnetConfig({ ...SD15_CONFIG, attention_head_dim: [5, 10, 20, 20], cross_attention_dim: 1024, use_linear_projection: true });
    expect(sd2.numHeads).toEqual([5, 10, 20, 20]);
    expect(sd2.linearProjection).toBe(true);
    const explicit = parseUnetConfig({ ...SD15_CONFIG, num_attention_heads: 4 });
    expect(explicit.numHeads).toEqual([4, 4, 4, 4]);
  });

  it.each([
    [{ class_embed_type: 'timestep' }, 'class_embed_type'],
    [{ addition_embed_type: 'text_time' }, 'addition_embed_type'],
    [{ time_embedding_type: 'fourier' }, 'time_embedding_type'],
    [{ only_cross_attention: true }, 'only_cross_attention'],
    [{ in_channels: 7 }, 'in_channels'],
    [{ down_block_types: ['CrossAttnDownBlock2D', 'SimpleCrossAttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'] }, 'down_block_types.1'],
    [{ layers_per_block: [2, 2] }, 'layers_per_block'],
    [{ attention_head_dim: 7 }, 'attention_head_dim'],
  ])('rejects %j with an error naming the file and %s', (change, key) => {
    const run = () => parseUnetConfig({ ...SD15_CONFIG, ...change }, 'some/unet/config.json');
    expect(run).toThrow(UnetConfigError);
    expect(run).toThrow(/^some\/unet\/config\.json: /);
    expect(run).toThrow(new RegExp(`\\n  ${key.replace(/\./g, '\\.')}: `));
  });

  it('names a missing required key', () => {
    const { cross_attention_dim: _dropped, ...rest } = SD15_CONFIG;
    expect(() => parseUnetConfig(rest, 'x/config.json')).toThrow(/x\/config\.json[\s\S]*cross_attention_dim: required key is missing/);
  });

  it('tolerates unknown keys', () => {
    expect(parseUnetConfig({ ...SD15_CONFIG, some_future_flag: 3, _class_name: 'UNet2DConditionModel' }).numHeads).toEqual([8, 8, 8, 8]);
  });
});

describe('unetManifest', () => {
  it('equals the tiny checkpoint key set with its PyTorch shapes', async () => {
    const cfg = await readUnetConfig(UNET_DIR);
    const file = await SafetensorsFile.open(path.join(UNET_DIR, 'diffusion_pytorch_model.safetensors'));
    const stored = new Map(file.keys().map((k) => [k, [...file.info(k).shape]]));
    await file.close();
    expect(sorted(unetManifest(cfg))).toEqual(sorted(stored));
  });

  it('equals diffusers’ SD 1.5 UNet manifest (686 tensors, 859,520,964 parameters)', async () => {
    const ref = await sd15Unet();
    const expected = new Map(ref.tensors.map((t) => [t.diffusers, t.shape]));
    const manifest = unetManifest(parseUnetConfig(SD15_CONFIG, 'SD15_CONFIG'));
    expect(sorted(manifest)).toEqual(sorted(expected));
    const count = [...manifest.values()].reduce((n, s) => n + s.reduce((a, b) => a * b, 1), 0);
    expect(count).toBe(859_520_964);
    // The config stored with the manifest (every key diffusers writes) gives the same.
    expect(sorted(unetManifest(parseUnetConfig(ref.diffusers_config, 'sd15.json')))).toEqual(sorted(expected));
  });

  it('makes proj_in/proj_out Linear [C, C] under use_linear_projection (SD 2.x)', () => {
    const manifest = unetManifest(parseUnetConfig({ ...SD15_CONFIG, attention_head_dim: [5, 10, 20, 20], cross_attention_dim: 1024, use_linear_projection: true }));
    expect(manifest.get('down_blocks.0.attentions.0.proj_in.weight')).toEqual([320, 320]);
    expect(manifest.get('mid_block.attentions.0.proj_out.weight')).toEqual([1280, 1280]);
    expect(manifest.get('down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight')).toEqual([320, 1024]);
  });
});
