/**
 * LR schedules vs diffusers' get_scheduler lambdas (diffusers/optimization.py, identical to
 * transformers/optimization.py). Expected values are worked out by hand from those formulas in the
 * comments; step k is the number of optimizer updates already applied (LambdaLR stepped after
 * optimizer.step()), so k = 0 is the first update and k = T − 1 the last.
 */
import { describe, expect, it } from 'vitest';

import { LrScheduleError, lrAt, lrLambda, type LrSchedule } from '../../src/train/lr-schedule.js';

function close(actual: number, expected: number): void {
  expect(Math.abs(actual - expected)).toBeLessThanOrEqual(1e-12 * Math.max(1, Math.abs(expected)) + 1e-18);
}

describe('lr schedules (diffusers get_scheduler)', () => {
  it('constant: lr₀ at every step', () => {
    const s: LrSchedule = { name: 'constant', baseLr: 1e-4 };
    for (const k of [0, 1, 500, 10_000]) close(lrAt(k, s), 1e-4);
  });

  it('constant_with_warmup: k/W during warmup, then lr₀', () => {
    const s: LrSchedule = { name: 'constant_with_warmup', baseLr: 2e-4, warmupSteps: 4 };
    close(lrAt(0, s), 0); // 0/4: the first update has lr 0
    close(lrAt(1, s), 5e-5); // 1/4 · 2e-4
    close(lrAt(3, s), 1.5e-4); // 3/4 · 2e-4
    close(lrAt(4, s), 2e-4); // end of warmup
    close(lrAt(1000, s), 2e-4);
  });

  it('linear: warmup then (T − k)/(T − W) down to 0', () => {
    const s: LrSchedule = { name: 'linear', baseLr: 1e-4, warmupSteps: 10, totalSteps: 100 };
    close(lrAt(0, s), 0);
    close(lrAt(5, s), 5e-5); // 5/10
    close(lrAt(10, s), 1e-4); // (100 − 10)/90 = 1
    close(lrAt(55, s), 5e-5); // 45/90
    close(lrAt(99, s), 1e-4 / 90); // last update: 1/90 · lr₀ = 1.111…e-6
    close(lrAt(100, s), 0);
    close(lrAt(150, s), 0); // max(0, negative)
    // Without warmup the first update has the full lr: (100 − 0)/100.
    close(lrAt(0, { ...s, warmupSteps: 0 }), 1e-4);
  });

  it('cosine: warmup then a half cosine (num_cycles 0.5)', () => {
    const s: LrSchedule = { name: 'cosine', baseLr: 1, warmupSteps: 10, totalSteps: 110 };
    close(lrAt(0, s), 0);
    close(lrAt(4, s), 0.4);
    close(lrAt(10, s), 1); // ½(1 + cos 0)
    close(lrAt(35, s), 0.8535533905932737); // progress ¼: ½(1 + cos(π/4)) = ½ + √2/4
    close(lrAt(60, s), 0.5); // progress ½: ½(1 + cos(π/2))
    close(lrAt(109, s), 0.0002467198171342); // progress 0.99: ½(1 − cos(0.01π)), cos(0.01π) = 0.99950656036573
    close(lrAt(110, s), 0); // ½(1 + cos π)
  });

  it('cosine_with_restarts: hard restarts, num_cycles default 1', () => {
    const two: LrSchedule = { name: 'cosine_with_restarts', baseLr: 1, warmupSteps: 0, totalSteps: 100, numCycles: 2 };
    close(lrAt(0, two), 1); // ½(1 + cos 0)
    close(lrAt(25, two), 0.5); // (2·0.25) mod 1 = 0.5 → ½(1 + cos(π/2))
    close(lrAt(49, two), 0.0009866357858642); // 0.98 → ½(1 − cos(0.02π)), cos(0.02π) = 0.99802672842827
    close(lrAt(50, two), 1); // (2·0.5) mod 1 = 0: restart
    close(lrAt(75, two), 0.5);
    close(lrAt(100, two), 0); // progress ≥ 1
    const one: LrSchedule = { name: 'cosine_with_restarts', baseLr: 1, warmupSteps: 10, totalSteps: 110 };
    close(lrAt(5, one), 0.5);
    close(lrAt(60, one), 0.5); // one cycle = the plain half cosine
  });

  it('polynomial: warmup then (lr₀ − lr_end)·(1 − progress)^power + lr_end', () => {
    const s: LrSchedule = {
      name: 'polynomial',
      baseLr: 1e-3,
      warmupSteps: 10,
      totalSteps: 110,
      power: 2,
      lrEnd: 1e-5,
    };
    close(lrAt(0, s), 0);
    close(lrAt(5, s), 5e-4);
    close(lrAt(10, s), 1e-3); // pct 1: 0.99e-3 + 1e-5
    close(lrAt(60, s), 2.575e-4); // pct ½: 0.99e-3 · ¼ + 1e-5
    close(lrAt(110, s), 1e-5); // pct 0
    close(lrAt(500, s), 1e-5); // k > T: lr_end
    // get_scheduler's defaults: power 1, lr_end 1e-7.
    const d: LrSchedule = { name: 'polynomial', baseLr: 1e-3, warmupSteps: 10, totalSteps: 110 };
    close(lrAt(60, d), 5.0005e-4); // (1e-3 − 1e-7)·½ + 1e-7
    close(lrLambda(60, d), 0.50005);
  });

  it('piecewise_constant: diffusers step_rules', () => {
    const s: LrSchedule = { name: 'piecewise_constant', baseLr: 1e-3, stepRules: '1:10,0.1:20,0.01:30,0.005' };
    close(lrLambda(0, s), 1);
    close(lrLambda(9, s), 1);
    close(lrLambda(10, s), 0.1);
    close(lrLambda(19, s), 0.1);
    close(lrLambda(20, s), 0.01);
    close(lrLambda(30, s), 0.005);
    close(lrAt(1000, s), 5e-6);
  });

  it('rejects inconsistent configurations with the schedule name', () => {
    expect(() => lrAt(0, { name: 'polynomial', baseLr: 1e-7, warmupSteps: 0, totalSteps: 10 })).toThrow(
      /polynomial.*lrEnd \(1e-7\) must be smaller than baseLr/,
    );
    expect(() => lrAt(0, { name: 'polynomial', baseLr: 1e-4, warmupSteps: 10, totalSteps: 10 })).toThrow(
      LrScheduleError,
    );
    expect(() => lrAt(-1, { name: 'constant', baseLr: 1 })).toThrow(/non-negative integer/);
    expect(() => lrAt(0, { name: 'linear', baseLr: 1, warmupSteps: 1.5, totalSteps: 10 })).toThrow(/warmupSteps/);
    expect(() => lrAt(0, { name: 'piecewise_constant', baseLr: 1, stepRules: '1-10,0.5' })).toThrow(/bad rule/);
  });
});
