/**
 * Synthetic detector models for tests: ONNX graphs with a detector's input/output signature whose
 * outputs are fixed tensors, written with the project's own ONNX serializer (`src/export`). The
 * float outputs also depend on the input through `ReduceSum(input) × 0`, so the input is really
 * consumed (and a non-finite pixel would show up as NaN) while the values stay exactly the given ones.
 */
import { GraphBuilder, type IoDim, type TensorData } from '../../../src/export/graph.js';
import type { OnnxDType } from '../../../src/export/onnx-proto.js';
import { writeOnnxModel } from '../../../src/export/write.js';

/** One fixed output. */
export interface ConstantOutput {
  readonly name: string;
  readonly dtype: OnnxDType;
  readonly dims: readonly number[];
  readonly data: TensorData;
}

/** Writes a model with one float input and the given constant outputs (in this order). */
export async function writeConstantModel(file: string, input: { name: string; dims: readonly IoDim[] }, outputs: readonly ConstantOutput[]): Promise<void> {
  const g = new GraphBuilder('synthetic_detector');
  g.inputs.push({ name: input.name, dtype: 'float32', dims: input.dims });
  const zero = g.addInitializer({ name: 'zero', dtype: 'float32', dims: [], data: () => new Float32Array([0]) });
  const [sum] = g.node('ReduceSum', [input.name], { keepdims: { kind: 'int', value: 0 } });
  const [nothing] = g.node('Mul', [sum!, zero]);
  for (const o of outputs) {
    const value = g.addInitializer({ name: `${o.name}_value`, dtype: o.dtype, dims: o.dims, data: () => o.data });
    if (o.dtype === 'float32') g.node('Add', [value, nothing!], {}, [o.name]);
    else g.node('Identity', [value], {}, [o.name]);
    g.outputs.push({ name: o.name, dtype: o.dtype, dims: o.dims });
  }
  await writeOnnxModel(g, file, { opset: 17 });
}
