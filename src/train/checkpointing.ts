/**
 * Gradient checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"): a
 * block's forward runs without keeping its intermediates for the backward pass; the backward
 * recomputes them from the block's inputs, then back-propagates through the recomputation. Peak
 * activation memory drops from "every intermediate of every block" to "block inputs + one block's
 * intermediates", for about one extra forward.
 *
 * tfjs mechanics. `tf.customGrad` runs its forward with the tape off and inside a `tidy`, so only
 * the output (and what `save` keeps) survives the forward. Gradients of a customGrad node reach
 * only its declared inputs, so every trained tensor the block reads (LoRA matrices, fine-tuned
 * weights) is passed as an input too — the caller names them (`paramsUnder(path)`); the block's
 * closure still reads them through its scope, and since they are the same tensors, the
 * recomputation's gradients w.r.t. them are the block's.
 *
 * The recomputation runs a nested `engine.gradients` inside the outer backward pass. tfjs keeps
 * one active tape per engine: a nested gradient computation at depth 0 replaces it and sets it to
 * null when done, which would make the outer backward fail at its cleanup. So the outer tape is
 * saved and restored around the nested call (the nested one still frees its own saved tensors).
 */
import * as tf from '@tensorflow/tfjs';

import type { UnetOptions } from '../models/unet/unet.js';

/** The `wrapBlock` hook of {@link UnetOptions} on tfjs tensors. */
export type WrapBlock = NonNullable<UnetOptions<tf.Tensor>['wrapBlock']>;

/**
 * `run(inputs)`, with its intermediates recomputed in the backward pass instead of kept.
 * `params`: the trained tensors `run` reads besides `inputs` (they get their gradients through
 * here); they must stay alive until the backward pass is done (variables).
 */
export function checkpoint(run: (inputs: readonly tf.Tensor[]) => tf.Tensor, inputs: readonly tf.Tensor[], params: readonly tf.Tensor[]): tf.Tensor {
  const n = inputs.length;
  // A tensor listed twice would get its gradient twice.
  const extra = [...new Set(params)].filter((p) => !inputs.includes(p));
  const node = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
    const save = args[args.length - 1] as tf.GradSaveFunc;
    const blockInputs = args.slice(0, n) as tf.Tensor[];
    // The inputs are intermediates of the outer forward, freed when it ends unless saved (tfjs
    // keeps clones for the backward); the parameters are variables that outlive the step.
    save(blockInputs);
    const value = run(blockInputs);
    const gradFunc = (dy: tf.Tensor, saved: tf.Tensor[]): tf.Tensor[] => recomputeGrads(run, saved, extra, dy);
    return { value, gradFunc };
  });
  return node(...inputs, ...extra);
}

/**
 * Gradients of `run(inputs)` w.r.t. `inputs` and then `params`, seeded with `dy`; zeros where
 * `run` does not depend on one.
 */
function recomputeGrads(run: (inputs: readonly tf.Tensor[]) => tf.Tensor, inputs: readonly tf.Tensor[], params: readonly tf.Tensor[], dy: tf.Tensor): tf.Tensor[] {
  const engine = tf.engine();
  const outerTape = engine.state.activeTape;
  const xs = [...inputs, ...params];
  try {
    return tf.tidy(() => {
      const { grads } = engine.gradients(() => run(inputs), xs, dy, true);
      return grads.map((g, i) => g ?? tf.zerosLike(xs[i]!));
    });
  } finally {
    engine.state.activeTape = outerTape;
  }
}

/**
 * A UNet `wrapBlock` that checkpoints every ResNet and transformer block; `paramsUnder(path)`
 * returns the trained tensors read under that module path (e.g. the LoRA matrices of
 * `down_blocks.0.attentions.0.…`), which must include everything the block trains.
 */
export function checkpointBlocks(paramsUnder: (path: string) => readonly tf.Tensor[]): WrapBlock {
  return (path, run, inputs) => checkpoint(run, inputs, paramsUnder(path));
}
