/**
 * Serialising a {@link GraphBuilder} as an ONNX ModelProto, streaming the weights.
 *
 * Everything but tensor payloads is encoded with protobufjs. The file is then framed by hand —
 * model fields, the `graph` field's key and length, the graph's nodes and I/O, then one
 * `initializer` field per tensor whose payload is produced, written and dropped one tensor at a
 * time — so peak memory is one tensor, not the model. Protobuf allows fields in any order and
 * concatenates repeated ones, so this is byte-for-byte a valid ModelProto.
 *
 * Protobuf messages cannot exceed 2 GiB: above `externalDataThreshold` (default: the file would
 * pass 2 GiB) every payload of 1 KiB or more goes to `<model>.onnx_data` next to the model,
 * referenced by `external_data` {location, offset, length}, as onnx's `save_as_external_data`
 * writes it; large tensors start on 4 KiB boundaries so runtimes can map them.
 */
import { endianness } from 'node:os';
import path from 'node:path';
import type { FileHandle } from 'node:fs/promises';
import { writeFileAtomic } from '../io/atomic.js';
import { BYTES_PER_ELEMENT, elementCount, type AttrValue, type GraphBuilder, type GraphIo, type Initializer, type NodeDef } from './graph.js';
import {
  ATTR_TYPE,
  FIELD,
  GraphProtoType,
  irVersionFor,
  lengthDelimitedKey,
  lengthDelimitedSize,
  ModelProtoType,
  ONNX_DTYPE,
  TensorProtoType,
  varint,
} from './onnx-proto.js';

/** protobuf's hard limit for one message (and so for a model file without external data). */
export const PROTOBUF_LIMIT = 2 ** 31 - 1;

/**
 * Tensors below this size stay inline even with external data, as onnx's `save_as_external_data`
 * keeps them: runtimes constant-fold shape tensors while loading, before external data is read.
 */
const INLINE_BELOW_BYTES = 1024;

export interface WriteModelOptions {
  readonly opset: number;
  /** Model file size in bytes above which payloads go to an external data file (default {@link PROTOBUF_LIMIT}). */
  readonly externalDataThreshold?: number;
  readonly producerVersion?: string;
  readonly docString?: string;
  /** `metadata_props` of the model (provenance). */
  readonly metadata?: Readonly<Record<string, string>>;
}

export interface WrittenModel {
  readonly file: string;
  /** The external data file, when one was written. */
  readonly externalData?: string;
  readonly modelBytes: number;
  readonly payloadBytes: number;
  readonly nodes: number;
  readonly initializers: number;
}

const PRODUCER = 'sd-workbench';

function attributeProto(name: string, a: AttrValue): Record<string, unknown> {
  switch (a.kind) {
    case 'int':
      return { name, type: ATTR_TYPE.int, i: a.value };
    case 'ints':
      return { name, type: ATTR_TYPE.ints, ints: [...a.value] };
    case 'float':
      return { name, type: ATTR_TYPE.float, f: a.value };
    case 'floats':
      return { name, type: ATTR_TYPE.floats, floats: [...a.value] };
    case 'string':
      return { name, type: ATTR_TYPE.string, s: new TextEncoder().encode(a.value) };
  }
}

function nodeProto(n: NodeDef): Record<string, unknown> {
  return {
    input: [...n.inputs],
    output: [...n.outputs],
    name: n.name,
    op_type: n.opType,
    attribute: Object.entries(n.attrs).map(([k, v]) => attributeProto(k, v)),
  };
}

function valueInfo(io: GraphIo): Record<string, unknown> {
  const tensor: Record<string, unknown> = { elem_type: ONNX_DTYPE[io.dtype] };
  if (io.dims !== undefined) {
    tensor.shape = { dim: io.dims.map((d) => (typeof d === 'number' ? { dim_value: d } : { dim_param: d })) };
  }
  return { name: io.name, type: { tensor_type: tensor } };
}

function concatBytes(parts: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

interface PlannedTensor {
  readonly init: Initializer;
  readonly bytes: number;
  /** TensorProto without its payload field. */
  readonly meta: Uint8Array;
  /** Offset in the external data file (external mode only). */
  readonly offset?: number;
}

function tensorMeta(init: Initializer, external?: { location: string; offset: number; length: number }): Uint8Array {
  const msg: Record<string, unknown> = { name: init.name, dims: [...init.dims], data_type: ONNX_DTYPE[init.dtype] };
  if (external !== undefined) {
    msg.data_location = 1;
    msg.external_data = [
      { key: 'location', value: external.location },
      { key: 'offset', value: String(external.offset) },
      { key: 'length', value: String(external.length) },
    ];
  }
  return TensorProtoType.encode(TensorProtoType.fromObject(msg)).finish();
}

function payloadOf(init: Initializer, expectedBytes: number): Uint8Array {
  const data = init.data();
  const count = elementCount(init.dims);
  if (data.length !== count) throw new Error(`initializer '${init.name}': ${data.length} values for shape [${init.dims.join(', ')}]`);
  const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  if (bytes.length !== expectedBytes) throw new Error(`initializer '${init.name}': ${bytes.length} bytes, expected ${expectedBytes}`);
  return bytes;
}

async function writeAll(handle: FileHandle, bytes: Uint8Array): Promise<void> {
  let done = 0;
  while (done < bytes.length) {
    const { bytesWritten } = await handle.write(bytes, done, bytes.length - done);
    done += bytesWritten;
  }
}

/** Write `graph` to `file` (atomically), with an external data file when it would be too large. */
export async function writeOnnxModel(graph: GraphBuilder, file: string, opts: WriteModelOptions): Promise<WrittenModel> {
  // ONNX stores payloads little-endian; typed arrays use the machine's order.
  if (endianness() !== 'LE') throw new Error('ONNX export needs a little-endian machine');
  const threshold = opts.externalDataThreshold ?? PROTOBUF_LIMIT;
  const graphMeta = GraphProtoType.encode(
    GraphProtoType.fromObject({
      name: graph.name,
      node: graph.nodes.map(nodeProto),
      input: graph.inputs.map(valueInfo),
      output: graph.outputs.map(valueInfo),
    }),
  ).finish();
  const metadata = Object.entries(opts.metadata ?? {}).map(([key, value]) => ({ key, value }));
  const modelMeta = ModelProtoType.encode(
    ModelProtoType.fromObject({
      ir_version: irVersionFor(opts.opset),
      producer_name: PRODUCER,
      producer_version: opts.producerVersion ?? '',
      ...(opts.docString !== undefined ? { doc_string: opts.docString } : {}),
      opset_import: [{ domain: '', version: opts.opset }],
      metadata_props: metadata,
    }),
  ).finish();

  const inits = [...graph.initializers.values()];
  const sizes = inits.map((init) => elementCount(init.dims) * BYTES_PER_ELEMENT[init.dtype]);
  const payloadBytes = sizes.reduce((a, b) => a + b, 0);

  // 1. Plan the layout: inline payloads unless the file would pass the threshold.
  const inline = inits.map((init, i) => ({ init, bytes: sizes[i]!, meta: tensorMeta(init) }));
  const isInline = (t: PlannedTensor) => t.offset === undefined;
  const tensorSize = (t: PlannedTensor) => t.meta.length + (isInline(t) ? lengthDelimitedSize(FIELD.tensorRawData, t.bytes) : 0);
  const graphSize = (ts: readonly PlannedTensor[]) => graphMeta.length + ts.reduce((a, t) => a + lengthDelimitedSize(FIELD.graphInitializer, tensorSize(t)), 0);
  const inlineGraph = graphSize(inline);
  const inlineFile = modelMeta.length + lengthDelimitedSize(FIELD.modelGraph, inlineGraph);
  const external = inlineFile > threshold;
  const dataName = `${path.basename(file)}_data`;
  let planned: PlannedTensor[] = inline;
  let dataBytes = 0;
  if (external) {
    planned = inits.map((init, i) => {
      const bytes = sizes[i]!;
      if (bytes < INLINE_BELOW_BYTES) return inline[i]!;
      const align = bytes >= 1 << 16 ? 4096 : 64;
      const offset = Math.ceil(dataBytes / align) * align;
      dataBytes = offset + bytes;
      return { init, bytes, offset, meta: tensorMeta(init, { location: dataName, offset, length: bytes }) };
    });
  }
  const graphBytes = external ? graphSize(planned) : inlineGraph;
  if (!external && inlineFile > PROTOBUF_LIMIT) throw new Error(`${file}: ${inlineFile} bytes exceed protobuf's 2 GiB limit`);

  // 2. The external data file, one tensor at a time.
  const dataFile = path.join(path.dirname(file), dataName);
  if (external) {
    await writeFileAtomic(dataFile, async (handle) => {
      let at = 0;
      for (const t of planned) {
        if (isInline(t)) continue;
        if (t.offset! > at) await writeAll(handle, new Uint8Array(t.offset! - at));
        await writeAll(handle, payloadOf(t.init, t.bytes));
        at = t.offset! + t.bytes;
      }
    });
  }

  // 3. The model file: model fields, graph key + length, graph body, initializers.
  await writeFileAtomic(file, async (handle) => {
    await writeAll(handle, concatBytes([modelMeta, lengthDelimitedKey(FIELD.modelGraph), varint(graphBytes), graphMeta]));
    for (const t of planned) {
      await writeAll(handle, concatBytes([lengthDelimitedKey(FIELD.graphInitializer), varint(tensorSize(t)), t.meta]));
      if (isInline(t)) {
        await writeAll(handle, concatBytes([lengthDelimitedKey(FIELD.tensorRawData), varint(t.bytes)]));
        await writeAll(handle, payloadOf(t.init, t.bytes));
      }
    }
  });
  const modelBytes = modelMeta.length + lengthDelimitedSize(FIELD.modelGraph, graphBytes);
  return {
    file,
    ...(external ? { externalData: dataFile } : {}),
    modelBytes,
    payloadBytes,
    nodes: graph.nodes.length,
    initializers: inits.length,
  };
}
