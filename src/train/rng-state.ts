/**
 * Training randomness, counter-based: the draws of micro-batch `micro` of optimizer step `step`
 * come from generators keyed by (seed, stream, step, micro), never from one running generator.
 *
 * Why counters and not a stateful generator whose state is saved: a run resumed at step k draws
 * exactly what an uninterrupted run draws at step k without replaying steps 0…k−1, the state to
 * checkpoint is just the next step, and randomness consumed by one part (timesteps) cannot shift
 * another's (noise) when a config option adds or removes a draw. The data pipeline uses the same
 * scheme (`src/data/rng.ts`), keyed by epoch and position.
 *
 * Normals come from PyTorch's CPU generator algorithm (`TorchGenerator`, seeded from the key) so
 * their distribution and float32 rounding are torch's; integers from xoshiro128** (`SeededRandom`).
 */
import { SeededRandom } from '../data/rng.js';
import { TorchGenerator } from '../schedulers/rng.js';

/** Independent streams of training randomness. */
export const TRAIN_STREAM = {
  /** Method setup: initial weights (LoRA matrices, …). */
  setup: 101,
  /** Per micro-batch: timesteps, noise, VAE posterior samples. */
  step: 102,
} as const;

/** A source of random numbers for one purpose (one micro-batch, or setup). */
export class TrainRandom {
  readonly #normals: TorchGenerator;
  readonly #integers: SeededRandom;

  /** `key`: safe integers, e.g. (seed, stream, step, micro). */
  constructor(...key: readonly number[]) {
    this.#integers = new SeededRandom(...key, 1);
    this.#normals = new TorchGenerator(new SeededRandom(...key, 2).nextUint32());
  }

  /** Standard normal float32 values, row-major for `shape` (as torch.randn with this generator). */
  randn(shape: readonly number[]): Float32Array {
    const n = shape.reduce((a, b) => a * b, 1);
    // torch draws fewer than 16 values through another path; draw 16 and keep the first n instead.
    return n >= 16 ? this.#normals.randn(shape) : this.#normals.randn([16]).slice(0, n);
  }

  /** `count` uniform integers in [0, high) (torch.randint(0, high, (count,)) in distribution). */
  randint(high: number, count: number): number[] {
    return Array.from({ length: count }, () => this.#integers.uniformInt(high));
  }

  /** A uniform float in [0, 1). */
  uniform(): number {
    return this.#integers.nextFloat();
  }
}

/** The generator of micro-batch `micro` of step `step` (0-based). */
export function stepRandom(seed: number, step: number, micro: number): TrainRandom {
  return new TrainRandom(seed, TRAIN_STREAM.step, step, micro);
}

/** The generator of method setup. */
export function setupRandom(seed: number): TrainRandom {
  return new TrainRandom(seed, TRAIN_STREAM.setup);
}

/** The RNG state a checkpoint records: the key scheme and the next step to draw for. */
export interface RngState {
  readonly scheme: 'counter-v1';
  readonly seed: number;
  /** The optimizer step the next micro-batch belongs to (0-based). */
  readonly nextStep: number;
}

/** Validates a recorded RNG state against the run's seed. */
export function checkRngState(state: unknown, seed: number, where: string): RngState {
  const s = state as Partial<RngState> | null;
  if (s === null || typeof s !== 'object' || s.scheme !== 'counter-v1' || !Number.isSafeInteger(s.seed) || !Number.isSafeInteger(s.nextStep)) {
    throw new Error(`${where}: rng state: expected {scheme: 'counter-v1', seed, nextStep}, found ${JSON.stringify(state)}`);
  }
  if (s.seed !== seed) {
    throw new Error(`${where}: the checkpoint was trained with seed ${s.seed}, the config says ${seed}; resume with the same seed`);
  }
  return s as RngState;
}
