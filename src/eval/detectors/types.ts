/**
 * The detector plugin interface. A detector looks at one 8-bit RGB image and returns labelled
 * scores: boxes for object detectors (NudeNet), one score per class for classifiers (nsfwjs, the
 * concept classifiers). The runner stores everything a detector returns; counting thresholds are
 * applied later, in the summary, so a protocol can be re-scored without re-running anything.
 *
 * Adding a detector touches `src/eval/detectors/` only: one file with a {@link DetectorPlugin}
 * and one line in `registry.ts`.
 */
import type { z } from 'zod';

import type { Image8 } from '../../models/vae/vae.js';

/** One detection: a class, its score and, for detectors, the box in image pixels. */
export interface Detection {
  readonly label: string;
  readonly score: number;
  /** [left, top, width, height] in pixels of the image given to `detect`. */
  readonly box?: readonly [number, number, number, number];
}

/** What a detector is: the facts written into every result file. */
export interface DetectorInfo {
  /** The plugin id (`nudenet-v3`, `nsfwjs`, …). */
  readonly type: string;
  /** The config entry's name (defaults to the type); unique within a run. */
  readonly name: string;
  /** Implementation and model identity, e.g. `nudenet-v3 post-processing 3.4; model 320n.onnx sha256:…`. */
  readonly version: string;
  readonly kind: 'detector' | 'classifier';
  /** Every label the model can return, in model order. */
  readonly labels: readonly string[];
  /** Labels counted for "images with any exposed class" (a protocol may narrow them). */
  readonly countedLabels: readonly string[];
}

/** A ready detector. */
export interface Detector {
  readonly info: DetectorInfo;
  /** Runs on one image; returns detections (detectors) or every class's score (classifiers). */
  detect(image: Image8): Promise<Detection[]>;
  /** Frees sessions and tensors. */
  dispose(): Promise<void>;
}

/** The fields every detector config entry has, whatever its type. */
export interface DetectorCommonConfig {
  readonly type: string;
  readonly name?: string;
  /** A detection counts for its class when its score is above this. */
  readonly threshold: number;
  /** An image counts as flagged when a counted label scores above this (default: `threshold`). */
  readonly image_threshold?: number | null;
  /** Labels counted for the flagged-image rate (default: the detector's exposed/unsafe labels). */
  readonly classes?: readonly string[] | null;
}

/** A detector type: its config schema and a factory. */
export interface DetectorPlugin<C extends DetectorCommonConfig = DetectorCommonConfig> {
  readonly type: string;
  readonly description: string;
  /** Boxes per object found, or one score per class. */
  readonly kind: 'detector' | 'classifier';
  /** A zod object with `type: z.literal(this.type)` plus its own fields (joined in a discriminated union). */
  readonly configSchema: z.ZodType<C>;
  /** Every label, for checking `classes` before anything loads (undefined: known only after loading). */
  labelsOf(cfg: C): readonly string[] | undefined;
  /** The labels counted by default. */
  defaultCounted(cfg: C): readonly string[];
  create(cfg: C): Promise<Detector>;
}

/** A detector model file that is not there: the message says where to put it. */
export class DetectorModelMissingError extends Error {
  override name = 'DetectorModelMissingError';
}
