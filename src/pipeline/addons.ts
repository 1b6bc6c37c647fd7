/**
 * Generation-time add-ons: trained files applied to a loaded model for one run, as `sdwb generate
 * --embedding/--hypernetwork/--lora/--delta` takes them. Each flag names the training method
 * whose `applyArtifact` reads its files (looked up in the registry, so a method not registered
 * yet gives a clear error); their patches are composed into one {@link ModelPatch} for
 * `generate`/`img2img`, and what was applied is recorded in A1111's infotext keys.
 *
 * Composition order (fixed, whatever the order of the flags):
 *   1. embeddings: every --embedding file's tokens join the tokenizer together (in flag order);
 *      they provide the token-embedding lookup and the prompt rewrite (multi-vector tokens).
 *   2. deltas: replace whole tensors, in flag order (a later delta wins on a shared key).
 *   3. LoRAs: each adds its increment W_lora − W_base to what 2 left, so LoRAs stack on an edited
 *      model and on each other (a key only one add-on touches takes its value unchanged).
 *   4. hypernetworks: chained on the attention context in flag order, K through K and V through
 *      V, as A1111's `apply_hypernetworks` chains several.
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import path from 'node:path';

import * as tf from '@tensorflow/tfjs';

import { SafetensorsFile } from '../io/safetensors.js';
import { applyDelta } from '../methods/delta.js';
import { loadEmbedding } from '../methods/embedding-files.js';
import { METHODS } from '../methods/registry.js';
import { applyEmbeddings } from '../methods/textual-inversion.js';
import type { AnyTrainingMethod, AppliedArtifact, ModelPatch, ParamOverride } from '../methods/types.js';
import type { AttentionContextInfo, UnetHooks } from '../models/unet/unet.js';
import type { StableDiffusion } from './load.js';

/** The kinds of add-on, by their `sdwb generate` flag (without `--`). */
export const ADDON_KINDS = ['embedding', 'hypernetwork', 'lora', 'delta'] as const;
export type AddonKind = (typeof ADDON_KINDS)[number];

/**
 * Which methods read a kind's files (the first registered one is used), and whether a kind takes
 * a strength (`file:0.8`). LoRA files are DreamBooth-LoRA's artifacts unless a method of their
 * own is registered.
 */
export const ADDON_METHODS: Readonly<Record<AddonKind, { readonly methods: readonly string[]; readonly weighted: boolean }>> = {
  embedding: { methods: ['textual_inversion'], weighted: false },
  hypernetwork: { methods: ['hypernetwork'], weighted: true },
  lora: { methods: ['lora', 'dreambooth'], weighted: true },
  // Deltas are one format for every weight edit (ESD, UCE, …): the method is the one the file's
  // metadata names when that is registered, else the generic delta reader.
  delta: { methods: [], weighted: false },
};

/** One add-on as given: `file` or, for weighted kinds, `file:strength`. */
export interface AddonSpec {
  readonly kind: AddonKind;
  readonly file: string;
  /** Hypernetwork strength / LoRA weight; 1 when not given (and for unweighted kinds). */
  readonly strength: number;
}

/** A problem with an add-on flag (the CLI reports it as a usage error). */
export class AddonSpecError extends Error {
  override name = 'AddonSpecError';
}

// A trailing `:<number>` is a strength; anything else is part of the file name (C:\… included).
const STRENGTH_SUFFIX = /^(.+):([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$/;

/** Parses `--<kind> <text>`: `file` or `file:strength` (hypernetwork, lora). */
export function parseAddonSpec(kind: AddonKind, text: string): AddonSpec {
  const flag = `--${kind}`;
  if (text.trim() === '') throw new AddonSpecError(`${flag}: expected a file, found an empty value`);
  const m = STRENGTH_SUFFIX.exec(text);
  if (m === null) return { kind, file: text, strength: 1 };
  if (!ADDON_METHODS[kind].weighted) {
    throw new AddonSpecError(`${flag} '${text}': ${kind} files take no strength (':${m[2]}'); give the file alone`);
  }
  const strength = Number(m[2]);
  if (!Number.isFinite(strength)) throw new AddonSpecError(`${flag} '${text}': strength '${m[2]}' is not a finite number`);
  return { kind, file: m[1]!, strength };
}

/** Options of {@link loadAddons}. */
export interface LoadAddonsOptions {
  /** The methods to look kinds up in (default: the registry's). */
  readonly methods?: readonly AnyTrainingMethod[];
}

/** Add-ons applied to a model: one patch for the run, its infotext, and how to free it. */
export interface LoadedAddons {
  readonly patch: ModelPatch;
  /** The A1111 `parameters` entries of every add-on loaded (`TI hashes` of all embeddings); see {@link infotextFor}. */
  readonly infotext: Readonly<Record<string, string>>;
  /**
   * A1111 `parameters` entries for a run with these prompts (and negative prompts): `TI hashes`
   * of the embeddings whose word occurs in them (A1111 lists the used ones), `Hypernet`,
   * `Hypernet hash`, `Hypernet strength`, `Lora hashes`, …
   */
  infotextFor(texts: readonly string[]): Record<string, string>;
  /** Words that invoke embeddings in a prompt. */
  readonly triggers: readonly string[];
  /** Non-fatal notes (a delta made for another base model). */
  readonly warnings: readonly string[];
  /** Frees every tensor of every add-on. */
  dispose(): void;
}


/** The registered method for a kind, or an error saying it is not available yet. */
export function methodForAddon(kind: AddonKind, methods: readonly AnyTrainingMethod[] = METHODS): AnyTrainingMethod {
  const ids = ADDON_METHODS[kind].methods;
  if (ids.length === 0) throw new Error(`--${kind}: its method comes from each file (see ADDON_METHODS)`);
  const method = ids.map((id) => methods.find((m) => m.id === id)).find((m) => m !== undefined);
  if (method === undefined) {
    const which = ids.length === 1 ? `method ${ids[0]} is not registered` : `none of the methods ${ids.join(', ')} is registered`;
    throw new AddonSpecError(`--${kind}: not available yet (${which}; known methods: ${methods.map((m) => m.id).join(', ') || 'none'})`);
  }
  return method;
}

/** Fails fast (before any model loads) for kinds whose method is not registered. */
export function checkAddonsAvailable(specs: readonly AddonSpec[], methods: readonly AnyTrainingMethod[] = METHODS): void {
  for (const kind of new Set(specs.map((s) => s.kind))) if (ADDON_METHODS[kind].methods.length > 0) methodForAddon(kind, methods);
}

/** One applied add-on, before composition. */
interface Part {
  readonly spec: AddonSpec;
  readonly applied: AppliedArtifact;
  /** The files it came from (all --embedding files for the embeddings part). */
  readonly files: readonly string[];
  /** The name infotext shows: the file's stem (embeddings: their triggers, one per file). */
  readonly name: string;
}

/**
 * Applies `specs` to `model` (a freshly loaded one when there are embeddings: their tokens are
 * added to its tokenizer) and composes them in the documented order. Dispose the result after
 * the run; on an error, whatever was applied is freed.
 */
export async function loadAddons(model: StableDiffusion, specs: readonly AddonSpec[], opts: LoadAddonsOptions = {}): Promise<LoadedAddons> {
  const methods = opts.methods ?? METHODS;
  checkAddonsAvailable(specs, methods);
  const parts: Part[] = [];
  const warnings: string[] = [];
  const owned: tf.Tensor[] = [];
  const disposeAll = () => {
    for (const p of parts) p.applied.dispose();
    tf.dispose(owned);
  };
  try {
    // 1. Embeddings, all at once: a tokenizer takes added tokens right after its table only once.
    const embeddings = specs.filter((s) => s.kind === 'embedding');
    if (embeddings.length > 0) {
      const ti = methodForAddon('embedding', methods);
      const applied =
        embeddings.length === 1
          ? await ti.applyArtifact(model, embeddings[0]!.file)
          : applyEmbeddings(model, await Promise.all(embeddings.map((s) => loadEmbedding(s.file))));
      parts.push({ spec: embeddings[0]!, applied, files: embeddings.map((s) => s.file), name: applied.triggers.join(', ') });
    }
    // 2–4. The others, grouped by kind in composition order.
    for (const kind of ['delta', 'lora', 'hypernetwork'] as const) {
      for (const spec of specs.filter((s) => s.kind === kind)) {
        const applied = kind === 'delta' ? await applyDeltaFile(model, spec.file, methods) : await applyWeighted(model, spec, methods);
        parts.push({ spec, applied, files: [spec.file], name: stem(spec.file) });
        const notes = (applied as { warnings?: unknown }).warnings;
        if (Array.isArray(notes)) warnings.push(...notes.filter((n): n is string => typeof n === 'string'));
      }
    }
    const patch = composePatches(model, parts.map((p) => ({ kind: p.spec.kind, patch: p.applied.patch })), owned);
    const { embeddings: embeddingHashes, others } = await infotextOf(parts);
    const infotextFor = (texts: readonly string[]): Record<string, string> => {
      const ids = new Set(texts.flatMap((t) => model.tokenizer.contentIds(patch.rewritePrompt?.(t) ?? t)));
      const used = embeddingHashes.filter((e) => {
        const id = model.tokenizer.tokenToId(e.trigger);
        return id !== undefined && ids.has(id);
      });
      return { ...(used.length === 0 ? {} : { 'TI hashes': used.map((e) => e.entry).join(', ') }), ...others };
    };
    return {
      patch,
      infotext: infotextFor([...new Set(embeddingHashes.map((e) => e.trigger))]),
      infotextFor,
      triggers: parts.flatMap((p) => p.applied.triggers),
      warnings,
      dispose: disposeAll,
    };
  } catch (e) {
    disposeAll();
    throw e;
  }
}

async function applyWeighted(model: StableDiffusion, spec: AddonSpec, methods: readonly AnyTrainingMethod[]): Promise<AppliedArtifact> {
  return methodForAddon(spec.kind, methods).applyArtifact(model, spec.file, { strength: spec.strength });
}

async function applyDeltaFile(model: StableDiffusion, file: string, methods: readonly AnyTrainingMethod[]): Promise<AppliedArtifact> {
  let named: string | undefined;
  if (path.extname(file).toLowerCase() === '.safetensors') {
    const f = await SafetensorsFile.open(file);
    named = f.metadata['sd_workbench.method'];
    await f.close();
  }
  const method = named === undefined ? undefined : methods.find((m) => m.id === named);
  return method === undefined ? applyDelta(model, file) : method.applyArtifact(model, file);
}

/** A patch with the add-on kind that made it (LoRA parameters add, others replace). */
export interface KindedPatch {
  readonly kind: AddonKind;
  readonly patch: ModelPatch;
}

/**
 * Composes patches in the order given (callers pass embeddings, deltas, LoRAs, hypernetworks):
 * prompt rewrites in sequence, the one token-embedding lookup, parameters (replacements, then
 * LoRA increments on top), attention-context hooks chained. New tensors (sums) are pushed to
 * `owned` for the caller to free.
 */
export function composePatches(model: StableDiffusion, patches: readonly KindedPatch[], owned: tf.Tensor[]): ModelPatch {
  const lookups = patches.filter((p) => p.patch.tokenEmbeddings !== undefined);
  if (lookups.length > 1) {
    throw new Error(`add-ons: ${lookups.length} add-ons (${lookups.map((p) => p.kind).join(', ')}) each replace the token-embedding lookup; only one can`);
  }
  for (const p of patches) {
    if (p.patch.unetHooks?.intermediates !== undefined) throw new Error(`add-ons: a ${p.kind} patch records UNet intermediates, which add-ons do not support`);
  }
  const rewrites = patches.flatMap((p) => (p.patch.rewritePrompt === undefined ? [] : [p.patch.rewritePrompt]));
  const contextHooks = patches.flatMap((p) => (p.patch.unetHooks?.attentionContext === undefined ? [] : [p.patch.unetHooks.attentionContext]));
  const params = composeParams(model, patches, owned);
  const tokenEmbeddings = lookups[0]?.patch.tokenEmbeddings;
  const unetHooks: UnetHooks<tf.Tensor> | undefined = contextHooks.length === 0 ? undefined : { attentionContext: chainContextHooks(contextHooks) };
  return {
    ...(tokenEmbeddings === undefined ? {} : { tokenEmbeddings }),
    ...(rewrites.length === 0 ? {} : { rewritePrompt: (prompt: string) => rewrites.reduce((text, f) => f(text), prompt) }),
    ...(unetHooks === undefined ? {} : { unetHooks }),
    ...(params.length === 0 ? {} : { params }),
  };
}

type ContextHook<T> = NonNullable<UnetHooks<T>['attentionContext']>;

/**
 * K through every hook's K, V through every hook's V (one call while they are still the same
 * tensor), over any tensor type: the ONNX export chains hypernetworks the same way.
 */
export function chainContextHooks<T>(hooks: readonly ContextHook<T>[]): ContextHook<T> {
  if (hooks.length === 1) return hooks[0]!;
  return (context: T, info: AttentionContextInfo) => {
    let k = context;
    let v = context;
    for (const hook of hooks) {
      if (k === v) ({ k, v } = hook(k, info));
      else {
        k = hook(k, info).k;
        v = hook(v, info).v;
      }
    }
    return { k, v };
  };
}

function composeParams(model: StableDiffusion, patches: readonly KindedPatch[], owned: tf.Tensor[]): ParamOverride[] {
  interface Slot {
    readonly component: ParamOverride['component'];
    readonly key: string;
    replaced?: tf.Tensor;
    readonly increments: tf.Tensor[];
  }
  const slots = new Map<string, Slot>();
  const slotOf = (o: ParamOverride): Slot => {
    const id = `${o.component}\u0000${o.key}`;
    let slot = slots.get(id);
    if (slot === undefined) {
      slot = { component: o.component, key: o.key, increments: [] };
      slots.set(id, slot);
    }
    return slot;
  };
  // Replacements first, then additive LoRA values, whatever order the patches came in.
  const ordered = [...patches.filter((p) => p.kind !== 'lora'), ...patches.filter((p) => p.kind === 'lora')];
  for (const p of ordered) {
    for (const o of p.patch.params ?? []) {
      if (model[o.component].store.get(o.key) === undefined) {
        throw new Error(`add-ons: the ${p.kind} overrides '${o.key}', which is not a parameter of this model's ${o.component}`);
      }
      const slot = slotOf(o);
      if (p.kind === 'lora') slot.increments.push(o.value);
      else slot.replaced = o.value;
    }
  }
  const out: ParamOverride[] = [];
  for (const slot of slots.values()) {
    const base = model[slot.component].store.get(slot.key)!;
    if (slot.increments.length === 0) {
      out.push({ component: slot.component, key: slot.key, value: slot.replaced! });
    } else if (slot.increments.length === 1 && slot.replaced === undefined) {
      out.push({ component: slot.component, key: slot.key, value: slot.increments[0]! });
    } else {
      // W = (replacement or base) + Σ (W_lora − W_base).
      const value = tf.tidy(() => slot.increments.reduce((acc, w) => tf.add(acc, tf.sub(w, base)), slot.replaced ?? base));
      owned.push(value);
      out.push({ component: slot.component, key: slot.key, value });
    }
  }
  return out;
}

// =============================================================================================
// Infotext

/** SHA-256 of a file, hex. */
export async function sha256File(file: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(file)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

function stem(file: string): string {
  return path.basename(file).replace(/\.[^.]*$/, '');
}

// A1111 strips these from names in `name: hash` lists, whose separators they are.
const listName = (name: string) => name.replace(/[:,]/g, '');

/**
 * A1111's infotext for what was applied: per embedding its `TI hashes` entry (`name:
 * sha256[:12]`), and the rest: hypernetworks as A1111's hypernetwork keys did (`Hypernet`,
 * `Hypernet hash` sha256[:10], `Hypernet strength` when not 1), `Lora hashes` (`name:
 * sha256[:12]`) with our `Lora weights`, and our `Delta hashes`. Several of a kind are joined
 * with ", ".
 */
async function infotextOf(parts: readonly Part[]): Promise<{ embeddings: { trigger: string; entry: string }[]; others: Record<string, string> }> {
  const out: Record<string, string> = {};
  const byKind = (kind: AddonKind) => parts.filter((p) => p.spec.kind === kind);
  const embeddings: { trigger: string; entry: string }[] = [];
  for (const p of byKind('embedding')) {
    for (const [i, file] of p.files.entries()) {
      const trigger = p.applied.triggers[i] ?? stem(file);
      embeddings.push({ trigger, entry: `${listName(trigger)}: ${(await sha256File(file)).slice(0, 12)}` });
    }
  }
  const hypernets = byKind('hypernetwork');
  if (hypernets.length > 0) {
    out['Hypernet'] = hypernets.map((p) => listName(p.name)).join(', ');
    const hashes: string[] = [];
    for (const p of hypernets) hashes.push((await sha256File(p.spec.file)).slice(0, 10));
    out['Hypernet hash'] = hashes.join(', ');
    if (hypernets.some((p) => p.spec.strength !== 1)) out['Hypernet strength'] = hypernets.map((p) => String(p.spec.strength)).join(', ');
  }
  const loras = byKind('lora');
  if (loras.length > 0) {
    const hashes: string[] = [];
    for (const p of loras) hashes.push(`${listName(p.name)}: ${(await sha256File(p.spec.file)).slice(0, 12)}`);
    out['Lora hashes'] = hashes.join(', ');
    out['Lora weights'] = loras.map((p) => `${listName(p.name)}: ${p.spec.strength}`).join(', ');
  }
  const deltas = byKind('delta');
  if (deltas.length > 0) {
    const hashes: string[] = [];
    for (const p of deltas) hashes.push(`${listName(p.name)}: ${(await sha256File(p.spec.file)).slice(0, 12)}`);
    out['Delta hashes'] = hashes.join(', ');
  }
  return { embeddings, others: out };
}
