import { describe, expect, it } from 'vitest';

import { dataConfigSchema, parseDataConfig, targetSize } from '../../src/data/config.js';

describe('dataConfigSchema', () => {
  it('applies the documented defaults', () => {
    expect(parseDataConfig({ dir: 'images' })).toEqual({
      dir: 'images',
      resolution: 512,
      center_crop: true,
      random_flip: false,
      repeats: 1,
      caption_extension: '.txt',
      template: 'none',
      shuffle_caption: false,
      keep_tokens: 0,
      caption_dropout_rate: 0,
      on_bad_image: 'skip',
      upscale_small: false,
      background: '#ffffff',
      cache_latents: false,
      recursive: false,
    });
  });

  it('documents every field with its default', () => {
    const shape = dataConfigSchema.shape;
    for (const [key, field] of Object.entries(shape)) {
      expect(field.description, key).toBeTruthy();
      if (key !== 'dir') expect(field.description, key).toMatch(/Default/);
    }
  });

  it('names the key of each problem', () => {
    expect(() => parseDataConfig({})).toThrow(/data\.dir: required/);
    expect(() => parseDataConfig({ dir: 'x', resolution: 500 })).toThrow(/data\.resolution: expected a multiple of 8/);
    expect(() => parseDataConfig({ dir: 'x', template: 'person' })).toThrow(/data\.template/);
    expect(() => parseDataConfig({ dir: 'x', caption_dropout_rate: 1.5 })).toThrow(/data\.caption_dropout_rate/);
    expect(() => parseDataConfig({ dir: 'x', caption_extension: 'txt' })).toThrow(/data\.caption_extension: expected an extension/);
    expect(() => parseDataConfig({ dir: 'x', resoluton: 512 })).toThrow(/resoluton/);
  });

  it('rejects a fixed instance prompt together with templates', () => {
    expect(() => parseDataConfig({ dir: 'x', instance_prompt: 'a photo of sks dog', template: 'object' })).toThrow(
      /data\.instance_prompt: set either instance_prompt or template/,
    );
  });

  it('gives a square size from resolution and lets width/height override it', () => {
    expect(targetSize(parseDataConfig({ dir: 'x', resolution: 32 }))).toEqual({ width: 32, height: 32 });
    expect(targetSize(parseDataConfig({ dir: 'x', resolution: 64, height: 32 }))).toEqual({ width: 64, height: 32 });
  });
});
