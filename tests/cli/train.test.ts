/**
 * `sdwb train` end to end on the tiny model: the example config with --set overrides trains,
 * logs, checkpoints and writes embeddings that load back; the loss falls; Ctrl-C saves a
 * checkpoint and exits; kill -9 leaves only whole checkpoints, and --resume continues.
 */
import { spawn } from 'node:child_process';
import { mkdtemp, readdir, readFile, stat } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

import sharp from 'sharp';
import { beforeAll, describe, expect, it } from 'vitest';

import { loadEmbedding } from '../../src/methods/embedding-files.js';
import { listCheckpoints, readCheckpoint } from '../../src/train/checkpoint.js';
import { readMetrics } from '../../src/train/metrics.js';
import { TINY_SD } from '../helpers/fixtures.js';
import { runSdwb, type CliResult } from '../helpers/cli.js';

const ROOT = path.resolve(import.meta.dirname, '../..');
const MAIN = path.join(ROOT, 'src/cli/main.ts');
const CONFIG = path.join(ROOT, 'configs/textual-inversion.yaml');

let imageDir: string;
beforeAll(async () => {
  imageDir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-train-images-'));
  for (const name of ['chelsea.png', 'coffee.png', 'rocket.jpg']) {
    await sharp(path.join('/work/shared/data/images_cc0', name)).resize(48, 48).png().toFile(path.join(imageDir, `${path.parse(name).name}.png`));
  }
});

/** --set flags for the tiny model, a temp output folder and our images. */
function sets(outputDir: string, extra: readonly string[]): string[] {
  return [
    `model=${TINY_SD}`,
    `data.dir=${imageDir}`,
    `output_dir=${outputDir}`,
    'data.resolution=32',
    'backend=wasm',
    'gradient_accumulation_steps=1',
    'learning_rate=5e-3',
    'sample_steps=4',
    ...extra,
  ].flatMap((s) => ['--set', s]);
}

const sdwb = (args: readonly string[]): Promise<CliResult> => runSdwb(args);

const mean = (xs: readonly number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;

describe('sdwb train configs/textual-inversion.yaml', () => {
  it('trains the tiny model: logs, checkpoints, samples, embeddings that reload; the loss falls', async () => {
    const out = await mkdtemp(path.join(os.tmpdir(), 'sdwb-train-'));
    // fixed_noise + one caption: the objective changes only with the image crops, so the fall is
    // the embedding's doing, not a lucky draw of timesteps.
    const r = await sdwb([
      'train',
      CONFIG,
      ...sets(out, ['steps=40', 'save_every=20', 'sample_every=20', 'fixed_noise=true', 'template=none', 'data.instance_prompt=a photo of <my-cat>']),
    ]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout.trim().split('\n')).toEqual(
      expect.arrayContaining([path.join(out, 'my-cat.safetensors'), path.join(out, 'my-cat.pt'), path.join(out, 'learned_embeds.safetensors')]),
    );

    // Logs: every step in metrics.jsonl, a TensorBoard event file with the loss and the samples.
    const metrics = await readMetrics(path.join(out, 'metrics.jsonl'));
    expect(metrics.map((m) => m.step)).toEqual(Array.from({ length: 40 }, (_, i) => i + 1));
    const losses = metrics.map((m) => m.loss!);
    const first = mean(losses.slice(0, 5));
    const last = mean(losses.slice(-5));
    console.log(`[train cli] loss mean of steps 1-5 ${first.toFixed(5)}, of steps 36-40 ${last.toFixed(5)} (fall ${(first - last).toFixed(5)})`);
    expect(first - last).toBeGreaterThan(0.003);
    const events = await readdir(path.join(out, 'logs'));
    expect(events).toHaveLength(1);
    const eventBytes = await readFile(path.join(out, 'logs', events[0]!));
    expect(eventBytes.includes(Buffer.from('train/loss'))).toBe(true);
    expect(eventBytes.includes(Buffer.from('samples'))).toBe(true);
    expect((await readdir(path.join(out, 'samples'))).sort()).toEqual(['step-000020.png', 'step-000040.png']);

    // Checkpoints, each a whole folder.
    expect(await listCheckpoints(out)).toEqual([20, 40]);
    expect((await readCheckpoint(path.join(out, 'checkpoint-20'))).state.step).toBe(20);

    // The three embedding files hold the same trained vectors and reload with their triggers.
    const a1111 = await loadEmbedding(path.join(out, 'my-cat.safetensors'));
    const pt = await loadEmbedding(path.join(out, 'my-cat.pt'));
    const diffusers = await loadEmbedding(path.join(out, 'learned_embeds.safetensors'));
    expect([a1111.token, pt.token, diffusers.token]).toEqual(['my-cat', 'my-cat', '<my-cat>']);
    expect(pt.step).toBe(40);
    expect(Array.from(pt.vectors)).toEqual(Array.from(a1111.vectors));
    expect(Array.from(diffusers.vectors)).toEqual(Array.from(a1111.vectors));
    expect([a1111.numVectors, a1111.width]).toEqual([1, 32]);
    // Training moved them away from the initializer ('cat'), whose row is the checkpoint-free start.
    const start = (await readCheckpoint(path.join(out, 'checkpoint-20'))).trainable.get('text_encoder.token_embedding.new_rows')!;
    expect(Array.from(start.data)).not.toEqual(Array.from(a1111.vectors));
  });

  it('Ctrl-C saves a checkpoint and exits 130; --resume latest finishes with each step logged once', async () => {
    const out = await mkdtemp(path.join(os.tmpdir(), 'sdwb-train-sigint-'));
    const child = spawn(process.execPath, ['--import', 'tsx', MAIN, 'train', CONFIG, ...sets(out, ['steps=500', 'save_every=1000'])], { cwd: ROOT });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    await waitFor(async () => (await readMetrics(path.join(out, 'metrics.jsonl')).catch(() => [])).length >= 3, 60_000);
    child.kill('SIGINT');
    expect(await exited).toBe(130);
    const steps = await listCheckpoints(out);
    expect(steps).toHaveLength(1);
    const stoppedAt = steps[0]!;
    expect(stderr).toContain(`interrupted at step ${stoppedAt}`);
    expect((await readMetrics(path.join(out, 'metrics.jsonl'))).at(-1)!.step).toBe(stoppedAt);

    const r = await sdwb(['train', CONFIG, ...sets(out, [`steps=${stoppedAt + 2}`, 'save_every=1000']), '--resume']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toContain(`resumed from ${path.join(out, `checkpoint-${stoppedAt}`)} at step ${stoppedAt}`);
    expect((await readMetrics(path.join(out, 'metrics.jsonl'))).map((m) => m.step)).toEqual(Array.from({ length: stoppedAt + 2 }, (_, i) => i + 1));
  });

  it('kill -9 leaves only whole checkpoints; the run resumes from the newest', async () => {
    const out = await mkdtemp(path.join(os.tmpdir(), 'sdwb-train-kill-'));
    const child = spawn(process.execPath, ['--import', 'tsx', MAIN, 'train', CONFIG, ...sets(out, ['steps=500', 'save_every=2'])], { cwd: ROOT });
    const exited = new Promise<void>((resolve) => child.on('exit', () => resolve()));
    await waitFor(async () => (await listCheckpoints(out)).length >= 2, 60_000);
    child.kill('SIGKILL');
    await exited;
    // Every checkpoint-<n> folder is complete and readable; temporaries are hidden (dot) names.
    for (const name of (await readdir(out)).filter((n) => n.startsWith('checkpoint-'))) {
      await readCheckpoint(path.join(out, name));
    }
    const newest = (await listCheckpoints(out)).at(-1)!;
    const r = await sdwb(['train', CONFIG, ...sets(out, [`steps=${newest + 1}`, 'save_every=2']), '--resume', 'latest']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toContain(`at step ${newest}`);
    expect((await readdir(out)).filter((n) => n.startsWith('.'))).toEqual([]);
    expect((await readMetrics(path.join(out, 'metrics.jsonl'))).map((m) => m.step)).toEqual(Array.from({ length: newest + 1 }, (_, i) => i + 1));
    expect((await stat(path.join(out, 'learned_embeds.safetensors'))).size).toBeGreaterThan(0);
  });

  it('reports config problems one per line and exits 2', async () => {
    const r = await sdwb(['train', CONFIG, '--set', 'lr_scheduler=cosin', '--set', 'num_vector=2']);
    expect(r.code).toBe(2);
    expect(r.stderr.trim().split('\n')).toEqual([
      `sdwb train: ${CONFIG}: invalid training config`,
      '  lr_scheduler: expected one of "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "piecewise_constant"; found "cosin"',
      "  num_vector: unknown field (did you mean 'num_vectors'?)",
    ]);
  });

  it('lists methods and fields', async () => {
    const methods = await sdwb(['train', '--methods']);
    expect(methods.stdout).toMatch(/^textual_inversion: /);
    const fields = await sdwb(['train', '--fields', 'textual_inversion']);
    expect(fields.stdout).toContain('learning_rate: Peak learning rate. Default 0.0005.');
    expect(fields.stdout).toContain('gradient_accumulation_steps: Micro-batches whose mean gradient makes one optimizer step. Default 4.');
    expect(fields.stdout).toContain('data.dir: Folder of training images');
  });
});

async function waitFor(condition: () => Promise<boolean>, timeoutMs: number): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > end) throw new Error('timed out waiting');
    await new Promise((r) => setTimeout(r, 100));
  }
}
