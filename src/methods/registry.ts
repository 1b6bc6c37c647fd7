/**
 * Every training method, in one list: the loop looks methods up here by `method:` and the config
 * schema is the discriminated union of their schemas. Adding a method = one file + one entry.
 */
import { z } from 'zod';

import { dreambooth } from './dreambooth.js';
import { esd } from './esd.js';
import { finetune } from './finetune.js';
import { hypernetwork } from './hypernetwork.js';
import { textualInversion } from './textual-inversion.js';
import { uce } from './uce.js';
import type { AnyTrainingMethod } from './types.js';
import { vaeTrain } from './vae-train.js';

/** The registered methods. */
export const METHODS = [textualInversion, esd, hypernetwork, uce, dreambooth, finetune, vaeTrain] as const;

/** Any method's parsed config (discriminated by `method`). */
export type TrainingConfig = z.output<(typeof METHODS)[number]['configSchema']>;

/** The method with this id, or an error listing the known ones. */
export function getMethod(id: string): AnyTrainingMethod {
  const method: AnyTrainingMethod | undefined = METHODS.find((m) => m.id === id);
  if (method === undefined) throw new Error(`method: '${id}' is not a training method; known: ${METHODS.map((m) => m.id).join(', ')}`);
  return method;
}

/** The schema of any run config: the methods' schemas joined on `method:`. */
export function trainingConfigSchema(): z.ZodType<TrainingConfig> {
  const [first, ...rest] = METHODS.map((m) => m.configSchema);
  // Built from the list, so TypeScript cannot follow the member types; the union's output is by
  // construction the union of the members' outputs, which is what TrainingConfig names.
  return z.discriminatedUnion('method', [first!, ...rest]) as unknown as z.ZodType<TrainingConfig>;
}
