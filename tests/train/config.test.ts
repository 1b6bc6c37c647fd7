/**
 * Training configs: the example config parses, --set overrides are validated like the file,
 * defaults are diffusers' textual-inversion defaults, and every error names its field.
 */
import path from 'node:path';
import { describe, expect, it } from 'vitest';

import { trainingConfigSchema } from '../../src/methods/registry.js';
import {
  applyOverrides,
  ConfigError,
  effectiveLearningRate,
  loadTrainingConfig,
  lrScheduleOf,
  parseConfigText,
  parseOverride,
  parseTrainingConfig,
} from '../../src/train/config.js';
import { lrAt } from '../../src/train/lr-schedule.js';
import { METHODS } from '../../src/methods/registry.js';

const ROOT = path.resolve(import.meta.dirname, '../..');
const EXAMPLE = path.join(ROOT, 'configs/textual-inversion.yaml');
const schema = trainingConfigSchema();

const MINIMAL = [
  'method=textual_inversion',
  'model=m',
  'output_dir=o',
  'data.dir=d',
  'placeholder_token=<x>',
  'initializer_token=cat',
];

async function issuesOf(sets: readonly string[]): Promise<readonly string[]> {
  try {
    await loadTrainingConfig(undefined, sets, schema);
  } catch (e) {
    if (e instanceof ConfigError) return e.issues;
    throw e;
  }
  throw new Error('expected a ConfigError');
}

describe('configs/textual-inversion.yaml', () => {
  it('parses, and --set overrides model, data.dir, output_dir and steps', async () => {
    const { config } = await loadTrainingConfig(
      EXAMPLE,
      ['model=/models/tiny', 'data.dir=/data/cats', 'output_dir=/out', 'steps=40', 'data.resolution=32', 'sample_prompts=[a <my-cat>, b]'],
      schema,
    );
    expect(config.method).toBe('textual_inversion');
    expect(config.model).toBe('/models/tiny');
    expect(config.output_dir).toBe('/out');
    expect(config.steps).toBe(40);
    expect(config.sample_prompts).toEqual(['a <my-cat>', 'b']);
    if (config.method !== 'textual_inversion') throw new Error('method');
    expect(config.data.dir).toBe('/data/cats');
    expect(config.data.resolution).toBe(32);
    // Untouched fields keep the file's values.
    expect(config.placeholder_token).toBe('<my-cat>');
    expect(config.initializer_token).toBe('cat');
    expect(config.data.repeats).toBe(100);
  });

  it('uses placeholder paths only (no dependency on the test fixtures)', async () => {
    const { config } = await loadTrainingConfig(EXAMPLE, [], schema);
    expect(config.model).toBe('path/to/model');
    if (config.method !== 'textual_inversion') throw new Error('method');
    expect(config.data.dir).toBe('path/to/images');
  });
});

describe('textual-inversion defaults', () => {
  it("are diffusers' example defaults", async () => {
    const { config } = await loadTrainingConfig(undefined, MINIMAL, schema);
    if (config.method !== 'textual_inversion') throw new Error('method');
    expect(config.learning_rate).toBe(5e-4);
    expect(config.batch_size).toBe(1);
    expect(config.gradient_accumulation_steps).toBe(4);
    expect(config.steps).toBe(3000);
    expect(config.lr_scheduler).toBe('constant');
    expect(config.scale_lr).toBe(false);
    expect(config.adam_weight_decay).toBe(1e-2);
    expect([config.adam_beta1, config.adam_beta2, config.adam_epsilon]).toEqual([0.9, 0.999, 1e-8]);
    expect(config.num_vectors).toBe(1);
    expect(config.template).toBe('object');
    expect(config.max_grad_norm).toBeNull();
    expect(effectiveLearningRate(config)).toBe(5e-4);
  });

  it('scale_lr multiplies by batch size × accumulation (the README run: 5e-4 × 1 × 4)', async () => {
    const { config } = await loadTrainingConfig(undefined, [...MINIMAL, 'scale_lr=true'], schema);
    expect(effectiveLearningRate(config)).toBe(2e-3);
    const schedule = lrScheduleOf(config);
    expect(lrAt(0, schedule)).toBe(2e-3);
  });

  it('maps the lr_* fields onto the schedule', async () => {
    const { config } = await loadTrainingConfig(
      undefined,
      [...MINIMAL, 'lr_scheduler=cosine', 'lr_warmup_steps=10', 'steps=110', 'learning_rate=1e-3'],
      schema,
    );
    const s = lrScheduleOf(config);
    expect(lrAt(5, s)).toBeCloseTo(0.5e-3, 12);
    // cosine half-way through the decay: ½(1 + cos(π/2)) = ½.
    expect(lrAt(60, s)).toBeCloseTo(0.5e-3, 12);
  });
});

describe('--set', () => {
  it('reads values as YAML scalars and lists', () => {
    expect(parseOverride('steps=100').value).toBe(100);
    expect(parseOverride('learning_rate=5e-4').value).toBe(5e-4);
    expect(parseOverride('scale_lr=true').value).toBe(true);
    expect(parseOverride('max_grad_norm=null').value).toBeNull();
    expect(parseOverride('sample_prompts=[a photo, b]').value).toEqual(['a photo', 'b']);
    expect(parseOverride('model=path/to/m=1').value).toBe('path/to/m=1');
    expect(parseOverride('placeholder_token=<my-cat>').value).toBe('<my-cat>');
    expect(parseOverride('data.dir=imgs').path).toEqual(['data', 'dir']);
  });

  it('creates sections, replaces list entries, and refuses to descend into a value', () => {
    const raw = applyOverrides({ sample_prompts: ['a', 'b'] }, [parseOverride('data.dir=x'), parseOverride('sample_prompts.1=c')]);
    expect(raw).toEqual({ sample_prompts: ['a', 'c'], data: { dir: 'x' } });
    expect(() => applyOverrides({ steps: 3 }, [parseOverride('steps.x=1')])).toThrow(/steps: is 3, not a section/);
    expect(() => parseOverride('novalue')).toThrow(/expected key.path=value/);
  });

  it('is validated like the file', async () => {
    expect(await issuesOf([...MINIMAL, 'steps=abc'])).toEqual(['steps: expected number; found "abc"']);
  });
});

describe('errors', () => {
  it('name the field and the allowed values, one line per issue', async () => {
    const issues = await issuesOf([...MINIMAL, 'lr_scheduler=cosin', 'template=objet', 'num_vector=2', 'steps=0', 'data.resolution=33']);
    expect(issues).toHaveLength(5);
    expect(issues).toContain(
      'lr_scheduler: expected one of "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "piecewise_constant"; found "cosin"',
    );
    expect(issues).toContain('template: expected one of "object", "style", "none"; found "objet"');
    expect(issues).toContain("num_vector: unknown field (did you mean 'num_vectors'?)");
    expect(issues).toContain('steps: expected a number ≥ 1; found 0 (number)');
    expect(issues.find((i) => i.startsWith('data.resolution: '))).toMatch(/multiple of 8/);
    for (const line of issues) expect(line).not.toContain('\n');
  });

  it('list the methods for an unknown method and report missing required fields', async () => {
    // Every registered method is offered, whatever the registry holds.
    const known = METHODS.map((m) => `"${m.id}"`).join(', ');
    expect(known).toContain('"textual_inversion"');
    expect(await issuesOf(['method=foo'])).toEqual([`method: expected one of ${known}; found "foo"`]);
    expect(await issuesOf(['model=m'])).toEqual([`method: expected one of ${known}; found it missing`]);
    const missing = await issuesOf(['method=textual_inversion']);
    expect(missing).toEqual(
      expect.arrayContaining([
        'model: required, found it missing',
        'output_dir: required, found it missing',
        'data: required, found it missing',
        'placeholder_token: required, found it missing',
        'initializer_token: required, found it missing',
      ]),
    );
  });

  it('check cross-field rules', async () => {
    expect(await issuesOf([...MINIMAL, 'lr_scheduler=piecewise_constant'])).toEqual([
      "lr_step_rules: required when lr_scheduler is 'piecewise_constant', found it missing",
    ]);
    expect(await issuesOf([...MINIMAL, 'sample_every=10'])).toEqual(['sample_prompts: sample_every is set but there are no sample_prompts to generate']);
    expect(await issuesOf([...MINIMAL, 'data.template=style'])).toEqual([
      "data.template: textual inversion takes its templates from 'template' (here 'object'); leave data.template unset",
    ]);
    expect(await issuesOf([...MINIMAL, 'template=none', 'data.instance_prompt=a photo of a cat'])).toEqual([
      "data.instance_prompt: must contain the placeholder token '<x>' (only captions with it train the embedding)",
    ]);
  });

  it('resolution is a shorthand for data.resolution, set in one place', async () => {
    const { config } = await loadTrainingConfig(undefined, [...MINIMAL, 'resolution=64'], schema);
    if (config.method !== 'textual_inversion') throw new Error('method');
    expect(config.data.resolution).toBe(64);
    expect(await issuesOf([...MINIMAL, 'resolution=64', 'data.resolution=32'])).toEqual([
      'resolution: 64 differs from data.resolution 32; set one of them',
    ]);
  });

  it('report unreadable files and non-mapping documents', async () => {
    await expect(loadTrainingConfig('/nonexistent/run.yaml', [], schema)).rejects.toThrow(/run.yaml: invalid training config:\n {2}file not found/);
    expect(() => parseConfigText('- a\n- b\n', 'x.yaml')).toThrow(/expected a mapping of fields/);
    expect(() => parseConfigText('{"a": ', 'x.json')).toThrow(/not valid JSON/);
    expect(() => parseConfigText('a: [1, 2\n', 'x.yaml')).toThrow(/not valid YAML/);
  });

  it('JSON configs validate the same way', () => {
    const raw = parseConfigText(
      JSON.stringify({ method: 'textual_inversion', model: 'm', output_dir: 'o', data: { dir: 'd' }, placeholder_token: '<x>', initializer_token: 'cat' }),
      'run.json',
    );
    const config = parseTrainingConfig(raw, schema, 'run.json');
    expect(config.steps).toBe(3000);
  });
});
