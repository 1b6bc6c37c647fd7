/**
 * Parameters as ONNX initializers. The recording scope turns each `param()` read into an
 * initializer named by the parameter's state-dict key, stored in the checkpoint's own layout
 * (conv filters OIHW — what ONNX Conv wants —, linear weights [out, in]), so an exported graph's
 * initializers are the checkpoint, key for key. Payloads are read only when the file is written.
 */
import type * as tf from '@tensorflow/tfjs';
import { hwioToOihw } from '../io/layout.js';
import { ParamError, sameShape, type ParamStore, type Scope } from '../ops/scope.js';
import type { OnnxRecorder, OnnxValue } from './recorder.js';

/** Read access to one component's parameters, in checkpoint (PyTorch) layout. */
export interface ParamSource {
  /** Names the source in errors (files, or "UNet of <folder>"). */
  readonly description: string;
  keys(): Iterable<string>;
  /** Checkpoint-layout shape of `key`, or undefined. */
  shapeOf(key: string): readonly number[] | undefined;
  /** The float32 values of `key` in checkpoint layout. */
  read(key: string): Float32Array;
}

/** Internal (HWIO for convs) → checkpoint (OIHW) shape. */
export function checkpointShape(internal: readonly number[]): number[] {
  return internal.length === 4 ? [internal[3]!, internal[2]!, internal[0]!, internal[1]!] : [...internal];
}

function fmt(s: readonly number[]): string {
  return `[${s.join(', ')}]`;
}

/** A {@link ParamSource} over a loaded tfjs parameter store (conv filters transposed back to OIHW on read). */
export function storeSource(store: ParamStore<tf.Tensor>, description = store.source): ParamSource {
  return {
    description,
    keys: () => store.keys(),
    shapeOf: (key) => {
      const t = store.get(key);
      return t === undefined ? undefined : checkpointShape(t.shape);
    },
    read: (key) => {
      const t = store.get(key);
      if (t === undefined) throw new ParamError(`${description}: missing parameter '${key}'`);
      const data = t.dataSync() as Float32Array;
      return t.rank === 4 ? hwioToOihw(data, t.shape).data : data;
    },
  };
}

/**
 * `base` with some tensors replaced (checkpoint layout, same shape) or, for keys the base lacks,
 * added with their own shape (e.g. a token table with appended rows).
 */
export function withOverrides(base: ParamSource, overrides: ReadonlyMap<string, { readonly data: Float32Array; readonly shape: readonly number[] }>): ParamSource {
  for (const [key, o] of overrides) {
    const count = o.shape.reduce((a, b) => a * b, 1);
    if (o.data.length !== count) throw new ParamError(`override '${key}': ${o.data.length} values for shape ${fmt(o.shape)}`);
  }
  return {
    description: base.description,
    keys: () => base.keys(),
    shapeOf: (key) => overrides.get(key)?.shape ?? base.shapeOf(key),
    read: (key) => overrides.get(key)?.data ?? base.read(key),
  };
}

/** The recording {@link Scope}: parameters become initializers, once per key, and accesses are tracked. */
export class InitializerScope implements Scope<OnnxValue> {
  readonly accessed = new Set<string>();
  private readonly values = new Map<string, OnnxValue>();

  constructor(
    private readonly recorder: OnnxRecorder,
    private readonly source: ParamSource,
  ) {}

  sub(prefix: string): Scope<OnnxValue> {
    return this.view(prefix);
  }

  param(key: string, shape: readonly number[]): OnnxValue {
    return this.view('').param(key, shape);
  }

  /** Keys of the source that no recorded op read, except those `ignore` accepts. */
  unused(ignore: (key: string) => boolean = () => false): string[] {
    return [...this.source.keys()].filter((k) => !this.accessed.has(k) && !ignore(k));
  }

  private view(prefix: string): Scope<OnnxValue> {
    const full = (k: string) => (prefix === '' ? k : `${prefix}.${k}`);
    return {
      sub: (p) => this.view(full(p)),
      param: (key, shape) => this.initializer(full(key), shape),
    };
  }

  private initializer(name: string, internal: readonly number[]): OnnxValue {
    const known = this.values.get(name);
    if (known !== undefined) {
      if (!sameShape(known.shape, internal)) throw new ParamError(`${this.source.description}: parameter '${name}' read as ${fmt(known.shape)} and as ${fmt(internal)}`);
      return known;
    }
    const expected = checkpointShape(internal);
    const found = this.source.shapeOf(name);
    if (found === undefined) {
      throw new ParamError(`${this.source.description}: missing parameter '${name}' (expected shape ${fmt(expected)})`, [{ key: name, problem: 'missing', expected }]);
    }
    if (!sameShape(found, expected)) {
      throw new ParamError(`${this.source.description}: parameter '${name}' has shape ${fmt(found)}, expected ${fmt(expected)}`, [
        { key: name, problem: 'shape', expected, found },
      ]);
    }
    const g = this.recorder.graph;
    g.reserve(name);
    const source = this.source;
    g.addInitializer({ name, dtype: 'float32', dims: expected, data: () => source.read(name) });
    this.accessed.add(name);
    // Conv filters are stored OIHW; the model sees HWIO (physical axis j ← logical axis layout[j]).
    const layout = internal.length === 4 ? [3, 2, 0, 1] : internal.map((_, i) => i);
    const dims = internal.map((d) => ({ num: d, den: 1, exps: this.recorder.symbols.map(() => 0) }));
    const v = this.recorder.value(name, 'float32', dims, layout);
    this.values.set(name, v);
    return v;
  }
}
