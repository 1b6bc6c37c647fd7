// Hostile and broken checkpoints: each is rejected with one precise one-line TorchCheckpointError,
// in bounded time, and without side effects. Payloads that Python's pickle would execute try to
// create a sentinel file; the tests check it never appears.
import { existsSync } from 'node:fs';
import { readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

import { TorchCheckpointError, readTorchCheckpoint, readTorchCheckpointBytes, type TorchReadOptions } from '../../src/io/torch-pickle.js';
import {
  OP,
  ascii,
  buildZip,
  dict,
  f32Bytes,
  global,
  int,
  list,
  pickle,
  raw,
  stackGlobal,
  storage,
  str,
  tensorV2,
  torchZip,
  tuple,
  u32,
  u64,
  withTempDir,
  type Part,
} from './torch-pickle.helpers.js';

const FILE = 'evil.ckpt';
// Where a payload that ran would leave its mark; never created by a correct reader.
const SENTINEL = join('/tmp', `sdwb-torch-pickle-sentinel-${process.pid}`);
const touch = str(`touch ${SENTINEL}`);

async function errorOf(bytes: Uint8Array, options?: TorchReadOptions): Promise<TorchCheckpointError> {
  const started = Date.now();
  try {
    const ckpt = await readTorchCheckpointBytes(bytes, FILE, options);
    // Some problems only show when the data is read.
    for (const t of ckpt.tensors.values()) await t.readRaw();
  } catch (error) {
    expect(Date.now() - started).toBeLessThan(5000);
    expect(error).toBeInstanceOf(TorchCheckpointError);
    const e = error as TorchCheckpointError;
    expect(e.file).toBe(FILE);
    expect(e.message).not.toMatch(/[\r\n]/);
    expect(existsSync(SENTINEL)).toBe(false);
    return e;
  }
  throw new Error('expected the checkpoint to be rejected');
}

async function expectRejected(bytes: Uint8Array, message: string | RegExp, options?: TorchReadOptions): Promise<void> {
  const e = await errorOf(bytes, options);
  if (typeof message === 'string') expect(e.message).toBe(`${FILE}: ${message}`);
  else expect(e.message).toMatch(message);
}

const inZip = (...parts: Part[]): Uint8Array => torchZip(pickle(...parts));
const PKL = 'archive/data.pkl';

describe('code execution attempts are refused, naming the global', () => {
  it('os.system via GLOBAL + REDUCE', async () => {
    await expectRejected(inZip(global('os', 'system'), touch, OP.TUPLE1, OP.REDUCE), `${PKL}: offset 2 (GLOBAL): global "os.system" is not allowed (not on the checkpoint allow-list; nothing was executed)`);
  });

  it('posix.system and nt.system (what os.system pickles as)', async () => {
    await expectRejected(inZip(global('posix', 'system'), touch, OP.TUPLE1, OP.REDUCE), /offset 2 \(GLOBAL\): global "posix\.system" is not allowed/);
    await expectRejected(inZip(global('nt', 'system'), touch, OP.TUPLE1, OP.REDUCE), /global "nt\.system" is not allowed/);
  });

  it('subprocess.Popen with an argument list', async () => {
    await expectRejected(inZip(global('subprocess', 'Popen'), list(str('touch'), str(SENTINEL)), OP.TUPLE1, OP.REDUCE), /offset 2 \(GLOBAL\): global "subprocess\.Popen" is not allowed/);
  });

  it('builtins.eval and builtins.exec via STACK_GLOBAL + REDUCE', async () => {
    const code = str(`__import__('os').system('touch ${SENTINEL}')`);
    await expectRejected(inZip(stackGlobal('builtins', 'eval'), code, OP.TUPLE1, OP.REDUCE), `${PKL}: offset 18 (STACK_GLOBAL): global "builtins.eval" is not allowed (not on the checkpoint allow-list; nothing was executed)`);
    await expectRejected(inZip(stackGlobal('builtins', 'exec'), code, OP.TUPLE1, OP.REDUCE), /global "builtins\.exec" is not allowed/);
    await expectRejected(inZip(stackGlobal('__builtin__', 'eval'), code, OP.TUPLE1, OP.REDUCE), /global "__builtin__\.eval" is not allowed/);
  });

  it('a getattr chain (getattr(__import__("os"), "system")) and dotted names', async () => {
    const chain = [stackGlobal('builtins', 'getattr'), stackGlobal('builtins', '__import__'), str('os'), OP.TUPLE1, OP.REDUCE, str('system'), OP.TUPLE2, OP.REDUCE, touch, OP.TUPLE1, OP.REDUCE];
    await expectRejected(inZip(...chain), /global "builtins\.getattr" is not allowed/);
    // Protocol 4 resolves dotted names by attribute walks; only exact allow-listed pairs pass.
    await expectRejected(inZip(stackGlobal('torch', '_utils._rebuild_tensor_v2')), /global "torch\._utils\._rebuild_tensor_v2" is not allowed/);
    await expectRejected(inZip(stackGlobal('collections', 'OrderedDict.__init__.__globals__')), /global "collections\.OrderedDict\.__init__\.__globals__" is not allowed/);
  });

  it('an unknown module, torch functions outside the allow-list, and lookalike names', async () => {
    await expectRejected(inZip(global('evil_module', 'payload')), /global "evil_module\.payload" is not allowed/);
    await expectRejected(inZip(global('torch', 'load')), /global "torch\.load" is not allowed/);
    await expectRejected(inZip(global('torch.storage', '_load_from_bytes'), [OP.SHORT_BINBYTES, 1, 0], OP.TUPLE1, OP.REDUCE), /global "torch\.storage\._load_from_bytes" is not allowed/);
    await expectRejected(inZip(global('torch._utils', '_rebuild_parameter_with_state')), /global "torch\._utils\._rebuild_parameter_with_state" is not allowed/);
    await expectRejected(inZip(global('collections ', 'OrderedDict')), /global "collections \.OrderedDict" is not allowed/);
    await expectRejected(inZip(global('numpy', 'load')), /global "numpy\.load" is not allowed/);
  });

  it('INST, OBJ, NEWOBJ and NEWOBJ_EX on disallowed classes', async () => {
    // INST reads its class name inline: offset = PROTO (2) + MARK (1) + the BINUNICODE argument.
    const instAt = 3 + 5 + `touch ${SENTINEL}`.length;
    await expectRejected(inZip(OP.MARK, touch, OP.INST, ascii('os\nsystem\n')), `${PKL}: offset ${instAt} (INST): global "os.system" is not allowed (not on the checkpoint allow-list; nothing was executed)`);
    await expectRejected(inZip(OP.MARK, global('subprocess', 'Popen'), touch, OP.OBJ), /offset 3 \(GLOBAL\): global "subprocess\.Popen" is not allowed/);
    await expectRejected(inZip(global('subprocess', 'Popen'), tuple(touch), OP.NEWOBJ), /global "subprocess\.Popen" is not allowed/);
    // Allowed names that are not classes cannot be instantiated.
    await expectRejected(inZip(OP.MARK, global('torch', 'FloatStorage'), OP.OBJ), /\(OBJ\): OBJ of torch\.FloatStorage is not allowed/);
    await expectRejected(inZip(global('torch._utils', '_rebuild_tensor_v2'), OP.EMPTY_TUPLE, OP.NEWOBJ), /\(NEWOBJ\): NEWOBJ of torch\._utils\._rebuild_tensor_v2 is not allowed/);
    await expectRejected(inZip(global('collections', 'OrderedDict'), OP.EMPTY_TUPLE, dict([str('x'), int(1)]), OP.NEWOBJ_EX), /NEWOBJ_EX of collections\.OrderedDict with keyword arguments is not allowed/);
    await expectRejected(inZip(OP.MARK, OP.INST, ascii('torch\nfloat16\n')), /\(INST\): INST of torch\.float16 is not allowed/);
    await expectRejected(inZip(global('torch', 'float16'), OP.EMPTY_TUPLE, OP.REDUCE), /\(REDUCE\): REDUCE of torch\.float16 is not allowed \(it is not callable in a checkpoint\)/);
    await expectRejected(inZip(str('os.system'), touch, OP.TUPLE1, OP.REDUCE), /\(REDUCE\): REDUCE on a str: only allowed globals can be called/);
  });

  it('BUILD on something that is not an allowed object', async () => {
    await expectRejected(inZip(global('collections', 'OrderedDict'), dict([str('__setstate__'), int(1)]), OP.BUILD), /\(BUILD\): BUILD on collections\.OrderedDict is not allowed/);
    await expectRejected(inZip(OP.EMPTY_DICT, dict([str('x'), int(1)]), OP.BUILD), /\(BUILD\): BUILD on a dict is not allowed/);
    const t = tensorV2(storage('FloatStorage', '0', 1), 0, [1], [1]);
    await expectRejected(torchZip(pickle(t, dict([str('x'), int(1)]), OP.BUILD), { '0': f32Bytes([1]) }), /BUILD on a tensor is not allowed/);
  });

  it('EXT1/EXT2/EXT4 (the copyreg extension registry)', async () => {
    await expectRejected(inZip(OP.EXT1, 1), `${PKL}: offset 2 (EXT1): extension code 1: the copyreg extension registry is not allowed (it would import an unnamed global)`);
    await expectRejected(inZip(OP.EXT2, 0x34, 0x12), /\(EXT2\): extension code 4660/);
    await expectRejected(inZip(OP.EXT4, u32(7)), /\(EXT4\): extension code 7/);
  });

  it('persistent ids other than storages (pickled nn.Module sources, plain strings)', async () => {
    await expectRejected(inZip(OP.MARK, str('module'), global('torch', 'FloatStorage'), str('x.py'), str('src'), OP.TUPLE, OP.BINPERSID), /persistent id of type "module" \(a pickled nn\.Module class with its source code\) is not allowed; only "storage"/);
    await expectRejected(inZip(OP.PERSID, ascii('0\n')), /\(PERSID\): persistent id must be a tuple, found a str/);
    await expectRejected(inZip(OP.MARK, str('storage'), str('torch.FloatStorage'), str('0'), str('cpu'), int(1), OP.TUPLE, OP.BINPERSID), /storage type must be a torch storage class, found a str/);
  });

  it('leaves no files behind (on-disk run)', async () => {
    await withTempDir(async (dir) => {
      const path = join(dir, 'evil.ckpt');
      await writeFile(path, inZip(global('os', 'system'), str(`touch ${join(dir, 'pwned')}`), OP.TUPLE1, OP.REDUCE));
      await expect(readTorchCheckpoint(path)).rejects.toThrow(/global "os\.system" is not allowed/);
      expect(await readdir(dir)).toEqual(['evil.ckpt']);
    });
  });
});

describe('hostile archives', () => {
  const member = (name: string): Uint8Array => torchZip(pickle(OP.NONE), {}, { extra: [{ name, data: ascii('x') }] });

  it('path-traversal and absolute member names', async () => {
    for (const name of ['../evil', '/etc/x', 'archive/../../x', 'archive/data/../../../x', 'archive\\..\\x', 'archive/data/0/../1', 'C:/x', 'archive/data.pkl\u0000.txt']) {
      const e = await errorOf(member(name));
      expect(e.message.startsWith(`${FILE}: unexpected member ${JSON.stringify(name)}: a torch checkpoint holds only <top>/data.pkl, <top>/data/<n>,`)).toBe(true);
    }
  });

  it('TorchScript archives are named as such', async () => {
    await expectRejected(member('archive/code/__torch__.py'), /unexpected member "archive\/code\/__torch__\.py" \(a TorchScript archive: use torch\.jit\.load, not supported here\)/);
  });

  it('two data.pkl, or members outside the data.pkl folder', async () => {
    await expectRejected(torchZip(pickle(OP.NONE), {}, { extra: [{ name: 'other/data.pkl', data: pickle(OP.NONE) }] }), '2 data.pkl members ("archive/data.pkl", "other/data.pkl"): expected exactly one');
    await expectRejected(torchZip(pickle(OP.NONE), {}, { extra: [{ name: 'other/version', data: ascii('3') }] }), 'member "other/version" is outside the archive folder "archive" that holds data.pkl');
    await expectRejected(buildZip([{ name: 'archive/version', data: ascii('3') }]), 'no <top>/data.pkl member: not a torch checkpoint');
  });

  it('a zip bomb by declared size (100 GB from a few bytes) is refused before inflating', async () => {
    // Sizes past 4 GiB need zip64 fields.
    const bomb = buildZip([{ name: 'archive/data.pkl', data: pickle(OP.NONE), deflate: true, size: 100 * 1024 ** 3 }], { zip64: true });
    await expectRejected(bomb, 'entry "archive/data.pkl": deflated entry declares 107374182400 uncompressed bytes, more than the limit of 1073741824');
    const ratio = buildZip([{ name: 'archive/data.pkl', data: pickle(OP.NONE), deflate: true, size: 10_000_000 }]);
    await expectRejected(ratio, /entry "archive\/data\.pkl": deflated entry declares 10000000 bytes from \d+ compressed bytes, a ratio above 1000 \(zip bomb\?\)/);
  });

  it('a true high-ratio bomb is capped at the declared size while inflating', async () => {
    // 8 MB of zeros deflate to ~8 KB; the entry claims 4 KB, within the ratio limit.
    const zeros = new Uint8Array(8 * 1024 * 1024);
    const bomb = buildZip([{ name: 'archive/data.pkl', data: zeros, deflate: true, size: 4096 }]);
    await expectRejected(bomb, 'entry "archive/data.pkl": deflated data inflates to more than the declared 4096 bytes (zip bomb or corrupt size)');
    // The absolute cap is configurable.
    const honest = buildZip([{ name: 'archive/data.pkl', data: zeros.subarray(0, 100_000), deflate: true }]);
    await expectRejected(honest, /deflated entry declares 100000 uncompressed bytes, more than the limit of 50000/, { maxInflatedBytes: 50_000 });
  });

  it('a deflated storage whose stream is shorter than declared', async () => {
    const good = f32Bytes([1, 2, 3, 4]);
    const p = pickle(dict([str('w'), tensorV2(storage('FloatStorage', '0', 4), 0, [4], [1])]));
    const bytes = torchZip(p, {}, { extra: [{ name: 'archive/data/0', data: good.subarray(0, 12), deflate: true, size: 16, crc: 0 }] });
    await expectRejected(bytes, 'storage "0": entry "archive/data/0": deflated data inflates to 12 bytes, but the directory declares 16');
  });

  it('truncated archives: cut central directory, cut local header, cut data', async () => {
    const p = pickle(dict([str('w'), tensorV2(storage('FloatStorage', '0', 4), 0, [4], [1])]));
    const whole = torchZip(p, { '0': f32Bytes([1, 2, 3, 4]) });
    // Cut inside the central directory: the end record is gone.
    await expectRejected(whole.subarray(0, whole.length - 40), 'not a zip archive, or truncated: no end-of-central-directory record at the end of the file');
    // Bytes missing from a local header: every later offset is off.
    const cutHeader = raw(whole.subarray(0, 10), whole.subarray(20));
    await expectRejected(cutHeader, /central directory: declared at \[\d+, \d+\) but the end records start at \d+ \(truncated, or data before\/inside the archive\)/);
    // Data cut short while the directory still declares it: it would run into the next header.
    const cutData = buildZip([
      { name: 'archive/data.pkl', data: p },
      { name: 'archive/data/0', data: f32Bytes([1, 2, 3, 4]), truncateTo: 10 },
    ]);
    await expectRejected(cutData, /entry "archive\/data\/0": data \[\d+, \d+\) overlaps the central directory at \d+/);
    // A directory entry pointing past the end of the file.
    const lying = torchZip(p, { '0': f32Bytes([1, 2, 3, 4]) });
    const view = new DataView(lying.buffer);
    const cd = view.getUint32(lying.length - 6, true);
    view.setUint32(cd + 42, 1_000_000, true);
    await expectRejected(lying, `entry "archive/data.pkl": local header at offset 1000000 lies past the end of the ${lying.length}-byte file (truncated)`);
    // Only a prefix of the file.
    await expectRejected(whole.subarray(0, 3), 'not a torch checkpoint: expected a zip archive (50 4b 03 04) or a pickle (80 …), found bytes 50 4b 03');
    await expectRejected(whole.subarray(0, 20), 'not a zip archive: 20 bytes is shorter than the 22-byte end-of-central-directory record');
    await expectRejected(whole.subarray(0, 30), 'not a zip archive, or truncated: no end-of-central-directory record at the end of the file');
  });

  it('corrupt data detected by CRC-32, encrypted and unsupported entries, overlapping entries', async () => {
    const p = pickle(OP.NONE);
    await expectRejected(buildZip([{ name: 'archive/data.pkl', data: p, crc: 0x12345678 }]), /entry "archive\/data\.pkl": CRC-32 mismatch: the directory records 0x12345678, the data has 0x[0-9a-f]{8} \(corrupt archive\)/);
    await expectRejected(buildZip([{ name: 'archive/data.pkl', data: p, flags: 1 }]), 'entry "archive/data.pkl": encrypted entries are not supported');
    await expectRejected(buildZip([{ name: 'archive/data.pkl', data: p, method: 12 }]), 'entry "archive/data.pkl": compression method 12 is not supported (only 0 stored and 8 deflated)');
    // A directory entry pointing at another entry's local header.
    const zip = buildZip([
      { name: 'archive/data.pkl', data: p },
      { name: 'archive/version', data: ascii('3') },
    ]);
    const v = new DataView(zip.buffer);
    const cd = v.getUint32(zip.length - 6, true);
    const second = cd + 46 + 'archive/data.pkl'.length;
    v.setUint32(second + 42, 0, true);
    await expectRejected(zip, 'entry "archive/version": local header names a different file than the central directory');
    // An entry whose data covers the next entry (the "overlapping files" zip bomb technique).
    const overlapping = buildZip([
      { name: 'archive/data.pkl', data: p, descriptor: true },
      { name: 'archive/version', data: ascii('3') },
    ]);
    const o = new DataView(overlapping.buffer);
    const ocd = o.getUint32(overlapping.length - 6, true);
    o.setUint32(ocd + 20, p.length + 40, true);
    o.setUint32(ocd + 24, p.length + 40, true);
    const firstEnd = 30 + 'archive/data.pkl'.length;
    await expectRejected(overlapping, `entry "archive/data.pkl": data [${firstEnd}, ${firstEnd + p.length + 40}) overlaps the next entry "archive/version" at ${firstEnd + p.length + 16}`);
  });

  it('storages that claim more data than the archive holds', async () => {
    const huge = pickle(dict([str('w'), tensorV2(storage('FloatStorage', '0', 10n ** 12n), 0, [1000], [1])]));
    await expectRejected(torchZip(huge, { '0': f32Bytes([1, 2]) }), /storage "0" declares 1000000000000 float32 elements \(4000000000000 bytes\), but "archive\/data\/0" holds 8 bytes/);
    const missing = pickle(dict([str('w'), tensorV2(storage('FloatStorage', '7', 1), 0, [1], [1])]));
    await expectRejected(torchZip(missing), /storage "7": the archive has no member "archive\/data\/7"/);
    const badKey = pickle(dict([str('w'), tensorV2(storage('FloatStorage', '../../etc/passwd', 1), 0, [1], [1])]));
    await expectRejected(torchZip(badKey), /storage key must be a decimal string, found "\.\.\/\.\.\/etc\/passwd"/);
  });

  it('shape × dtype larger than the storage, negative strides and offsets', async () => {
    const four = { '0': f32Bytes([1, 2, 3, 4]) };
    const tooBig = pickle(tensorV2(storage('FloatStorage', '0', 4), 0, [3, 2], [2, 1]));
    await expectRejected(
      torchZip(tooBig, four),
      `${PKL}: offset ${tooBig.length - 2} (REDUCE): _rebuild_tensor_v2: a F32 tensor of shape [3, 2], stride [2, 1] and offset 0 needs 24 bytes of storage, but storage "0" has 16 (4 float32 elements)`,
    );
    await expectRejected(torchZip(pickle(tensorV2(storage('FloatStorage', '0', 4), 3, [2], [1])), four), /offset 3 needs 20 bytes of storage, but storage "0" has 16/);
    await expectRejected(torchZip(pickle(tensorV2(storage('FloatStorage', '0', 4), 0, [2, 2], [-1, 1])), four), /_rebuild_tensor_v2: stride\[0\] must not be negative, found -1/);
    await expectRejected(torchZip(pickle(tensorV2(storage('FloatStorage', '0', 4), -1, [2], [1])), four), /_rebuild_tensor_v2: storage offset must not be negative, found -1/);
    await expectRejected(torchZip(pickle(tensorV2(storage('FloatStorage', '0', 4), 0, [2, 3], [1])), four), /_rebuild_tensor_v2: size \[2, 3\] and stride \[1\] have different lengths/);
    await expectRejected(torchZip(pickle(tensorV2(storage('FloatStorage', '0', 4), 0, [2 ** 40, 2 ** 40], [0, 0])), four), /shape \[1099511627776, 1099511627776\] has more than 2\^53 bytes/);
    // A stride-0 view within bounds is fine to describe but too big to materialise under a small cap.
    await expectRejected(torchZip(pickle(dict([str('x'), tensorV2(storage('FloatStorage', '0', 4), 0, [1000, 1000], [0, 0])])), four), 'tensor of shape [1000, 1000] (F32) would take 4000000 bytes, more than the limit of 1000000', { maxTensorBytes: 1_000_000 });
  });
});

describe('malformed pickles', () => {
  it('unknown opcode', async () => {
    await expectRejected(inZip(0xff), `${PKL}: offset 2 (0xff): unknown opcode 0xff`);
  });

  it('stack underflow', async () => {
    await expectRejected(inZip(OP.APPEND), `${PKL}: offset 2 (APPEND): stack underflow: the stack is empty`);
    await expectRejected(inZip(int(1), OP.TUPLE2), `${PKL}: offset 4 (TUPLE2): stack underflow: the stack is empty`);
    await expectRejected(torchZip(raw(OP.PROTO, 2, OP.STOP)), `${PKL}: offset 2 (STOP): stack underflow: STOP found an empty stack`);
    await expectRejected(inZip(OP.BINPUT, 0), `${PKL}: offset 2 (BINPUT): stack underflow: the stack is empty`);
  });

  it('MARK misuse', async () => {
    await expectRejected(inZip(OP.EMPTY_LIST, int(1), OP.APPENDS), `${PKL}: offset 5 (APPENDS): no MARK is open`);
    await expectRejected(inZip(OP.MARK, OP.NONE), `${PKL}: offset 4 (STOP): STOP with 1 MARK(s) still open`);
    await expectRejected(inZip(OP.POP_MARK), `${PKL}: offset 2 (POP_MARK): no MARK is open`);
    await expectRejected(inZip(int(1), OP.MARK, OP.TUPLE1), `${PKL}: offset 5 (TUPLE1): stack underflow: nothing above the last MARK`);
    await expectRejected(inZip(OP.NONE, OP.NONE), `${PKL}: offset 4 (STOP): STOP found 2 values on the stack, expected exactly 1`);
    await expectRejected(inZip(OP.MARK, str('k'), OP.DICT), /\(DICT\): DICT needs key\/value pairs, found an odd number \(1\) of items/);
  });

  it('memo misuse, truncation inside an opcode, bad lengths and protocols', async () => {
    await expectRejected(inZip(OP.BINGET, 3), `${PKL}: offset 2 (BINGET): memo key 3 was never stored`);
    await expectRejected(torchZip(raw(OP.PROTO, 2, OP.BINUNICODE, u32(100), ascii('abc'))), `${PKL}: offset 2 (BINUNICODE): BINUNICODE data: needs 100 bytes, only 3 left`);
    await expectRejected(torchZip(raw(OP.PROTO, 2, OP.NONE)), `${PKL}: offset 3: pickle data ended at byte 3 without a STOP opcode`);
    await expectRejected(inZip(OP.BINBYTES8, u64(2n ** 62n)), /\(BINBYTES8\): BINBYTES8 length: 4611686018427387904 bytes declared, only 1 left/);
    await expectRejected(inZip(OP.LONG4, u32(100_000), new Uint8Array(10)), /\(LONG4\): LONG4 of 100000 bytes exceeds the limit of 1024 bytes/);
    await expectRejected(torchZip(raw(OP.PROTO, 9, OP.NONE, OP.STOP)), `${PKL}: offset 0 (PROTO): unsupported pickle protocol 9 (highest known is 5)`);
    await expectRejected(inZip(OP.NEXT_BUFFER), /\(NEXT_BUFFER\): out-of-band buffers \(protocol 5 NEXT_BUFFER\) are not supported/);
    await expectRejected(inZip([OP.SHORT_BINUNICODE, 2, 0xc3, 0x28]), `${PKL}: offset 2 (SHORT_BINUNICODE): SHORT_BINUNICODE: invalid UTF-8 text`);
    await expectRejected(inZip(OP.EMPTY_DICT, OP.EMPTY_LIST, int(1), OP.SETITEM), /\(SETITEM\): unhashable dict key: a list/);
    await expectRejected(inZip(OP.INT, ascii('12abc\n')), /\(INT\): INT argument "12abc" is not a decimal integer/);
  });

  it('recursive structures built through the memo stop with an error instead of hanging', async () => {
    await expectRejected(inZip(OP.EMPTY_LIST, OP.BINPUT, 0, OP.BINGET, 0, OP.APPEND), 'recursive structure: a list at "0" contains itself');
    await expectRejected(inZip(OP.EMPTY_DICT, OP.BINPUT, 0, str('self'), OP.BINGET, 0, OP.SETITEM), 'recursive structure: a dict at "self" contains itself');
    // A DAG of shared lists 60 deep has 2^60 paths: it must be walked once per container.
    const shared: Part[] = [OP.EMPTY_LIST, OP.BINPUT, 0];
    for (let i = 1; i < 60; i++) shared.push(OP.POP, OP.EMPTY_LIST, OP.MARK, OP.BINGET, i - 1, OP.BINGET, i - 1, OP.APPENDS, OP.BINPUT, i);
    const ckpt = await readTorchCheckpointBytes(inZip(...shared), FILE);
    expect(Array.isArray(ckpt.root)).toBe(true);
  });

  it('nesting deeper than the limit, and value/stack limits', async () => {
    const deep = raw(new Uint8Array(5000).fill(OP.EMPTY_LIST), new Uint8Array(4999).fill(OP.APPEND));
    await expectRejected(inZip(deep), /containers nested deeper than 100 levels at "0\.0\.0/);
    await expectRejected(inZip(new Uint8Array(2000).fill(OP.NONE), OP.MARK, OP.POP_MARK), /stack exceeds the limit of 1000 values/, { pickleLimits: { maxStack: 1000 } });
    await expectRejected(inZip(OP.EMPTY_LIST, raw(...Array.from({ length: 3000 }, () => [OP.EMPTY_LIST, OP.APPEND]))), /more than 2000 values created \(limit\)/, { pickleLimits: { maxValues: 2000 } });
    await expectRejected(torchZip(pickle(OP.NONE), {}, {}), /data\.pkl is \d+ bytes, more than the limit of 3/, { maxPickleBytes: 3 });
  });
});

describe('broken legacy files', () => {
  const magic = pickle(int(0x1950a86a20f9469cfc6cn));
  const version = pickle(int(1001));
  const sysInfo = pickle(dict([str('little_endian'), OP.NEWTRUE]));
  const pid = [OP.MARK, str('storage'), global('torch', 'FloatStorage'), str('5'), str('cpu'), int(2), OP.NONE, OP.TUPLE, OP.BINPERSID];
  const main = pickle(dict([str('w'), tensorV2(pid, 0, [2], [1])]));
  const keys = pickle(list(str('5')));

  it('bad magic number, protocol version, or a malicious main pickle', async () => {
    await expectRejected(raw(pickle(int(12345)), version), 'legacy format: expected the torch magic number 0x1950a86a20f9469cfc6c first, found an int');
    await expectRejected(raw(magic, pickle(int(1000))), 'legacy format: expected protocol version 1001, found 1000');
    await expectRejected(raw(magic, version, sysInfo, pickle(global('os', 'system'), touch, OP.TUPLE1, OP.REDUCE)), /legacy pickle: offset \d+ \(GLOBAL\): global "os\.system" is not allowed/);
    await expectRejected(raw(magic, version, pickle(global('os', 'system'))), /legacy pickle: offset \d+ \(GLOBAL\): global "os\.system" is not allowed here \(plain data expected\)/);
  });

  it('storages missing, truncated, or of the wrong size', async () => {
    const dataAt = magic.length + version.length + sysInfo.length + main.length + keys.length + 8;
    await expectRejected(raw(magic, version, sysInfo, main, keys, u64(2n), f32Bytes([1])), `legacy format: storage "5": data [${dataAt}, ${dataAt + 8}) runs past the end of the ${dataAt + 4}-byte file (truncated)`);
    await expectRejected(raw(magic, version, sysInfo, main, keys, u64(3n), f32Bytes([1, 2, 3])), 'legacy format: storage "5": the file stores 3 elements, the pickle declares 2');
    await expectRejected(raw(magic, version, sysInfo, main, pickle(list())), 'legacy format: storage "5" is used by the pickle but has no data (missing from the key list)');
    await expectRejected(raw(magic, version, sysInfo, main, pickle(list(str('9'), str('5')))), 'legacy format: storage key "9" is listed but never used by the pickle');
    await expectRejected(raw(magic, version, sysInfo, main), /legacy pickle: offset \d+: pickle data ended at byte \d+ without a STOP opcode/);
  });

  it('not a checkpoint at all', async () => {
    await expectRejected(new Uint8Array(0), 'empty file: expected a torch checkpoint');
    await expectRejected(ascii('{"not": "a checkpoint"}'), 'not a torch checkpoint: expected a zip archive (50 4b 03 04) or a pickle (80 …), found bytes 7b 22 6e 6f');
  });
});
