/**
 * An ONNX graph under construction: nodes in recording order (which is a topological order),
 * initializers whose payload is produced only when the file is written, graph inputs and outputs.
 */
import type { OnnxDType } from './onnx-proto.js';

export type AttrValue =
  | { readonly kind: 'int'; readonly value: number }
  | { readonly kind: 'ints'; readonly value: readonly number[] }
  | { readonly kind: 'float'; readonly value: number }
  | { readonly kind: 'floats'; readonly value: readonly number[] }
  | { readonly kind: 'string'; readonly value: string };

export interface NodeDef {
  readonly opType: string;
  readonly inputs: readonly string[];
  readonly outputs: readonly string[];
  readonly attrs: Readonly<Record<string, AttrValue>>;
  readonly name: string;
}

export type TensorData = Float32Array | Int32Array | BigInt64Array;

export interface Initializer {
  readonly name: string;
  readonly dtype: OnnxDType;
  readonly dims: readonly number[];
  /** Produces the payload (row-major) when the file is written; called once. */
  readonly data: () => TensorData;
  /**
   * Set when the definition baked this constant from input sizes (see `CallPlan`): exporting
   * is an error if the constant is still used after pruning.
   */
  readonly sizeDependent?: string;
}

/** A dimension of a graph input or output: a fixed size or a `dim_param` name. */
export type IoDim = number | string;

export interface GraphIo {
  readonly name: string;
  readonly dtype: OnnxDType;
  /** Undefined: rank and shape unspecified (any rank accepted). */
  readonly dims?: readonly IoDim[];
}

export const BYTES_PER_ELEMENT: Readonly<Record<OnnxDType, number>> = { float32: 4, int32: 4, int64: 8 };

export function elementCount(dims: readonly number[]): number {
  return dims.reduce((a, b) => a * b, 1);
}

export class GraphBuilder {
  readonly nodes: NodeDef[] = [];
  readonly initializers = new Map<string, Initializer>();
  readonly inputs: GraphIo[] = [];
  readonly outputs: GraphIo[] = [];
  private readonly used = new Set<string>();
  private counter = 0;

  constructor(readonly name: string) {}

  /** A value name not used yet, `<prefix>_<n>` (or `prefix` itself when it is free and `exact`). */
  fresh(prefix: string, exact = false): string {
    if (exact && !this.used.has(prefix)) {
      this.used.add(prefix);
      return prefix;
    }
    let name: string;
    do name = `${prefix}_${this.counter++}`;
    while (this.used.has(name));
    this.used.add(name);
    return name;
  }

  /** Reserve a name that must be exactly `name` (graph inputs/outputs, parameter keys). */
  reserve(name: string): string {
    if (this.used.has(name)) throw new Error(`${this.name}: value name '${name}' is already taken`);
    this.used.add(name);
    return name;
  }

  /** Append a node; returns its output names (fresh ones unless given). */
  node(opType: string, inputs: readonly string[], attrs: Readonly<Record<string, AttrValue>> = {}, outputs?: readonly string[]): string[] {
    const outs = outputs ? [...outputs] : [this.fresh(opType.toLowerCase())];
    this.nodes.push({ opType, inputs: [...inputs], outputs: outs, attrs, name: `${opType}_${this.nodes.length}` });
    return outs;
  }

  addInitializer(init: Initializer): string {
    if (this.initializers.has(init.name)) throw new Error(`${this.name}: initializer '${init.name}' defined twice`);
    this.initializers.set(init.name, init);
    return init.name;
  }

  /**
   * Drop nodes and initializers no graph output depends on (the definition may compute values the
   * export does not return, e.g. CLIP's gather-based pooling replaced by a batch-free one).
   */
  prune(): void {
    const live = new Set<string>(this.outputs.map((o) => o.name));
    const keep: boolean[] = new Array<boolean>(this.nodes.length).fill(false);
    for (let i = this.nodes.length - 1; i >= 0; i--) {
      const n = this.nodes[i]!;
      if (n.outputs.some((o) => live.has(o))) {
        keep[i] = true;
        for (const inp of n.inputs) if (inp !== '') live.add(inp);
      }
    }
    const kept = this.nodes.filter((_, i) => keep[i]);
    this.nodes.length = 0;
    this.nodes.push(...kept);
    for (const name of [...this.initializers.keys()]) if (!live.has(name)) this.initializers.delete(name);
    const liveInputs = this.inputs.filter((i) => live.has(i.name));
    if (liveInputs.length !== this.inputs.length) {
      const dead = this.inputs.filter((i) => !live.has(i.name)).map((i) => i.name);
      throw new Error(`${this.name}: graph input(s) ${dead.join(', ')} are not used by any output`);
    }
  }

  /** Bytes of initializer payloads. */
  payloadBytes(): number {
    let total = 0;
    for (const init of this.initializers.values()) total += elementCount(init.dims) * BYTES_PER_ELEMENT[init.dtype];
    return total;
  }
}
