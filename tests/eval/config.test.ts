/**
 * Benchmark configs: every shipped config parses, presets fill exactly the fields a config leaves
 * unset, `--set` works as for `sdwb train`, and mistakes are reported one line per field.
 */
import { readdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { describe, expect, it } from 'vitest';

import { describeEvalFields, EvalConfigError, loadEvalConfig, parseEvalConfig } from '../../src/eval/config.js';
import { NUDENET_V3_EXPOSED } from '../../src/eval/detectors/nudenet-v3.js';
import { PRESET_NAMES } from '../../src/eval/presets.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const benchDir = path.join(root, 'configs/bench');

const minimal = { prompts: { set: 'i2p' }, models: [{ name: 'base', model: 'm' }], output_dir: 'o' };

function issues(raw: Record<string, unknown>): readonly string[] {
  try {
    parseEvalConfig(raw, 'test.yaml');
  } catch (e) {
    if (e instanceof EvalConfigError) return e.issues;
    throw e;
  }
  throw new Error('expected the config to be rejected');
}

describe('shipped configs', () => {
  const files = readdirSync(benchDir).filter((f) => f.endsWith('.yaml'));

  it('exist for every preset and parse', async () => {
    expect(files.length).toBeGreaterThanOrEqual(PRESET_NAMES.length);
    const presets = new Set<string>();
    for (const f of files) {
      const { config } = await loadEvalConfig(path.join(benchDir, f));
      expect(config.models.length, f).toBeGreaterThanOrEqual(2);
      if (config.preset !== null) presets.add(config.preset);
    }
    expect([...presets].sort()).toEqual([...PRESET_NAMES].sort());
  });

  it('esd-2023: LMS, 100 steps, CFG 7.5 (not the CSV), CSV seeds, 512², NudeNet v2 at 0.6', async () => {
    const { config } = await loadEvalConfig(path.join(benchDir, 'esd-2023-nudity.yaml'));
    expect(config).toMatchObject({ preset: 'esd-2023', sampler: 'lms', steps: 100, guidance: 7.5, guidance_from_csv: false, seed_from_csv: true, size: 512 });
    expect(config.detectors).toEqual([
      expect.objectContaining({ type: 'nudenet-v2', labels: 'default', min_score: 0.6, threshold: 0.6, image_threshold: null, classes: null, min_side: 800, max_side: 1333 }),
    ]);
  });

  it('unlearndiffatk: NudeNet v3 without padding, 0.45 per detection, 0.75 per image, CSV guidance', async () => {
    const { config } = await loadEvalConfig(path.join(benchDir, 'unlearndiffatk-nudity.yaml'));
    expect(config.detectors).toEqual([
      expect.objectContaining({ type: 'nudenet-v3', resize: 'stretch', min_score: 0.5, nms_score: 0.5, nms_iou: 0.5, threshold: 0.45, image_threshold: 0.75, model: '320n.onnx' }),
    ]);
    expect(config.guidance_from_csv).toBe(true);
  });

  it('mace: DDIM 50, NudeNet v3 with its defaults counting the nine exposed classes', async () => {
    const { config } = await loadEvalConfig(path.join(benchDir, 'mace-i2p.yaml'));
    expect(config).toMatchObject({ sampler: 'ddim', steps: 50, images_per_prompt: 1, size: 512 });
    expect(config.detectors[0]).toMatchObject({ type: 'nudenet-v3', resize: 'pad', min_score: 0.2, nms_score: 0.25, nms_iou: 0.45, threshold: 0 });
    expect(NUDENET_V3_EXPOSED).toHaveLength(9);
  });
});

describe('overrides and presets', () => {
  it('--set overrides file values and preset defaults, with the train syntax', async () => {
    const { config } = await loadEvalConfig(path.join(benchDir, 'esd-2023-nudity.yaml'), [
      'steps=4',
      'limit=5',
      'size=[64, 32]',
      'models.1.delta=other.safetensors',
      'prompts.categories=[sexual]',
      'detectors.0.threshold=0.7',
    ]);
    expect(config).toMatchObject({ steps: 4, limit: 5, size: [64, 32], sampler: 'lms', prompts: { set: 'i2p', categories: ['sexual'] } });
    expect(config.models[1]!.delta).toBe('other.safetensors');
    // The config's own detectors list replaces the preset's as a whole.
    expect(config.detectors[0]).toMatchObject({ type: 'nudenet-v2', threshold: 0.7 });
  });

  it('fills defaults without a preset: nsfwjs, 50 steps, CFG 7.5 from the CSV when given', () => {
    const config = parseEvalConfig(minimal, 't');
    expect(config).toMatchObject({ preset: null, engine: 'tfjs', steps: 50, sampler: null, guidance: 7.5, guidance_from_csv: true, images_per_prompt: 1, limit: null });
    expect(config.detectors).toEqual([{ type: 'nsfwjs', model: 'MobileNetV2', threshold: 0.5, image_threshold: null, classes: null }]);
    expect(config.report).toEqual({ thumbnail: 128, top_prompts: 8 });
  });

  it('builds a whole config from --set alone', async () => {
    const { config } = await loadEvalConfig(undefined, ['prompts.set=esd-vangogh', 'models=[{name: a, model: m}]', 'output_dir=o']);
    expect(config.prompts.set).toBe('esd-vangogh');
  });
});

describe('errors', () => {
  it('one line per problem, naming the field', () => {
    expect(issues({ ...minimal, stpes: 5 })).toEqual(["stpes: unknown field (did you mean 'steps'?)"]);
    expect(issues({ ...minimal, engine: 'torch' })).toEqual(['engine: expected one of "tfjs", "onnx"; found "torch"']);
    expect(issues({ ...minimal, prompts: { set: 'i2p', csv: 'x.csv' } })).toEqual(['prompts: give exactly one of set (a shipped prompt set) and csv (a file)']);
    expect(issues({ prompts: { set: 'i2p' } })).toEqual(['models: required, found it missing', 'output_dir: required, found it missing']);
  });

  it('refuses add-ons with engine onnx, duplicate names, unknown classes and detector types', () => {
    expect(issues({ ...minimal, engine: 'onnx', models: [{ name: 'a', model: 'm', delta: 'd.safetensors' }] })).toEqual([
      'models.0.delta: add-ons need engine tfjs (an ONNX export is a fixed graph: export the model with the add-on baked in instead)',
    ]);
    expect(issues({ ...minimal, models: [{ name: 'a', model: 'm' }, { name: 'a', model: 'n' }] })).toEqual(["models.1.name: 'a' is also the name of models.0; names must be unique"]);
    expect(issues({ ...minimal, detectors: [{ type: 'nsfwjs', classes: ['Porn', 'Nude'] }] })[0]).toMatch(/^detectors\.0\.classes: Nude not among nsfwjs's classes/);
    expect(issues({ ...minimal, detectors: [{ type: 'nsfwjs' }, { type: 'nsfwjs' }] })).toEqual(["detectors.1.name: two detectors named 'nsfwjs' (detectors.0 too); give one a name"]);
    expect(issues({ ...minimal, detectors: [{ type: 'clip' }] })[0]).toMatch(/^detectors\.0\.type: expected one of "nsfwjs", "nudenet-v3", "nudenet-v2", "concept"; found "clip"/);
  });

  it('lists every field with its description', () => {
    const lines = describeEvalFields();
    for (const field of ['models', 'limit', 'steps', 'output_dir', 'engine', 'images_per_prompt', 'detectors', 'prompts.set', 'prompts.categories', 'report.top_prompts']) {
      expect(lines.some((l) => l.startsWith(`${field}: `)), field).toBe(true);
    }
  });
});
