import { promises as fs } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { mapKey, mapKeys, mappedShape, type Keymap } from '../../src/io/keymaps/apply.js';
import {
  COMPONENT_NAMES,
  diffusersToLdm,
  emaKeyOf,
  ignoredLdmKey,
  ldmKeymaps,
  ldmToDiffusers,
  type ComponentName,
  type LdmLayout,
} from '../../src/io/ldm-keys.js';
import { clipTextManifest, vaeManifest } from '../../src/models/components.js';
import { parseClipTextConfig } from '../../src/models/clip/config.js';
import { parseUnetConfig } from '../../src/models/unet/config.js';
import { unetManifest } from '../../src/models/unet/unet.js';
import { parseVaeConfig } from '../../src/models/vae/config.js';
import { TINY_SD } from '../helpers/fixtures.js';
import { loadSd15, sd2LdmShapes, SD21_UNET_CONFIG, SD2_TEXT_CONFIG, TINY_MAPPING } from './keymaps.helpers.js';

async function sd15Layout(): Promise<LdmLayout> {
  const m = await loadSd15();
  const text = parseClipTextConfig(m.components.text_encoder.diffusers_config, 'sd15');
  return {
    unet: parseUnetConfig(m.components.unet.diffusers_config),
    vae: parseVaeConfig(m.components.vae.diffusers_config),
    textEncoder: { layout: 'clip', numLayers: text.numLayers },
  };
}

/** Checks a listed correspondence both ways, with shapes, and that it is a bijection. */
function checkBothWays(
  layout: LdmLayout,
  component: ComponentName,
  rows: readonly { diffusers: string; shape: readonly number[]; ldm: string; ldmShape: readonly number[] }[],
): void {
  const map = ldmKeymaps(layout)[component];
  const ldmSeen = new Set<string>();
  for (const r of rows) {
    const there = diffusersToLdm(layout, component, r.diffusers);
    expect(there?.key, r.diffusers).toBe(r.ldm);
    expect(mappedShape(r.shape, there!.transform, 'diffusers'), r.diffusers).toEqual(r.ldmShape);
    const back = ldmToDiffusers(layout, r.ldm);
    expect(back?.component).toBe(component);
    expect(back?.mapped.map((m) => m.key), r.ldm).toEqual([r.diffusers]);
    expect(mappedShape(r.ldmShape, back!.mapped[0]!.transform, 'foreign'), r.ldm).toEqual(r.shape);
    ldmSeen.add(r.ldm);
  }
  // Bijection: as many distinct LDM names as diffusers names, and mapKeys finds no collision.
  expect(ldmSeen.size).toBe(rows.length);
  const { pairs, unmapped } = mapKeys(map, rows.map((r) => r.diffusers), 'diffusers');
  expect(unmapped).toEqual([]);
  expect(pairs).toHaveLength(rows.length);
}

describe('LDM keymaps against the SD 1.5 manifest (written by diffusers)', () => {
  for (const component of COMPONENT_NAMES) {
    it(`maps every ${component} entry both ways with the listed shapes, as a bijection`, async () => {
      const m = await loadSd15();
      const c = m.components[component];
      const rows = c.tensors.map((t) => ({ diffusers: t.diffusers, shape: t.shape, ldm: t.ldm, ldmShape: t.ldm_shape ?? t.shape }));
      expect(rows.length).toBe({ unet: 686, vae: 248, text_encoder: 196 }[component]);
      checkBothWays(await sd15Layout(), component, rows);
    });
  }

  it('covers exactly the parameters our model code declares for the SD 1.5 configs', async () => {
    const m = await loadSd15();
    const layout = await sd15Layout();
    const manifests = {
      unet: unetManifest(layout.unet as ReturnType<typeof parseUnetConfig>),
      vae: vaeManifest(layout.vae as ReturnType<typeof parseVaeConfig>),
      text_encoder: clipTextManifest(parseClipTextConfig(m.components.text_encoder.diffusers_config, 'sd15')),
    };
    for (const component of COMPONENT_NAMES) {
      expect(new Set(manifests[component].keys())).toEqual(new Set(m.components[component].tensors.map((t) => t.diffusers)));
    }
  });

  it('lists the non-weight keys of original files as ignored, with a reason', async () => {
    const m = await loadSd15();
    const layout = await sd15Layout();
    for (const extra of m.ldm_only_keys) {
      expect(ldmToDiffusers(layout, extra.ldm), extra.ldm).toBeUndefined();
      expect(ignoredLdmKey(extra.ldm), extra.ldm).toMatch(/\w/);
    }
  });
});

describe('LDM keymaps against the tiny single-file mapping (two levels, one layer per block)', () => {
  it('maps every tiny entry both ways', async () => {
    const mapping = JSON.parse(await fs.readFile(TINY_MAPPING, 'utf8')) as {
      mapping: Record<ComponentName, { ldm: string; ldm_shape: number[]; diffusers: string; shape: number[] }[]>;
    };
    const read = async (c: string) => JSON.parse(await fs.readFile(`${TINY_SD}/${c}/config.json`, 'utf8')) as unknown;
    const text = parseClipTextConfig(await read('text_encoder'), 'tiny');
    const layout: LdmLayout = {
      unet: parseUnetConfig(await read('unet')),
      vae: parseVaeConfig(await read('vae')),
      textEncoder: { layout: 'clip', numLayers: text.numLayers },
    };
    for (const component of COMPONENT_NAMES) {
      const rows = mapping.mapping[component].map((r) => ({ diffusers: r.diffusers, shape: r.shape, ldm: r.ldm, ldmShape: r.ldm_shape }));
      expect(rows.length).toBeGreaterThan(10);
      checkBothWays(layout, component, rows);
    }
  });
});

describe('SD 2.x (shape-only manifest from the public SD 2.1 and OpenCLIP ViT-H/14 structure)', () => {
  const unetCfg = parseUnetConfig(SD21_UNET_CONFIG);
  const textCfg = parseClipTextConfig(SD2_TEXT_CONFIG, 'sd2 text');
  const layout: LdmLayout = {
    unet: unetCfg,
    vae: { blockChannels: [128, 256, 512, 512], layersPerBlock: 2 },
    textEncoder: { layout: 'openclip', numLayers: textCfg.numLayers },
  };

  /** Diffusers manifest → LDM names and shapes through the keymaps (fused parts concatenated). */
  function toLdm(component: ComponentName, manifest: Map<string, number[]>): Map<string, number[]> {
    const out = new Map<string, number[]>();
    for (const [key, shape] of manifest) {
      const m = diffusersToLdm(layout, component, key);
      expect(m, key).toBeDefined();
      const ldmShape = mappedShape(shape, m!.transform, 'diffusers');
      const prev = out.get(m!.key);
      if (prev !== undefined) expect(prev, m!.key).toEqual(ldmShape);
      out.set(m!.key, ldmShape);
    }
    return out;
  }

  it('maps the SD 2.1 UNet onto the LDM UNet names with Linear projections and 1024-wide context', async () => {
    const expected = new Map([...(await sd2LdmShapes())].filter(([k]) => k.startsWith('model.diffusion_model.')));
    const got = toLdm('unet', unetManifest(unetCfg));
    expect(got.size).toBe(686);
    expect(got).toEqual(expected);
    expect(got.get('model.diffusion_model.input_blocks.1.1.proj_in.weight')).toEqual([320, 320]);
    expect(got.get('model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight')).toEqual([320, 1024]);
  });

  it('maps the 23-layer CLIPTextModel onto OpenCLIP names, fusing q/k/v; the rest of OpenCLIP is ignored with a reason', async () => {
    const expected = new Map([...(await sd2LdmShapes())].filter(([k]) => k.startsWith('cond_stage_model.')));
    const manifest = clipTextManifest(textCfg);
    expect(manifest.size).toBe(4 + 23 * 16);
    const got = toLdm('text_encoder', manifest);
    const ignored = [...expected.keys()].filter((k) => ignoredLdmKey(k, textCfg.numLayers) !== undefined);
    expect(ignored.sort()).toEqual(
      [
        'cond_stage_model.model.logit_scale',
        'cond_stage_model.model.text_projection',
        ...[...expected.keys()].filter((k) => k.includes('resblocks.23.')),
      ].sort(),
    );
    for (const k of ignored) expected.delete(k);
    expect(got).toEqual(expected);
  });

  it('splits in_proj_weight into q, k, v row blocks in that order and fuses them back', () => {
    const back = ldmToDiffusers(layout, 'cond_stage_model.model.transformer.resblocks.7.attn.in_proj_weight')!;
    expect(back.mapped.map((m) => [m.key, m.transform])).toEqual([
      ['text_model.encoder.layers.7.self_attn.q_proj.weight', { kind: 'split', index: 0, count: 3 }],
      ['text_model.encoder.layers.7.self_attn.k_proj.weight', { kind: 'split', index: 1, count: 3 }],
      ['text_model.encoder.layers.7.self_attn.v_proj.weight', { kind: 'split', index: 2, count: 3 }],
    ]);
    expect(mappedShape([3072, 1024], back.mapped[0]!.transform, 'foreign')).toEqual([1024, 1024]);
    expect(ldmToDiffusers(layout, 'cond_stage_model.model.positional_embedding')?.mapped[0]?.key).toBe(
      'text_model.embeddings.position_embedding.weight',
    );
  });

  it('round-trips every SD 2.x diffusers key through LDM names', () => {
    const manifests = { unet: unetManifest(unetCfg), text_encoder: clipTextManifest(textCfg) } as const;
    for (const [component, manifest] of Object.entries(manifests) as [ComponentName, Map<string, number[]>][]) {
      for (const key of manifest.keys()) {
        const there = diffusersToLdm(layout, component, key)!;
        const back = ldmToDiffusers(layout, there.key)!;
        expect(back.mapped.map((m) => m.key), key).toContain(key);
      }
    }
  });
});

describe('the generic keymap function', () => {
  const map: Keymap = {
    name: 'test',
    sections: [
      { modules: [['a.', 'x.'], ['a.b.', 'y.'], ['exact.weight', 'e']] },
      { modules: [['r.', 's.']], inner: [['n1.', 'in.0.'], ['n1.w', 'special']] },
    ],
  };

  it('uses the longest module prefix and the longest inner rename, else keeps the rest verbatim', () => {
    expect(mapKey(map, 'a.b.c', 'diffusers')).toEqual([{ key: 'y.c', transform: { kind: 'identity' } }]);
    expect(mapKey(map, 'a.c.d', 'diffusers')[0]?.key).toBe('x.c.d');
    expect(mapKey(map, 'r.n1.w', 'diffusers')[0]?.key).toBe('s.special');
    expect(mapKey(map, 'r.n1.bias', 'diffusers')[0]?.key).toBe('s.in.0.bias');
    expect(mapKey(map, 'r.other', 'diffusers')[0]?.key).toBe('s.other');
    expect(mapKey(map, 's.in.0.bias', 'foreign')[0]?.key).toBe('r.n1.bias');
  });

  it('matches rows without a trailing dot only as whole keys, and segments only at dots', () => {
    expect(mapKey(map, 'exact.weight', 'diffusers')[0]?.key).toBe('e');
    expect(mapKey(map, 'e', 'foreign')[0]?.key).toBe('exact.weight');
    expect(mapKey(map, 'ab.c', 'diffusers')).toEqual([]);
    expect(mapKey(map, 'exact.weight2', 'diffusers')).toEqual([]);
  });

  it('reports collisions instead of dropping a tensor', () => {
    const bad: Keymap = { name: 'bad', sections: [{ modules: [['p.', 'q.'], ['z.', 'q.w.']] }] };
    expect(() => mapKeys(bad, ['p.w.k', 'z.k'], 'diffusers')).toThrow(/both map to 'q\.w\.k'/);
  });
});

describe('EMA names', () => {
  it("drops the dots of the UNet key below 'model.', as LDM's LitEma does", () => {
    expect(emaKeyOf('model.diffusion_model.input_blocks.0.0.weight')).toBe('model_ema.diffusion_modelinput_blocks00weight');
    expect(emaKeyOf('model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight')).toBe(
      'model_ema.diffusion_modelmiddle_block1transformer_blocks0attn1to_qweight',
    );
  });
});
