/**
 * The one generic renamer behind every foreign naming (LDM single-file, OpenCLIP, …).
 *
 * A keymap is data, not code: a list of sections, each a table of module prefixes
 * (diffusers prefix ↔ foreign prefix) sharing one table of inner renames. A key maps through the
 * longest module prefix that matches it, then through the longest inner rename that matches the
 * rest of it; the rest is kept verbatim when no inner rename applies. Because both sides of every
 * row are plain strings, the same table is read in either direction.
 *
 * Prefixes ending in `.` match whole path segments; any other string matches only the exact key
 * (e.g. OpenCLIP's `positional_embedding`).
 */

/** How a tensor's layout differs between the two namings (data is never reordered, only reshaped or sliced). */
export type Transform =
  | { readonly kind: 'identity' }
  /** diffusers Linear weight [O, I] ↔ foreign 1×1 convolution [O, I, 1, 1]; biases are unchanged. */
  | { readonly kind: 'conv1x1' }
  /** The diffusers tensor is row block `index` of `count` equal blocks of the foreign tensor's first dimension. */
  | { readonly kind: 'split'; readonly index: number; readonly count: number };

export const IDENTITY: Transform = Object.freeze({ kind: 'identity' });
export const CONV1X1: Transform = Object.freeze({ kind: 'conv1x1' });

/** Row block `index` of `count` (OpenCLIP's fused q/k/v projections). */
export function split(index: number, count: number): Transform {
  return { kind: 'split', index, count };
}

/** One row of a table: the diffusers string and the foreign string it corresponds to. */
export type Row = readonly [diffusers: string, foreign: string];

/** An inner rename; the transform applies to every tensor renamed through it. */
export type InnerRow = readonly [diffusers: string, foreign: string, transform?: Transform];

/** Module prefixes that share one table of inner renames (e.g. every ResNet block of a UNet). */
export interface Section {
  readonly modules: readonly Row[];
  readonly inner?: readonly InnerRow[];
}

export interface Keymap {
  /** Names the keymap in errors, e.g. `LDM UNet`. */
  readonly name: string;
  readonly sections: readonly Section[];
}

export type Side = 'diffusers' | 'foreign';

export interface MappedKey {
  readonly key: string;
  readonly transform: Transform;
}

/** One name correspondence, as a table of the whole mapping lists them. */
export interface KeyPair {
  readonly diffusers: string;
  readonly foreign: string;
  readonly transform: Transform;
}

const SIDE_INDEX: Readonly<Record<Side, 0 | 1>> = { diffusers: 0, foreign: 1 };

interface Index {
  /** Module prefix (or exact key) on the source side → [target prefix, section]. */
  readonly modules: Map<string, readonly [string, Section]>;
}

const indexes = new WeakMap<Keymap, Record<Side, Index>>();

function indexOf(map: Keymap, from: Side): Index {
  let both = indexes.get(map);
  if (both === undefined) {
    both = { diffusers: buildIndex(map, 'diffusers'), foreign: buildIndex(map, 'foreign') };
    indexes.set(map, both);
  }
  return both[from];
}

function buildIndex(map: Keymap, from: Side): Index {
  const s = SIDE_INDEX[from];
  const modules = new Map<string, readonly [string, Section]>();
  for (const section of map.sections) {
    for (const row of section.modules) {
      const source = row[s];
      if (modules.has(source)) throw new Error(`${map.name} keymap: module '${source}' (${from} side) is listed twice`);
      modules.set(source, [row[1 - s]!, section]);
    }
  }
  return { modules };
}

/** Candidate module strings for `key`, longest first: the key itself, then each `segment.` prefix. */
function* prefixesOf(key: string): Generator<string> {
  yield key;
  for (let i = key.length - 1; i >= 0; i--) {
    if (key.charCodeAt(i) === 46 /* '.' */) yield key.slice(0, i + 1);
  }
}

function matches(pattern: string, rest: string): boolean {
  return pattern.endsWith('.') ? rest.startsWith(pattern) : rest === pattern;
}

/**
 * Map one key from `from`'s naming to the other. Usually one result; a foreign tensor that is
 * split into several diffusers tensors gives one per part; an unknown key gives none.
 */
export function mapKey(map: Keymap, key: string, from: Side): MappedKey[] {
  const { modules } = indexOf(map, from);
  const s = SIDE_INDEX[from];
  for (const prefix of prefixesOf(key)) {
    const hit = modules.get(prefix);
    if (hit === undefined) continue;
    // Only exact rows (no trailing dot) can equal a whole key.
    if (prefix === key) return [{ key: hit[0], transform: IDENTITY }];
    const [target, section] = hit;
    const rest = key.slice(prefix.length);
    let best: string | undefined;
    for (const row of section.inner ?? []) {
      const pattern = row[s];
      if (matches(pattern, rest) && (best === undefined || pattern.length > best.length)) best = pattern;
    }
    if (best === undefined) return [{ key: target + rest, transform: IDENTITY }];
    const tail = rest.slice(best.length);
    return (section.inner ?? [])
      .filter((row) => row[s] === best)
      .map((row) => ({ key: target + row[1 - s] + tail, transform: row[2] ?? IDENTITY }));
  }
  return [];
}

/** The shape a tensor has on the other side of `transform`, given its shape on side `from`. */
export function mappedShape(shape: readonly number[], transform: Transform, from: Side): number[] {
  switch (transform.kind) {
    case 'identity':
      return [...shape];
    case 'conv1x1':
      if (from === 'diffusers') return shape.length === 2 ? [...shape, 1, 1] : [...shape];
      return shape.length === 4 && shape[2] === 1 && shape[3] === 1 ? shape.slice(0, 2) : [...shape];
    case 'split': {
      const [rows, ...rest] = shape;
      if (rows === undefined) throw new Error('split: a scalar cannot be split into row blocks');
      return from === 'diffusers' ? [rows * transform.count, ...rest] : [rows / transform.count, ...rest];
    }
  }
}

/** Every correspondence for `keys` (given on side `from`), plus the keys the map does not cover. */
export function mapKeys(map: Keymap, keys: Iterable<string>, from: Side): { pairs: KeyPair[]; unmapped: string[] } {
  const pairs: KeyPair[] = [];
  const unmapped: string[] = [];
  const seen = new Map<string, string>();
  for (const key of keys) {
    const mapped = mapKey(map, key, from);
    if (mapped.length === 0) unmapped.push(key);
    for (const m of mapped) {
      // Two sources landing on one target (one part of it) would silently drop a tensor.
      const slot = m.transform.kind === 'split' ? `${m.key}#${m.transform.index}/${m.transform.count}` : m.key;
      const other = seen.get(slot);
      if (other !== undefined) throw new Error(`${map.name} keymap: '${key}' and '${other}' both map to '${m.key}'`);
      seen.set(slot, key);
      pairs.push(
        from === 'diffusers'
          ? { diffusers: key, foreign: m.key, transform: m.transform }
          : { diffusers: m.key, foreign: key, transform: m.transform },
      );
    }
  }
  return { pairs, unmapped };
}

/** The same keymap with `prefix` prepended to every foreign module string (e.g. `model.diffusion_model.`). */
export function withForeignPrefix(map: Keymap, prefix: string, name = map.name): Keymap {
  return {
    name,
    sections: map.sections.map((s) => ({
      ...s,
      modules: s.modules.map(([d, f]) => [d, prefix + f] as const),
    })),
  };
}
