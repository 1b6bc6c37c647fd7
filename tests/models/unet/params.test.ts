/**
 * UNet parameter groups against what the reference material defines: ESD 2023's sets are the
 * paper code's rules applied to the CompVis names of the same tensors (single-file mapping),
 * ESD 2024's sets are Linear/Conv2d modules (told apart from norms by their weight's rank), and
 * the cross-attention K/V set is exactly what UCE edits.
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { SafetensorsFile } from '../../../src/io/safetensors.js';
import {
  esd2023Sets,
  esd2024Sets,
  isCrossAttn,
  isCrossAttnKV,
  selectParams,
  type Esd2023Set,
  type Esd2024Set,
} from '../../../src/models/unet/params.js';
import { ERASURE_REF, SHARED } from '../../helpers/fixtures.js';

interface Named {
  readonly diffusers: string;
  readonly ldm: string;
  readonly shape: readonly number[];
}

const LDM_PREFIX = 'model.diffusion_model.';

/** The tiny UNet's tensors with their CompVis names (single-file fixture) and SD 1.5's (manifest). */
async function namings(): Promise<Record<'tiny' | 'sd15', Named[]>> {
  const tiny = JSON.parse(await readFile(path.join(SHARED, 'fixtures/tiny-sd-single-file/mapping.json'), 'utf8')) as {
    mapping: { unet: Named[] };
  };
  const sd15 = JSON.parse(await readFile(path.join(SHARED, 'fixtures/manifests/sd15.json'), 'utf8')) as {
    components: { unet: { tensors: Named[] } };
  };
  return { tiny: tiny.mapping.unet, sd15: sd15.components.unet.tensors };
}

/** `train-esd.py`'s rules, verbatim, on a CompVis name (without `model.diffusion_model.`). */
const compVisRules: Record<Esd2023Set, (name: string) => boolean> = {
  noxattn: (n) => !(n.startsWith('out.') || n.includes('attn2') || n.includes('time_embed')),
  selfattn: (n) => n.includes('attn1'),
  xattn: (n) => n.includes('attn2'),
  full: () => true,
  notime: (n) => !(n.startsWith('out.') || n.includes('time_embed')),
};

/** diffusers' `esd_sd.py` rules on module names, with Linear/Conv2d told apart by weight rank (2 or 4; norms have 1). */
function esd2024Reference(tensors: readonly Named[]): Record<Esd2024Set, string[]> {
  const module = (key: string) => key.slice(0, key.lastIndexOf('.'));
  const linearOrConv = new Set(
    tensors.filter((t) => t.diffusers.endsWith('.weight') && (t.shape.length === 2 || t.shape.length === 4)).map((t) => module(t.diffusers)),
  );
  const keys = tensors.map((t) => t.diffusers).filter((k) => linearOrConv.has(module(k)));
  return {
    'esd-x': keys.filter((k) => module(k).includes('attn2')),
    'esd-x-strict': keys.filter((k) => module(k).includes('attn2') && (module(k).includes('to_k') || module(k).includes('to_v'))),
    'esd-u': keys.filter((k) => !module(k).includes('attn2')),
    'esd-all': keys,
  };
}

describe.each(['tiny', 'sd15'] as const)('UNet parameter groups (%s)', (model) => {
  it.each(Object.keys(compVisRules) as Esd2023Set[])('ESD 2023 %s = the paper code’s rule on CompVis names', async (set) => {
    const tensors = (await namings())[model];
    const expected = tensors.filter((t) => compVisRules[set](t.ldm.slice(LDM_PREFIX.length))).map((t) => t.diffusers);
    const picked = selectParams(
      tensors.map((t) => t.diffusers),
      esd2023Sets[set],
    );
    expect(picked.length).toBeGreaterThan(0);
    expect(picked.sort()).toEqual(expected.sort());
  });

  it.each(Object.keys(esd2024Sets) as Esd2024Set[])('ESD 2024 %s = Linear/Conv2d modules by the diffusers code’s rule', async (set) => {
    const tensors = (await namings())[model];
    const picked = selectParams(
      tensors.map((t) => t.diffusers),
      esd2024Sets[set],
    );
    expect(picked.length).toBeGreaterThan(0);
    expect(picked.sort()).toEqual(esd2024Reference(tensors)[set].sort());
  });
});

describe('cross-attention selectors on the tiny UNet', () => {
  it('isCrossAttnKV picks exactly the 8 tensors UCE edits; isCrossAttn every attn2 parameter', async () => {
    const unetFile = await SafetensorsFile.open(path.join(SHARED, 'fixtures/tiny-sd/unet/diffusion_pytorch_model.safetensors'));
    const keys = unetFile.keys();
    await unetFile.close();
    const uce = await SafetensorsFile.open(path.join(ERASURE_REF, 'uce.safetensors'));
    const edited = uce.keys();
    await uce.close();
    expect(selectParams(keys, isCrossAttnKV).sort()).toEqual([...edited].sort());
    // 4 cross-attentions × (to_q, to_k, to_v weights + to_out.0 weight and bias).
    const attn2 = selectParams(keys, isCrossAttn);
    expect(attn2).toHaveLength(4 * 5);
    expect(attn2.every((k) => k.includes('.attn2.'))).toBe(true);
    expect(keys.filter((k) => k.includes('attn2')).length).toBe(attn2.length);
  });
});
