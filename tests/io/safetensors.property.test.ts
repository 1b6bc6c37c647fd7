// Properties: (a) whatever we serialize parses back identically; (b) no mutation or truncation of
// a valid file makes the reader throw anything but SafetensorsError, hang, or return an
// inconsistent view of the file.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';

import { DTYPE_BYTES, f32ToBf16Array, f32ToF16Array } from '../../src/io/dtypes.js';
import {
  SafetensorsError,
  SafetensorsFile,
  parseSafetensorsHeader,
  serializeSafetensors,
  type TensorToWrite,
  type WritableDType,
} from '../../src/io/safetensors.js';
import { bytesOf } from './safetensors.helpers.js';

const shapeArb = fc.array(fc.integer({ min: 0, max: 4 }), { maxLength: 4 });

function dataArb(dtype: WritableDType, count: number): fc.Arbitrary<TensorToWrite['data']> {
  const n = { minLength: count, maxLength: count };
  switch (dtype) {
    case 'F32':
      return fc.array(fc.float(), n).map((v) => Float32Array.from(v));
    case 'F16':
    case 'BF16':
      return fc.oneof(
        fc.array(fc.float(), n).map((v) => Float32Array.from(v)),
        fc.array(fc.integer({ min: 0, max: 0xffff }), n).map((v) => Uint16Array.from(v)),
      );
    case 'I64':
      return fc.oneof(
        fc.array(fc.bigInt({ min: -(2n ** 63n), max: 2n ** 63n - 1n }), n).map((v) => BigInt64Array.from(v)),
        fc.array(fc.integer(), n).map((v) => Int32Array.from(v)),
      );
    case 'I32':
      return fc.array(fc.integer(), n).map((v) => Int32Array.from(v));
    case 'U8':
      return fc.array(fc.integer({ min: 0, max: 255 }), n).map((v) => Uint8Array.from(v));
    case 'BOOL':
      return fc.array(fc.integer({ min: 0, max: 1 }), n).map((v) => Uint8Array.from(v));
  }
}

const tensorArb: fc.Arbitrary<TensorToWrite> = fc
  .record({ dtype: fc.constantFrom<WritableDType>('F32', 'F16', 'BF16', 'I64', 'I32', 'U8', 'BOOL'), shape: shapeArb })
  .chain(({ dtype, shape }) => dataArb(dtype, shape.reduce((a, b) => a * b, 1)).map((data) => ({ dtype, shape, data })));

const nameArb = fc.string({ unit: 'binary', maxLength: 12 }).filter((s) => s !== '__metadata__');

const fileArb = fc.record({
  tensors: fc.uniqueArray(fc.tuple(nameArb, tensorArb), { selector: ([name]) => name, maxLength: 8 }),
  metadata: fc.option(fc.dictionary(fc.string({ unit: 'binary', maxLength: 8 }), fc.string({ unit: 'binary', maxLength: 16 }), { maxKeys: 4 }), { nil: undefined }),
});

// What the stored bytes of a tensor must be, computed independently of the writer's layout.
function expectedStoredBytes(t: TensorToWrite): Uint8Array {
  if ((t.dtype === 'F16' || t.dtype === 'BF16') && t.data instanceof Float32Array) {
    const bits = new Uint16Array(t.data.length);
    (t.dtype === 'F16' ? f32ToF16Array : f32ToBf16Array)(t.data, bits); // checked against references in safetensors.dtypes.test.ts
    return bytesOf(bits);
  }
  if (t.dtype === 'I64' && t.data instanceof Int32Array) return bytesOf(BigInt64Array.from(t.data, (v) => BigInt(v)));
  return bytesOf(t.data);
}

describe('property: serialize → parse is the identity', () => {
  it('keeps names, dtypes, shapes, metadata and bytes', async () => {
    await fc.assert(
      fc.asyncProperty(fileArb, async ({ tensors, metadata }) => {
        const bytes = serializeSafetensors(tensors, metadata);
        const file = SafetensorsFile.fromBytes(bytes);
        expect(new Set(file.keys())).toEqual(new Set(tensors.map(([name]) => name)));
        expect({ ...file.metadata }).toEqual(metadata ?? {});
        expect(file.headerLength % 8).toBe(0);
        for (const [name, t] of tensors) {
          const info = file.info(name);
          expect(info.dtype).toBe(t.dtype);
          expect(info.shape).toEqual(t.shape);
          expect(await file.readRaw(name)).toEqual(expectedStoredBytes(t));
        }
        // Input order never matters.
        expect(serializeSafetensors(tensors.slice().reverse(), metadata)).toEqual(bytes);
      }),
      { numRuns: 300 },
    );
  });
});

// Reads everything a caller could read; throws if the parsed view is inconsistent with the bytes.
async function exerciseReader(bytes: Uint8Array): Promise<void> {
  const file = SafetensorsFile.fromBytes(bytes, 'fuzzed');
  const infos = [...file.tensors.values()];
  const sorted = infos.slice().sort((a, b) => a.start - b.start || a.end - b.end);
  let cursor = 8 + file.headerLength;
  for (const info of sorted) {
    if (info.start !== cursor) throw new Error(`inconsistent: ${info.name} starts at ${info.start}, expected ${cursor}`);
    const count = info.shape.reduce((a, b) => a * b, 1);
    if (info.end - info.start !== count * DTYPE_BYTES[info.dtype]) throw new Error(`inconsistent size for ${info.name}`);
    cursor = info.end;
  }
  if (cursor !== bytes.length) throw new Error('inconsistent: data section not covered');
  for (const info of infos) {
    const raw = await file.readRaw(info.name);
    if (raw.length !== info.end - info.start) throw new Error('readRaw length mismatch');
    const floats = await file.readFloat32(info.name);
    if (floats.length * DTYPE_BYTES[info.dtype] !== raw.length) throw new Error('readFloat32 length mismatch');
    for (const read of [() => file.readInt(info.name), () => file.readBigInt64(info.name)]) {
      await read().catch((e: unknown) => {
        if (!(e instanceof SafetensorsError)) throw e;
      });
    }
  }
}

async function expectOnlySafetensorsErrors(bytes: Uint8Array): Promise<void> {
  try {
    await exerciseReader(bytes);
  } catch (e) {
    if (!(e instanceof SafetensorsError)) throw e;
    expect(e.message).not.toMatch(/[\n\r]/);
  }
}

const seedFiles = [
  serializeSafetensors(
    {
      'conv_in.weight': { dtype: 'F16', shape: [2, 1, 3], data: new Float32Array([1, -2, 0.5, 65504, 1e-5, -0]) },
      'conv_in.bias': { dtype: 'F32', shape: [2], data: new Float32Array([0.25, -1]) },
      step: { dtype: 'I64', shape: [], data: new BigInt64Array([7n]) },
      mask: { dtype: 'BOOL', shape: [3], data: new Uint8Array([1, 0, 1]) },
      empty: { dtype: 'I32', shape: [0], data: new Int32Array(0) },
    },
    { format: 'pt', 'ss_network_dim': '4' },
  ),
  serializeSafetensors({ x: { dtype: 'BF16', shape: [4], data: new Uint16Array([0x3f80, 0x7fc0, 0xff80, 1]) } }),
];

const mutationArb = fc.oneof(
  fc.record({ kind: fc.constant('set' as const), at: fc.nat(), value: fc.integer({ min: 0, max: 255 }) }),
  fc.record({ kind: fc.constant('flip' as const), at: fc.nat(), bit: fc.integer({ min: 0, max: 7 }) }),
  fc.record({ kind: fc.constant('delete' as const), at: fc.nat(), length: fc.integer({ min: 1, max: 16 }) }),
  fc.record({ kind: fc.constant('insert' as const), at: fc.nat(), bytes: fc.uint8Array({ minLength: 1, maxLength: 8 }) }),
  fc.record({ kind: fc.constant('truncate' as const), at: fc.nat() }),
  // Edits inside the JSON with tokens that matter to it, keeping the length prefix in step.
  fc.record({
    kind: fc.constant('json' as const),
    at: fc.nat(),
    remove: fc.integer({ min: 0, max: 6 }),
    token: fc.constantFrom('"', '{', '}', '[', ']', ',', ':', '-1', '0', '1e400', '2.5', '9007199254740993', '"F16"', '"I64"', '"__metadata__"', 'null', '\\u0000', '\\ud800', ' ', '"data_offsets":[0,0]'),
  }),
);

type Mutation = typeof mutationArb extends fc.Arbitrary<infer M> ? M : never;

function mutate(original: Uint8Array, mutations: readonly Mutation[]): Uint8Array {
  let bytes = original.slice();
  for (const m of mutations) {
    const at = bytes.length === 0 ? 0 : m.at % bytes.length;
    switch (m.kind) {
      case 'set':
        if (bytes.length > 0) bytes[at] = m.value;
        break;
      case 'flip':
        if (bytes.length > 0) bytes[at]! ^= 1 << m.bit;
        break;
      case 'delete':
        bytes = Uint8Array.from([...bytes.subarray(0, at), ...bytes.subarray(at + m.length)]);
        break;
      case 'insert':
        bytes = Uint8Array.from([...bytes.subarray(0, at), ...m.bytes, ...bytes.subarray(at)]);
        break;
      case 'truncate':
        bytes = bytes.subarray(0, at);
        break;
      case 'json': {
        if (bytes.length < 8) break;
        const n = Number(new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(0, true));
        if (n > bytes.length - 8) break;
        const json = bytes.subarray(8, 8 + n);
        const pos = m.at % (json.length + 1);
        const token = new TextEncoder().encode(m.token);
        const edited = Uint8Array.from([...json.subarray(0, pos), ...token, ...json.subarray(pos + m.remove)]);
        const out = new Uint8Array(8 + edited.length + bytes.length - 8 - n);
        new DataView(out.buffer).setBigUint64(0, BigInt(edited.length), true);
        out.set(edited, 8);
        out.set(bytes.subarray(8 + n), 8 + edited.length);
        bytes = out;
        break;
      }
    }
  }
  return bytes;
}

describe('property: hostile input only ever yields SafetensorsError', () => {
  it('survives random mutations and truncations of valid files', async () => {
    await fc.assert(
      fc.asyncProperty(fc.constantFrom(...seedFiles), fc.array(mutationArb, { minLength: 1, maxLength: 4 }), async (seed, mutations) => {
        await expectOnlySafetensorsErrors(mutate(seed, mutations));
      }),
      { numRuns: 3000 },
    );
  });

  it('survives mutations of freshly generated files', async () => {
    await fc.assert(
      fc.asyncProperty(fileArb, fc.array(mutationArb, { minLength: 1, maxLength: 3 }), async ({ tensors, metadata }, mutations) => {
        await expectOnlySafetensorsErrors(mutate(serializeSafetensors(tensors, metadata), mutations));
      }),
      { numRuns: 500 },
    );
  });

  it('survives arbitrary bytes and arbitrary declared sizes', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 64 }), fc.nat(), (bytes, fileSize) => {
        try {
          parseSafetensorsHeader(bytes, fileSize, 'random');
        } catch (e) {
          if (!(e instanceof SafetensorsError)) throw e;
        }
      }),
      { numRuns: 2000 },
    );
  });

  it('survives arbitrary JSON values as the header', async () => {
    await fc.assert(
      fc.asyncProperty(fc.json(), fc.nat({ max: 64 }), async (text, extra) => {
        const json = new TextEncoder().encode(text);
        const bytes = new Uint8Array(8 + json.length + extra);
        new DataView(bytes.buffer).setBigUint64(0, BigInt(json.length), true);
        bytes.set(json, 8);
        await expectOnlySafetensorsErrors(bytes);
      }),
      { numRuns: 1000 },
    );
  });
});
