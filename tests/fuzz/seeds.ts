// Seed inputs for fuzzing the safetensors reader: small valid files covering every dtype, scalars,
// zero-size tensors, metadata, unusual names, plus the real fixtures that are small enough.
// Usage: tsx tests/fuzz/seeds.ts <corpus-dir>   (writes seed-*.safetensors there)

import { mkdir, readFile, stat, writeFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import { serializeSafetensors } from '../../src/io/safetensors.js';

// The shared reference folder sits beside the project (see ../shared/README.md).
const FIXTURES = resolve(dirname(fileURLToPath(import.meta.url)), '../../../shared/fixtures');
const MAX_SEED_BYTES = 64 * 1024;

/** The generated seed files, by name. */
export function generatedSeeds(): Map<string, Uint8Array> {
  const seeds = new Map<string, Uint8Array>();
  seeds.set('empty', serializeSafetensors({}));
  seeds.set('metadata-only', serializeSafetensors({}, { format: 'pt', 'modelspec.title': 'seed' }));
  seeds.set(
    'all-dtypes',
    serializeSafetensors(
      {
        f32: { dtype: 'F32', shape: [2, 2], data: new Float32Array([1, -0, NaN, Infinity]) },
        f16: { dtype: 'F16', shape: [3], data: new Float32Array([1, 65504, 2 ** -24]) },
        bf16: { dtype: 'BF16', shape: [1, 2], data: new Float32Array([1, -3]) },
        i64: { dtype: 'I64', shape: [2], data: new BigInt64Array([-(2n ** 63n), 2n ** 40n]) },
        i32: { dtype: 'I32', shape: [], data: new Int32Array([-1]) },
        u8: { dtype: 'U8', shape: [3], data: new Uint8Array([0, 127, 255]) },
        bool: { dtype: 'BOOL', shape: [2], data: new Uint8Array([0, 1]) },
        zero: { dtype: 'F32', shape: [0, 4], data: new Float32Array(0) },
      },
      { format: 'pt' },
    ),
  );
  seeds.set(
    'names',
    serializeSafetensors({
      '': { dtype: 'U8', shape: [1], data: new Uint8Array([1]) },
      '0': { dtype: 'U8', shape: [1], data: new Uint8Array([2]) },
      'ünï\u{1F600}': { dtype: 'U8', shape: [1], data: new Uint8Array([3]) },
      'a"b\\c\n': { dtype: 'U8', shape: [1], data: new Uint8Array([4]) },
    }),
  );
  // Dtypes our writer does not produce, built by hand.
  const header = JSON.stringify({
    f64: { dtype: 'F64', shape: [1], data_offsets: [0, 8] },
    u64: { dtype: 'U64', shape: [1], data_offsets: [8, 16] },
    u32: { dtype: 'U32', shape: [1], data_offsets: [16, 20] },
    i16: { dtype: 'I16', shape: [1], data_offsets: [20, 22] },
    u16: { dtype: 'U16', shape: [1], data_offsets: [22, 24] },
    i8: { dtype: 'I8', shape: [1], data_offsets: [24, 25] },
    e4m3: { dtype: 'F8_E4M3', shape: [1], data_offsets: [25, 26] },
    e5m2: { dtype: 'F8_E5M2', shape: [1], data_offsets: [26, 27] },
  });
  const json = new TextEncoder().encode(header);
  const raw = new Uint8Array(8 + json.length + 27).fill(0xff, 8 + json.length);
  new DataView(raw.buffer).setBigUint64(0, BigInt(json.length), true);
  raw.set(json, 8);
  seeds.set('other-dtypes', raw);
  return seeds;
}

/** Small real files written by Python, as extra seeds. */
export async function fixtureSeeds(): Promise<Map<string, Uint8Array>> {
  const seeds = new Map<string, Uint8Array>();
  for (const file of ['tiny-sd-reference/scheduler.safetensors', 'erasure-reference/uce.safetensors', 'tiny-sd-reference/vae.safetensors']) {
    const path = join(FIXTURES, file);
    const size = await stat(path).then((s) => s.size, () => Infinity);
    if (size <= MAX_SEED_BYTES * 4) seeds.set(file.replace(/[/.]/g, '-'), new Uint8Array(await readFile(path)));
  }
  return seeds;
}

async function main(): Promise<void> {
  const dir = process.argv[2];
  if (dir === undefined) throw new Error('usage: tsx tests/fuzz/seeds.ts <corpus-dir>');
  await mkdir(dir, { recursive: true });
  const seeds = new Map([...generatedSeeds(), ...(await fixtureSeeds())]);
  for (const [name, bytes] of seeds) await writeFile(join(dir, `seed-${name}.safetensors`), bytes);
  console.log(`wrote ${seeds.size} seeds to ${dir}`);
}

if (process.argv[1] !== undefined && fileURLToPath(import.meta.url) === process.argv[1]) {
  await main();
}
