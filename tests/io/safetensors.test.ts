// Round trips, byte-exact agreement with files written by Python's safetensors, reading real
// fixtures, the streaming/atomic writer, and offsets beyond 4 GiB.
import { open, readFile, readdir, writeFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

import { f32ToF16Array } from '../../src/io/dtypes.js';
import {
  SafetensorsError,
  SafetensorsFile,
  parseSafetensorsHeader,
  serializeSafetensors,
  writeSafetensors,
  writeSafetensorsStreaming,
  type TensorEntry,
  type TensorToWrite,
} from '../../src/io/safetensors.js';
import { bytesOf, rawFile, withTempDir } from './safetensors.helpers.js';

const FIXTURES = resolve(dirname(fileURLToPath(import.meta.url)), '../../../shared/fixtures');

// toEqual walks typed arrays element by element (minutes for millions); compare bytes instead.
const sameBytes = (a: ArrayBufferView, b: ArrayBufferView): boolean => Buffer.from(bytesOf(a)).equals(Buffer.from(bytesOf(b)));
const REFERENCE_DIR = join(FIXTURES, 'tiny-sd-reference');
const UNET_FILE = join(FIXTURES, 'tiny-sd/unet/diffusion_pytorch_model.safetensors');

function everyDtype(): Record<string, TensorToWrite> {
  return {
    f32: { dtype: 'F32', shape: [2, 3], data: new Float32Array([1, -2.5, 3e-39, Infinity, -0, NaN]) },
    f16: { dtype: 'F16', shape: [4], data: new Float32Array([1, -2, 65504, 2 ** -24]) },
    f16raw: { dtype: 'F16', shape: [2], data: new Uint16Array([0x3c00, 0x7e00]) },
    bf16: { dtype: 'BF16', shape: [3], data: new Float32Array([1, -2, 3.140625]) },
    bf16raw: { dtype: 'BF16', shape: [1], data: new Uint16Array([0x3f80]) },
    i64: { dtype: 'I64', shape: [3], data: new BigInt64Array([-(2n ** 63n), 0n, 2n ** 63n - 1n]) },
    i64from32: { dtype: 'I64', shape: [2], data: new Int32Array([-7, 2147483647]) },
    i32: { dtype: 'I32', shape: [2, 1], data: new Int32Array([-2147483648, 42]) },
    u8: { dtype: 'U8', shape: [3], data: new Uint8Array([0, 128, 255]) },
    bool: { dtype: 'BOOL', shape: [2], data: new Uint8Array([1, 0]) },
    scalar: { dtype: 'F32', shape: [], data: new Float32Array([7]) },
    empty: { dtype: 'F32', shape: [0, 3], data: new Float32Array(0) },
    emptyI64: { dtype: 'I64', shape: [0], data: new BigInt64Array(0) },
  };
}

describe('round trip', () => {
  it('writes and reads back every writable dtype, scalars, zero-size tensors and metadata', async () => {
    await withTempDir(async (dir) => {
      const path = join(dir, 'all.safetensors');
      const tensors = everyDtype();
      await writeSafetensors(path, tensors, { format: 'pt', note: 'ünïcödé ✓' });
      const file = await SafetensorsFile.open(path);
      try {
        expect({ ...file.metadata }).toEqual({ format: 'pt', note: 'ünïcödé ✓' });
        expect(new Set(file.keys())).toEqual(new Set(Object.keys(tensors)));
        for (const [name, t] of Object.entries(tensors)) {
          expect(file.info(name).dtype).toBe(t.dtype);
          expect(file.info(name).shape).toEqual(t.shape);
        }
        expect(bytesOf(await file.readFloat32('f32'))).toEqual(bytesOf(tensors['f32']!.data));
        expect([...(await file.readFloat32('f16'))]).toEqual([1, -2, 65504, 2 ** -24]);
        expect(new Uint16Array((await file.readRaw('f16raw')).buffer)).toEqual(new Uint16Array([0x3c00, 0x7e00]));
        expect([...(await file.readFloat32('bf16'))]).toEqual([1, -2, 3.140625]);
        expect([...(await file.readFloat32('bf16raw'))]).toEqual([1]);
        expect(await file.readBigInt64('i64')).toEqual(new BigInt64Array([-(2n ** 63n), 0n, 2n ** 63n - 1n]));
        expect(await file.readBigInt64('i64from32')).toEqual(new BigInt64Array([-7n, 2147483647n]));
        expect([...(await file.readInt('i64from32'))]).toEqual([-7, 2147483647]);
        expect([...(await file.readInt('i32'))]).toEqual([-2147483648, 42]);
        expect(await file.readRaw('u8')).toEqual(new Uint8Array([0, 128, 255]));
        expect([...(await file.readInt('bool'))]).toEqual([1, 0]);
        expect([...(await file.readFloat32('scalar'))]).toEqual([7]);
        expect(await file.readFloat32('empty')).toEqual(new Float32Array(0));
        expect(await file.readBigInt64('emptyI64')).toEqual(new BigInt64Array(0));
      } finally {
        await file.close();
      }
    });
  });

  it('writes an empty file exactly like Python ({} padded to 8 bytes)', () => {
    const bytes = serializeSafetensors({});
    expect([...bytes]).toEqual([8, 0, 0, 0, 0, 0, 0, 0, ...new TextEncoder().encode('{}      ')]);
    expect(SafetensorsFile.fromBytes(bytes).keys()).toEqual([]);
  });

  it('includes __metadata__ (even empty) only when given', () => {
    const text = (bytes: Uint8Array): string => new TextDecoder().decode(bytes.subarray(8)).trimEnd();
    expect(text(serializeSafetensors({}, {}))).toBe('{"__metadata__":{}}');
    expect(text(serializeSafetensors({}, { b: '2', a: '1' }))).toBe('{"__metadata__":{"a":"1","b":"2"}}');
  });

  it('orders tensors like the Rust library: descending dtype alignment, then name by UTF-8 bytes', () => {
    const tensors: [string, TensorToWrite][] = [
      ['b', { dtype: 'F32', shape: [1], data: new Float32Array(1) }],
      ['a', { dtype: 'U8', shape: [1], data: new Uint8Array(1) }],
      ['z', { dtype: 'I64', shape: [1], data: new BigInt64Array(1) }],
      ['\u{1F600}', { dtype: 'F16', shape: [1], data: new Uint16Array(1) }], // UTF-16 sorts it first, UTF-8 last
      ['\uFF5E', { dtype: 'F16', shape: [1], data: new Uint16Array(1) }],
      ['a10', { dtype: 'F32', shape: [1], data: new Float32Array(1) }],
      ['a9', { dtype: 'F32', shape: [1], data: new Float32Array(1) }],
      ['i', { dtype: 'I32', shape: [1], data: new Int32Array(1) }],
      ['bool', { dtype: 'BOOL', shape: [1], data: new Uint8Array(1) }],
    ];
    const file = SafetensorsFile.fromBytes(serializeSafetensors(tensors));
    expect(file.keys()).toEqual(['z', 'a10', 'a9', 'b', 'i', '\uFF5E', '\u{1F600}', 'a', 'bool']);
    const reversed = serializeSafetensors(tensors.slice().reverse());
    expect(reversed).toEqual(serializeSafetensors(tensors));
  });

  it('keeps integer-like names in header order (JSON.parse would move them first)', () => {
    const bytes = rawFile('{"b":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"7":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', 2);
    expect(SafetensorsFile.fromBytes(bytes).keys()).toEqual(['b', '7']);
  });

  it('reads F64, I8, I16, U16, U32, U64 and FP8 as float32 and integers', async () => {
    const f64 = new Float64Array([1.5, -1e300, 0.1]);
    const parts: [string, string, number[], Uint8Array][] = [
      ['f64', 'F64', [3], bytesOf(f64)],
      ['i8', 'I8', [2], bytesOf(new Int8Array([-128, 127]))],
      ['i16', 'I16', [2], bytesOf(new Int16Array([-32768, 5]))],
      ['u16', 'U16', [1], bytesOf(new Uint16Array([65535]))],
      ['u32', 'U32', [2], bytesOf(new Uint32Array([4294967295, 3]))],
      ['u64', 'U64', [1], bytesOf(new BigUint64Array([2n ** 64n - 1n]))],
      ['e4m3', 'F8_E4M3', [2], new Uint8Array([0x38, 0x7e])],
      ['e5m2', 'F8_E5M2', [2], new Uint8Array([0x3c, 0x7c])],
    ];
    const header: Record<string, object> = {};
    let offset = 0;
    for (const [name, dtype, shape, bytes] of parts) {
      header[name] = { dtype, shape, data_offsets: [offset, offset + bytes.length] };
      offset += bytes.length;
    }
    const data = new Uint8Array(offset);
    let at = 0;
    for (const [, , , bytes] of parts) {
      data.set(bytes, at);
      at += bytes.length;
    }
    const file = SafetensorsFile.fromBytes(rawFile(header, data));
    expect([...(await file.readFloat32('f64'))]).toEqual([1.5, -Infinity, Math.fround(0.1)]);
    expect([...(await file.readFloat32('i8'))]).toEqual([-128, 127]);
    expect([...(await file.readInt('i16'))]).toEqual([-32768, 5]);
    expect([...(await file.readInt('u16'))]).toEqual([65535]);
    expect([...(await file.readFloat32('u32'))]).toEqual([4294967296, 3]);
    await expect(file.readInt('u32')).rejects.toThrow('<memory>: tensor "u32": readInt: expected values within int32, found 4294967295 at element 0');
    await expect(file.readBigInt64('u64')).rejects.toThrow('readBigInt64: expected values within int64, found 18446744073709551615 at element 0');
    expect(await file.readBigInt64('u32')).toEqual(new BigInt64Array([4294967295n, 3n]));
    expect([...(await file.readFloat32('e4m3'))]).toEqual([1, 448]);
    expect([...(await file.readFloat32('e5m2'))]).toEqual([1, Infinity]);
    await expect(file.readBigInt64('f64')).rejects.toThrow('readBigInt64: expected an integer dtype, found F64 (use readFloat32)');
  });

  it('converts across chunk boundaries (tensors larger than the 8 MiB read buffer)', async () => {
    const count = 5_000_003; // F16: 10 MB stored, two reads with an odd tail
    const values = Float32Array.from({ length: count }, (_, i) => ((i * 7919) % 2048) / 64 - 16); // exact in float16
    const file = SafetensorsFile.fromBytes(serializeSafetensors({
      big: { dtype: 'F16', shape: [count], data: values },
      ids: { dtype: 'I64', shape: [1_500_001], data: Int32Array.from({ length: 1_500_001 }, (_, i) => i - 750_000) },
    }));
    const back = await file.readFloat32('big');
    expect(sameBytes(back, values)).toBe(true); // all values are exact in float16
    const into = new Float32Array(count);
    expect(await file.readFloat32('big', into)).toBe(into);
    expect(into[count - 1]).toBe(values[count - 1]);
    const ids = await file.readInt('ids');
    expect(ids[0]).toBe(-750_000);
    expect(ids[1_048_576]).toBe(1_048_576 - 750_000);
    expect(ids[1_500_000]).toBe(750_000);
  });
});

describe('agreement with Python safetensors', () => {
  it('re-serializes every tiny-sd-reference file byte for byte', async () => {
    const names = (await readdir(REFERENCE_DIR)).filter((f) => f.endsWith('.safetensors'));
    expect(names.length).toBeGreaterThanOrEqual(6);
    for (const name of names) {
      await expectByteIdenticalRewrite(join(REFERENCE_DIR, name));
    }
  });

  it('re-serializes the tiny-sd model files (written by diffusers save_pretrained) byte for byte', async () => {
    for (const part of ['unet/diffusion_pytorch_model.safetensors', 'vae/diffusion_pytorch_model.safetensors', 'text_encoder/model.safetensors']) {
      await expectByteIdenticalRewrite(join(FIXTURES, 'tiny-sd', part));
    }
    await expectByteIdenticalRewrite(join(FIXTURES, 'tiny-sd-single-file/tiny-sd.safetensors'));
  });

  it('writes the same bytes through the streaming file writer', async () => {
    await withTempDir(async (dir) => {
      const source = join(REFERENCE_DIR, 'scheduler.safetensors');
      const file = await SafetensorsFile.open(source);
      const out = join(dir, 'copy.safetensors');
      try {
        const entries: TensorEntry[] = file.keys().map((name) => ({ name, dtype: file.info(name).dtype as 'F32' | 'I64', shape: file.info(name).shape }));
        await writeSafetensorsStreaming(out, entries, file.metadata, async (name) => {
          const raw = await file.readRaw(name);
          return file.info(name).dtype === 'I64' ? new BigInt64Array(raw.buffer) : new Float32Array(raw.buffer);
        });
      } finally {
        await file.close();
      }
      expect(await readFile(out)).toEqual(await readFile(source));
    });
  });
});

async function expectByteIdenticalRewrite(path: string): Promise<void> {
  const original = await readFile(path);
  const file = await SafetensorsFile.open(path);
  try {
    const tensors: [string, TensorToWrite][] = [];
    for (const name of file.keys().reverse()) {
      const { dtype, shape } = file.info(name);
      if (dtype === 'F32') tensors.push([name, { dtype, shape, data: await file.readFloat32(name) }]);
      else if (dtype === 'I64') tensors.push([name, { dtype, shape, data: await file.readBigInt64(name) }]);
      else throw new Error(`${path}: unexpected dtype ${dtype}`);
    }
    const hasMetadata = new TextDecoder().decode(original.subarray(8, 24)).startsWith('{"__metadata__"');
    const rewritten = serializeSafetensors(tensors, hasMetadata ? file.metadata : undefined);
    expect(Buffer.from(rewritten).equals(original), `${path} differs after rewrite`).toBe(true);
  } finally {
    await file.close();
  }
}

describe('real files', () => {
  it('reads the tiny-sd UNet with its known shapes', async () => {
    const file = await SafetensorsFile.open(UNET_FILE);
    try {
      expect(file.metadata).toEqual({ format: 'pt' });
      expect(file.tensors.size).toBe(208);
      expect(file.info('conv_in.weight').shape).toEqual([32, 4, 3, 3]);
      expect(file.info('conv_in.bias').shape).toEqual([32]);
      expect(file.info('time_embedding.linear_1.weight').shape).toEqual([128, 32]);
      expect(file.info('down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight').shape).toEqual([32, 32]);
      expect(file.info('mid_block.resnets.0.conv1.weight').shape).toEqual([64, 64, 3, 3]);
      expect(file.info('conv_out.weight').shape).toEqual([4, 32, 3, 3]);
      const weight = await file.readFloat32('conv_in.weight');
      expect(weight.length).toBe(32 * 4 * 3 * 3);
      expect(weight.every(Number.isFinite)).toBe(true);
      expect(new Float32Array((await file.readRaw('conv_in.weight')).buffer)).toEqual(weight);
      // Header offsets are absolute and tile the data section.
      const infos = [...file.tensors.values()].sort((a, b) => a.start - b.start);
      expect(infos[0]!.start).toBe(8 + file.headerLength);
      expect(infos.at(-1)!.end).toBe(file.size);
    } finally {
      await file.close();
    }
  });

  it('reads int64 timesteps exactly and as int32/float32', async () => {
    const file = await SafetensorsFile.open(join(REFERENCE_DIR, 'scheduler.safetensors'));
    try {
      const expected = [901, 801, 701, 601, 501, 401, 301, 201, 101, 1];
      expect([...(await file.readBigInt64('ddim_timesteps_10'))]).toEqual(expected.map(BigInt));
      expect([...(await file.readInt('ddim_timesteps_10'))]).toEqual(expected);
      expect([...(await file.readFloat32('ddim_timesteps_10'))]).toEqual(expected);
    } finally {
      await file.close();
    }
  });
});

describe('streaming, atomic writer', () => {
  const entries: TensorEntry[] = [
    { name: 'w', dtype: 'F16', shape: [4_200_000] }, // crosses the 4M-element conversion buffer
    { name: 'b', dtype: 'F32', shape: [3] },
    { name: 'step', dtype: 'I64', shape: [] },
  ];

  it('asks for each tensor once, in file order, and writes what it converts', async () => {
    await withTempDir(async (dir) => {
      const path = join(dir, 'out.safetensors');
      const asked: string[] = [];
      const weights = Float32Array.from({ length: 4_200_000 }, (_, i) => Math.sin(i) * 100);
      await writeSafetensorsStreaming(path, entries, { step: '1' }, (name) => {
        asked.push(name);
        if (name === 'w') return weights;
        if (name === 'b') return new Float32Array([1, 2, 3]);
        return new BigInt64Array([12345n]);
      });
      expect(asked).toEqual(['step', 'b', 'w']);
      const file = await SafetensorsFile.open(path);
      try {
        const expected = new Uint16Array(weights.length);
        f32ToF16Array(weights, expected);
        expect(sameBytes(await file.readRaw('w'), expected)).toBe(true);
        expect([...(await file.readBigInt64('step'))]).toEqual([12345n]);
      } finally {
        await file.close();
      }
      expect(await readdir(dir)).toEqual(['out.safetensors']);
    });
  });

  it('leaves nothing behind when the producer fails half-way', async () => {
    await withTempDir(async (dir) => {
      const path = join(dir, 'out.safetensors');
      const failing = writeSafetensorsStreaming(path, entries, undefined, (name) => {
        if (name === 'w') throw new Error('producer failed');
        return name === 'b' ? new Float32Array(3) : new BigInt64Array(1);
      });
      await expect(failing).rejects.toThrow('producer failed');
      expect(await readdir(dir)).toEqual([]);
    });
  });

  it('keeps an existing file intact when a rewrite fails', async () => {
    await withTempDir(async (dir) => {
      const path = join(dir, 'out.safetensors');
      await writeFile(path, 'old contents');
      const failing = writeSafetensorsStreaming(path, entries, undefined, () => new Float32Array(2));
      await expect(failing).rejects.toThrow(`${path}: tensor "step": data: expected 1 elements for shape [], found 2`);
      expect(await readFile(path, 'utf8')).toBe('old contents');
      expect(await readdir(dir)).toEqual(['out.safetensors']);
    });
  });

  it('replaces an existing file on success', async () => {
    await withTempDir(async (dir) => {
      const path = join(dir, 'out.safetensors');
      await writeFile(path, 'old contents');
      await writeSafetensors(path, { x: { dtype: 'U8', shape: [1], data: new Uint8Array([9]) } });
      expect(await readFile(path)).toEqual(Buffer.from(serializeSafetensors({ x: { dtype: 'U8', shape: [1], data: new Uint8Array([9]) } })));
    });
  });

  it('fails cleanly when the folder does not exist', async () => {
    await withTempDir(async (dir) => {
      await expect(writeSafetensors(join(dir, 'missing', 'x.safetensors'), {})).rejects.toThrow(/ENOENT/);
    });
  });
});

describe('writer input validation', () => {
  const one = (t: Partial<TensorToWrite>): Record<string, TensorToWrite> => ({
    t: { dtype: 'F32', shape: [2], data: new Float32Array(2), ...t } as TensorToWrite,
  });
  const messageOf = (fn: () => unknown): string => {
    try {
      fn();
    } catch (e) {
      expect(e).toBeInstanceOf(SafetensorsError);
      return (e as Error).message;
    }
    throw new Error('expected an error');
  };

  it.each<[string, () => unknown, string]>([
    ['wrong array type', () => serializeSafetensors(one({ data: new Int32Array(2) })), 'tensor "t": data: expected Float32Array for F32, found Int32Array'],
    ['wrong length', () => serializeSafetensors(one({ data: new Float32Array(3) })), 'tensor "t": data: expected 2 elements for shape [2], found 3'],
    ['F16 from Int32Array', () => serializeSafetensors(one({ dtype: 'F16', data: new Int32Array(2) })), 'tensor "t": data: expected Float32Array or Uint16Array (raw bits) for F16, found Int32Array'],
    ['BOOL out of range', () => serializeSafetensors(one({ dtype: 'BOOL', data: new Uint8Array([0, 2]) })), 'tensor "t": data: expected 0 or 1 for BOOL, found 2 at element 1'],
    ['unwritable dtype', () => serializeSafetensors(one({ dtype: 'F64' as 'F32' })), 'tensor "t": dtype: expected one of F32, F16, BF16, I64, I32, U8, BOOL, found "F64"'],
    ['negative dimension', () => serializeSafetensors(one({ shape: [-2] })), 'tensor "t": shape[0]: expected a non-negative integer, found -2'],
    ['reserved name', () => serializeSafetensors({ __metadata__: { dtype: 'U8', shape: [], data: new Uint8Array(1) } }), 'tensor "__metadata__": name: expected a tensor name, found the reserved key'],
    ['lone surrogate', () => serializeSafetensors({ '\ud800': { dtype: 'U8', shape: [], data: new Uint8Array(1) } }), 'tensor "\\ud800": name: expected well-formed Unicode, found a lone surrogate'],
    ['duplicate names', () => serializeSafetensors([['a', { dtype: 'U8', shape: [], data: new Uint8Array(1) }], ['a', { dtype: 'U8', shape: [], data: new Uint8Array(1) }]]), 'tensor "a": name: expected unique tensor names, found this one twice'],
    ['non-string metadata', () => serializeSafetensors({}, { n: 3 as unknown as string }), 'metadata["n"]: expected a string, found number 3'],
  ])('rejects %s', (_label, fn, message) => {
    expect(messageOf(fn)).toBe(`<memory>: ${message}`);
  });
});

describe('files beyond 4 GiB', () => {
  it('reads a tensor stored past the 4 GiB mark (sparse file)', async () => {
    await withTempDir(async (dir) => {
      const path = join(dir, 'huge.safetensors');
      const padBytes = 5 * 2 ** 30;
      const tail = new Float32Array([1.5, -2, 3.25, 4]);
      const header = rawFile({
        pad: { dtype: 'U8', shape: [padBytes], data_offsets: [0, padBytes] },
        tail: { dtype: 'F32', shape: [2, 2], data_offsets: [padBytes, padBytes + 16] },
      });
      const handle = await open(path, 'w');
      try {
        await handle.write(header, 0, header.length, 0);
        await handle.write(bytesOf(tail), 0, 16, header.length + padBytes); // leaves a hole: no disk used
      } finally {
        await handle.close();
      }
      const file = await SafetensorsFile.open(path);
      try {
        expect(file.size).toBe(header.length + padBytes + 16);
        expect(file.info('tail').start).toBe(header.length + padBytes);
        expect(file.info('tail').start).toBeGreaterThan(2 ** 32);
        expect(await file.readFloat32('tail')).toEqual(tail);
        expect(parseSafetensorsHeader(header, file.size, path).dataLength).toBe(padBytes + 16);
      } finally {
        await file.close();
      }
    });
  });
});
