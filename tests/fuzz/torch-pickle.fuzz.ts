// Fuzz target for the safe torch checkpoint reader (zip, pickle machine, legacy format). Any
// exception other than TorchCheckpointError, a multi-line message, a hang, or a loaded checkpoint
// whose tensors disagree with their own metadata is a finding.
// Input layout: byte 0 picks the mode, the rest is the payload.
//   mode 0: the payload is a whole checkpoint file (zip or legacy).
//   mode 1: the payload is a data.pkl, wrapped in a valid torch zip with a few fixed storages, so
//           coverage-guided mutation reaches the pickle machine instead of dying on the CRC check.
// Jazzer loads JavaScript only: compile with tests/fuzz/torch-pickle.fuzz.tsconfig.json first.

import { DTYPE_BYTES } from '../../src/io/dtypes.js';
import { PickleOpaque, TorchCheckpointError, TorchTensorRef, readTorchCheckpointBytes, stateDict, type TorchReadOptions } from '../../src/io/torch-pickle.js';
import { ZipWriter } from '../../src/io/zip.js';

/** Small limits so one input stays fast and small whatever it declares. */
export const FUZZ_OPTIONS: TorchReadOptions = Object.freeze({
  maxTensorBytes: 1 << 20,
  maxPickleBytes: 1 << 20,
  maxInflatedBytes: 1 << 22,
  pickleLimits: { maxValues: 200_000, maxStack: 100_000, maxMemo: 100_000 },
});

// Storages available to mode-1 pickles: keys 0-3 with 0, 4, 24 and 64 bytes.
const STORAGE_SIZES = [0, 4, 24, 64];

/** Wraps a data.pkl payload into a torch zip (archive/data.pkl, archive/data/0-3, archive/version). */
export async function wrapPickle(pickle: Uint8Array): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  const zip = new ZipWriter((c) => {
    chunks.push(c.slice());
  });
  await zip.add('archive/data.pkl', pickle);
  for (const [key, size] of STORAGE_SIZES.entries()) await zip.add(`archive/data/${key}`, new Uint8Array(size).map((_, i) => (i * 37 + key) & 0xff));
  await zip.add('archive/version', new TextEncoder().encode('3\n'));
  await zip.finish();
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

/** Runs one input; throws only for findings. */
export async function fuzz(data: Uint8Array): Promise<void> {
  const payload = data.subarray(1);
  const file = data[0] === 1 ? await wrapPickle(payload) : payload;
  await exercise(file);
}

function expected(error: unknown): void {
  if (!(error instanceof TorchCheckpointError)) throw error;
  if (/[\r\n]/.test(error.message)) throw new Error(`multi-line TorchCheckpointError message: ${JSON.stringify(error.message)}`);
}

async function exercise(file: Uint8Array): Promise<void> {
  let ckpt;
  try {
    ckpt = await readTorchCheckpointBytes(file, 'fuzz', FUZZ_OPTIONS);
  } catch (error) {
    expected(error);
    return;
  }
  if (!(ckpt.root === null || typeof ckpt.root !== 'object' || ckpt.root instanceof Object)) throw new Error('root is not a value');
  for (const [name, tensor] of ckpt.tensors) {
    if (!(tensor instanceof TorchTensorRef) || !(tensor instanceof PickleOpaque)) throw new Error(`tensors[${JSON.stringify(name)}] is not a tensor`);
    if (tensor.shape.length !== tensor.stride.length) throw new Error('shape and stride lengths differ');
    const item = DTYPE_BYTES[tensor.dtype];
    if (item === undefined) throw new Error(`unknown dtype ${String(tensor.dtype)}`);
    try {
      const raw = await tensor.readRaw();
      if (raw.length !== tensor.numel * item) throw new Error(`readRaw returned ${raw.length} bytes for ${tensor.numel} × ${item}`);
      const floats = await tensor.readFloat32();
      if (floats.length !== tensor.numel) throw new Error(`readFloat32 returned ${floats.length} values for ${tensor.numel}`);
    } catch (error) {
      expected(error);
    }
  }
  try {
    const sd = stateDict(ckpt);
    for (const t of sd.values()) if (!(t instanceof TorchTensorRef)) throw new Error('stateDict returned a non-tensor');
  } catch (error) {
    expected(error);
  }
  await ckpt.close();
}
