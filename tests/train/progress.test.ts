/** Progress formatting (pure) and the reporter's TTY / plain-log behaviour with a fake clock. */
import { describe, expect, it } from 'vitest';

import {
  Ema,
  ProgressReporter,
  formatDuration,
  formatProgress,
  formatRate,
  type ProgressStream,
} from '../../src/train/progress.js';

describe('formatting', () => {
  it('formats durations like tqdm', () => {
    expect(formatDuration(3725)).toBe('1:02:05');
    expect(formatDuration(65)).toBe('01:05');
    expect(formatDuration(0)).toBe('00:00');
    expect(formatDuration(59.6)).toBe('01:00');
    expect(formatDuration(36_000)).toBe('10:00:00');
    expect(formatDuration(Number.NaN)).toBe('--:--');
    expect(formatDuration(Infinity)).toBe('--:--');
  });

  it('formats rates as it/s, or s/it below one step per second', () => {
    expect(formatRate(2.345)).toBe('2.35it/s');
    expect(formatRate(0.25)).toBe('4.00s/it');
    expect(formatRate(0)).toBe('?it/s');
  });

  it('formats a full line: step/total, %, loss, lr, rate, elapsed<ETA', () => {
    // 880 steps left at 2 it/s = 440 s = 07:20.
    expect(formatProgress({ step: 120, total: 1000, loss: 0.123456, lr: 1e-4, rate: 2, elapsed: 51 })).toBe(
      'step  120/1000 ( 12%) | loss 0.1235 | lr 1.00e-4 | 2.00it/s | 00:51<07:20',
    );
    expect(formatProgress({ step: 0, total: 10, elapsed: 0, skipped: 2 })).toBe(
      'step  0/10 (  0%) | ?it/s | 00:00<--:-- | skipped 2',
    );
  });

  it('EMA is bias-corrected and ignores non-finite samples', () => {
    const e = new Ema(0.5);
    expect(e.value).toBeUndefined();
    expect(e.push(1)).toBe(1); // 0.5 / (1 − 0.5)
    expect(e.push(Number.NaN)).toBe(1);
    // s = 0.5·0.5 + 0.5·3 = 1.75; / (1 − 0.25) = 2.333…
    expect(e.push(3)).toBeCloseTo(7 / 3, 12);
  });
});

function sink(isTTY: boolean, columns?: number): ProgressStream & { out: string[] } {
  const out: string[] = [];
  return { out, isTTY, ...(columns !== undefined ? { columns } : {}), write: (s: string) => out.push(s) };
}

describe('ProgressReporter', () => {
  it('TTY: redraws one line in place with \\r, throttled; done() ends the line', () => {
    let t = 0;
    const stream = sink(true);
    const p = new ProgressReporter({ total: 4, stream, now: () => t, ttyIntervalMs: 100 });
    t = 500;
    p.update({ step: 1, loss: 1, lr: 1e-3 });
    t = 520; // within 100 ms: no redraw
    p.update({ step: 2, loss: 1, lr: 1e-3 });
    t = 1000;
    p.update({ step: 3, loss: 1, lr: 1e-3 });
    p.log('saved checkpoint');
    t = 1010;
    p.update({ step: 4, loss: 1, lr: 1e-3 }); // the last step is always drawn
    p.done();
    const all = stream.out.join('');
    expect(all.split('\n').length - 1).toBe(2); // the log line and the final newline
    expect(stream.out[0]).toBe('\rstep 1/4 ( 25%) | loss 1.0000 | lr 1.00e-3 | 2.00it/s | 00:01<00:02\x1b[K');
    expect(stream.out.filter((s) => s.includes('step 2/4'))).toHaveLength(0);
    expect(all).toContain('\r\x1b[Ksaved checkpoint\n');
    expect(stream.out.at(-1)).toBe('\n');
    expect(all).toContain('step 4/4 (100%)');
  });

  it('non-TTY: plain lines at the interval, plus the first and the last step', () => {
    let t = 0;
    const stream = sink(false);
    const p = new ProgressReporter({ total: 100, stream, now: () => t, plainIntervalMs: 10_000 });
    for (let step = 1; step <= 100; step++) {
      t = step * 1000; // 1 it/s
      p.update({ step, loss: 0.5, lr: 1e-4 });
    }
    p.done();
    expect(stream.out.every((s) => s.endsWith('\n') && !s.includes('\r'))).toBe(true);
    // Steps 1, 11, 21, …, 91 (every 10 s), then 100.
    const steps = stream.out.map((s) => Number(/step +(\d+)\//.exec(s)![1]));
    expect(steps).toEqual([1, 11, 21, 31, 41, 51, 61, 71, 81, 91, 100]);
    expect(stream.out[5]).toContain('00:51<00:49'); // step 51: 49 left at 1 it/s
  });

  it('resumed runs count rate from the resume step; long lines are cut to the terminal width', () => {
    let t = 0;
    const stream = sink(true, 30);
    const p = new ProgressReporter({ total: 1000, startStep: 500, stream, now: () => t });
    t = 2000;
    p.update({ step: 504, loss: 2 });
    expect(stream.out[0]!.replace(/\x1b\[K$/, '').length).toBeLessThanOrEqual(30);
    const wide = sink(false);
    let u = 0;
    const q = new ProgressReporter({ total: 1000, startStep: 500, stream: wide, now: () => u });
    u = 2000;
    q.update({ step: 504 });
    expect(wide.out[0]).toContain('2.00it/s'); // 4 steps in 2 s, not 504
  });
});
