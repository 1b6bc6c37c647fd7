/**
 * Learning-rate schedules with diffusers' `get_scheduler` names and formulas
 * (diffusers/optimization.py, the same lambdas as transformers/optimization.py).
 *
 * Step index: diffusers wraps each lambda in `torch.optim.lr_scheduler.LambdaLR` and calls
 * `lr_scheduler.step()` *after* `optimizer.step()`. LambdaLR starts at lambda(0), so the k-th
 * optimizer update (k = 0, 1, …: the number of updates already applied) uses lambda(k). `lrAt`
 * and `lrLambda` take that k. Consequences worth knowing: with warmup the very first update has
 * lr = 0, and the last update of a `linear` run (k = total − 1) still has lr = base/(total − warmup).
 *
 * Symbols: k = step, W = warmupSteps, T = totalSteps, lr₀ = baseLr.
 */

/** Schedule names accepted by diffusers' `get_scheduler`. */
export const LR_SCHEDULE_NAMES = [
  'constant',
  'constant_with_warmup',
  'linear',
  'cosine',
  'cosine_with_restarts',
  'polynomial',
  'piecewise_constant',
] as const;
export type LrScheduleName = (typeof LR_SCHEDULE_NAMES)[number];

interface Base {
  /** lr₀: the optimizer's lr (LambdaLR multiplies it by the lambda). */
  readonly baseLr: number;
}
interface Warmup {
  /** W: linear warmup from 0 over this many updates. */
  readonly warmupSteps: number;
}
interface Total {
  /** T: the total number of optimizer updates. */
  readonly totalSteps: number;
}

/** A schedule, discriminated by diffusers' name. */
export type LrSchedule =
  | ({ readonly name: 'constant' } & Base)
  | ({ readonly name: 'constant_with_warmup' } & Base & Warmup)
  | ({ readonly name: 'linear' } & Base & Warmup & Total)
  | ({
      readonly name: 'cosine';
      /** Periods of the cosine over the decay; get_scheduler always uses the default 0.5. */
      readonly numCycles?: number;
    } & Base &
      Warmup &
      Total)
  | ({
      readonly name: 'cosine_with_restarts';
      /** Number of hard restarts (get_scheduler's `num_cycles`, default 1). */
      readonly numCycles?: number;
    } & Base &
      Warmup &
      Total)
  | ({
      readonly name: 'polynomial';
      /** Decay exponent (default 1). */
      readonly power?: number;
      /** Final lr, absolute (default 1e-7, which get_scheduler never overrides). */
      readonly lrEnd?: number;
    } & Base &
      Warmup &
      Total)
  | ({
      readonly name: 'piecewise_constant';
      /** diffusers' `step_rules`, e.g. "1:10,0.1:20,0.01:30,0.005". */
      readonly stepRules: string;
    } & Base);

/** Thrown for an inconsistent schedule configuration. */
export class LrScheduleError extends Error {
  override name = 'LrScheduleError';
}

// The warmup branch shared by every *_with_warmup lambda: k / max(1, W).
function warmupFactor(k: number, w: number): number {
  return k / Math.max(1, w);
}

/** LambdaLR's multiplier for the k-th optimizer update (lr = lr₀ · lambda(k)). */
export function lrLambda(step: number, s: LrSchedule): number {
  validate(s);
  if (!Number.isInteger(step) || step < 0) {
    throw new LrScheduleError(`lr schedule '${s.name}': step must be a non-negative integer, got ${step}`);
  }
  const k = step;
  switch (s.name) {
    case 'constant':
      return 1;
    case 'constant_with_warmup':
      return k < s.warmupSteps ? warmupFactor(k, s.warmupSteps) : 1;
    case 'linear': {
      if (k < s.warmupSteps) return warmupFactor(k, s.warmupSteps);
      // max(0, (T − k) / max(1, T − W))
      return Math.max(0, (s.totalSteps - k) / Math.max(1, s.totalSteps - s.warmupSteps));
    }
    case 'cosine': {
      if (k < s.warmupSteps) return warmupFactor(k, s.warmupSteps);
      const progress = (k - s.warmupSteps) / Math.max(1, s.totalSteps - s.warmupSteps);
      const cycles = s.numCycles ?? 0.5;
      // max(0, ½(1 + cos(π · 2c · progress)))
      return Math.max(0, 0.5 * (1 + Math.cos(Math.PI * cycles * 2 * progress)));
    }
    case 'cosine_with_restarts': {
      if (k < s.warmupSteps) return warmupFactor(k, s.warmupSteps);
      const progress = (k - s.warmupSteps) / Math.max(1, s.totalSteps - s.warmupSteps);
      if (progress >= 1) return 0;
      const cycles = s.numCycles ?? 1;
      // max(0, ½(1 + cos(π · ((c · progress) mod 1)))); progress ≥ 0 here, so JS % equals Python's.
      return Math.max(0, 0.5 * (1 + Math.cos(Math.PI * ((cycles * progress) % 1))));
    }
    case 'polynomial': {
      if (k < s.warmupSteps) return warmupFactor(k, s.warmupSteps);
      const lrEnd = s.lrEnd ?? 1e-7;
      if (k > s.totalSteps) return lrEnd / s.baseLr;
      const power = s.power ?? 1;
      // (lr₀ − lr_end) · (1 − (k − W)/(T − W))^power + lr_end, as a fraction of lr₀
      const pctRemaining = 1 - (k - s.warmupSteps) / (s.totalSteps - s.warmupSteps);
      return ((s.baseLr - lrEnd) * pctRemaining ** power + lrEnd) / s.baseLr;
    }
    case 'piecewise_constant':
      return piecewise(k, s.stepRules);
  }
}

/** The learning rate of the k-th optimizer update (k = updates already applied; see file comment). */
export function lrAt(step: number, s: LrSchedule): number {
  return s.baseLr * lrLambda(step, s);
}

function validate(s: LrSchedule): void {
  const where = `lr schedule '${s.name}'`;
  if (!(Number.isFinite(s.baseLr) && s.baseLr >= 0)) {
    throw new LrScheduleError(`${where}: baseLr must be a finite number ≥ 0, got ${s.baseLr}`);
  }
  if ('warmupSteps' in s && !(Number.isInteger(s.warmupSteps) && s.warmupSteps >= 0)) {
    throw new LrScheduleError(`${where}: warmupSteps must be an integer ≥ 0, got ${s.warmupSteps}`);
  }
  if ('totalSteps' in s && !(Number.isInteger(s.totalSteps) && s.totalSteps >= 1)) {
    throw new LrScheduleError(`${where}: totalSteps must be an integer ≥ 1, got ${s.totalSteps}`);
  }
  if (s.name === 'polynomial') {
    const lrEnd = s.lrEnd ?? 1e-7;
    // Same check as diffusers; it also rules out baseLr = 0 (the lambda divides by lr₀).
    if (!(s.baseLr > lrEnd)) {
      throw new LrScheduleError(`${where}: lrEnd (${lrEnd}) must be smaller than baseLr (${s.baseLr})`);
    }
    // Python raises ZeroDivisionError at k = T when T = W; say so up front instead.
    if (!(s.totalSteps > s.warmupSteps)) {
      throw new LrScheduleError(
        `${where}: totalSteps (${s.totalSteps}) must exceed warmupSteps (${s.warmupSteps})`,
      );
    }
  }
}

// diffusers' rule string "v1:s1,v2:s2,…,v_last": multiplier v_i while step < s_i (rules checked in
// ascending s_i order), v_last afterwards.
function piecewise(step: number, rules: string): number {
  const parts = rules.split(',');
  const last = Number(parts[parts.length - 1]);
  const table = parts.slice(0, -1).map((rule) => {
    const [value, steps, ...rest] = rule.split(':');
    const v = Number(value);
    const s = Number(steps);
    if (rest.length > 0 || value === undefined || steps === undefined || !Number.isFinite(v) || !Number.isInteger(s)) {
      throw new LrScheduleError(`lr schedule 'piecewise_constant': bad rule '${rule}' in '${rules}' (want value:step)`);
    }
    return { value: v, until: s };
  });
  if (!Number.isFinite(last)) {
    throw new LrScheduleError(`lr schedule 'piecewise_constant': last entry of '${rules}' must be a number`);
  }
  // Python builds a dict keyed by step, so a repeated step keeps its last value.
  const byStep = new Map<number, number>();
  for (const r of table) byStep.set(r.until, r.value);
  for (const until of [...byStep.keys()].sort((a, b) => a - b)) {
    if (step < until) return byStep.get(until)!;
  }
  return last;
}
