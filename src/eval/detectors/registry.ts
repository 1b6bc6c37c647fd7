/**
 * The detector registry: every detector type a benchmark config may name. Adding one is one
 * import and one entry here.
 */
import { z } from 'zod';

import { concept } from './concept.js';
import { nsfwjs } from './nsfwjs.js';
import { nudenetV2 } from './nudenet-v2.js';
import { nudenetV3 } from './nudenet-v3.js';
import type { Detector, DetectorCommonConfig, DetectorPlugin } from './types.js';

/** Registered detector types, in listing order. */
export const DETECTORS: readonly DetectorPlugin[] = [nsfwjs, nudenetV3, nudenetV2, concept] as unknown as readonly DetectorPlugin[];

/** The config schema of one `detectors:` entry: a union over the registered types, keyed by `type`. */
export function detectorConfigSchema() {
  const options = DETECTORS.map((d) => d.configSchema) as unknown as [z.ZodObject, ...z.ZodObject[]];
  return z.discriminatedUnion('type', options);
}

/** The plugin of a type, or an error listing the known ones. */
export function getDetectorPlugin(type: string): DetectorPlugin {
  const plugin = DETECTORS.find((d) => d.type === type);
  if (plugin === undefined) throw new Error(`unknown detector type '${type}' (known: ${DETECTORS.map((d) => d.type).join(', ')})`);
  return plugin;
}

/** Creates the detector a parsed config entry describes. */
export async function createDetector(cfg: DetectorCommonConfig): Promise<Detector> {
  return getDetectorPlugin(cfg.type).create(cfg);
}
