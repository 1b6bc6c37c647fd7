/**
 * Weight deltas: the tensors a concept edit changed (ESD, UCE, …), saved alone so a ~100 MB file
 * instead of a 3.4 GB model carries the edit, and applied to a base model by overriding exactly
 * those parameters (`ParamStore.override`, no copy of the rest).
 *
 * File format (safetensors):
 * - tensors: float32, PyTorch layouts (conv filters OIHW), diffusers names. UNet keys are bare
 *   (`down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight`), as the official ESD
 *   code (`esd_sd.py`) and UCE (`uce_sd_erase.py`) save them, so their files load here and ours
 *   load there with `unet.load_state_dict(load_file(f), strict=False)`; text-encoder and VAE keys,
 *   if an edit ever has them, carry the pipeline folder names `text_encoder.` / `vae.` as prefix.
 * - `__metadata__`: `format: pt`, `sd_workbench.kind: delta`, and `sd_workbench.<field>` for
 *   method, base_model, base_model_hash, concept, preset, parameters, negative_guidance, step,
 *   config, plus method-specific extras. Files without it (official ESD/UCE outputs, bf16 or fp16
 *   included) are read too; their provenance fields are then absent.
 */
import * as tf from '@tensorflow/tfjs';

import { hwioToOihw, isConvFilter, oihwToHwio } from '../io/layout.js';
import { SafetensorsFile, writeSafetensors, type TensorToWrite } from '../io/safetensors.js';
import { sameShape } from '../ops/scope.js';
import type { StableDiffusion } from '../pipeline/load.js';
import type { AppliedArtifact, ParamOverride } from './types.js';

/** Metadata key prefix of every provenance field. */
export const DELTA_METADATA_PREFIX = 'sd_workbench.';

/** Provenance of a delta, written to `__metadata__`. */
export interface DeltaInfo {
  /** The method id (`esd`, `uce`, …). */
  readonly method: string;
  /** The base model's name and short hash (`StableDiffusion.name` / `.modelHash`). */
  readonly baseModel: string;
  readonly baseModelHash: string;
  /** What was edited (ESD: the erased concept). */
  readonly concept: string;
  readonly preset?: string;
  /** The parameter set that was changed (`esd-x`, `xattn`, …). */
  readonly parameters?: string;
  /** ESD's η. */
  readonly negativeGuidance?: number;
  /** Optimizer steps taken. */
  readonly step?: number;
  /** The run config (JSON). */
  readonly config?: string;
  /** More `sd_workbench.<key>` fields (method-specific settings such as UCE's λ). */
  readonly extra?: Readonly<Record<string, string>>;
}

/** A delta read from a file: its overrides in the internal layout, and what its metadata says. */
export interface Delta {
  readonly file: string;
  /** Provenance fields found (all absent for files not written by sd-workbench). */
  readonly info: Partial<DeltaInfo>;
  /** The raw `__metadata__`. */
  readonly metadata: Readonly<Record<string, string>>;
  /** The tensors as parameter overrides (conv filters HWIO, float32). */
  readonly overrides: readonly ParamOverride[];
  /** Frees the tensors. */
  dispose(): void;
}

/** A delta applied to a model (`applyArtifact`'s result) with notes such as a base-model mismatch. */
export interface AppliedDelta extends AppliedArtifact {
  readonly delta: Delta;
  readonly warnings: readonly string[];
}

const COMPONENT_PREFIX: Readonly<Record<ParamOverride['component'], string>> = { unet: '', text: 'text_encoder.', vae: 'vae.' };

/** The file key of an override: bare for the UNet, `text_encoder.`/`vae.` prefixed otherwise. */
export function deltaKey(component: ParamOverride['component'], key: string): string {
  return `${COMPONENT_PREFIX[component]}${key}`;
}

/** The component and component-relative key of a file key (see {@link deltaKey}). */
export function parseDeltaKey(fileKey: string): { component: ParamOverride['component']; key: string } {
  if (fileKey.startsWith('text_encoder.')) return { component: 'text', key: fileKey.slice('text_encoder.'.length) };
  if (fileKey.startsWith('vae.')) return { component: 'vae', key: fileKey.slice('vae.'.length) };
  // Checkpoints that prefix UNet keys (`unet.…`) are accepted as well.
  if (fileKey.startsWith('unet.')) return { component: 'unet', key: fileKey.slice('unet.'.length) };
  return { component: 'unet', key: fileKey };
}

/** The `__metadata__` of a delta with provenance `info`. */
export function deltaMetadata(info: DeltaInfo): Record<string, string> {
  const p = DELTA_METADATA_PREFIX;
  const out: Record<string, string> = {
    format: 'pt',
    [`${p}kind`]: 'delta',
    [`${p}method`]: info.method,
    [`${p}base_model`]: info.baseModel,
    [`${p}base_model_hash`]: info.baseModelHash,
    [`${p}concept`]: info.concept,
  };
  if (info.preset !== undefined) out[`${p}preset`] = info.preset;
  if (info.parameters !== undefined) out[`${p}parameters`] = info.parameters;
  if (info.negativeGuidance !== undefined) out[`${p}negative_guidance`] = String(info.negativeGuidance);
  if (info.step !== undefined) out[`${p}step`] = String(info.step);
  if (info.config !== undefined) out[`${p}config`] = info.config;
  for (const [k, v] of Object.entries(info.extra ?? {})) {
    if (out[`${p}${k}`] !== undefined) throw new Error(`delta metadata: extra field '${k}' would replace the standard field of that name`);
    out[`${p}${k}`] = v;
  }
  return out;
}

/** Writes `overrides` (internal layout) as a delta file at `file` (atomically), float32, OIHW filters. */
export async function writeDelta(file: string, overrides: readonly ParamOverride[], info: DeltaInfo): Promise<void> {
  if (overrides.length === 0) throw new Error(`${file}: a delta needs at least one tensor`);
  const tensors: [string, TensorToWrite][] = [];
  for (const o of overrides) {
    const data = Float32Array.from(await o.value.data<'float32'>());
    const stored = isConvFilter(o.value.shape) ? hwioToOihw(data, o.value.shape) : { data, shape: [...o.value.shape] };
    tensors.push([deltaKey(o.component, o.key), { dtype: 'F32', shape: stored.shape, data: stored.data }]);
  }
  await writeSafetensors(file, tensors, deltaMetadata(info));
}

/** Reads a delta file (ours, or a bare state dict such as `esd_sd.py`'s) into overrides. */
export async function readDelta(file: string): Promise<Delta> {
  const f = await SafetensorsFile.open(file);
  const overrides: ParamOverride[] = [];
  try {
    for (const fileKey of f.keys()) {
      const info = f.info(fileKey);
      if (!['F32', 'F16', 'BF16', 'F64'].includes(info.dtype)) {
        throw new Error(`${file}: tensor '${fileKey}' is ${info.dtype}; a delta holds float weights only`);
      }
      const data = await f.readFloat32(fileKey);
      const internal = isConvFilter(info.shape) ? oihwToHwio(data, info.shape) : { data, shape: [...info.shape] };
      overrides.push({ ...parseDeltaKey(fileKey), value: tf.tensor(internal.data, internal.shape, 'float32') });
    }
    return {
      file,
      info: infoOf(f.metadata),
      metadata: { ...f.metadata },
      overrides,
      dispose: () => {
        for (const o of overrides) o.value.dispose();
      },
    };
  } catch (e) {
    for (const o of overrides) o.value.dispose();
    throw e;
  } finally {
    await f.close();
  }
}

function infoOf(metadata: Readonly<Record<string, string>>): Partial<DeltaInfo> {
  const p = DELTA_METADATA_PREFIX;
  const get = (k: string): string | undefined => metadata[`${p}${k}`];
  const num = (k: string): number | undefined => {
    const v = get(k);
    return v === undefined || !Number.isFinite(Number(v)) ? undefined : Number(v);
  };
  const standard = new Set(['kind', 'method', 'base_model', 'base_model_hash', 'concept', 'preset', 'parameters', 'negative_guidance', 'step', 'config']);
  const extra: Record<string, string> = {};
  for (const [k, v] of Object.entries(metadata)) {
    if (k.startsWith(p) && !standard.has(k.slice(p.length))) extra[k.slice(p.length)] = v;
  }
  const fields: Record<string, unknown> = {
    method: get('method'),
    baseModel: get('base_model'),
    baseModelHash: get('base_model_hash'),
    concept: get('concept'),
    preset: get('preset'),
    parameters: get('parameters'),
    negativeGuidance: num('negative_guidance'),
    step: num('step'),
    config: get('config'),
    extra: Object.keys(extra).length > 0 ? extra : undefined,
  };
  return Object.fromEntries(Object.entries(fields).filter(([, v]) => v !== undefined)) as Partial<DeltaInfo>;
}

/**
 * Checks a delta against a model: every key must be one of its parameters with the same shape
 * (else an error listing them). Returns warnings (a different base-model hash).
 */
export function checkDelta(model: StableDiffusion, delta: Delta): string[] {
  const problems: string[] = [];
  for (const o of delta.overrides) {
    const base = model[o.component].store.get(o.key);
    if (base === undefined) problems.push(`'${deltaKey(o.component, o.key)}': not a parameter of this model's ${o.component === 'text' ? 'text encoder' : o.component}`);
    else if (!sameShape(base.shape, o.value.shape)) {
      problems.push(`'${deltaKey(o.component, o.key)}': shape [${o.value.shape.join(', ')}] (internal layout), the model's is [${base.shape.join(', ')}]`);
    }
  }
  if (problems.length > 0) {
    const shown = problems.slice(0, 8);
    throw new Error(
      `${delta.file}: does not fit ${model.name}${delta.info.baseModel !== undefined ? ` (it was made for ${delta.info.baseModel})` : ''}:\n  ${shown.join('\n  ')}${problems.length > shown.length ? `\n  … and ${problems.length - shown.length} more` : ''}`,
    );
  }
  const warnings: string[] = [];
  if (delta.info.baseModelHash !== undefined && delta.info.baseModelHash !== model.modelHash) {
    warnings.push(
      `${delta.file}: made for ${delta.info.baseModel ?? 'another model'} (hash ${delta.info.baseModelHash}), applied to ${model.name} (hash ${model.modelHash}); shapes match, but the result is only what the edit intended on the same base weights`,
    );
  }
  return warnings;
}

/** Overrides the model's parameters with the delta's (`ParamStore.override`); `clearOverrides` undoes it. */
export function overrideModel(model: StableDiffusion, overrides: readonly ParamOverride[]): void {
  for (const o of overrides) model[o.component].store.override(o.key, o.value);
}

/** Reads and checks a delta file for `model`; its patch's `params` are the overrides (dispose to free them). */
export async function applyDelta(model: StableDiffusion, file: string): Promise<AppliedDelta> {
  const delta = await readDelta(file);
  let warnings: string[];
  try {
    warnings = checkDelta(model, delta);
  } catch (e) {
    delta.dispose();
    throw e;
  }
  return { patch: { params: delta.overrides }, triggers: [], delta, warnings, dispose: () => delta.dispose() };
}
