/**
 * `sdwb export` and `sdwb generate --engine onnx` as a user runs them: an export with an
 * embedding and a delta, and one with two hypernetworks at strengths (the add-on flags of `sdwb
 * generate`, with the same effect: the export generates what tfjs generates with the flags), the
 * reference DDIM run through the exported folder, a single-file checkpoint exported directly, and
 * bad flags.
 */
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readInitializers } from '../../src/export/read.js';
import { parseParameters, readPngText } from '../../src/io/png-text.js';
import { SafetensorsFile, writeSafetensors } from '../../src/io/safetensors.js';
import { diff, get, readRef, TINY_SD } from '../helpers/fixtures.js';
import { writeTestHypernetwork } from '../helpers/hypernetwork.js';
import { runSdwb, type CliResult } from '../helpers/cli.js';

const PROMPT = 'a photo of an astronaut riding a horse';

const sdwb = (...args: string[]): Promise<CliResult> => runSdwb(args, { backend: 'wasm' });

let dir: string;
let exported: string;
let embeddingFile: string;
let deltaFile: string;
let hypernetworkFiles: [string, string];

beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'sdwb-onnx-cli-'));
  embeddingFile = path.join(dir, 'shiny-style.safetensors');
  await writeSafetensors(embeddingFile, { emb_params: { dtype: 'F32', shape: [2, 32], data: Float32Array.from({ length: 64 }, (_, i) => Math.sin(i)) } });
  deltaFile = path.join(dir, 'edit.safetensors');
  // A delta replaces the tensors it holds (bare keys are UNet keys), as `sdwb generate --delta` applies it.
  await writeSafetensors(deltaFile, { 'conv_in.bias': { dtype: 'F32', shape: [32], data: Float32Array.from({ length: 32 }, (_, i) => 0.01 * i) } });
  exported = path.join(dir, 'onnx');
  // Two hypernetworks, chained: one on every attention of the tiny UNet (32: cross and self, 64:
  // self), one on the 64-wide self-attention only, each with a Dropout that generation skips.
  hypernetworkFiles = [path.join(dir, 'hn-a.pt'), path.join(dir, 'hn-b.pt')];
  await writeTestHypernetwork(hypernetworkFiles[0], [32, 64], { layerStructure: [1, 2, 1], activation: 'elu', activateOutput: false, layerNorm: true, dropoutStructure: [0, 0.3, 0] }, 3);
  await writeTestHypernetwork(hypernetworkFiles[1], [64], { layerStructure: [1, 1.5, 1], activation: 'swish', activateOutput: true, layerNorm: false, dropoutStructure: [0, 0, 0] }, 4);
});

async function readLatents(file: string): Promise<Float32Array> {
  const f = await SafetensorsFile.open(file);
  try {
    return await f.readFloat32('latents');
  } finally {
    await f.close();
  }
}

afterAll(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

describe('sdwb export', () => {
  it('exports the fixture with an embedding and a delta, listing what it wrote', async () => {
    const r = await sdwb('export', '--model', TINY_SD, '--out', exported, '--embedding', embeddingFile, '--delta', deltaFile);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^unet: .*unet\/model.onnx, \d+ nodes/m);
    expect(r.stdout).toContain('added tokens: shiny-style shiny-style_1\n');
    const index = JSON.parse(await fs.readFile(path.join(exported, 'model_index.json'), 'utf8')) as { _sdwb_export: { add_ons: unknown[] } };
    expect(index._sdwb_export.add_ons).toEqual([
      { kind: 'embedding', source: 'shiny-style.safetensors' },
      { kind: 'delta', source: 'edit.safetensors' },
    ]);
    const stored = await readInitializers(path.join(exported, 'unet', 'model.onnx'), (n) => n === 'conv_in.bias');
    expect(Array.from(stored.get('conv_in.bias')!.data as Float32Array)).toEqual(Array.from(Float32Array.from({ length: 32 }, (_, i) => 0.01 * i)));
  });

  it('generates from the export what sdwb generate gives on tfjs with the same --embedding and --delta', async () => {
    const common = ['--prompt', 'a shiny-style photo of a cat', '--steps', '3', '--sampler', 'ddim', '--seed', '5'];
    const onnxLatents = path.join(dir, 'onnx-latents.safetensors');
    const tfjsLatents = path.join(dir, 'tfjs-latents.safetensors');
    const a = await sdwb('generate', '--engine', 'onnx', '--threads', '1', '--model', exported, ...common, '--save-latents', onnxLatents, '--out', path.join(dir, 'a'));
    expect(a.code, a.stderr).toBe(0);
    const b = await sdwb('generate', '--model', TINY_SD, '--embedding', embeddingFile, '--delta', deltaFile, ...common, '--save-latents', tfjsLatents, '--out', path.join(dir, 'b'));
    expect(b.code, b.stderr).toBe(0);
    const d = diff(await readLatents(onnxLatents), await readLatents(tfjsLatents));
    expect(d.rel, JSON.stringify(d)).toBeLessThanOrEqual(1e-4);
  });

  it('exports hypernetworks at strengths (chained in flag order) that generate what sdwb generate gives on tfjs with the same --hypernetwork flags', async () => {
    const [a, b] = hypernetworkFiles;
    const flags = ['--hypernetwork', `${a}:0.6`, '--hypernetwork', `${b}:-0.8`];
    const out = path.join(dir, 'onnx-hn');
    const e = await sdwb('export', '--model', TINY_SD, '--out', out, ...flags);
    expect(e.code, e.stderr).toBe(0);
    expect(e.stdout).toMatch(/^unet: .*unet\/model.onnx, \d+ nodes/m);
    const index = JSON.parse(await fs.readFile(path.join(out, 'model_index.json'), 'utf8')) as {
      _sdwb_export: { add_ons: unknown[]; unet_hooks: boolean; hypernetworks: { name: string; source: string; sha256: string; strength: number; widths: number[] }[] };
    };
    expect(index._sdwb_export.add_ons).toEqual([
      { kind: 'hypernetwork', source: 'hn-a.pt', weight: 0.6 },
      { kind: 'hypernetwork', source: 'hn-b.pt', weight: -0.8 },
    ]);
    expect(index._sdwb_export.unet_hooks).toBe(true);
    expect(index._sdwb_export.hypernetworks).toMatchObject([
      { name: 'hn-a', source: 'hn-a.pt', strength: 0.6, widths: [32, 64] },
      { name: 'hn-b', source: 'hn-b.pt', strength: -0.8, widths: [64] },
    ]);
    expect(index._sdwb_export.hypernetworks[0]!.sha256).toMatch(/^[0-9a-f]{64}$/);

    const common = ['--prompt', 'a photo of a cat', '--steps', '3', '--sampler', 'ddim', '--seed', '5'];
    const latents = (name: string) => path.join(dir, `${name}-latents.safetensors`);
    const o = await sdwb('generate', '--engine', 'onnx', '--threads', '1', '--model', out, ...common, '--save-latents', latents('onnx-hn'), '--out', path.join(dir, 'c'));
    expect(o.code, o.stderr).toBe(0);
    const t = await sdwb('generate', '--model', TINY_SD, ...flags, ...common, '--save-latents', latents('tfjs-hn'), '--out', path.join(dir, 'd'));
    expect(t.code, t.stderr).toBe(0);
    const base = await sdwb('generate', '--model', TINY_SD, ...common, '--save-latents', latents('tfjs-base'), '--out', path.join(dir, 'e'));
    expect(base.code, base.stderr).toBe(0);
    const onnx = await readLatents(latents('onnx-hn'));
    const d = diff(onnx, await readLatents(latents('tfjs-hn')));
    console.log(`[onnx-cli] hypernetwork export vs tfjs generate --hypernetwork: final latents rel ${d.rel.toExponential(2)}`);
    expect(d.rel, JSON.stringify(d)).toBeLessThanOrEqual(1e-4);
    // Not vacuous: the hypernetworks move the latents far beyond that tolerance.
    expect(diff(onnx, await readLatents(latents('tfjs-base'))).rel).toBeGreaterThan(1e-2);
  });

  it('refuses a missing add-on file and a bad opset before writing anything', async () => {
    const h = await sdwb('export', '--model', TINY_SD, '--out', path.join(dir, 'h'), '--hypernetwork', `${path.join(dir, 'missing.pt')}:0.5`);
    expect(h.code).not.toBe(0);
    expect(h.stderr).toContain('missing.pt');
    const l = await sdwb('export', '--model', TINY_SD, '--out', path.join(dir, 'l'), '--lora', path.join(dir, 'missing.safetensors:0.8'));
    expect(l.code).not.toBe(0);
    expect(l.stderr).toContain('missing.safetensors');
    const o = await sdwb('export', '--model', TINY_SD, '--out', path.join(dir, 'o'), '--opset', '11');
    expect(o.code).toBe(2);
    expect(o.stderr).toMatch(/--opset must be an integer in \[14, 21\], got '11'/);
    for (const d of ['h', 'l', 'o']) await expect(fs.stat(path.join(dir, d))).rejects.toThrow(/ENOENT/);
  });

  it('exports a single-file checkpoint (converted on the way) to the same UNet outputs', async () => {
    const single = path.join(dir, 'tiny.safetensors');
    const c = await sdwb('convert', TINY_SD, '--to', 'single-file', '--out', single);
    expect(c.code, c.stderr).toBe(0);
    const out = path.join(dir, 'from-single');
    const r = await sdwb('export', '--model', single, '--out', out);
    expect(r.code, r.stderr).toBe(0);
    const a = await readInitializers(path.join(out, 'unet', 'model.onnx'), (n) => n === 'conv_out.weight');
    const b = await readInitializers(path.join(exported, 'unet', 'model.onnx'), (n) => n === 'conv_out.weight');
    expect(Array.from(a.get('conv_out.weight')!.data as Float32Array)).toEqual(Array.from(b.get('conv_out.weight')!.data as Float32Array));
  });
});

describe('sdwb generate --engine onnx', () => {
  it('reproduces the reference final latents from --init-latents and writes A1111 parameters', async () => {
    const sampling = await readRef('sampling.safetensors');
    const init = get(sampling, 'init_latents');
    const initFile = path.join(dir, 'init.safetensors');
    await writeSafetensors(initFile, { latents: { dtype: 'F32', shape: init.shape, data: init.data } });
    const plain = path.join(dir, 'plain');
    const e = await sdwb('export', '--model', TINY_SD, '--out', plain);
    expect(e.code, e.stderr).toBe(0);
    const saved = path.join(dir, 'out.safetensors');
    const out = path.join(dir, 'img');
    const r = await sdwb(
      'generate', '--engine', 'onnx', '--threads', '1', '--model', plain, '--prompt', PROMPT, '--negative-prompt', '',
      '--steps', '10', '--guidance', '7.5', '--sampler', 'ddim', '--width', '32', '--height', '32', '--seed', '0',
      '--init-latents', initFile, '--save-latents', saved, '--out', out,
    ); // prettier-ignore
    expect(r.code, r.stderr).toBe(0);
    const f = await SafetensorsFile.open(saved);
    try {
      const d = diff(await f.readFloat32('latents'), get(sampling, 'final_latents').data);
      expect(d.rel, JSON.stringify(d)).toBeLessThanOrEqual(1e-4);
    } finally {
      await f.close();
    }
    const params = parseParameters(readPngText(await fs.readFile(path.join(out, '0-0.png')))['parameters']!);
    // No add-ons: the export keeps the base model's hash.
    expect(params.settings).toMatchObject({ Sampler: 'DDIM', Seed: '0', 'Model hash': '887e133466', Model: 'plain' });
  });

  it('fails with one line for a folder that is not an export and for an unavailable CUDA provider', async () => {
    const r = await sdwb('generate', '--engine', 'onnx', '--model', TINY_SD, '--prompt', 'x', '--out', dir);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(`sdwb generate: ${TINY_SD}: no text_encoder/model.onnx — not an ONNX export (make one with sdwb export; --engine onnx needs one)`);
    const cuda = await sdwb('generate', '--engine', 'onnx', '--execution-provider', 'cuda', '--model', exported, '--prompt', 'x', '--steps', '1', '--out', dir);
    if (cuda.code !== 0) expect(cuda.stderr).toMatch(/--execution-provider cuda: onnxruntime's CUDA provider did not load/);
  });
});
