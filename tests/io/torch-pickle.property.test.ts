// Properties: (a) any value tree the writer accepts reads back as the same tree; (b) random byte
// mutations of valid checkpoints (whole files, or just their data.pkl re-wrapped in a valid zip)
// give a self-consistent checkpoint or a TorchCheckpointError — never another exception or hang.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';

import { PickleTuple, TorchTensorRef, readTorchCheckpointBytes, type PickleValue } from '../../src/io/torch-pickle.js';
import { serializeTorchCheckpoint, type TorchSaveValue } from '../../src/io/torch-save.js';
import { fuzz } from '../fuzz/torch-pickle.fuzz.js';
import { torchPickleSeeds } from '../fuzz/torch-pickle.fuzz.seeds.js';

// ---- (a) round trip

interface Tensor {
  dtype: 'float32' | 'float16' | 'int64' | 'uint8';
  shape: number[];
  data: Float32Array | BigInt64Array | Uint8Array;
}

const tensorArb: fc.Arbitrary<Tensor> = fc
  .record({ dtype: fc.constantFrom<Tensor['dtype']>('float32', 'float16', 'int64', 'uint8'), shape: fc.array(fc.integer({ min: 0, max: 3 }), { maxLength: 3 }) })
  .chain(({ dtype, shape }) => {
    const n = shape.reduce((a, b) => a * b, 1);
    const len = { minLength: n, maxLength: n };
    const data: fc.Arbitrary<Tensor['data']> =
      dtype === 'int64'
        ? fc.array(fc.bigInt({ min: -(2n ** 63n), max: 2n ** 63n - 1n }), len).map((v) => BigInt64Array.from(v))
        : dtype === 'uint8'
          ? fc.array(fc.integer({ min: 0, max: 255 }), len).map((v) => Uint8Array.from(v))
          : fc.array(fc.float({ noNaN: true, min: -60000, max: 60000 }), len).map((v) => Float32Array.from(v));
    return data.map((d) => ({ dtype, shape, data: d }));
  });

const scalarArb = fc.oneof(
  fc.constant(null),
  fc.boolean(),
  fc.integer(),
  fc.bigInt({ min: -(2n ** 100n), max: 2n ** 100n }),
  fc.double({ noNaN: true }).filter((x) => !Number.isInteger(x)),
  fc.string({ unit: 'grapheme', maxLength: 8 }),
  fc.uint8Array({ maxLength: 8 }),
);

const { tree } = fc.letrec<{ tree: TorchSaveValue }>((tie) => ({
  tree: fc.oneof(
    { depthSize: 'small', withCrossShrink: true },
    scalarArb,
    tensorArb,
    fc.array(tie('tree'), { maxLength: 4 }),
    fc.array(tie('tree'), { maxLength: 4 }).map((items) => new PickleTuple(items as PickleValue[])),
    fc.dictionary(fc.string({ maxLength: 6 }), tie('tree'), { maxKeys: 4 }),
    fc.array(fc.tuple(fc.oneof(fc.integer(), fc.string({ maxLength: 4 })), tie('tree')), { maxLength: 4 }).map((entries) => new Map(entries)),
  ) as fc.Arbitrary<TorchSaveValue>,
}));

// The value our reader should produce for a writer input.
async function expectSame(actual: PickleValue, input: unknown): Promise<void> {
  if (typeof input === 'number' || typeof input === 'bigint') {
    const asNumber = typeof input === 'bigint' && input >= BigInt(Number.MIN_SAFE_INTEGER) && input <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(input) : input;
    expect(actual).toBe(asNumber);
  } else if (input === null || typeof input === 'boolean' || typeof input === 'string') {
    expect(actual).toBe(input);
  } else if (input instanceof Uint8Array) {
    expect(actual).toBeInstanceOf(Uint8Array);
    expect([...(actual as Uint8Array)]).toEqual([...input]);
  } else if (Array.isArray(input)) {
    expect(Array.isArray(actual)).toBe(true);
    const a = actual as PickleValue[];
    expect(a.length).toBe(input.length);
    for (let i = 0; i < input.length; i++) await expectSame(a[i]!, input[i]);
  } else if (input instanceof PickleTuple) {
    expect(actual).toBeInstanceOf(PickleTuple);
    const a = actual as PickleTuple;
    expect(a.length).toBe(input.length);
    for (let i = 0; i < input.length; i++) await expectSame(a.items[i]!, input.items[i]);
  } else if (input instanceof Map || (typeof input === 'object' && !('data' in (input as object)))) {
    const entries = input instanceof Map ? [...input] : Object.entries(input as object);
    expect(actual).toBeInstanceOf(Map);
    const a = actual as Map<PickleValue, PickleValue>;
    expect([...a.keys()]).toEqual(entries.map(([k]) => k));
    for (const [k, v] of entries) await expectSame(a.get(k as PickleValue)!, v);
  } else {
    const t = input as Tensor;
    expect(actual).toBeInstanceOf(TorchTensorRef);
    const ref = actual as TorchTensorRef;
    expect(ref.shape).toEqual(t.shape);
    expect(ref.torchDType).toBe(t.dtype);
    const raw = await ref.readRaw();
    if (t.dtype === 'float16') {
      const back = await ref.readFloat32();
      for (let i = 0; i < back.length; i++) expect(Math.abs(back[i]! - (t.data as Float32Array)[i]!)).toBeLessThanOrEqual(Math.abs((t.data as Float32Array)[i]!) * 2 ** -11 + 2 ** -24);
    } else {
      expect([...raw]).toEqual([...new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength)]);
    }
  }
}

describe('torch checkpoint writer → reader', () => {
  it('reads back every value tree it writes', async () => {
    await fc.assert(
      fc.asyncProperty(tree, async (value) => {
        const ckpt = await readTorchCheckpointBytes(await serializeTorchCheckpoint(value));
        await expectSame(ckpt.root, value);
      }),
      { numRuns: 150 },
    );
  });
});

// ---- (b) mutations

describe('torch checkpoint reader under mutation', () => {
  it('never throws anything but TorchCheckpointError, and loads are self-consistent', async () => {
    const seeds = [...(await torchPickleSeeds()).values()];
    const mutation = fc.record({
      seed: fc.integer({ min: 0, max: seeds.length - 1 }),
      edits: fc.array(
        fc.record({
          kind: fc.constantFrom('set', 'flip', 'delete', 'insert', 'truncate'),
          at: fc.nat(),
          value: fc.integer({ min: 0, max: 255 }),
          length: fc.integer({ min: 1, max: 16 }),
        }),
        { minLength: 1, maxLength: 4 },
      ),
    });
    await fc.assert(
      fc.asyncProperty(mutation, async ({ seed, edits }) => {
        let bytes = seeds[seed]!.slice();
        for (const e of edits) {
          // Byte 0 is the fuzz mode; edits land in the payload.
          const at = 1 + (e.at % Math.max(1, bytes.length - 1));
          if (e.kind === 'set') bytes[Math.min(at, bytes.length - 1)] = e.value;
          else if (e.kind === 'flip') bytes[Math.min(at, bytes.length - 1)]! ^= 1 << (e.value & 7);
          else if (e.kind === 'delete') bytes = Uint8Array.from([...bytes.subarray(0, at), ...bytes.subarray(at + e.length)]);
          else if (e.kind === 'insert') bytes = Uint8Array.from([...bytes.subarray(0, at), ...new Uint8Array(e.length).fill(e.value), ...bytes.subarray(at)]);
          else bytes = bytes.subarray(0, at);
        }
        await fuzz(bytes);
      }),
      { numRuns: 1500 },
    );
  });
});
