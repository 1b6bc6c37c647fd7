/**
 * Adam and AdamW over `tf.Variable`s, exactly as `torch.optim.Adam` / `torch.optim.AdamW`
 * (single-tensor path, amsgrad = False, maximize = False), with exportable state for bit-exact
 * resume.
 *
 * Per parameter p with gradient g, at its t-th update (t = 1, 2, …), in torch's operation order:
 *   AdamW:  p ← p · (1 − lr·λ)                    (decoupled weight decay, Loshchilov & Hutter)
 *   Adam:   g ← g + λ·p                           (L2 penalty folded into the gradient)
 *   m ← β₁·m + (1 − β₁)·g
 *   v ← β₂·v + ((1 − β₂)·g)·g
 *   step_size = lr / (1 − β₁ᵗ)
 *   denom     = √v / √(1 − β₂ᵗ) + ε               (ε added after the v bias correction)
 *   p ← p − (step_size·m) / denom
 * Bias corrections are computed in float64 and applied as float32 scalars, as torch does with
 * Python floats against float32 tensors.
 *
 * Like torch, a parameter without a gradient in a step is left alone and its own step count t
 * does not advance; its m and v are created at its first update.
 */
import * as tf from '@tensorflow/tfjs';

/** Which update rule: decoupled weight decay (AdamW) or L2-in-gradient (Adam). */
export type AdamKind = 'adamw' | 'adam';

/** Hyperparameters; defaults are torch's (AdamW: wd 0.01; Adam: wd 0). */
export interface AdamOptions {
  readonly kind: AdamKind;
  readonly lr: number;
  readonly betas?: readonly [number, number];
  readonly eps?: number;
  readonly weightDecay?: number;
}

/** A parameter group with its own lr and/or weight decay (torch's param_groups). */
export interface ParamGroup {
  readonly params: readonly tf.Variable[];
  readonly lr?: number;
  readonly weightDecay?: number;
}

/** Gradients keyed by variable name, as `tf.variableGrads` returns them (null/absent = no grad). */
export type GradMap = Readonly<Record<string, tf.Tensor | null | undefined>>;

/** Optimizer state as plain arrays: enough to continue bit-for-bit after a restart. */
export interface OptimizerState {
  /** Number of `step()` calls made. */
  readonly step: number;
  /** Per-parameter update count t (differs from `step` only for parameters that missed grads). */
  readonly paramSteps: Readonly<Record<string, number>>;
  /** First moments, keyed by variable name, in the variable's own layout. */
  readonly m: Readonly<Record<string, Float32Array>>;
  /** Second moments. */
  readonly v: Readonly<Record<string, Float32Array>>;
}

/** Per-step options for {@link AdamOptimizer.step}. */
export interface StepOptions {
  /** Multiplies every group's lr for this update (an LR schedule's lambda). Default 1. */
  readonly lrScale?: number;
}

interface Slot {
  readonly param: tf.Variable;
  readonly lr: number;
  readonly weightDecay: number;
  t: number;
  m: tf.Tensor | undefined;
  v: tf.Tensor | undefined;
}

/** Thrown when state or gradients do not match the optimizer's parameters. */
export class OptimizerError extends Error {
  override name = 'OptimizerError';
}

/** Adam / AdamW with torch semantics over a list of variables or parameter groups. */
export class AdamOptimizer {
  readonly kind: AdamKind;
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  #steps = 0;
  readonly #slots = new Map<string, Slot>();

  constructor(params: readonly tf.Variable[] | readonly ParamGroup[], opts: AdamOptions) {
    this.kind = opts.kind;
    const [beta1, beta2] = opts.betas ?? [0.9, 0.999];
    this.beta1 = beta1;
    this.beta2 = beta2;
    this.eps = opts.eps ?? 1e-8;
    const defaultWd = opts.weightDecay ?? (opts.kind === 'adamw' ? 0.01 : 0);
    checkHyper('lr', opts.lr, 0, Infinity);
    checkHyper('beta1', beta1, 0, 1);
    checkHyper('beta2', beta2, 0, 1);
    checkHyper('eps', this.eps, 0, Infinity);
    checkHyper('weightDecay', defaultWd, 0, Infinity);

    const groups: readonly ParamGroup[] = isGroupList(params) ? params : [{ params }];
    for (const [gi, g] of groups.entries()) {
      const lr = g.lr ?? opts.lr;
      const weightDecay = g.weightDecay ?? defaultWd;
      checkHyper(`group ${gi} lr`, lr, 0, Infinity);
      checkHyper(`group ${gi} weightDecay`, weightDecay, 0, Infinity);
      for (const p of g.params) {
        if (this.#slots.has(p.name)) {
          throw new OptimizerError(`variable '${p.name}' appears more than once in the optimizer's parameters`);
        }
        if (p.dtype !== 'float32') {
          throw new OptimizerError(`variable '${p.name}' has dtype ${p.dtype}; Adam needs float32`);
        }
        this.#slots.set(p.name, { param: p, lr, weightDecay, t: 0, m: undefined, v: undefined });
      }
    }
  }

  /** Number of `step()` calls so far. */
  get stepCount(): number {
    return this.#steps;
  }

  /** Names of the variables this optimizer updates, in construction order. */
  get paramNames(): string[] {
    return [...this.#slots.keys()];
  }

  /**
   * Applies one update from `grads` (keyed by variable name). Gradients are not disposed; names
   * that are not this optimizer's parameters are an error.
   */
  step(grads: GradMap, opts: StepOptions = {}): void {
    const lrScale = opts.lrScale ?? 1;
    checkHyper('lrScale', lrScale, 0, Infinity);
    for (const name of Object.keys(grads)) {
      if (!this.#slots.has(name)) {
        throw new OptimizerError(`gradient for '${name}', which is not a parameter of this optimizer`);
      }
    }
    for (const [name, slot] of this.#slots) {
      const g = grads[name];
      if (g === null || g === undefined) continue;
      if (!sameShape(g.shape, slot.param.shape)) {
        throw new OptimizerError(
          `gradient for '${name}' has shape [${g.shape.join(', ')}], parameter is [${slot.param.shape.join(', ')}]`,
        );
      }
      this.#update(slot, g, slot.lr * lrScale);
    }
    this.#steps += 1;
  }

  #update(slot: Slot, grad: tf.Tensor, lr: number): void {
    const t = slot.t + 1;
    const { beta1, beta2, eps } = this;
    const wd = slot.weightDecay;
    const biasCorrection1 = 1 - beta1 ** t;
    const biasCorrection2Sqrt = Math.sqrt(1 - beta2 ** t);
    const stepSize = lr / biasCorrection1;
    const oldM = slot.m;
    const oldV = slot.v;
    const next = tf.tidy(() => {
      let p: tf.Tensor = slot.param;
      let g: tf.Tensor = grad.dtype === 'float32' ? grad : tf.cast(grad, 'float32');
      if (this.kind === 'adamw') {
        if (wd !== 0) p = tf.mul(p, 1 - lr * wd);
      } else if (wd !== 0) {
        g = tf.add(g, tf.mul(p, wd));
      }
      // m, v start at zero (torch's zeros_like); the formulas then reduce to (1−β)·g terms, but
      // going through the same ops keeps the rounding identical to torch's first step.
      const m0 = oldM ?? tf.zerosLike(p);
      const v0 = oldV ?? tf.zerosLike(p);
      const m = tf.add(tf.mul(m0, beta1), tf.mul(g, 1 - beta1));
      const v = tf.add(tf.mul(v0, beta2), tf.mul(tf.mul(g, 1 - beta2), g));
      const denom = tf.add(tf.div(tf.sqrt(v), biasCorrection2Sqrt), eps);
      const updated = tf.sub(p, tf.div(tf.mul(m, stepSize), denom));
      return { updated, m, v };
    });
    slot.param.assign(next.updated);
    next.updated.dispose();
    oldM?.dispose();
    oldV?.dispose();
    slot.m = next.m;
    slot.v = next.v;
    slot.t = t;
  }

  /** The state as plain Float32Arrays (copies; reads tensors synchronously). */
  state(): OptimizerState {
    const m: Record<string, Float32Array> = {};
    const v: Record<string, Float32Array> = {};
    const paramSteps: Record<string, number> = {};
    for (const [name, slot] of this.#slots) {
      paramSteps[name] = slot.t;
      if (slot.m !== undefined && slot.v !== undefined) {
        m[name] = Float32Array.from(slot.m.dataSync() as Float32Array);
        v[name] = Float32Array.from(slot.v.dataSync() as Float32Array);
      }
    }
    return { step: this.#steps, paramSteps, m, v };
  }

  /**
   * Replaces the state with `s` (from `state()`, possibly of another process). Every parameter
   * with t > 0 needs m and v of its exact size; names must be this optimizer's parameters.
   */
  loadState(s: OptimizerState): void {
    if (!Number.isSafeInteger(s.step) || s.step < 0) {
      throw new OptimizerError(`optimizer state: step must be a non-negative integer, got ${s.step}`);
    }
    for (const key of [...Object.keys(s.paramSteps), ...Object.keys(s.m), ...Object.keys(s.v)]) {
      if (!this.#slots.has(key)) {
        throw new OptimizerError(`optimizer state has '${key}', which is not a parameter of this optimizer`);
      }
    }
    const staged = new Map<string, { t: number; m?: Float32Array; v?: Float32Array }>();
    for (const [name, slot] of this.#slots) {
      const t = s.paramSteps[name] ?? 0;
      if (!Number.isSafeInteger(t) || t < 0 || t > s.step) {
        throw new OptimizerError(`optimizer state: '${name}' has step ${t}, expected an integer in [0, ${s.step}]`);
      }
      const m = s.m[name];
      const v = s.v[name];
      if (t === 0) {
        if (m !== undefined || v !== undefined) {
          throw new OptimizerError(`optimizer state: '${name}' has moments but step 0`);
        }
        staged.set(name, { t });
        continue;
      }
      const size = slot.param.size;
      for (const [which, arr] of [['m', m], ['v', v]] as const) {
        if (arr === undefined) throw new OptimizerError(`optimizer state: '${name}' has step ${t} but no ${which}`);
        if (arr.length !== size) {
          throw new OptimizerError(
            `optimizer state: ${which} of '${name}' has ${arr.length} values, ` +
              `parameter has ${size} ([${slot.param.shape.join(', ')}])`,
          );
        }
      }
      staged.set(name, { t, m: m!, v: v! });
    }
    this.#disposeMoments();
    for (const [name, slot] of this.#slots) {
      const st = staged.get(name)!;
      slot.t = st.t;
      if (st.m !== undefined && st.v !== undefined) {
        slot.m = tf.tensor(Float32Array.from(st.m), slot.param.shape, 'float32');
        slot.v = tf.tensor(Float32Array.from(st.v), slot.param.shape, 'float32');
      }
    }
    this.#steps = s.step;
  }

  /** Frees the moment tensors (the parameters belong to the caller). */
  dispose(): void {
    this.#disposeMoments();
  }

  #disposeMoments(): void {
    for (const slot of this.#slots.values()) {
      slot.m?.dispose();
      slot.v?.dispose();
      slot.m = undefined;
      slot.v = undefined;
      slot.t = 0;
    }
  }
}

function isGroupList(p: readonly tf.Variable[] | readonly ParamGroup[]): p is readonly ParamGroup[] {
  return p.length > 0 && !(p[0] instanceof tf.Variable);
}

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

function checkHyper(name: string, value: number, min: number, maxExclusive: number): void {
  if (!(Number.isFinite(value) && value >= min && value < maxExclusive)) {
    const range = maxExclusive === Infinity ? `≥ ${min}` : `in [${min}, ${maxExclusive})`;
    throw new OptimizerError(`optimizer: ${name} must be a finite number ${range}, got ${value}`);
  }
}
