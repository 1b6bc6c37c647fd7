/**
 * The subset of onnx/onnx.proto (proto2, package `onnx`) this exporter writes and its tests read
 * back, with the official field numbers. Messages and fields we never emit are left out; protobuf
 * parsers skip unknown fields, so files written here are valid ModelProtos for every reader.
 *
 * Tensor payloads never go through protobufjs: a TensorProto is encoded without `raw_data` and the
 * payload field is appended by hand (see `write.ts`), so multi-gigabyte weights stream to disk one
 * tensor at a time instead of being copied into one giant buffer.
 */
import protobuf from 'protobufjs';

const ONNX_PROTO = `
syntax = "proto2";
package onnx;

message AttributeProto {
  enum AttributeType {
    UNDEFINED = 0;
    FLOAT = 1;
    INT = 2;
    STRING = 3;
    TENSOR = 4;
    GRAPH = 5;
    FLOATS = 6;
    INTS = 7;
    STRINGS = 8;
  }
  optional string name = 1;
  optional float f = 2;
  optional int64 i = 3;
  optional bytes s = 4;
  optional TensorProto t = 5;
  repeated float floats = 7;
  repeated int64 ints = 8;
  repeated bytes strings = 9;
  optional AttributeType type = 20;
}

message ValueInfoProto {
  optional string name = 1;
  optional TypeProto type = 2;
  optional string doc_string = 3;
}

message NodeProto {
  repeated string input = 1;
  repeated string output = 2;
  optional string name = 3;
  optional string op_type = 4;
  repeated AttributeProto attribute = 5;
  optional string doc_string = 6;
  optional string domain = 7;
}

message ModelProto {
  optional int64 ir_version = 1;
  optional string producer_name = 2;
  optional string producer_version = 3;
  optional string domain = 4;
  optional int64 model_version = 5;
  optional string doc_string = 6;
  optional GraphProto graph = 7;
  repeated OperatorSetIdProto opset_import = 8;
  repeated StringStringEntryProto metadata_props = 14;
}

message StringStringEntryProto {
  optional string key = 1;
  optional string value = 2;
}

message GraphProto {
  repeated NodeProto node = 1;
  optional string name = 2;
  repeated TensorProto initializer = 5;
  optional string doc_string = 10;
  repeated ValueInfoProto input = 11;
  repeated ValueInfoProto output = 12;
  repeated ValueInfoProto value_info = 13;
}

message TensorProto {
  enum DataType {
    UNDEFINED = 0;
    FLOAT = 1;
    UINT8 = 2;
    INT8 = 3;
    UINT16 = 4;
    INT16 = 5;
    INT32 = 6;
    INT64 = 7;
    STRING = 8;
    BOOL = 9;
    FLOAT16 = 10;
    DOUBLE = 11;
  }
  enum DataLocation {
    DEFAULT = 0;
    EXTERNAL = 1;
  }
  repeated int64 dims = 1;
  optional int32 data_type = 2;
  repeated float float_data = 4 [packed = true];
  repeated int32 int32_data = 5 [packed = true];
  repeated int64 int64_data = 7 [packed = true];
  optional string name = 8;
  optional bytes raw_data = 9;
  optional string doc_string = 12;
  repeated StringStringEntryProto external_data = 13;
  optional DataLocation data_location = 14;
}

message TensorShapeProto {
  message Dimension {
    oneof value {
      int64 dim_value = 1;
      string dim_param = 2;
    }
    optional string denotation = 3;
  }
  repeated Dimension dim = 1;
}

message TypeProto {
  message Tensor {
    optional int32 elem_type = 1;
    optional TensorShapeProto shape = 2;
  }
  oneof value {
    Tensor tensor_type = 1;
  }
  optional string denotation = 6;
}

message OperatorSetIdProto {
  optional string domain = 1;
  optional int64 version = 2;
}
`;

const root = protobuf.parse(ONNX_PROTO, { keepCase: true }).root;

/** `onnx.ModelProto`. */
export const ModelProtoType: protobuf.Type = root.lookupType('onnx.ModelProto');
/** `onnx.GraphProto`. */
export const GraphProtoType: protobuf.Type = root.lookupType('onnx.GraphProto');
/** `onnx.TensorProto`. */
export const TensorProtoType: protobuf.Type = root.lookupType('onnx.TensorProto');

/** `TensorProto.DataType` codes of the element types the exporter uses. */
export const ONNX_DTYPE = { float32: 1, int32: 6, int64: 7 } as const;
export type OnnxDType = keyof typeof ONNX_DTYPE;

/** `AttributeProto.AttributeType` codes. */
export const ATTR_TYPE = { float: 1, int: 2, string: 3, floats: 6, ints: 7 } as const;

/** `ModelProto.graph`, `GraphProto.initializer` and `TensorProto.raw_data` field numbers (hand-framed fields). */
export const FIELD = { modelGraph: 7, graphInitializer: 5, tensorRawData: 9 } as const;

/**
 * The IR version that goes with an opset, as onnx.helper's table pairs them (opset 14 ↔ IR 7,
 * 15–18 ↔ IR 8, 19–20 ↔ IR 9, 21+ ↔ IR 10): the oldest IR that knows the opset, so older
 * runtimes accept the file.
 */
export function irVersionFor(opset: number): number {
  if (opset <= 14) return 7;
  if (opset <= 18) return 8;
  if (opset <= 20) return 9;
  return 10;
}

/** Protobuf varint bytes of a non-negative integer below 2⁵³. */
export function varint(value: number): Uint8Array {
  if (!(Number.isSafeInteger(value) && value >= 0)) throw new Error(`varint: ${value} is not a non-negative safe integer`);
  const out: number[] = [];
  let v = value;
  while (v >= 0x80) {
    out.push((v % 0x80) | 0x80);
    v = Math.floor(v / 0x80);
  }
  out.push(v);
  return Uint8Array.from(out);
}

/** The key (tag) bytes of a length-delimited field. */
export function lengthDelimitedKey(field: number): Uint8Array {
  return varint(field * 8 + 2);
}

/** Bytes a length-delimited field of `length` payload bytes occupies, key and length included. */
export function lengthDelimitedSize(field: number, length: number): number {
  return lengthDelimitedKey(field).length + varint(length).length + length;
}
