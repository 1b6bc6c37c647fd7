/**
 * nsfwjs (infinitered/nsfwjs, MIT): an image classifier shipped with its weights inside the npm
 * package, so it works without any download — the default detector. Five classes: Drawing,
 * Hentai, Neutral, Porn, Sexy; every image gets all five probabilities (a softmax, summing to 1).
 *
 * The package's bundled models are CommonJS modules holding the model JSON and base64 weights;
 * its `load(name)` imports them, so nothing is fetched. Images go through the package's own
 * `classify` (÷255, bilinear resize with aligned corners to the model's size), on whatever tfjs
 * backend `initBackend` chose.
 */
import { createRequire } from 'node:module';

import * as tf from '@tensorflow/tfjs';
import { z } from 'zod';

import type { Image8 } from '../../models/vae/vae.js';
import { detectorCommonFields } from './common.js';
import type { Detection, Detector, DetectorPlugin } from './types.js';

/** nsfwjs' classes in model output order. */
export const NSFWJS_LABELS = ['Drawing', 'Hentai', 'Neutral', 'Porn', 'Sexy'] as const;

/** Classes counted as unsafe by default. */
export const NSFWJS_UNSAFE: readonly string[] = ['Hentai', 'Porn', 'Sexy'];

/** The bundled models, by nsfwjs' names. */
export const NSFWJS_MODELS = ['MobileNetV2', 'MobileNetV2Mid', 'InceptionV3'] as const;

/** Config of a `type: nsfwjs` detector entry. */
export const nsfwjsSchema = z.strictObject({
  type: z.literal('nsfwjs'),
  ...detectorCommonFields(0.5),
  model: z.enum(NSFWJS_MODELS).default('MobileNetV2').describe('Bundled nsfwjs model (MobileNetV2 224², MobileNetV2Mid, InceptionV3 299²). Default MobileNetV2.'),
});
/** A parsed nsfwjs entry. */
export type NsfwjsConfig = z.infer<typeof nsfwjsSchema>;

/** The installed nsfwjs version (from its package.json). */
export function nsfwjsVersion(): string {
  const require = createRequire(import.meta.url);
  try {
    return (require('nsfwjs/package.json') as { version: string }).version;
  } catch {
    // Its exports map may hide package.json; resolve the entry point and walk up instead.
    const entry = require.resolve('nsfwjs');
    const root = entry.slice(0, entry.lastIndexOf('node_modules/nsfwjs') + 'node_modules/nsfwjs'.length);
    return (require(`${root}/package.json`) as { version: string }).version;
  }
}

interface NsfwModel {
  classify(img: tf.Tensor3D, topk?: number): Promise<Array<{ className: string; probability: number }>>;
  dispose(): void;
}

/** The nsfwjs classifier plugin. */
export const nsfwjs: DetectorPlugin<NsfwjsConfig> = {
  type: 'nsfwjs',
  description: 'nsfwjs image classifier (bundled weights, no download): Drawing, Hentai, Neutral, Porn, Sexy probabilities',
  kind: 'classifier',
  configSchema: nsfwjsSchema,
  labelsOf: () => NSFWJS_LABELS,
  defaultCounted: () => NSFWJS_UNSAFE,
  async create(cfg) {
    await tf.ready();
    const lib = (await import('nsfwjs')) as unknown as { load(name: string): Promise<NsfwModel> };
    // load() announces the model on console.info; keep the run's output to our own lines.
    const info = console.info;
    console.info = () => undefined;
    let model: NsfwModel;
    try {
      model = await lib.load(cfg.model);
    } finally {
      console.info = info;
    }
    return {
      info: {
        type: 'nsfwjs',
        name: cfg.name ?? 'nsfwjs',
        version: `nsfwjs ${nsfwjsVersion()} ${cfg.model} (bundled weights)`,
        kind: 'classifier',
        labels: NSFWJS_LABELS,
        countedLabels: cfg.classes ?? NSFWJS_UNSAFE,
      },
      async detect(image: Image8): Promise<Detection[]> {
        if (image.channels !== 3) throw new Error(`nsfwjs: expected an RGB image, got ${image.channels} channels`);
        const pixels = tf.tensor3d(image.data, [image.height, image.width, 3], 'int32');
        try {
          const predictions = await model.classify(pixels, NSFWJS_LABELS.length);
          const byName = new Map(predictions.map((p) => [p.className, p.probability]));
          return NSFWJS_LABELS.map((label) => {
            const score = byName.get(label);
            if (score === undefined) throw new Error(`nsfwjs: no probability for class ${label}`);
            return { label, score };
          });
        } finally {
          pixels.dispose();
        }
      },
      async dispose() {
        model.dispose();
      },
    };
  },
};
