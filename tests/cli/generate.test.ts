/**
 * `sdwb generate` as a user runs it: the reference run from --init-latents reproduces diffusers'
 * final latents, the PNG carries A1111 parameters that parse back to the settings given, and bad
 * input fails with one clear line.
 */
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseParameters, readPngText } from '../../src/io/png-text.js';
import { SafetensorsFile, writeSafetensors } from '../../src/io/safetensors.js';
import { diff, get, readRef, TINY_SD, type RefTensor } from '../helpers/fixtures.js';
import { runSdwb, type CliResult } from '../helpers/cli.js';

const PROMPT = 'a photo of an astronaut riding a horse';


const sdwb = (...args: string[]): Promise<CliResult> => runSdwb(args, { backend: 'wasm' });

/** The lines of stderr that are not the backend banner or progress. */
function errorLines(stderr: string): string[] {
  return stderr
    .trim()
    .split('\n')
    .filter((l) => l !== '' && !l.startsWith('tfjs backend:') && !l.startsWith('step '));
}

let dir: string;
let sampling: Map<string, RefTensor>;
let initFile: string;

beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'sdwb-generate-'));
  sampling = await readRef('sampling.safetensors');
  const init = get(sampling, 'init_latents');
  // Named other than `latents` on purpose: a single tensor is taken whatever its name.
  initFile = path.join(dir, 'init.safetensors');
  await writeSafetensors(initFile, { x_T: { dtype: 'F32', shape: init.shape, data: init.data } });
});

afterAll(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

describe('sdwb generate', () => {
  it('reproduces the reference final latents from --init-latents and writes a PNG with A1111 parameters', async () => {
    const out = path.join(dir, 'img');
    const saved = path.join(dir, 'out.safetensors');
    const r = await sdwb(
      'generate', '--model', TINY_SD, '--prompt', PROMPT, '--negative-prompt', '',
      '--steps', '10', '--guidance', '7.5', '--sampler', 'ddim', '--width', '32', '--height', '32', '--seed', '0',
      '--init-latents', initFile, '--save-latents', saved, '--out', out,
    ); // prettier-ignore
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain('seed: 0\n');
    expect(r.stderr).toMatch(/step 10\/10 \(100%\)/);

    const f = await SafetensorsFile.open(saved);
    try {
      expect(f.keys()).toEqual(['latents']);
      expect(f.info('latents').shape).toEqual([1, 4, 16, 16]);
      const d = diff(await f.readFloat32('latents'), get(sampling, 'final_latents').data);
      expect(d.rel, `max-abs ${d.maxAbs} vs scale ${d.scale}`).toBeLessThanOrEqual(1e-4);
    } finally {
      await f.close();
    }

    expect(await fs.readdir(out)).toEqual(['0-0.png']);
    const params = parseParameters(readPngText(await fs.readFile(path.join(out, '0-0.png')))['parameters']!);
    expect(params).toEqual({
      prompt: PROMPT,
      negativePrompt: '',
      settings: {
        Steps: '10',
        Sampler: 'DDIM',
        'CFG scale': '7.5',
        Seed: '0',
        Size: '32x32',
        'Model hash': '887e133466', // sha256 of unet/diffusion_pytorch_model.safetensors (fixture README)
        Model: 'tiny-sd',
      },
    });
  });

  it('prints a random seed when none is given and names a batch <index>-<seed>.png, continuing the folder', async () => {
    const out = path.join(dir, 'batch');
    await fs.mkdir(out);
    await fs.writeFile(path.join(out, '4-123.png'), '');
    const r = await sdwb(
      'generate', '--model', TINY_SD, '--prompt', 'a cat', '--negative-prompt', 'blurry, dark', '--steps', '2',
      '--sampler', 'dpmpp_2m', '--karras', '--batch', '2', '--clip-skip', '2', '--out', out,
    ); // prettier-ignore
    expect(r.code, r.stderr).toBe(0);
    const seed = /^seed: (\d+)$/m.exec(r.stdout)?.[1];
    expect(seed).toBeDefined();
    expect((await fs.readdir(out)).sort()).toEqual(['4-123.png', `5-${seed}.png`, `6-${seed}.png`]);
    const params = parseParameters(readPngText(await fs.readFile(path.join(out, `6-${seed}.png`)))['parameters']!);
    expect(params.negativePrompt).toBe('blurry, dark');
    expect(params.settings).toMatchObject({ Steps: '2', Sampler: 'DPM++ 2M Karras', Seed: seed, Size: '32x32', 'Clip skip': '2' });
  });

  it('fails with one line naming expected and found shapes for wrong --init-latents', async () => {
    const r = await sdwb('generate', '--model', TINY_SD, '--prompt', 'x', '--batch', '2', '--init-latents', initFile, '--out', path.join(dir, 'never'));
    expect(r.code).toBe(1);
    expect(errorLines(r.stderr)).toEqual([
      `sdwb generate: ${initFile}: tensor 'x_T' has shape [1, 4, 16, 16], expected [2, 4, 16, 16] = [batch, latent channels, height/f, width/f] (--batch 2 at 32x32, f = 2)`,
    ]);
  });

  it('fails with one line for a size the VAE cannot divide, a wrong model path and a non-exported model on the onnx engine', async () => {
    const size = await sdwb('generate', '--model', TINY_SD, '--prompt', 'x', '--width', '30', '--height', '32', '--out', dir);
    expect(size.code).toBe(1);
    expect(errorLines(size.stderr)).toEqual(['sdwb generate: width 30 is not a positive multiple of 4 (VAE factor 2 × 2^1 UNet downsamplings); try 32']);

    const missing = await sdwb('generate', '--model', '/no/such/model', '--prompt', 'x', '--out', dir);
    expect(missing.code).toBe(1);
    expect(errorLines(missing.stderr)).toEqual(['sdwb generate: /no/such/model: no such model folder']);

    const onnx = await sdwb('generate', '--engine', 'onnx', '--model', TINY_SD, '--prompt', 'x', '--out', dir);
    expect(onnx.code).toBe(1);
    expect(errorLines(onnx.stderr)).toEqual([
      `sdwb generate: ${TINY_SD}: no text_encoder/model.onnx — not an ONNX export (make one with sdwb export; --engine onnx needs one)`,
    ]);
  });
});
