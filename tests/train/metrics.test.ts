/** metrics.jsonl: whole lines, flushed per write, partial tails ignored and repaired, kill -9 safe. */
import { spawn } from 'node:child_process';
import { appendFile, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { MetricsWriter, parseMetrics, readMetrics } from '../../src/train/metrics.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'sdwb-metrics-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('MetricsWriter', () => {
  it('writes one JSON object per line, readable before close', async () => {
    const file = path.join(dir, 'a', 'metrics.jsonl');
    const w = MetricsWriter.open(file, { now: () => 1_700_000_000_500 });
    w.write({ step: 1, loss: 0.25, lr: 1e-4, gradNorm: 1.5 });
    // Flushed per write: visible to a reader while the writer is still open.
    expect(await readFile(file, 'utf8')).toBe(
      '{"step":1,"loss":0.25,"lr":0.0001,"time":1700000000.5,"gradNorm":1.5}\n',
    );
    w.write({ step: 2, loss: Number.NaN, lr: 2e-4, time: 12.5, gradNorm: Infinity });
    w.close();
    expect(() => w.write({ step: 3, loss: 0, lr: 0 })).toThrow(/closed/);
    expect(await readMetrics(file)).toEqual([
      { step: 1, loss: 0.25, lr: 1e-4, time: 1_700_000_000.5, gradNorm: 1.5 },
      { step: 2, loss: null, lr: 2e-4, time: 12.5, gradNorm: null },
    ]);
  });

  it('ignores a trailing partial line and cuts it off before appending again', async () => {
    const file = path.join(dir, 'b.jsonl');
    const w = MetricsWriter.open(file);
    w.write({ step: 1, loss: 1, lr: 1, time: 1 });
    w.close();
    await appendFile(file, '{"step":2,"loss":0.5,"l');
    expect((await readMetrics(file)).map((r) => r.step)).toEqual([1]);

    const again = MetricsWriter.open(file);
    again.write({ step: 2, loss: 0.5, lr: 1, time: 2 });
    again.close();
    expect(await readFile(file, 'utf8')).toBe(
      '{"step":1,"loss":1,"lr":1,"time":1}\n{"step":2,"loss":0.5,"lr":1,"time":2}\n',
    );
  });

  it('a file holding only a fragment is emptied on reopen', async () => {
    const file = path.join(dir, 'c.jsonl');
    await appendFile(file, '{"step":1,"lo');
    expect(await readMetrics(file)).toEqual([]);
    MetricsWriter.open(file).close();
    expect(await readFile(file, 'utf8')).toBe('');
  });

  it('reports a corrupt complete line with file and line number', () => {
    expect(() => parseMetrics('{"step":1,"loss":1,"lr":1,"time":0}\nnot json\n', 'm.jsonl')).toThrow(
      /m\.jsonl: line 2 is not valid JSON/,
    );
    expect(() => parseMetrics('{"step":1,"loss":"x","lr":1,"time":0}\n', 'm.jsonl')).toThrow(/field 'loss'/);
  });

  it('survives kill -9 of a process writing in a loop: every complete line parses', async () => {
    const file = path.join(dir, 'killed.jsonl');
    const module = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../src/train/metrics.ts');
    const script = `
      import { MetricsWriter } from ${JSON.stringify(module)};
      const w = MetricsWriter.open(${JSON.stringify(file)});
      for (let step = 1; ; step++) {
        w.write({ step, loss: 1 / step, lr: 1e-4 });
        if (step === 200) process.stdout.write('ready\\n');
      }
    `;
    const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    await new Promise<void>((resolve, reject) => {
      child.stdout.on('data', (d: Buffer) => {
        if (d.toString().includes('ready')) resolve();
      });
      child.on('exit', (code) => reject(new Error(`writer exited early with code ${code}`)));
    });
    const exited = new Promise((resolve) => child.on('exit', resolve));
    child.kill('SIGKILL');
    await exited;
    const records = await readMetrics(file);
    expect(records.length).toBeGreaterThanOrEqual(200);
    records.forEach((r, i) => {
      expect(r.step).toBe(i + 1);
      expect(r.loss).toBe(1 / (i + 1));
    });
  });
});
