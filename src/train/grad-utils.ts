/**
 * Method-agnostic gradient utilities for the training loop: accumulation over micro-batches,
 * global-norm clipping (torch.nn.utils.clip_grad_norm_), and a guard against non-finite steps.
 *
 * Ownership: functions here never dispose their inputs unless they say so; whatever they return
 * belongs to the caller.
 */
import * as tf from '@tensorflow/tfjs';

/** Gradients keyed by variable name (what `tf.variableGrads` returns, minus null entries). */
export type Grads = Record<string, tf.Tensor>;

/** Gradients as `tf.variableGrads` may return them (null = variable not trainable). */
export type MaybeGrads = Readonly<Record<string, tf.Tensor | null | undefined>>;

/** The non-null entries of a gradient map, in key order. */
function entries(grads: MaybeGrads): [string, tf.Tensor][] {
  return Object.entries(grads).filter((e): e is [string, tf.Tensor] => e[1] !== null && e[1] !== undefined);
}

/** Disposes every tensor of a gradient map. */
export function disposeGrads(grads: MaybeGrads): void {
  for (const [, g] of entries(grads)) g.dispose();
}

/**
 * Sums the gradients of N micro-batches, each scaled by 1/N, as diffusers does with
 * `gradient_accumulation_steps = N` (accelerate divides each micro-batch loss by N before
 * `backward`, and torch sums into `.grad`). The result is the mean gradient over the N
 * micro-batches. A shorter final window (end of data) is still divided by N, as accelerate does.
 */
export class GradAccumulator {
  /** N, the number of micro-batches per optimizer step. */
  readonly steps: number;
  #sum: Map<string, tf.Tensor> = new Map();
  #count = 0;

  constructor(steps: number) {
    if (!Number.isInteger(steps) || steps < 1) {
      throw new Error(`gradient accumulation steps must be an integer ≥ 1, got ${steps}`);
    }
    this.steps = steps;
  }

  /** Micro-batches added since the last `take()`. */
  get count(): number {
    return this.#count;
  }

  /** True once N micro-batches have been added. */
  get ready(): boolean {
    return this.#count >= this.steps;
  }

  /**
   * Adds one micro-batch's gradients (scaled by 1/N) and disposes them. A variable missing from
   * some micro-batches simply gets the sum of the ones it appeared in (torch's behaviour too).
   */
  add(grads: MaybeGrads): void {
    if (this.ready) {
      throw new Error(`gradient accumulator already holds ${this.steps} micro-batches; call take() first`);
    }
    const scale = 1 / this.steps;
    for (const [name, g] of entries(grads)) {
      const prev = this.#sum.get(name);
      if (prev !== undefined && !sameShape(prev.shape, g.shape)) {
        throw new Error(
          `gradient '${name}' changed shape between micro-batches: ` +
            `[${prev.shape.join(', ')}] then [${g.shape.join(', ')}]`,
        );
      }
      // N = 1 keeps the gradient itself (scaling by 1 is exact, this saves a copy).
      const scaled = this.steps === 1 ? g : tf.mul(g, scale);
      if (scaled !== g) g.dispose();
      if (prev === undefined) {
        this.#sum.set(name, scaled);
      } else {
        this.#sum.set(name, tf.add(prev, scaled));
        prev.dispose();
        scaled.dispose();
      }
    }
    this.#count += 1;
  }

  /** Returns the accumulated gradients (caller owns them) and starts a new window. */
  take(): Grads {
    const out: Grads = Object.fromEntries(this.#sum);
    this.#sum = new Map();
    this.#count = 0;
    return out;
  }

  /** Drops a partial window (e.g. after a skipped, non-finite micro-batch). */
  reset(): void {
    for (const t of this.#sum.values()) t.dispose();
    this.#sum = new Map();
    this.#count = 0;
  }
}

/** What {@link gradStats} reads back. */
export interface GradStats {
  /** ‖all gradients‖₂ (torch's total_norm for norm_type 2). */
  readonly globalNorm: number;
  /**
   * False when any gradient element is NaN or ±Inf. (Finite gradients whose norm overflows
   * float32 keep `finite` true with an infinite `globalNorm`.)
   */
  readonly finite: boolean;
}

// ‖g‖₂ per tensor, then the norm of the stack of norms: torch's summation order.
function globalNormTensor(gs: readonly tf.Tensor[]): tf.Scalar {
  return tf.tidy(() => tf.norm(tf.stack(gs.map((g) => tf.norm(g)))) as tf.Scalar);
}

// sum(x · 0) is 0 for finite x and NaN as soon as one element is NaN or ±Inf (Inf · 0 = NaN); it
// is exact where checking the norm is not (finite values can overflow a float32 norm).
function nonFiniteProbe(gs: readonly tf.Tensor[]): tf.Scalar {
  return tf.tidy(() => tf.addN(gs.map((g) => tf.sum(tf.mul(g, 0)))) as tf.Scalar);
}

/** Global L2 norm and finiteness of a set of gradients, read back with one sync. */
export function gradStats(grads: MaybeGrads): GradStats {
  const gs = entries(grads).map(([, g]) => g);
  if (gs.length === 0) return { globalNorm: 0, finite: true };
  const both = tf.tidy(() => tf.stack([globalNormTensor(gs), nonFiniteProbe(gs)]));
  const [norm, probe] = both.dataSync();
  both.dispose();
  return { globalNorm: norm!, finite: Number.isFinite(probe!) };
}

/** Result of {@link clipGradNorm}. */
export interface ClipResult {
  /** The clipped gradients (new tensors, caller owns them). */
  readonly grads: Grads;
  /** The global norm before clipping, as torch returns it. */
  readonly totalNorm: number;
  /** The factor applied: min(1, maxNorm / (totalNorm + 1e-6)). */
  readonly coef: number;
}

/**
 * `torch.nn.utils.clip_grad_norm_(params, maxNorm)` with norm_type 2: total = ‖all grads‖₂,
 * coef = min(1, maxNorm / (total + 1e-6)) computed in float32, every gradient multiplied by coef.
 * Inputs are left untouched; non-finite gradients give a NaN coefficient, as in torch.
 */
export function clipGradNorm(grads: MaybeGrads, maxNorm: number): ClipResult {
  if (!(Number.isFinite(maxNorm) && maxNorm > 0)) {
    throw new Error(`max gradient norm must be a finite number > 0, got ${maxNorm}`);
  }
  const es = entries(grads);
  if (es.length === 0) return { grads: {}, totalNorm: 0, coef: 1 };
  const gs = es.map(([, g]) => g);
  const total = globalNormTensor(gs);
  const coef = tf.tidy(() => tf.minimum(tf.div(maxNorm, tf.add(total, 1e-6)), 1) as tf.Scalar);
  const out: Grads = {};
  for (const [name, g] of es) out[name] = tf.tidy(() => tf.mul(g, coef));
  const totalNorm = total.dataSync()[0]!;
  const coefValue = coef.dataSync()[0]!;
  total.dispose();
  coef.dispose();
  return { grads: out, totalNorm, coef: coefValue };
}

/** Thrown by {@link NonFiniteGuard} when too many consecutive steps were skipped. */
export class NonFiniteError extends Error {
  override name = 'NonFiniteError';
}

/** Options for {@link NonFiniteGuard}. */
export interface NonFiniteGuardOptions {
  /** Throw after this many skipped steps in a row (default 5). */
  readonly maxConsecutive?: number;
}

/**
 * Decides whether an optimizer step may proceed: a NaN/Inf loss or gradient skips the step and is
 * counted; after `maxConsecutive` skips in a row training is hopeless, so it throws.
 */
export class NonFiniteGuard {
  readonly maxConsecutive: number;
  #skipped = 0;
  #consecutive = 0;

  constructor(opts: NonFiniteGuardOptions = {}) {
    const n = opts.maxConsecutive ?? 5;
    if (!Number.isInteger(n) || n < 1) throw new Error(`maxConsecutive must be an integer ≥ 1, got ${n}`);
    this.maxConsecutive = n;
  }

  /** Steps skipped so far. */
  get skipped(): number {
    return this.#skipped;
  }

  /** Skips in a row ending at the latest check. */
  get consecutive(): number {
    return this.#consecutive;
  }

  /**
   * Returns true when the step should be applied (loss and gradients finite), false to skip it.
   * Throws {@link NonFiniteError} on the `maxConsecutive`-th skip in a row.
   */
  check(step: number, loss: number, gradsFinite: boolean): boolean {
    const lossFinite = Number.isFinite(loss);
    if (lossFinite && gradsFinite) {
      this.#consecutive = 0;
      return true;
    }
    this.#skipped += 1;
    this.#consecutive += 1;
    if (this.#consecutive >= this.maxConsecutive) {
      const what = lossFinite ? 'non-finite gradients' : `loss = ${loss}`;
      throw new NonFiniteError(
        `step ${step}: ${what}; ${this.#consecutive} consecutive steps skipped (${this.#skipped} in total) ` +
          `because the loss or gradients were NaN/Inf. Training has diverged: lower the learning rate, ` +
          `enable or tighten gradient clipping (max_grad_norm), and check the data for corrupt images or ` +
          `empty captions.`,
      );
    }
    return false;
  }
}

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}
