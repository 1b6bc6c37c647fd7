/**
 * Reading initializers back out of an ONNX model file (inline or external data) without decoding
 * the rest: the ORT pipeline needs the text encoder's final LayerNorm for clip skip, and tests
 * compare exported weights with the checkpoint.
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import protobuf from 'protobufjs';
import { FIELD, ONNX_DTYPE, TensorProtoType, type OnnxDType } from './onnx-proto.js';

export interface StoredTensor {
  readonly dtype: OnnxDType;
  readonly dims: readonly number[];
  readonly data: Float32Array | Int32Array | BigInt64Array;
}

interface TensorMessage {
  name?: string;
  dims?: (number | { toNumber(): number })[];
  data_type?: number;
  raw_data?: Uint8Array;
  float_data?: number[];
  int32_data?: number[];
  data_location?: number;
  external_data?: { key?: string; value?: string }[];
}

const DTYPE_OF_CODE = new Map<number, OnnxDType>(Object.entries(ONNX_DTYPE).map(([k, v]) => [v, k as OnnxDType]));

function typedFrom(dtype: OnnxDType, bytes: Uint8Array): Float32Array | Int32Array | BigInt64Array {
  const copy = new Uint8Array(bytes); // a copy: aligned, and not a view into a pooled Node Buffer
  switch (dtype) {
    case 'float32':
      return new Float32Array(copy.buffer, 0, copy.byteLength / 4);
    case 'int32':
      return new Int32Array(copy.buffer, 0, copy.byteLength / 4);
    case 'int64':
      return new BigInt64Array(copy.buffer, 0, copy.byteLength / 8);
  }
}

/** The initializers of `file` whose names `wanted` accepts (default: all). */
export async function readInitializers(file: string, wanted: (name: string) => boolean = () => true): Promise<Map<string, StoredTensor>> {
  const buf = await fs.readFile(file);
  const out = new Map<string, StoredTensor>();
  const model = protobuf.Reader.create(buf);
  while (model.pos < model.len) {
    const tag = model.uint32();
    if (tag >>> 3 !== FIELD.modelGraph || (tag & 7) !== 2) {
      model.skipType(tag & 7);
      continue;
    }
    const graphEnd = model.uint32() + model.pos;
    while (model.pos < graphEnd) {
      const gtag = model.uint32();
      if (gtag >>> 3 !== FIELD.graphInitializer || (gtag & 7) !== 2) {
        model.skipType(gtag & 7);
        continue;
      }
      const length = model.uint32();
      const bytes = buf.subarray(model.pos, model.pos + length);
      model.pos += length;
      const t = TensorProtoType.decode(bytes) as unknown as TensorMessage;
      const name = t.name ?? '';
      if (!wanted(name)) continue;
      const dtype = DTYPE_OF_CODE.get(t.data_type ?? 0);
      if (dtype === undefined) throw new Error(`${file}: initializer '${name}' has unsupported data type ${t.data_type}`);
      const dims = (t.dims ?? []).map((d) => (typeof d === 'number' ? d : d.toNumber()));
      let raw: Uint8Array;
      if (t.data_location === 1) {
        const entry = (key: string) => t.external_data?.find((e) => e.key === key)?.value;
        const location = entry('location');
        if (location === undefined || location !== path.basename(location)) throw new Error(`${file}: initializer '${name}' has external location ${JSON.stringify(location)}`);
        const offset = Number(entry('offset') ?? '0');
        const count = dims.reduce((a, b) => a * b, 1) * (dtype === 'int64' ? 8 : 4);
        const handle = await fs.open(path.join(path.dirname(file), location), 'r');
        try {
          raw = new Uint8Array(count);
          const { bytesRead } = await handle.read(raw, 0, count, offset);
          if (bytesRead !== count) throw new Error(`${file}: external data of '${name}' is truncated`);
        } finally {
          await handle.close();
        }
      } else if (t.raw_data !== undefined && t.raw_data.length > 0) {
        raw = t.raw_data;
      } else if (dtype === 'float32') {
        raw = new Uint8Array(Float32Array.from(t.float_data ?? []).buffer);
      } else if (dtype === 'int32') {
        raw = new Uint8Array(Int32Array.from(t.int32_data ?? []).buffer);
      } else {
        throw new Error(`${file}: initializer '${name}' stores int64 outside raw_data`);
      }
      out.set(name, { dtype, dims, data: typedFrom(dtype, raw) });
    }
  }
  return out;
}
