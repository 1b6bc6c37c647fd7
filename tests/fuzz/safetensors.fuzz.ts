// Jazzer.js fuzz target for the safetensors reader. Any exception other than SafetensorsError, a
// hang, or a parsed file whose view is inconsistent with its bytes is a finding.
// Jazzer loads JavaScript only: `npm run fuzz:safetensors` compiles this file (and what it imports)
// with tests/fuzz/tsconfig.json into tmp/fuzz-build/ first.

import { DTYPE_BYTES } from '../../src/io/dtypes.js';
import { SafetensorsError, SafetensorsFile, parseSafetensorsHeader } from '../../src/io/safetensors.js';

/** Parses `data` as a whole safetensors file and reads every tensor every way the API allows. */
export async function fuzz(data: Uint8Array): Promise<void> {
  try {
    await exercise(data);
  } catch (error) {
    if (!(error instanceof SafetensorsError)) throw error;
    if (/[\r\n]/.test(error.message)) throw new Error(`multi-line SafetensorsError message: ${JSON.stringify(error.message)}`);
  }
}

async function exercise(data: Uint8Array): Promise<void> {
  // The pure parser must agree with the file object, and must not depend on bytes past the header.
  const header = parseSafetensorsHeader(data, data.length, 'fuzz');
  const file = SafetensorsFile.fromBytes(data, 'fuzz');
  if (file.tensors.size !== header.tensors.length) throw new Error('parser and file disagree on the tensor count');

  const sorted = [...file.tensors.values()].sort((a, b) => a.start - b.start || a.end - b.end);
  let cursor = header.dataStart;
  for (const info of sorted) {
    if (info.start !== cursor) throw new Error(`inconsistent: ${JSON.stringify(info.name)} starts at ${info.start}, expected ${cursor}`);
    const count = info.shape.reduce((a, b) => a * b, 1);
    if (info.end - info.start !== count * DTYPE_BYTES[info.dtype]) throw new Error(`inconsistent byte size for ${JSON.stringify(info.name)}`);
    cursor = info.end;
  }
  if (cursor !== data.length) throw new Error('inconsistent: data section not exactly covered');

  for (const info of file.tensors.values()) {
    const raw = await file.readRaw(info.name);
    if (raw.length !== info.end - info.start) throw new Error('readRaw returned the wrong length');
    const floats = await file.readFloat32(info.name);
    if (floats.length * DTYPE_BYTES[info.dtype] !== raw.length) throw new Error('readFloat32 returned the wrong length');
    await swallowSafetensorsError(file.readInt(info.name));
    await swallowSafetensorsError(file.readBigInt64(info.name));
  }
  await file.close();
}

async function swallowSafetensorsError(read: Promise<unknown>): Promise<void> {
  try {
    await read;
  } catch (error) {
    if (!(error instanceof SafetensorsError)) throw error;
  }
}
