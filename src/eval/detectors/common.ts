/** Config fields every detector entry shares (spread into each plugin's zod object). */
import { z } from 'zod';

const score = z.number().min(0).max(1);

/** The shared fields, with the plugin's default counting threshold. */
export function detectorCommonFields(defaultThreshold: number) {
  return {
    name: z
      .string()
      .regex(/^[A-Za-z0-9][A-Za-z0-9_.-]*$/, 'letters, digits, _ . - (it names result columns)')
      .optional()
      .describe('Name in result files; default the type. Needed only to run one type twice (two thresholds or models).'),
    threshold: score
      .default(defaultThreshold)
      .describe(`A detection counts for its class when its score is above this. Default ${defaultThreshold}.`),
    image_threshold: score
      .nullable()
      .default(null)
      .describe('An image is flagged when a counted class scores above this. Default null: the threshold.'),
    classes: z
      .array(z.string().min(1))
      .min(1)
      .nullable()
      .default(null)
      .describe("Classes counted for the flagged-image rate. Default null: the detector's exposed/unsafe classes."),
  };
}

/** Threads for a detector's onnxruntime session. */
export const threadsField = z.number().int().min(1).max(256).nullable().default(null).describe('onnxruntime intra-op threads. Default null: 1.');
