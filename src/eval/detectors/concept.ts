/**
 * The plug-in point for concept classifiers (the toy-world classifier of a later issue, or any
 * model that scores named concepts in an image). A classifier registers a factory under an id;
 * a config then uses it as `{ type: concept, classifier: <id>, options: {…} }`, and it runs like
 * any other detector: its per-concept scores are stored, and concepts above the threshold count.
 */
import { z } from 'zod';

import type { Image8 } from '../../models/vae/vae.js';
import { detectorCommonFields } from './common.js';
import type { Detection, Detector, DetectorPlugin } from './types.js';

/** A loaded concept classifier. */
export interface ConceptClassifier {
  /** Concept names, in a fixed order. */
  readonly concepts: readonly string[];
  /** What identifies the classifier and its weights, for result files. */
  readonly version: string;
  /** A score in [0, 1] per concept. */
  classify(image: Image8): Promise<Readonly<Record<string, number>>>;
  dispose?(): Promise<void>;
}

/** How a classifier is made from its `options`. */
export interface ConceptClassifierFactory {
  readonly id: string;
  readonly description: string;
  create(options: Readonly<Record<string, unknown>>): Promise<ConceptClassifier>;
}

const factories = new Map<string, ConceptClassifierFactory>();

/** Registers a classifier under its id (a second registration of an id is an error). */
export function registerConceptClassifier(factory: ConceptClassifierFactory): void {
  if (factories.has(factory.id)) throw new Error(`concept classifier '${factory.id}' is already registered`);
  factories.set(factory.id, factory);
}

/** The registered classifiers. */
export function conceptClassifiers(): readonly ConceptClassifierFactory[] {
  return [...factories.values()];
}

/** Config of a `type: concept` detector entry. */
export const conceptSchema = z.strictObject({
  type: z.literal('concept'),
  ...detectorCommonFields(0.5),
  classifier: z.string().min(1).describe('Id of a registered concept classifier. Required.'),
  options: z.record(z.string(), z.unknown()).default({}).describe("The classifier's own settings (model file, …). Default {}."),
});
/** A parsed concept entry. */
export type ConceptConfig = z.infer<typeof conceptSchema>;

/** The concept-classifier detector plugin. */
export const concept: DetectorPlugin<ConceptConfig> = {
  type: 'concept',
  description: 'a registered concept classifier (the CLI registers the toy-world classifier as `toy`)',
  kind: 'classifier',
  configSchema: conceptSchema,
  labelsOf: () => undefined,
  defaultCounted: () => [],
  async create(cfg) {
    const factory = factories.get(cfg.classifier);
    if (factory === undefined) {
      const known = [...factories.keys()];
      throw new Error(`concept classifier '${cfg.classifier}' is not registered (registered: ${known.length > 0 ? known.join(', ') : 'none yet'})`);
    }
    const classifier = await factory.create(cfg.options);
    const unknown = (cfg.classes ?? []).filter((c) => !classifier.concepts.includes(c));
    if (unknown.length > 0) {
      await classifier.dispose?.();
      throw new Error(`concept classifier '${cfg.classifier}' has no concept ${unknown.join(', ')} (it has ${classifier.concepts.join(', ')})`);
    }
    return {
      info: {
        type: 'concept',
        name: cfg.name ?? `concept-${cfg.classifier}`,
        version: classifier.version,
        kind: 'classifier',
        labels: classifier.concepts,
        countedLabels: cfg.classes ?? classifier.concepts,
      },
      async detect(image: Image8): Promise<Detection[]> {
        const scores = await classifier.classify(image);
        return classifier.concepts.map((label) => {
          const score = scores[label];
          if (typeof score !== 'number' || !Number.isFinite(score)) throw new Error(`concept classifier '${cfg.classifier}': no finite score for '${label}'`);
          return { label, score };
        });
      },
      async dispose() {
        await classifier.dispose?.();
      },
    } satisfies Detector;
  },
};
