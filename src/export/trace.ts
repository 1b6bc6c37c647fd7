/**
 * One model definition → one ONNX graph: shape-only traces at several sizes fit the dynamic axes
 * (`symbolic.ts`), then one recording pass over {@link OnnxRecorder} and an
 * {@link InitializerScope} emits the graph, which is pruned to what the outputs need and checked
 * (every parameter read, no size-baked constant left).
 */
import type { DTypeName, Ops } from '../ops/ops.js';
import { ManifestScope, ParamError, type Scope } from '../ops/scope.js';
import type { ShapeOnly } from '../ops/shape-ops.js';
import { GraphBuilder } from './graph.js';
import { InitializerScope, type ParamSource } from './params.js';
import { OnnxRecorder, type LayoutPolicy, type OnnxValue, type SymbolSource } from './recorder.js';
import { constDim, fitPlan, loggingShapeOps, traceCount, traceSizes, type CallRecord, type Dim, type SymbolSpec } from './symbolic.js';

/** A logical axis of an input: a fixed size or a symbol (by index into the graph's symbols). */
export type InputDim = number | { readonly symbol: number };

export interface InputSpec {
  readonly name: string;
  readonly dtype: DTypeName;
  /** Logical (model-side) axes, e.g. NHWC for images. */
  readonly dims: readonly InputDim[];
  /** Physical axis j of the graph input holds logical axis layout[j] (default: same order). */
  readonly layout?: readonly number[];
  /**
   * Declare the input 1-D [`broadcastDim`] and give the model Expand(x, [symbol]): one value for
   * the batch or one per sample (the UNet's timestep).
   */
  readonly broadcastToSymbol?: number;
  /** The `dim_param` of a broadcast input's one axis (default 'steps'). */
  readonly broadcastDim?: string;
}

export interface OutputSpec {
  readonly name: string;
  /** Physical axis j of the graph output holds logical axis layout[j] (default: same order). */
  readonly layout?: readonly number[];
}

/** A forward pass written over {@link Ops}: inputs in {@link GraphSpec.inputs} order → outputs in outputs order. */
export type Forward = <T>(o: Ops<T>, p: Scope<T>, inputs: readonly T[]) => readonly T[];

export interface GraphSpec {
  /** Graph name (and the component in error messages). */
  readonly name: string;
  readonly symbols: readonly SymbolSpec[];
  readonly inputs: readonly InputSpec[];
  readonly outputs: readonly OutputSpec[];
  readonly forward: Forward;
  /** Parameter keys the forward may legitimately leave unread (buffers such as position_ids). */
  readonly ignoreUnused?: (key: string) => boolean;
}

export interface RecordOptions {
  readonly opset: number;
  readonly layout: LayoutPolicy;
}

function unit(k: number, symbols: number): Dim {
  return { num: 1, den: 1, exps: Array.from({ length: symbols }, (_, s) => (s === k ? 1 : 0)) };
}

function logicalShape(input: InputSpec, sizes: readonly number[]): number[] {
  return input.dims.map((d) => (typeof d === 'number' ? d : sizes[d.symbol]!));
}

/** The graph of `spec` with parameters from `params`. */
export function recordGraph(spec: GraphSpec, params: ParamSource, opts: RecordOptions): GraphBuilder {
  // 1. Shape-only traces: base, each symbol doubled, all tripled.
  const logs: CallRecord[][] = [];
  for (let t = 0; t < traceCount(spec.symbols); t++) {
    const sizes = traceSizes(spec.symbols, t);
    const log: CallRecord[] = [];
    const scope = new ManifestScope<ShapeOnly>((_key, shape) => ({ shape: [...shape] }));
    const inputs = spec.inputs.map((i): ShapeOnly => ({
      shape: i.broadcastToSymbol !== undefined ? [sizes[i.broadcastToSymbol]!] : logicalShape(i, sizes),
    }));
    spec.forward(loggingShapeOps(log), scope, inputs);
    logs.push(log);
  }
  const plan = fitPlan(logs, spec.symbols, spec.name);

  // 2. Where each symbol's runtime size is read: the first input axis that carries it.
  const sources = new Map<number, SymbolSource>();
  for (const input of spec.inputs) {
    if (input.broadcastToSymbol !== undefined) continue;
    const layout = input.layout ?? input.dims.map((_, i) => i);
    input.dims.forEach((d, axis) => {
      if (typeof d !== 'number' && !sources.has(d.symbol)) sources.set(d.symbol, { input: input.name, axis: layout.indexOf(axis) });
    });
  }

  // 3. The recording pass.
  const graph = new GraphBuilder(spec.name);
  const recorder = new OnnxRecorder(graph, plan, spec.symbols, sources, opts);
  const scope = new InitializerScope(recorder, params);
  const k = spec.symbols.length;
  const inputs = spec.inputs.map((i): OnnxValue => {
    if (i.broadcastToSymbol !== undefined) return recorder.broadcastInput(i.name, i.dtype, i.broadcastToSymbol, i.broadcastDim ?? 'steps');
    const dims = i.dims.map((d) => (typeof d === 'number' ? constDim(d, k) : unit(d.symbol, k)));
    return recorder.input(i.name, i.dtype, dims, i.layout ?? dims.map((_, a) => a));
  });
  const outputs = spec.forward(recorder, scope, inputs);
  recorder.finish();
  if (outputs.length !== spec.outputs.length) throw new Error(`${spec.name}: the forward returned ${outputs.length} outputs, expected ${spec.outputs.length}`);
  outputs.forEach((v, i) => recorder.output(v, spec.outputs[i]!.name, spec.outputs[i]!.layout));

  // 4. Prune and check.
  graph.prune();
  const baked = [...graph.initializers.values()].filter((init) => init.sizeDependent !== undefined);
  if (baked.length > 0) {
    throw new Error(
      `${spec.name}: the definition bakes input sizes into ${baked.map((b) => b.sizeDependent).join(', ')}, which an output needs; those axes cannot be dynamic`,
    );
  }
  const unused = scope.unused(spec.ignoreUnused);
  if (unused.length > 0) {
    throw new ParamError(`${params.description}: ${unused.length} parameter(s) not used by the ${spec.name} graph: ${unused.slice(0, 8).join(', ')}${unused.length > 8 ? ', …' : ''}`);
  }
  return graph;
}
