import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SafetensorsFile } from '../../src/io/safetensors.js';
import { TINY_SD } from '../helpers/fixtures.js';
import { TINY_SINGLE, writeSparseSafetensors } from '../io/keymaps.helpers.js';
import { runSdwb, type CliResult } from '../helpers/cli.js';


const sdwb = (...args: string[]): Promise<CliResult> => runSdwb(args);

let tmp: string;
beforeAll(async () => {
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'sdwb-convert-'));
});
afterAll(async () => {
  await fs.rm(tmp, { recursive: true, force: true });
});

const readJson = async (file: string): Promise<unknown> => JSON.parse(await fs.readFile(file, 'utf8'));

describe('sdwb convert', () => {
  it('single file → diffusers folder, with the configs from --config and the notes on stderr', async () => {
    const out = path.join(tmp, 'from-single');
    const r = await sdwb('convert', TINY_SINGLE, '--to', 'diffusers', '--out', out, '--config', TINY_SD);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain(`wrote ${out}`);
    expect(r.stderr).toMatch(/note: .*configs taken from/);
    for (const c of ['unet', 'vae', 'text_encoder']) {
      expect(await readJson(path.join(out, c, 'config.json'))).toEqual(await readJson(path.join(TINY_SD, c, 'config.json')));
    }
    expect((await fs.readdir(out)).sort()).toEqual(['model_index.json', 'scheduler', 'text_encoder', 'tokenizer', 'unet', 'vae']);
    const inspect = await sdwb('inspect', '--json', out);
    expect(inspect.code, inspect.stdout).toBe(0);
  });

  it('diffusers folder → single file (fp16) that inspect reads back as SD 1.x with no problems', async () => {
    const out = path.join(tmp, 'tiny-fp16.safetensors');
    const r = await sdwb('convert', TINY_SD, '--to', 'single-file', '--out', out, '--dtype', 'fp16');
    expect(r.code, r.stderr).toBe(0);
    const f = await SafetensorsFile.open(out);
    expect(new Set([...f.tensors.values()].map((t) => t.dtype))).toEqual(new Set(['F16']));
    await f.close();
    const inspect = await sdwb('inspect', '--json', out);
    expect(inspect.code, inspect.stdout).toBe(0);
    const report = JSON.parse(inspect.stdout) as { architecture: string; problems: string[]; components: { name: string; stats: { tensors: number } }[] };
    expect(report.architecture).toBe('SD 1.x (original single-file layout)');
    // The fixture README's 368 weights: the folder's tensors minus the text encoder's position-id buffer.
    expect(report.components.map((c) => [c.name, c.stats.tensors])).toEqual([
      ['unet', 208],
      ['vae', 124],
      ['text_encoder', 36],
    ]);
    expect(report.problems).toEqual([]);
  });

  it('writes the prediction type asked for into the scheduler config', async () => {
    const out = path.join(tmp, 'vpred');
    const r = await sdwb('convert', TINY_SINGLE, '--to', 'diffusers', '--out', out, '--config', TINY_SD, '--prediction-type', 'v_prediction');
    expect(r.code, r.stderr).toBe(0);
    expect(((await readJson(path.join(out, 'scheduler/scheduler_config.json'))) as { prediction_type: string }).prediction_type).toBe('v_prediction');
  });

  it('fails with one line for bad flags, an existing output and unsupported models', async () => {
    const bad = await sdwb('convert', TINY_SINGLE, '--to', 'onnx', '--out', path.join(tmp, 'x'));
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/--to: expected diffusers or single-file/);

    const exists = path.join(tmp, 'exists');
    await fs.mkdir(exists);
    const again = await sdwb('convert', TINY_SINGLE, '--to', 'diffusers', '--out', exists);
    expect(again.code).toBe(1);
    expect(again.stderr.trim().split('\n')).toHaveLength(1);
    expect(again.stderr).toMatch(/already exists/);

    const sdxl = path.join(tmp, 'sdxl.safetensors');
    await writeSparseSafetensors(sdxl, new Map([['conditioner.embedders.0.transformer.text_model.final_layer_norm.weight', { dtype: 'F16', shape: [768] }]]));
    const r = await sdwb('convert', sdxl, '--to', 'diffusers', '--out', path.join(tmp, 'sdxl-out'));
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/sdwb convert: SDXL .*not supported yet/);
    expect(await fs.stat(path.join(tmp, 'sdxl-out')).catch(() => undefined)).toBeUndefined();
  });
});
