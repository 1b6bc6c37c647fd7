/**
 * The toy classifier as an eval concept classifier (`src/eval/detectors/concept.ts`): config
 * `{ type: concept, classifier: toy, options: { model: assets/toy-sd/classifier.safetensors } }`.
 * Each head's softmax probabilities become concept scores: shapes, colours and styles by name,
 * backgrounds as "<name> background" (so "white" the background never collides with a colour).
 */
import * as tf from '@tensorflow/tfjs';

import { assetPath } from '../assets.js';
import { conceptClassifiers, registerConceptClassifier, type ConceptClassifier, type ConceptClassifierFactory } from '../eval/detectors/concept.js';
import type { Image8 } from '../models/vae/vae.js';
import { classifyBatch, HEAD_NAMES, HEADS, loadClassifier, type Head } from './classifier.js';

/** Where `scripts/toy-classifier.ts` saves the classifier by default (relative to the package root). */
export const DEFAULT_CLASSIFIER_FILE = 'assets/toy-sd/classifier.safetensors';

/** The bundled classifier of the installed package. */
export function bundledClassifierFile(): Promise<string> {
  return assetPath('toy-sd', 'classifier.safetensors');
}

/** The concept name of a head's label. */
export function conceptName(head: Head, label: string): string {
  return head === 'background' ? `${label} background` : label;
}

/** Every concept the toy classifier scores, in head order. */
export const TOY_CONCEPTS: readonly string[] = HEAD_NAMES.flatMap((h) => (HEADS[h] as readonly string[]).map((l) => conceptName(h, l)));

/** The factory registered under id `toy`. */
export const toyConceptClassifier: ConceptClassifierFactory = {
  id: 'toy',
  description: 'the toy-world CNN (shape, colour, style, background heads); options.model: its safetensors file',
  async create(options): Promise<ConceptClassifier> {
    const file = typeof options['model'] === 'string' ? options['model'] : await bundledClassifierFile();
    const w = await loadClassifier(file);
    return {
      concepts: TOY_CONCEPTS,
      version: `toy-classifier ${JSON.stringify(w.cfg.channels)} ${file}`,
      async classify(image: Image8) {
        if (image.width !== w.cfg.imageSize || image.height !== w.cfg.imageSize || image.channels !== 3) {
          throw new Error(`toy classifier: expected ${w.cfg.imageSize}×${w.cfg.imageSize} RGB images, found ${image.width}×${image.height}×${image.channels}`);
        }
        const probs = classifyBatch(w, [image]);
        const scores: Record<string, number> = {};
        for (const h of HEAD_NAMES) (HEADS[h] as readonly string[]).forEach((label, i) => (scores[conceptName(h, label)] = probs[h][0]![i]!));
        return scores;
      },
      async dispose() {
        tf.dispose([...w.params.values()]);
      },
    };
  },
};

/** Registers the `toy` concept classifier once (later calls do nothing). */
export function registerToyClassifier(): void {
  if (!conceptClassifiers().some((f) => f.id === toyConceptClassifier.id)) registerConceptClassifier(toyConceptClassifier);
}
