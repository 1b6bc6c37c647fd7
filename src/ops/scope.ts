/**
 * Named parameters as model code sees them.
 *
 * A model asks for `p.sub('conv1').param('weight', [3, 3, 32, 64])` at the place it uses the
 * tensor, declaring the shape it expects there. The store behind the scope records every access,
 * so after one dry forward pass we know exactly which checkpoint keys a model uses and can report
 * missing, unused and wrong-shaped keys in one strict error instead of failing deep in a matmul.
 */

export interface Scope<T> {
  /** A view whose keys are prefixed with `prefix.`. */
  sub(prefix: string): Scope<T>;
  /** The parameter `key` (relative to this view), which must have `shape`. */
  param(key: string, shape: readonly number[]): T;
}

export interface ParamProblem {
  readonly key: string;
  readonly problem: 'missing' | 'shape';
  readonly expected: readonly number[];
  readonly found?: readonly number[];
}

export class ParamError extends Error {
  constructor(
    message: string,
    readonly problems: readonly ParamProblem[] = [],
  ) {
    super(message);
    this.name = 'ParamError';
  }
}

function formatShape(s: readonly number[]): string {
  return `[${s.join(', ')}]`;
}

/**
 * A flat map of full parameter names → tensors, with optional overrides (trainable variables,
 * edited weights) that shadow the base values without copying them.
 */
export class ParamStore<T> {
  private readonly accessed = new Set<string>();
  private readonly overrides = new Map<string, T>();

  constructor(
    private readonly base: ReadonlyMap<string, T>,
    private readonly shapeOf: (t: T) => readonly number[],
    /** Names the source of the parameters in errors (a file or folder). */
    readonly source = 'parameters',
  ) {}

  /** The root scope. */
  scope(): Scope<T> {
    return this.view('');
  }

  /** Make `key` resolve to `value` instead of the base tensor (shape must match). */
  override(key: string, value: T): void {
    const baseValue = this.base.get(key);
    if (baseValue !== undefined) {
      const want = this.shapeOf(baseValue);
      const got = this.shapeOf(value);
      if (!sameShape(want, got)) {
        throw new ParamError(
          `${this.source}: override of '${key}' has shape ${formatShape(got)}, expected ${formatShape(want)}`,
        );
      }
    }
    this.overrides.set(key, value);
  }

  clearOverrides(): void {
    this.overrides.clear();
  }

  get(key: string): T | undefined {
    return this.overrides.get(key) ?? this.base.get(key);
  }

  keys(): IterableIterator<string> {
    return this.base.keys();
  }

  /** Keys read since construction (or the last `resetAccess`). */
  accessedKeys(): ReadonlySet<string> {
    return this.accessed;
  }

  resetAccess(): void {
    this.accessed.clear();
  }

  /** Base keys that no forward pass has read: unused weights in a checkpoint. */
  unusedKeys(): string[] {
    return [...this.base.keys()].filter((k) => !this.accessed.has(k));
  }

  private view(prefix: string): Scope<T> {
    const full = (key: string) => (prefix === '' ? key : `${prefix}.${key}`);
    return {
      sub: (p) => this.view(full(p)),
      param: (key, shape) => {
        const name = full(key);
        const t = this.get(name);
        if (t === undefined) {
          throw new ParamError(`${this.source}: missing parameter '${name}' (expected shape ${formatShape(shape)})`, [
            { key: name, problem: 'missing', expected: shape },
          ]);
        }
        const found = this.shapeOf(t);
        if (!sameShape(found, shape)) {
          throw new ParamError(
            `${this.source}: parameter '${name}' has shape ${formatShape(found)}, expected ${formatShape(shape)}`,
            [{ key: name, problem: 'shape', expected: shape, found }],
          );
        }
        this.accessed.add(name);
        return t;
      },
    };
  }
}

/**
 * A scope that never fails: it records every requested key and shape and hands back a
 * placeholder. Running a model's forward once over it yields the model's full parameter manifest,
 * which is how loaders check a checkpoint against an architecture before touching tensor data.
 */
export class ManifestScope<T> implements Scope<T> {
  constructor(
    private readonly make: (key: string, shape: readonly number[]) => T,
    private readonly prefix = '',
    readonly entries: Map<string, readonly number[]> = new Map(),
  ) {}

  sub(p: string): Scope<T> {
    return new ManifestScope(this.make, this.full(p), this.entries);
  }

  param(key: string, shape: readonly number[]): T {
    const name = this.full(key);
    this.entries.set(name, [...shape]);
    return this.make(name, shape);
  }

  private full(key: string): string {
    return this.prefix === '' ? key : `${this.prefix}.${key}`;
  }
}

export function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}
