// The safe torch checkpoint reader on well-formed input: every tensor-rebuild form torch emits
// (hand-assembled pickles, no Python), both container formats, the writer round trip.
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

import { f32ToBf16Array, f32ToF16Array } from '../../src/io/dtypes.js';
import {
  NumpyArray,
  PickleGlobal,
  PickleObject,
  PickleOrderedDict,
  PickleTuple,
  TorchCheckpointError,
  TorchStorageRef,
  TorchTensorRef,
  readTorchCheckpoint,
  readTorchCheckpointBytes,
  stateDict,
  type PickleValue,
} from '../../src/io/torch-pickle.js';
import { pyFloat, serializeTorchCheckpoint, writeTorchCheckpoint, type TorchSaveValue } from '../../src/io/torch-save.js';
import {
  OP,
  ascii,
  bool,
  contiguous,
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
  stackGlobal,
  storage,
  str,
  tensorV2,
  tensorV3,
  torchZip,
  tuple,
  u32,
  u64,
  withTempDir,
  type Part,
} from './torch-pickle.helpers.js';

const read = (bytes: Uint8Array): ReturnType<typeof readTorchCheckpointBytes> => readTorchCheckpointBytes(bytes, 'test.ckpt');

function tensorAt(root: PickleValue, ...path: PickleValue[]): TorchTensorRef {
  let node: PickleValue | undefined = root;
  for (const k of path) node = node instanceof Map ? node.get(k) : Array.isArray(node) ? node[k as number] : undefined;
  if (!(node instanceof TorchTensorRef)) throw new Error(`no tensor at ${path.join('.')}`);
  return node;
}

function u16Bytes(bits: Uint16Array): Uint8Array {
  return new Uint8Array(bits.buffer, bits.byteOffset, bits.byteLength);
}

describe('torch checkpoint reader: tensor forms', () => {
  it('reads a float32 tensor from a typed storage via _rebuild_tensor_v2', async () => {
    const p = pickle(dict([str('w'), tensorV2(storage('FloatStorage', '0', 6), 0, [2, 3], [3, 1])]));
    const ckpt = await read(torchZip(p, { '0': f32Bytes([1, 2, 3, 4, 5, 6]) }));
    const w = tensorAt(ckpt.root, 'w');
    expect(w.dtype).toBe('F32');
    expect(w.torchDType).toBe('float32');
    expect(w.shape).toEqual([2, 3]);
    expect(w.stride).toEqual([3, 1]);
    expect(w.requiresGrad).toBe(false);
    expect(w.isParameter).toBe(false);
    expect([...(await w.readFloat32())]).toEqual([1, 2, 3, 4, 5, 6]);
    expect([...ckpt.tensors.keys()]).toEqual(['w']);
    expect(ckpt.format).toBe('zip');
  });

  it('reads _rebuild_parameter with its requires_grad flag', async () => {
    const p = pickle(dict([str('p'), parameter(tensorV2(storage('FloatStorage', '0', 2), 0, [2], [1]), true)]));
    const ckpt = await read(torchZip(p, { '0': f32Bytes([0.5, -2]) }));
    const t = tensorAt(ckpt.root, 'p');
    expect(t.isParameter).toBe(true);
    expect(t.requiresGrad).toBe(true);
    expect([...(await t.readFloat32())]).toEqual([0.5, -2]);
  });

  it('reads the untyped storage + dtype form (_rebuild_tensor_v3 with torch.storage.UntypedStorage)', async () => {
    const bits = new Uint16Array(3);
    f32ToF16Array(Float32Array.from([1.5, -2, 65504]), bits);
    const p = pickle(dict([str('h'), tensorV3(storage('UntypedStorage', '0', 6, 'cpu', 'torch.storage'), 0, [3], [1], 'float16')]));
    const ckpt = await read(torchZip(p, { '0': u16Bytes(bits) }));
    const h = tensorAt(ckpt.root, 'h');
    expect(h.dtype).toBe('F16');
    expect(h.storage.dtype).toBe('U8');
    expect([...(await h.readFloat32())]).toEqual([1.5, -2, 65504]);
  });

  it('reads float16, bfloat16, int64, int32, bool, uint8 and float64 storages', async () => {
    const half = new Uint16Array(2);
    f32ToF16Array(Float32Array.from([0.25, -8]), half);
    const bf = new Uint16Array(2);
    f32ToBf16Array(Float32Array.from([3, -0.5]), bf);
    const p = pickle(
      dict(
        [str('f16'), tensorV2(storage('HalfStorage', '0', 2), 0, [2], [1])],
        [str('bf16'), tensorV2(storage('BFloat16Storage', '1', 2), 0, [2], [1])],
        [str('i64'), tensorV2(storage('LongStorage', '2', 2), 0, [2], [1])],
        [str('i32'), tensorV2(storage('IntStorage', '3', 1), 0, [], [])],
        [str('bool'), tensorV2(storage('BoolStorage', '4', 3), 0, [3], [1])],
        [str('u8'), tensorV2(storage('ByteStorage', '5', 2), 0, [2], [1])],
        [str('f64'), tensorV2(storage('DoubleStorage', '6', 1), 0, [1], [1])],
      ),
    );
    const ckpt = await read(
      torchZip(p, {
        '0': u16Bytes(half),
        '1': u16Bytes(bf),
        '2': new Uint8Array(BigInt64Array.from([-(2n ** 40n), 7n]).buffer),
        '3': new Uint8Array(Int32Array.from([-9]).buffer),
        '4': Uint8Array.from([1, 0, 2]),
        '5': Uint8Array.from([0, 255]),
        '6': new Uint8Array(Float64Array.from([1 / 3]).buffer),
      }),
    );
    const r = ckpt.root;
    expect([...(await tensorAt(r, 'f16').readFloat32())]).toEqual([0.25, -8]);
    expect([...new Uint16Array((await tensorAt(r, 'f16').readRaw()).buffer)]).toEqual([...half]);
    expect([...(await tensorAt(r, 'bf16').readFloat32())]).toEqual([3, -0.5]);
    expect([...new BigInt64Array((await tensorAt(r, 'i64').readRaw()).buffer)]).toEqual([-(2n ** 40n), 7n]);
    expect(tensorAt(r, 'i32').shape).toEqual([]);
    expect([...(await tensorAt(r, 'i32').readFloat32())]).toEqual([-9]);
    expect([...(await tensorAt(r, 'bool').readFloat32())]).toEqual([1, 0, 1]);
    expect([...(await tensorAt(r, 'u8').readFloat32())]).toEqual([0, 255]);
    expect([...(await tensorAt(r, 'f64').readFloat32())]).toEqual([Math.fround(1 / 3)]);
  });

  it('materialises non-contiguous strides (a transpose) by stride walking', async () => {
    // storage holds [[0,1,2],[3,4,5]]; the transpose is [[0,3],[1,4],[2,5]] with stride [1, 3].
    const p = pickle(dict([str('t'), tensorV2(storage('FloatStorage', '0', 6), 0, [3, 2], [1, 3])]));
    const t = tensorAt((await read(torchZip(p, { '0': f32Bytes([0, 1, 2, 3, 4, 5]) }))).root, 't');
    expect(t.isContiguous).toBe(false);
    expect([...(await t.readFloat32())]).toEqual([0, 3, 1, 4, 2, 5]);
  });

  it('materialises offset views and stride-0 expansions sharing one storage', async () => {
    const s = storage('FloatStorage', '0', 12);
    const p = pickle(
      list(
        tensorV2(s, 0, [3, 4], [4, 1]),
        // base[1:3, 1:3] : offset 5, shape [2, 2], stride [4, 1]
        tensorV2(raw(OP.MARK, str('storage'), global('torch', 'FloatStorage'), str('0'), str('cpu'), int(12), OP.TUPLE, OP.BINPERSID), 5, [2, 2], [4, 1]),
        // row 2 expanded to [2, 4]
        tensorV2(raw(OP.MARK, str('storage'), global('torch', 'FloatStorage'), str('0'), str('cpu'), int(12), OP.TUPLE, OP.BINPERSID), 8, [2, 4], [0, 1]),
      ),
    );
    const ckpt = await read(torchZip(p, { '0': f32Bytes(Array.from({ length: 12 }, (_, i) => i)) }));
    const [base, view, expanded] = ckpt.root as TorchTensorRef[];
    expect(view!.storage).toBe(base!.storage);
    expect(expanded!.storage).toBe(base!.storage);
    expect([...(await view!.readFloat32())]).toEqual([5, 6, 9, 10]);
    expect([...(await expanded!.readFloat32())]).toEqual([8, 9, 10, 11, 8, 9, 10, 11]);
    expect([...ckpt.tensors.keys()]).toEqual(['0', '1', '2']);
  });

  it('allows empty tensors anywhere, as torch does', async () => {
    const p = pickle(dict([str('e'), tensorV2(storage('FloatStorage', '0', 0), 99, [0, 3], [3, 1])]));
    const e = tensorAt((await read(torchZip(p, { '0': new Uint8Array(0) }))).root, 'e');
    expect(e.numel).toBe(0);
    expect((await e.readFloat32()).length).toBe(0);
  });

  it('keeps OrderedDict order and its _metadata BUILD state', async () => {
    const p = pickle(
      orderedDict([str('b'), int(1)], [str('a'), int(2)]),
      dict([str('_metadata'), orderedDict([str(''), dict([str('version'), int(1)])])]),
      OP.BUILD,
    );
    const ckpt = await read(torchZip(p));
    expect(ckpt.root).toBeInstanceOf(PickleOrderedDict);
    const root = ckpt.root as PickleOrderedDict;
    expect([...root.keys()]).toEqual(['b', 'a']);
    const meta = (root.attributes as Map<PickleValue, PickleValue>).get('_metadata') as Map<PickleValue, PickleValue>;
    expect((meta.get('') as Map<PickleValue, PickleValue>).get('version')).toBe(1);
  });

  it('flattens a nested state_dict and a Lightning-like checkpoint with inert ModelCheckpoint state', async () => {
    const callbackState = dict([str('best_model_score'), tensorV2(storage('FloatStorage', '1', 1), 0, [], [])], [str('monitor'), OP.NONE]);
    const p = pickle(
      dict(
        [str('epoch'), int(3)],
        [str('global_step'), int(4000)],
        [str('pytorch-lightning_version'), str('1.4.2')],
        [
          str('state_dict'),
          orderedDict(
            [str('model.diffusion_model.out.0.weight'), tensorV2(storage('FloatStorage', '0', 4), 0, [4], [1])],
            [str('cond_stage_model'), orderedDict([str('proj.bias'), tensorV2(storage('FloatStorage', '0', 4), 2, [2], [1])])],
          ),
        ],
        [str('callbacks'), dict([global('pytorch_lightning.callbacks.model_checkpoint', 'ModelCheckpoint'), callbackState])],
        [
          str('checkpoint_obj'),
          [global('pytorch_lightning.callbacks.model_checkpoint', 'ModelCheckpoint'), OP.EMPTY_TUPLE, OP.NEWOBJ, dict([str('save_top_k'), int(1)]), OP.BUILD],
        ],
        [str('lr'), float(1e-4)],
      ),
    );
    const ckpt = await read(torchZip(p, { '0': f32Bytes([1, 2, 3, 4]), '1': f32Bytes([0.5]) }));
    const root = ckpt.root as Map<PickleValue, PickleValue>;
    expect(root.get('global_step')).toBe(4000);
    expect(root.get('epoch')).toBe(3);
    expect(root.get('lr')).toBe(1e-4);
    const sd = stateDict(ckpt);
    expect([...sd.keys()]).toEqual(['model.diffusion_model.out.0.weight', 'cond_stage_model.proj.bias']);
    expect([...(await sd.get('cond_stage_model.proj.bias')!.readFloat32())]).toEqual([3, 4]);
    const callbacks = root.get('callbacks') as Map<PickleValue, PickleValue>;
    const [cbKey] = [...callbacks.keys()];
    expect(cbKey).toBeInstanceOf(PickleGlobal);
    expect((cbKey as PickleGlobal).qualifiedName).toBe('pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint');
    const obj = root.get('checkpoint_obj') as PickleObject;
    expect(obj).toBeInstanceOf(PickleObject);
    expect((obj.state as Map<PickleValue, PickleValue>).get('save_top_k')).toBe(1);
    expect(ckpt.tensors.has('callbacks.pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint.best_model_score')).toBe(true);
  });

  it('uses the root as the state dict when it is a dict of tensors, and reads an A1111 ParameterDict embedding', async () => {
    const pd: Part = [
      global('torch.nn.modules.container', 'ParameterDict'),
      OP.EMPTY_TUPLE,
      OP.NEWOBJ,
      dict([str('training'), bool(true)], [str('_parameters'), orderedDict([str('*'), parameter(tensorV2(storage('FloatStorage', '0', 8), 0, [2, 4], [4, 1]))])]),
      OP.BUILD,
    ];
    const p = pickle(dict([str('string_to_token'), dict([str('*'), int(265)])], [str('string_to_param'), pd], [str('name'), str('emb')], [str('step'), int(500)]));
    const ckpt = await read(torchZip(p, { '0': f32Bytes([1, 2, 3, 4, 5, 6, 7, 8]) }));
    expect([...ckpt.tensors.keys()]).toEqual(['string_to_param.*']);
    expect([...stateDict(ckpt).keys()]).toEqual(['string_to_param.*']);
    expect(tensorAt((((ckpt.root as Map<PickleValue, PickleValue>).get('string_to_param') as PickleObject).state as Map<PickleValue, PickleValue>).get('_parameters')!, '*').shape).toEqual([2, 4]);
  });

  it('names tensors of a hypernetwork dict keyed by int layer widths', async () => {
    const layer = (key: string): Part => orderedDict([str('linear.0.weight'), tensorV2(storage('FloatStorage', key, 2), 0, [1, 2], [2, 1])]);
    const p = pickle(
      dict(
        [int(768), tuple(layer('0'), layer('1'))],
        [int(320), tuple(layer('2'), layer('3'))],
        [str('step'), int(10)],
        [str('layer_structure'), list(float(1), float(2), float(1))],
        [str('activation_func'), str('linear')],
      ),
    );
    const two = f32Bytes([1, 2]);
    const ckpt = await read(torchZip(p, { '0': two, '1': two, '2': two, '3': two }));
    expect([...ckpt.tensors.keys()]).toEqual(['768.0.linear.0.weight', '768.1.linear.0.weight', '320.0.linear.0.weight', '320.1.linear.0.weight']);
    expect([...(ckpt.root as Map<PickleValue, PickleValue>).keys()]).toEqual([768, 320, 'step', 'layer_structure', 'activation_func']);
    expect((ckpt.root as Map<PickleValue, PickleValue>).get('layer_structure')).toEqual([1, 2, 1]);
    // stateDict flattens dicts only; tuples of dicts are not a state dict.
    expect(() => stateDict(ckpt)).toThrow(/state dict: no tensors found/);
  });

  it('decodes numpy scalars (a numpy int64 global_step), numpy arrays and protocol-2 bytes', async () => {
    const i8 = [global('numpy', 'dtype'), str('i8'), bool(false), bool(true), OP.TUPLE3, OP.REDUCE, tuple(int(3), str('<'), OP.NONE, OP.NONE, OP.NONE, int(-1), int(-1), int(0)), OP.BUILD];
    const f4 = [global('numpy', 'dtype'), str('f4'), bool(false), bool(true), OP.TUPLE3, OP.REDUCE, tuple(int(3), str('<'), OP.NONE, OP.NONE, OP.NONE, int(-1), int(-1), int(0)), OP.BUILD];
    const latin1 = (bytes: number[]): Part => [global('_codecs', 'encode'), str(String.fromCharCode(...bytes)), str('latin1'), OP.TUPLE2, OP.REDUCE];
    const step = [global('numpy.core.multiarray', 'scalar'), i8, latin1([0x39, 0x05, 0, 0, 0, 0, 0, 0]), OP.TUPLE2, OP.REDUCE];
    const arr = [
      global('numpy.core.multiarray', '_reconstruct'),
      global('numpy', 'ndarray'),
      tuple(int(0)),
      [OP.SHORT_BINBYTES, 1, 0x62],
      OP.TUPLE3,
      OP.REDUCE,
      tuple(int(1), tuple(int(2)), f4, bool(false), [OP.SHORT_BINBYTES, 8, f32Bytes([1.5, 2.5])]),
      OP.BUILD,
    ];
    const p = pickle(dict([str('global_step'), step], [str('arr'), arr], [str('raw'), latin1([0, 200, 255])]));
    const root = (await read(torchZip(p))).root as Map<PickleValue, PickleValue>;
    expect(root.get('global_step')).toBe(1337);
    const a = root.get('arr') as NumpyArray;
    expect(a).toBeInstanceOf(NumpyArray);
    expect(a.shape).toEqual([2]);
    expect([...new Float32Array(a.data.slice().buffer)]).toEqual([1.5, 2.5]);
    expect([...(root.get('raw') as Uint8Array)]).toEqual([0, 200, 255]);
  });

  it('rebuilds a tensor from a numpy array (_rebuild_device_tensor_from_numpy, numpy >= 2 module names)', async () => {
    const f4 = [global('numpy', 'dtype'), str('f4'), bool(false), bool(true), OP.TUPLE3, OP.REDUCE, tuple(int(3), str('<'), OP.NONE, OP.NONE, OP.NONE, int(-1), int(-1), int(0)), OP.BUILD];
    const array = (fortran: boolean): Part => [
      global('numpy._core.multiarray', '_reconstruct'),
      global('numpy', 'ndarray'),
      tuple(int(0)),
      [OP.SHORT_BINBYTES, 1, 0x62],
      OP.TUPLE3,
      OP.REDUCE,
      tuple(int(1), tuple(int(2), int(3)), f4, bool(fortran), [OP.SHORT_BINBYTES, 24, f32Bytes([0, 1, 2, 3, 4, 5])]),
      OP.BUILD,
    ];
    const call = (fortran: boolean): Part => [global('torch._utils', '_rebuild_device_tensor_from_numpy'), OP.MARK, array(fortran), global('torch', 'float32'), str('xla:0'), bool(false), OP.TUPLE, OP.REDUCE];
    const ckpt = await read(torchZip(pickle(dict([str('c'), call(false)], [str('f'), call(true)]))));
    const c = tensorAt(ckpt.root, 'c');
    expect(c.storage.location).toBe('xla:0');
    expect([...(await c.readFloat32())]).toEqual([0, 1, 2, 3, 4, 5]);
    // Fortran order: column-major data [0..5] is the matrix [[0, 2, 4], [1, 3, 5]].
    expect([...(await tensorAt(ckpt.root, 'f').readFloat32())]).toEqual([0, 2, 4, 1, 3, 5]);
  });

  it('runs the protocol 0-5 data opcodes', async () => {
    const p = raw(
      OP.PROTO,
      4,
      OP.FRAME,
      u64(10n),
      OP.EMPTY_DICT,
      OP.MEMOIZE,
      OP.MARK,
      [OP.SHORT_BINUNICODE, 1, ...ascii('a')],
      [OP.INT, ascii('01\n')],
      [OP.SHORT_BINUNICODE, 1, ...ascii('b')],
      [OP.INT, ascii('-42\n')],
      [OP.SHORT_BINUNICODE, 1, ...ascii('c')],
      [OP.LONG, ascii('123456789012345678901234567890L\n')],
      [OP.SHORT_BINUNICODE, 1, ...ascii('d')],
      [OP.FLOAT, ascii('2.5\n')],
      [OP.SHORT_BINUNICODE, 1, ...ascii('e')],
      [OP.STRING, ascii("'it\\'s\\x41\\n'\n")],
      [OP.SHORT_BINUNICODE, 1, ...ascii('f')],
      [OP.UNICODE, ascii('caf\\u00e9 \\U0001F600\n')],
      [OP.SHORT_BINUNICODE, 1, ...ascii('g')],
      [OP.MARK, OP.NONE, OP.NEWTRUE, OP.LIST],
      [OP.SHORT_BINUNICODE, 1, ...ascii('h')],
      [OP.EMPTY_SET, OP.MARK, int(1), int(2), OP.ADDITEMS],
      [OP.SHORT_BINUNICODE, 1, ...ascii('i')],
      [OP.MARK, int(3), OP.FROZENSET],
      [OP.SHORT_BINUNICODE, 1, ...ascii('j')],
      [OP.BINBYTES8, u64(2n), 7, 8],
      [OP.SHORT_BINUNICODE, 1, ...ascii('k')],
      [OP.BYTEARRAY8, u64(1n), 9, OP.READONLY_BUFFER],
      [OP.SHORT_BINUNICODE, 1, ...ascii('l')],
      [OP.MARK, str('x'), int(1), OP.DICT],
      [OP.SHORT_BINUNICODE, 1, ...ascii('m')],
      [OP.MARK, int(1), int(2), int(3), int(4), OP.TUPLE, OP.PUT, ascii('77\n'), OP.POP, OP.GET, ascii('77\n')],
      [OP.SHORT_BINUNICODE, 1, ...ascii('n')],
      [OP.LONG4, u32(2), 0x00, 0x80, OP.DUP, OP.POP],
      [OP.SHORT_BINUNICODE, 1, ...ascii('o')],
      [OP.BINSTRING, u32(2), ...ascii('hi')],
      [OP.SHORT_BINUNICODE, 1, ...ascii('p')],
      stackGlobal('collections', 'OrderedDict'),
      OP.SETITEMS,
      OP.STOP,
    );
    const root = (await read(torchZip(p))).root as Map<PickleValue, PickleValue>;
    expect(root.get('a')).toBe(true);
    expect(root.get('b')).toBe(-42);
    expect(root.get('c')).toBe(123456789012345678901234567890n);
    expect(root.get('d')).toBe(2.5);
    expect(root.get('e')).toBe("it'sA\n");
    expect(root.get('f')).toBe('café 😀');
    expect(root.get('g')).toEqual([null, true]);
    expect(root.get('h')).toEqual(new Set([1, 2]));
    expect(root.get('i')).toEqual(new Set([3]));
    expect([...(root.get('j') as Uint8Array)]).toEqual([7, 8]);
    expect([...(root.get('k') as Uint8Array)]).toEqual([9]);
    expect(root.get('l')).toEqual(new Map([['x', 1]]));
    expect((root.get('m') as PickleTuple).items).toEqual([1, 2, 3, 4]);
    expect(root.get('n')).toBe(-32768);
    expect(root.get('o')).toBe('hi');
    expect((root.get('p') as PickleGlobal).qualifiedName).toBe('collections.OrderedDict');
  });

  it('lists a bare tensor root under the empty path, and keeps Lightning module references inert', async () => {
    const bare = await read(torchZip(pickle(tensorV2(storage('FloatStorage', '0', 1), 0, [], [])), { '0': f32Bytes([42]) }));
    expect([...bare.tensors.keys()]).toEqual(['']);
    expect(() => stateDict(bare)).toThrow('test.ckpt: state dict: expected a dict of tensors (or a dict with a "state_dict" entry), found a tensor at the root');
    const moduleRef = await read(torchZip(pickle(dict([str('cb'), global('pytorch_lightning.callbacks', 'model_checkpoint')]))));
    expect(((moduleRef.root as Map<PickleValue, PickleValue>).get('cb') as PickleGlobal).qualifiedName).toBe('pytorch_lightning.callbacks.model_checkpoint');
    await expect(read(torchZip(pickle(global('pytorch_lightning.callbacks', 'model_checkpoint'), OP.EMPTY_TUPLE, OP.REDUCE)))).rejects.toThrow(
      /REDUCE of pytorch_lightning\.callbacks\.model_checkpoint is not allowed/,
    );
  });

  it('accepts tensor metadata but refuses lazy neg/conj bits', async () => {
    const withMeta = (meta: Part): Uint8Array =>
      pickle(global('torch._utils', '_rebuild_tensor_v2'), OP.MARK, storage('FloatStorage', '0', 1), int(0), tuple(), tuple(), bool(false), orderedDict(), meta, OP.TUPLE, OP.REDUCE);
    const ok = await read(torchZip(withMeta(dict([str('neg'), bool(false)])), { '0': f32Bytes([1]) }));
    expect(ok.root).toBeInstanceOf(TorchTensorRef);
    await expect(read(torchZip(withMeta(dict([str('neg'), bool(true)])), { '0': f32Bytes([1]) }))).rejects.toThrow(/_rebuild_tensor_v2: tensors with a lazy neg bit are not supported/);
  });

  it('keeps a nested pickle inside bytes as inert bytes', async () => {
    const inner = pickle(global('os', 'system'), str('echo pwned'), OP.TUPLE1, OP.REDUCE);
    const p = pickle(dict([str('payload'), [OP.BINBYTES, u32(inner.length), inner]]));
    const root = (await read(torchZip(p))).root as Map<PickleValue, PickleValue>;
    expect(root.get('payload')).toEqual(inner);
  });
});

describe('torch checkpoint reader: containers', () => {
  it('reads storages behind data descriptors and zip64 records, as torch writes them', async () => {
    const p = pickle(dict([str('w'), tensorV2(storage('FloatStorage', '0', 2), 0, [2], [1])]));
    for (const options of [{ descriptor: true }, { zip64: true }, { top: 'my_model' }]) {
      const w = tensorAt((await read(torchZip(p, { '0': f32Bytes([7, 8]) }, options))).root, 'w');
      expect([...(await w.readFloat32())]).toEqual([7, 8]);
    }
  });

  it('reads deflated storages (inflated per entry) and tolerates the newer torch records', async () => {
    const p = pickle(dict([str('w'), tensorV2(storage('FloatStorage', '0', 4), 0, [4], [1])]));
    const ckpt = await read(
      torchZip(p, {}, {
        extra: [
          { name: 'archive/data/0', data: f32Bytes([1, 2, 3, 4]), deflate: true },
          { name: 'archive/byteorder', data: ascii('little') },
          { name: 'archive/.data/serialization_id', data: ascii('1234567890') },
          { name: 'archive/.data/version', data: ascii('3\n') },
          { name: 'archive/.format_version', data: ascii('1') },
          { name: 'archive/.storage_alignment', data: ascii('64') },
        ],
      }),
    );
    expect([...(await tensorAt(ckpt.root, 'w').readFloat32())]).toEqual([1, 2, 3, 4]);
  });

  it('byte-swaps storages of a checkpoint whose byteorder record says "big"', async () => {
    const p = pickle(dict([str('w'), tensorV2(storage('FloatStorage', '0', 2), 0, [2], [1])]));
    const big = new Uint8Array(8);
    new DataView(big.buffer).setFloat32(0, 1.25, false);
    new DataView(big.buffer).setFloat32(4, -3, false);
    const ckpt = await read(torchZip(p, { '0': big }, { extra: [{ name: 'archive/byteorder', data: ascii('big') }] }));
    expect([...(await tensorAt(ckpt.root, 'w').readFloat32())]).toEqual([1.25, -3]);
  });

  it('reads the legacy (non-zip) format: five pickles, then the storages', async () => {
    const legacyPid = (key: string, numel: number, view: Part = OP.NONE): Part => [
      OP.MARK,
      str('storage'),
      global('torch', 'FloatStorage'),
      str(key),
      str('cpu'),
      int(numel),
      view,
      OP.TUPLE,
      OP.BINPERSID,
    ];
    const magic = pickle(int(0x1950a86a20f9469cfc6cn));
    const version = pickle(int(1001));
    const sysInfo = pickle(dict([str('protocol_version'), int(1001)], [str('little_endian'), bool(true)], [str('type_sizes'), dict([str('int'), int(4)])]));
    const main = pickle(
      dict(
        [str('a'), tensorV2(legacyPid('140', 4), 0, [2, 2], [2, 1])],
        [str('b'), tensorV2(legacyPid('200', 1), 0, [1], [1])],
        // A pre-1.0 storage view: elements [2, 4) of storage 140.
        [str('v'), tensorV2(legacyPid('140', 4, tuple(str('141'), int(2), int(2))), 0, [2], [1])],
      ),
    );
    const keys = pickle(list(str('140'), str('200')));
    const count = (n: number): Uint8Array => u64(BigInt(n));
    const file = raw(magic, version, sysInfo, main, keys, count(4), f32Bytes([1, 2, 3, 4]), count(1), f32Bytes([9]));
    const ckpt = await read(file);
    expect(ckpt.format).toBe('legacy');
    expect([...(await tensorAt(ckpt.root, 'a').readFloat32())]).toEqual([1, 2, 3, 4]);
    expect([...(await tensorAt(ckpt.root, 'b').readFloat32())]).toEqual([9]);
    expect([...(await tensorAt(ckpt.root, 'v').readFloat32())]).toEqual([3, 4]);
  });

  it('reads from a file with positioned reads and fails reads after close', async () => {
    await withTempDir(async (dir) => {
      const path = join(dir, 'model.ckpt');
      const p = pickle(dict([str('w'), tensorV2(storage('FloatStorage', '0', 3), 0, [3], [1])]));
      await writeFile(path, torchZip(p, { '0': f32Bytes([4, 5, 6]) }));
      const ckpt = await readTorchCheckpoint(path);
      expect(ckpt.path).toBe(path);
      const w = tensorAt(ckpt.root, 'w');
      expect(w.storage).toBeInstanceOf(TorchStorageRef);
      expect([...(await w.readFloat32())]).toEqual([4, 5, 6]);
      await ckpt.close();
      await expect(w.readFloat32()).rejects.toThrow(TorchCheckpointError);
    });
  });
});

describe('torch checkpoint writer', () => {
  it('round-trips an A1111 embedding and a hypernetwork through our reader', async () => {
    const vectors = Float32Array.from({ length: 2 * 768 }, (_, i) => Math.sin(i));
    const value: TorchSaveValue = {
      string_to_token: { '*': 265 },
      string_to_param: { '*': { dtype: 'float32', shape: [2, 768], data: vectors } },
      name: 'my-style',
      step: 1500,
      sd_checkpoint: 'a9263745',
      sd_checkpoint_name: null,
    };
    const ckpt = await read(await serializeTorchCheckpoint(value));
    const root = ckpt.root as Map<PickleValue, PickleValue>;
    expect([...root.keys()]).toEqual(['string_to_token', 'string_to_param', 'name', 'step', 'sd_checkpoint', 'sd_checkpoint_name']);
    expect(root.get('string_to_token')).toEqual(new Map([['*', 265]]));
    expect(root.get('sd_checkpoint_name')).toBe(null);
    const t = ckpt.tensors.get('string_to_param.*')!;
    expect(t.shape).toEqual([2, 768]);
    expect(await t.readFloat32()).toEqual(vectors);

    const layer = (seed: number): TorchSaveValue => {
      const sd = new PickleOrderedDict();
      sd.set('linear.0.weight', { dtype: 'float16', shape: [2, 2], data: Float32Array.from([seed, 0.5, -1, 2]) } as never);
      sd.set('linear.0.bias', { dtype: 'float32', shape: [2], data: Float32Array.from([seed, 0]), parameter: true, requiresGrad: true } as never);
      return sd as never;
    };
    const hyper: TorchSaveValue = new Map<string | number, TorchSaveValue>([
      [768, new PickleTuple([layer(1), layer(2)] as PickleValue[])],
      ['layer_structure', [pyFloat(1), pyFloat(2), pyFloat(1)]],
      ['dropout_structure', [0, 0.3, 0]],
      ['step', 2000],
      ['big', 2n ** 80n],
      ['bytes', Uint8Array.from([0, 128, 255])],
    ]);
    const h = await read(await serializeTorchCheckpoint(hyper));
    expect([...h.tensors.keys()]).toEqual(['768.0.linear.0.weight', '768.0.linear.0.bias', '768.1.linear.0.weight', '768.1.linear.0.bias']);
    const bias = h.tensors.get('768.1.linear.0.bias')!;
    expect(bias.isParameter).toBe(true);
    expect(bias.requiresGrad).toBe(true);
    expect([...(await bias.readFloat32())]).toEqual([2, 0]);
    expect([...(await h.tensors.get('768.0.linear.0.weight')!.readFloat32())]).toEqual([1, 0.5, -1, 2]);
    const hr = h.root as Map<PickleValue, PickleValue>;
    expect(hr.get('layer_structure')).toEqual([1, 2, 1]);
    expect(hr.get('dropout_structure')).toEqual([0, 0.3, 0]);
    expect(hr.get('big')).toBe(2n ** 80n);
    expect([...(hr.get('bytes') as Uint8Array)]).toEqual([0, 128, 255]);
    expect((hr.get(768) as PickleTuple).items[0]).toBeInstanceOf(PickleOrderedDict);
  });

  it('writes torch layout: archive/ records, 64-byte aligned stored entries, version "3", shared tensors once', async () => {
    const t = { dtype: 'float32' as const, shape: [3], data: Float32Array.from([1, 2, 3]) };
    const bytes = await serializeTorchCheckpoint({ a: t, tied: t, i: { dtype: 'int64', shape: [1], data: Int32Array.from([-7]) } });
    const { ZipArchive, memorySource } = await import('../../src/io/zip.js');
    const zip = await ZipArchive.fromSource(memorySource(bytes));
    expect([...zip.entries.keys()]).toEqual(['archive/data.pkl', 'archive/byteorder', 'archive/data/0', 'archive/data/1', 'archive/version']);
    for (const e of zip.entries.values()) {
      expect(e.method).toBe('stored');
      expect(e.dataOffset % 64).toBe(0);
    }
    expect(new TextDecoder().decode(await zip.read(zip.get('archive/version')!))).toBe('3\n');
    const ckpt = await read(bytes);
    const root = ckpt.root as Map<PickleValue, PickleValue>;
    expect(root.get('a')).toBe(root.get('tied'));
    expect([...(await tensorAt(root, 'i').readFloat32())]).toEqual([-7]);
    expect([...stateDict(ckpt).keys()]).toEqual(['a', 'tied', 'i']);
  });

  it('re-saves tensors read from a checkpoint (materialising strided views)', async () => {
    const p = pickle(dict([str('t'), tensorV2(storage('HalfStorage', '0', 6), 0, [3, 2], [1, 3])]));
    const bits = new Uint16Array(6);
    f32ToF16Array(Float32Array.from([0, 1, 2, 3, 4, 5]), bits);
    const src = await read(torchZip(p, { '0': u16Bytes(bits) }));
    const again = await read(await serializeTorchCheckpoint({ t: tensorAt(src.root, 't') }));
    const t = tensorAt(again.root, 't');
    expect(t.dtype).toBe('F16');
    expect(t.stride).toEqual(contiguous([3, 2]));
    expect([...(await t.readFloat32())]).toEqual([0, 3, 1, 4, 2, 5]);
  });

  it('writes atomically and refuses values it cannot represent', async () => {
    await withTempDir(async (dir) => {
      const path = join(dir, 'emb.pt');
      await writeTorchCheckpoint(path, { step: 1, w: { dtype: 'bfloat16', shape: [2], data: Float32Array.from([1, -2]) } });
      const ckpt = await readTorchCheckpoint(path);
      expect([...(await tensorAt(ckpt.root, 'w').readFloat32())]).toEqual([1, -2]);
      await ckpt.close();
      const cyclic: unknown[] = [];
      cyclic.push(cyclic);
      await expect(writeTorchCheckpoint(join(dir, 'bad.pt'), { x: cyclic as never })).rejects.toThrow(/value at "x.0": the value contains itself/);
      await expect(writeTorchCheckpoint(join(dir, 'bad.pt'), { f: (() => 1) as never })).rejects.toThrow(/cannot save a function/);
      await expect(writeTorchCheckpoint(join(dir, 'bad.pt'), { t: { dtype: 'float32', shape: [3], data: new Float32Array(2) } })).rejects.toThrow(/tensor data has 2 elements, its shape needs 3/);
      await expect(writeTorchCheckpoint(join(dir, 'bad.pt'), { a: new Float32Array(2) as never })).rejects.toThrow(/bare Float32Array/);
      const { readdir } = await import('node:fs/promises');
      expect((await readdir(dir)).sort()).toEqual(['emb.pt']);
    });
  });
});
