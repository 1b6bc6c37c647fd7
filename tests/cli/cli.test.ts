import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { TINY_REF, TINY_SD } from '../helpers/fixtures.js';
import { runSdwb, type CliResult } from '../helpers/cli.js';



const sdwb = (...args: string[]): Promise<CliResult> => runSdwb(args);

async function tmpDir(): Promise<string> {
  return fs.mkdtemp(path.join(os.tmpdir(), 'sdwb-cli-'));
}

interface TokenFixture {
  prompts: { key: string; text: string; input_ids: number[] }[];
}

describe('sdwb tokenize', () => {
  it('prints the reference input_ids with --json', async () => {
    const ref = JSON.parse(await fs.readFile(path.join(TINY_REF, 'tokens.json'), 'utf8')) as TokenFixture;
    for (const key of ['astronaut', 'long', 'emoji']) {
      const p = ref.prompts.find((x) => x.key === key)!;
      const r = await sdwb('tokenize', '--model', TINY_SD, '--json', '--', p.text);
      expect(r.code, r.stderr).toBe(0);
      const lastLine = r.stdout.trim().split('\n').at(-1)!;
      expect((JSON.parse(lastLine) as { input_ids: number[] }).input_ids).toEqual(p.input_ids);
    }
  });

  it('reports the count against the 75-token window', async () => {
    const r = await sdwb('tokenize', '--model', TINY_SD, '--', 'a photo of an astronaut riding a horse');
    expect(r.code).toBe(0);
    expect(r.stdout).toContain('8/75 tokens (fits)');
  });

  it('fails with one line for a missing model', async () => {
    const r = await sdwb('tokenize', '--model', '/nonexistent/model', '--', 'hello');
    expect(r.code).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toContain('/nonexistent/model');
  });
});

describe('sdwb inspect', () => {
  it('checks the tiny fixture against the architecture its configs imply', async () => {
    const r = await sdwb('inspect', '--json', TINY_SD);
    const report = JSON.parse(r.stdout) as {
      architecture: string;
      problems: string[];
      components: { name: string; missingKeys: string[]; unexpectedKeys: string[]; stats?: { tensors: number } }[];
    };
    expect(report.problems).toEqual([]);
    expect(r.code).toBe(0);
    expect(report.architecture).toContain('custom size');
    const unet = report.components.find((c) => c.name === 'unet')!;
    expect(unet.missingKeys).toEqual([]);
    expect(unet.unexpectedKeys).toEqual([]);
    // The fixture README's key table: UNet 208 tensors is what save_pretrained wrote.
    expect(unet.stats?.tensors).toBe(208);
  });

  it('names the missing config key of a broken component', async () => {
    const dir = await tmpDir();
    await fs.cp(TINY_SD, dir, { recursive: true });
    const cfgFile = path.join(dir, 'unet', 'config.json');
    await fs.chmod(cfgFile, 0o644);
    const cfg = JSON.parse(await fs.readFile(cfgFile, 'utf8')) as Record<string, unknown>;
    delete cfg.block_out_channels;
    await fs.writeFile(cfgFile, JSON.stringify(cfg));
    const r = await sdwb('inspect', dir);
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/block_out_channels/);
    await fs.rm(dir, { recursive: true, force: true });
  });

  it('fails with one line naming a truncated weights file', async () => {
    const dir = await tmpDir();
    const src = path.join(TINY_SD, 'unet', 'diffusion_pytorch_model.safetensors');
    const bytes = await fs.readFile(src);
    const file = path.join(dir, 'cut.safetensors');
    await fs.writeFile(file, bytes.subarray(0, 1000));
    const r = await sdwb('inspect', file);
    expect(r.code).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toContain('cut.safetensors');
    await fs.rm(dir, { recursive: true, force: true });
  });
});
