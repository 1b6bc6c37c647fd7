/**
 * scheduler_config.json parsing: the fixture's SD 1.5-style file, defaults, and errors that name
 * the file and the key.
 */
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { parseSchedulerConfig, readSchedulerConfig } from '../../src/schedulers/config.js';
import { TINY_SD } from '../helpers/fixtures.js';

const SD15 = {
  _class_name: 'PNDMScheduler',
  beta_end: 0.012,
  beta_schedule: 'scaled_linear',
  beta_start: 0.00085,
  num_train_timesteps: 1000,
  set_alpha_to_one: false,
  skip_prk_steps: true,
  steps_offset: 1,
  trained_betas: null,
  clip_sample: false,
};

describe('scheduler config', () => {
  it('reads the fixture folder', async () => {
    const cfg = await readSchedulerConfig(path.join(TINY_SD, 'scheduler'));
    expect(cfg).toMatchObject({
      savedClass: 'PNDMScheduler',
      trainTimesteps: 1000,
      betaSchedule: 'scaled_linear',
      betaStart: 0.00085,
      betaEnd: 0.012,
      predictionType: 'epsilon',
      stepsOffset: 1,
      finalAlphaIsOne: false,
      timestepSpacing: 'leading',
      clipSample: false,
      skipPrkSteps: true,
    });
  });

  it('leaves sampler-specific keys undefined when absent and tolerates unknown keys', () => {
    const cfg = parseSchedulerConfig({ ...SD15, clip_sample: undefined, set_alpha_to_one: undefined, some_future_key: 3 });
    expect(cfg.clipSample).toBeUndefined();
    expect(cfg.finalAlphaIsOne).toBeUndefined();
    expect(cfg.timestepSpacing).toBeUndefined();
    expect(cfg.predictionType).toBe('epsilon');
  });

  it('honours prediction_type, timestep_spacing and use_karras_sigmas', () => {
    const cfg = parseSchedulerConfig({ ...SD15, prediction_type: 'v_prediction', timestep_spacing: 'trailing', use_karras_sigmas: true });
    expect(cfg.predictionType).toBe('v_prediction');
    expect(cfg.timestepSpacing).toBe('trailing');
    expect(cfg.karrasSigmas).toBe(true);
  });

  it('names the file and the missing key', () => {
    const { beta_schedule: _, num_train_timesteps: __, ...missing } = SD15;
    expect(() => parseSchedulerConfig(missing, 'my/scheduler_config.json')).toThrow(
      /^my\/scheduler_config\.json: .*missing required key 'num_train_timesteps'.*'beta_schedule': required key is missing/,
    );
  });

  it('rejects settings that would silently change the maths', () => {
    expect(() => parseSchedulerConfig({ ...SD15, thresholding: true }, 'f.json')).toThrow(/f\.json: 'thresholding': true is not supported/);
    expect(() => parseSchedulerConfig({ ...SD15, prediction_type: 'x0' }, 'f.json')).toThrow(/f\.json: 'prediction_type'/);
  });
});
