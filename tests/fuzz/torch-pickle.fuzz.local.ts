// Dependency-free mutation fuzzer for the torch checkpoint target, for machines where Jazzer.js'
// native addon cannot load. Not coverage-guided: an input joins the corpus when it produces an
// outcome not seen before (an error shape, or a successful load's tensor dtype mix). Mutations
// know a little about pickles (opcode bytes, allow-listed globals, length fields).
// The target runs in a worker; the main thread is a watchdog that saves the input of a hang.
// Usage: tsx tests/fuzz/torch-pickle.fuzz.local.ts [--seconds 60] [--seed 1] [--out .fuzz-corpus/torch-pickle-findings]

import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';

import { FUZZ_OPTIONS, fuzz, wrapPickle } from './torch-pickle.fuzz.js';
import { torchPickleSeeds } from './torch-pickle.fuzz.seeds.js';

const MAX_INPUT = 1 << 20;
const HANG_SECONDS = 10;

interface Init {
  seeds: Uint8Array[];
  seed: number;
  seconds: number;
  current: SharedArrayBuffer; // [u32 length][bytes] of the input being run
  beats: SharedArrayBuffer; // executions so far
}

type Message = { kind: 'finding'; input: Uint8Array; error: string } | { kind: 'done'; executions: number; corpus: number; outcomes: [string, number][] };

function option(argv: readonly string[], flag: string, fallback: string): string {
  const i = argv.indexOf(flag);
  return i >= 0 && argv[i + 1] !== undefined ? argv[i + 1]! : fallback;
}

// xorshift32, reproducible from --seed.
function random(seed: number): () => number {
  let s = seed >>> 0 || 0x2545f491;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s / 2 ** 32;
  };
}

const text = (s: string): Uint8Array => new TextEncoder().encode(s);
// Fragments worth splicing in: opcodes with arguments, allowed and refused globals, storage ids.
const TOKENS: Uint8Array[] = [
  ...[0x28, 0x2e, 0x30, 0x31, 0x32, 0x4e, 0x51, 0x52, 0x61, 0x62, 0x65, 0x73, 0x74, 0x75, 0x7d, 0x5d, 0x29, 0x81, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8f, 0x90, 0x91, 0x92, 0x93, 0x94, 0x97, 0x98].map((b) => Uint8Array.of(b)),
  Uint8Array.of(0x68, 0), Uint8Array.of(0x71, 0), Uint8Array.of(0x6a, 0, 0, 0, 0), Uint8Array.of(0x4b, 0xff), Uint8Array.of(0x4a, 0xff, 0xff, 0xff, 0xff),
  Uint8Array.of(0x8a, 8, 0, 0, 0, 0, 0, 0, 0, 0x80), Uint8Array.of(0x58, 0xff, 0xff, 0xff, 0x7f), Uint8Array.of(0x82, 1), Uint8Array.of(0x95, 0xff, 0, 0, 0, 0, 0, 0, 0),
  text('ctorch._utils\n_rebuild_tensor_v2\n'), text('ctorch._utils\n_rebuild_tensor_v3\n'), text('ctorch._utils\n_rebuild_parameter\n'),
  text('ctorch\nFloatStorage\n'), text('ctorch\nHalfStorage\n'), text('ctorch.storage\nUntypedStorage\n'), text('ctorch\nbfloat16\n'),
  text('ccollections\nOrderedDict\n'), text('cnumpy\ndtype\n'), text('cnumpy.core.multiarray\nscalar\n'), text('c_codecs\nencode\n'),
  text('cbuiltins\nset\n'), text('ctorch.nn.modules.container\nParameterDict\n'), text('cos\nsystem\n'), text('ibuiltins\neval\n'),
  text('X\u0007\u0000\u0000\u0000storage'), text('X\u0001\u0000\u0000\u00000'), text('X\u0003\u0000\u0000\u0000cpu'),
];
const WIDE = [0n, 1n, 0x7fn, 0x80n, 0xffn, 0xffffn, 0x7fffffffn, 0xffffffffn, 2n ** 32n, 2n ** 53n, 2n ** 63n, 2n ** 64n - 1n];

function mutate(input: Uint8Array, corpus: readonly Uint8Array[], next: () => number): Uint8Array {
  const pick = <T>(items: readonly T[]): T => items[Math.floor(next() * items.length)]!;
  const mode = input[0] ?? 0;
  let body = input.subarray(1);
  for (let round = 1 + Math.floor(next() * 3); round > 0; round--) {
    const at = Math.floor(next() * (body.length + 1));
    const r = next();
    if (r < 0.2 && body.length > 0) {
      body = body.slice();
      const i = Math.min(at, body.length - 1);
      body[i] = body[i]! ^ (1 << Math.floor(next() * 8));
    } else if (r < 0.3 && body.length > 0) {
      body = body.slice();
      body[Math.min(at, body.length - 1)] = pick([0, 1, 0x7f, 0x80, 0xff, 0x28, 0x2e, 0x52, 0x62, 0x51]);
    } else if (r < 0.4) {
      body = join3(body.subarray(0, at), new Uint8Array(0), body.subarray(at + 1 + Math.floor(next() * 16)));
    } else if (r < 0.45) {
      body = body.subarray(0, at);
    } else if (r < 0.7) {
      body = join3(body.subarray(0, at), pick(TOKENS), body.subarray(at));
    } else if (r < 0.8 && body.length >= 8) {
      body = body.slice();
      const width = pick([2, 4, 8]);
      const where = Math.min(at, body.length - width);
      const value = BigInt.asUintN(width * 8, pick(WIDE) + BigInt(Math.floor(next() * 3) - 1));
      for (let b = 0; b < width; b++) body[where + b] = Number((value >> BigInt(8 * b)) & 0xffn);
    } else {
      const other = pick(corpus).subarray(1);
      const from = Math.floor(next() * other.length);
      body = join3(body.subarray(0, at), other.subarray(from, from + 1 + Math.floor(next() * 64)), body.subarray(at));
    }
  }
  const out = new Uint8Array(Math.min(MAX_INPUT, body.length + 1));
  out[0] = next() < 0.02 ? 1 - (mode & 1) : mode;
  out.set(body.subarray(0, out.length - 1), 1);
  return out;
}

function join3(a: Uint8Array, b: Uint8Array, c: Uint8Array): Uint8Array {
  const out = new Uint8Array(a.length + b.length + c.length);
  out.set(a, 0);
  out.set(b, a.length);
  out.set(c, a.length + b.length);
  return out;
}

// The outcome of an input: the error text with numbers and quoted names blanked, or the dtypes loaded.
async function outcomeOf(input: Uint8Array): Promise<string> {
  const { readTorchCheckpointBytes } = await import('../../src/io/torch-pickle.js');
  try {
    const file = input[0] === 1 ? await wrapPickle(input.subarray(1)) : input.subarray(1);
    const ckpt = await readTorchCheckpointBytes(file, 'f', FUZZ_OPTIONS);
    return `ok:${[...new Set([...ckpt.tensors.values()].map((t) => `${t.dtype}/${Math.min(t.shape.length, 3)}`))].sort().join(',')}`;
  } catch (error) {
    const message = error instanceof Error ? error.message : String(error);
    return message
      .replace(/found bytes [0-9a-f ]+/g, 'found bytes X')
      .replace(/"(?:[^"\\]|\\.)*"/g, '""')
      .replace(/0x[0-9a-f]+|-?\d+/gi, 'N')
      .slice(0, 140);
  }
}

async function workerMain(init: Init): Promise<void> {
  const next = random(init.seed);
  const corpus = [...init.seeds];
  const outcomes = new Map<string, number>();
  for (const s of corpus) outcomes.set(await outcomeOf(s), 1);
  const current = new Uint8Array(init.current);
  const length = new Uint32Array(init.current, 0, 1);
  const beats = new Int32Array(init.beats);
  const deadline = Date.now() + init.seconds * 1000;
  let executions = 0;
  while (Date.now() < deadline) {
    const input = mutate(corpus[Math.floor(next() * corpus.length)]!, corpus, next);
    length[0] = input.length;
    current.set(input, 4);
    try {
      await fuzz(input);
    } catch (error) {
      parentPort!.postMessage({ kind: 'finding', input, error: error instanceof Error ? `${error.name}: ${error.message}\n${error.stack ?? ''}` : String(error) } satisfies Message);
    }
    Atomics.store(beats, 0, ++executions);
    if (executions % 4 === 0) {
      const outcome = await outcomeOf(input);
      const seen = outcomes.get(outcome) ?? 0;
      outcomes.set(outcome, seen + 1);
      if (seen === 0 && corpus.length < 5000) corpus.push(input);
    }
  }
  parentPort!.postMessage({ kind: 'done', executions, corpus: corpus.length, outcomes: [...outcomes] } satisfies Message);
}

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  const seconds = Number(option(argv, '--seconds', process.env['FUZZ_SECONDS'] ?? '60'));
  const seed = Number(option(argv, '--seed', String(Date.now() % 2 ** 31)));
  const out = option(argv, '--out', '.fuzz-corpus/torch-pickle-findings');
  const seeds = [...(await torchPickleSeeds()).values()];
  const current = new SharedArrayBuffer(4 + MAX_INPUT);
  const beats = new SharedArrayBuffer(4);
  console.log(`fuzzing the torch checkpoint reader for ${seconds} s (seed ${seed}, ${seeds.length} seeds)`);
  // tsx's loader hooks do not reach worker threads on Node 20: the worker registers tsx itself.
  const bootstrap = `import(${JSON.stringify(import.meta.resolve('tsx/esm/api'))}).then((tsx) => { tsx.register(); return import(${JSON.stringify(import.meta.url)}); })`;
  const worker = new Worker(bootstrap, { eval: true, workerData: { seeds, seed, seconds, current, beats } satisfies Init });
  const findings: string[] = [];
  const save = async (input: Uint8Array, error: string): Promise<void> => {
    await mkdir(out, { recursive: true });
    const path = join(out, `finding-${findings.length}.bin`);
    findings.push(path);
    await writeFile(path, input);
    await writeFile(`${path}.txt`, error);
    console.log(`FINDING ${path}: ${error.split('\n')[0]}`);
  };
  let last = -1;
  let since = Date.now();
  const watchdog = setInterval(() => {
    const beat = Atomics.load(new Int32Array(beats), 0);
    if (beat !== last) {
      last = beat;
      since = Date.now();
    } else if (Date.now() - since > HANG_SECONDS * 1000) {
      clearInterval(watchdog);
      const n = new Uint32Array(current, 0, 1)[0]!;
      void save(new Uint8Array(current, 4, n).slice(), `hang: no progress for ${HANG_SECONDS} s`).then(() => worker.terminate());
    }
  }, 500);
  const done = await new Promise<Extract<Message, { kind: 'done' }> | undefined>((resolve) => {
    worker.on('message', (m: Message) => {
      if (m.kind === 'finding') void save(m.input, m.error);
      else resolve(m);
    });
    worker.on('error', (error) => {
      console.error(`worker crashed: ${error.stack ?? error.message}`);
      resolve(undefined);
    });
    worker.on('exit', () => resolve(undefined));
  });
  clearInterval(watchdog);
  await worker.terminate();
  if (done !== undefined) {
    console.log(`${done.executions} executions (${Math.round(done.executions / seconds)}/s), corpus ${done.corpus}, ${done.outcomes.length} distinct outcomes`);
    for (const [outcome, count] of done.outcomes.sort((a, b) => b[1] - a[1]).slice(0, 50)) console.log(`  ${String(count).padStart(7)}  ${outcome}`);
  }
  console.log(findings.length === 0 ? 'no findings' : `${findings.length} findings in ${out}`);
  process.exitCode = findings.length === 0 && done !== undefined ? 0 : 1;
}

if (isMainThread) {
  await main();
} else {
  await workerMain(workerData as Init);
}
