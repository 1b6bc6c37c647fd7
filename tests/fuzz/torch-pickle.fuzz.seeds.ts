// Seed inputs for the torch checkpoint fuzz target (each prefixed with its mode byte, see
// torch-pickle.fuzz.ts): writer output, every tensor-rebuild form, the legacy format, zip64,
// deflated storages, numpy values, and a few refused payloads so mutations start near the policy.
// Usage: tsx tests/fuzz/torch-pickle.fuzz.seeds.ts <corpus-dir>   (writes seed-*.bin there)

import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { PickleOrderedDict } from '../../src/io/torch-pickle.js';
import { pyFloat, serializeTorchCheckpoint } from '../../src/io/torch-save.js';
import {
  OP,
  bool,
  dict,
  f32Bytes,
  float,
  global,
  int,
  list,
  orderedDict,
  parameter,
  pickle,
  raw,
  storage,
  str,
  tensorV2,
  tensorV3,
  torchZip,
  tuple,
  u64,
  type Part,
} from '../io/torch-pickle.helpers.js';

const whole = (bytes: Uint8Array): Uint8Array => raw(0, bytes);
const wrapped = (bytes: Uint8Array): Uint8Array => raw(1, bytes);

/** Seeds by name, mode byte included. */
export async function torchPickleSeeds(): Promise<Map<string, Uint8Array>> {
  const seeds = new Map<string, Uint8Array>();
  const sd = new PickleOrderedDict();
  sd.set('w', { dtype: 'float16', shape: [2, 3], data: Float32Array.from([1, 2, 3, 4, 5, 6]) } as never);
  sd.set('b', { dtype: 'float32', shape: [3], data: Float32Array.from([0.5, -1, 7]), parameter: true, requiresGrad: true } as never);
  seeds.set(
    'writer',
    whole(
      await serializeTorchCheckpoint({
        state_dict: sd as never,
        global_step: 123,
        hyper: new Map<number, never>([[768, [{ dtype: 'bfloat16', shape: [1], data: Float32Array.from([3]) }] as never]]) as never,
        i: { dtype: 'int64', shape: [2], data: BigInt64Array.from([-1n, 2n ** 40n]) },
        layer_structure: [pyFloat(1), pyFloat(2)],
        bytes: Uint8Array.from([1, 2, 3]),
      }),
    ),
  );

  // Mode-1 pickles use the fixed storages 0 (0 B), 1 (4 B), 2 (24 B), 3 (64 B).
  const forms: Part = dict(
    [str('v2'), tensorV2(storage('FloatStorage', '2', 6), 0, [2, 3], [3, 1])],
    [str('t'), tensorV2(storage('FloatStorage', '2', 6), 0, [3, 2], [1, 3])],
    [str('view'), tensorV2(storage('FloatStorage', '2', 6), 2, [2], [2])],
    [str('expand'), tensorV2(storage('FloatStorage', '1', 1), 0, [4, 4], [0, 0])],
    [str('p'), parameter(tensorV2(storage('HalfStorage', '3', 32), 0, [4, 8], [8, 1]))],
    [str('v3'), tensorV3(storage('UntypedStorage', '3', 64, 'cpu', 'torch.storage'), 0, [32], [1], 'bfloat16')],
    [str('empty'), tensorV2(storage('FloatStorage', '0', 0), 0, [0], [1])],
    [str('sd'), orderedDict([str('a.weight'), tensorV2(storage('LongStorage', '3', 8), 0, [8], [1])])],
    [str('callbacks'), dict([global('pytorch_lightning.callbacks.model_checkpoint', 'ModelCheckpoint'), dict([str('best'), float(0.5)])])],
    [int(768), tuple(list(int(1), float(2)), OP.NONE, bool(true))],
  );
  seeds.set('forms', wrapped(pickle(forms)));
  const numpy: Part = dict(
    [
      str('step'),
      [
        global('numpy.core.multiarray', 'scalar'),
        global('numpy', 'dtype'),
        str('i8'),
        bool(false),
        bool(true),
        OP.TUPLE3,
        OP.REDUCE,
        tuple(int(3), str('<'), OP.NONE, OP.NONE, OP.NONE, int(-1), int(-1), int(0)),
        OP.BUILD,
        [global('_codecs', 'encode'), str('\u0001\u0000\u0000\u0000\u0000\u0000\u0000\u0000'), str('latin1'), OP.TUPLE2, OP.REDUCE],
        OP.TUPLE2,
        OP.REDUCE,
      ],
    ],
    [str('set'), [global('builtins', 'set'), list(int(1), int(2)), OP.TUPLE1, OP.REDUCE]],
    [str('pd'), [global('torch.nn.modules.container', 'ParameterDict'), OP.EMPTY_TUPLE, OP.NEWOBJ, dict([str('_parameters'), orderedDict()]), OP.BUILD]],
  );
  seeds.set('numpy', wrapped(pickle(numpy)));
  seeds.set('refused', wrapped(pickle(global('os', 'system'), str('true'), OP.TUPLE1, OP.REDUCE)));
  seeds.set('memo', wrapped(raw(OP.PROTO, 4, OP.FRAME, u64(6n), OP.EMPTY_LIST, OP.MEMOIZE, OP.MARK, OP.BINGET, 0, OP.APPENDS, OP.STOP)));

  const p = pickle(dict([str('w'), tensorV2(storage('FloatStorage', '0', 4), 0, [2, 2], [2, 1])]));
  seeds.set('zip64', whole(torchZip(p, { '0': f32Bytes([1, 2, 3, 4]) }, { zip64: true, descriptor: true })));
  seeds.set('deflated', whole(torchZip(p, {}, { extra: [{ name: 'archive/data/0', data: f32Bytes([1, 2, 3, 4]), deflate: true }] })));

  const legacyPid = (key: string, numel: number): Part => [OP.MARK, str('storage'), global('torch', 'FloatStorage'), str(key), str('cpu'), int(numel), OP.NONE, OP.TUPLE, OP.BINPERSID];
  seeds.set(
    'legacy',
    whole(
      raw(
        pickle(int(0x1950a86a20f9469cfc6cn)),
        pickle(int(1001)),
        pickle(dict([str('little_endian'), bool(true)])),
        pickle(dict([str('a'), tensorV2(legacyPid('1', 4), 0, [2, 2], [2, 1])], [str('b'), tensorV2(legacyPid('2', 1), 0, [], [])])),
        pickle(list(str('1'), str('2'))),
        u64(4n),
        f32Bytes([1, 2, 3, 4]),
        u64(1n),
        f32Bytes([5]),
      ),
    ),
  );
  return seeds;
}

async function main(): Promise<void> {
  const dir = process.argv[2];
  if (dir === undefined) throw new Error('usage: tsx tests/fuzz/torch-pickle.fuzz.seeds.ts <corpus-dir>');
  await mkdir(dir, { recursive: true });
  const seeds = await torchPickleSeeds();
  for (const [name, bytes] of seeds) await writeFile(join(dir, `seed-${name}.bin`), bytes);
  console.log(`wrote ${seeds.size} seeds to ${dir}`);
}

if (process.argv[1] !== undefined && fileURLToPath(import.meta.url) === process.argv[1]) {
  await main();
}
