// A dependency-free mutation fuzzer for the safetensors target, for machines where Jazzer.js'
// native libFuzzer addon cannot load (its 4.0.0 prebuilds need glibc >= 2.38 and GLIBCXX_3.4.32).
// Not coverage-guided: it keeps inputs that reach a new outcome (a new error kind or a new
// successful dtype/rank mix) and mutates those, with byte- and JSON-aware mutations.
// The target runs in a worker; the main thread is a watchdog that catches hangs.
// Usage: tsx tests/fuzz/run-local.ts [--seconds 60] [--seed 1] [--out .fuzz-corpus/safetensors-findings]

import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';

import { fuzz } from './safetensors.fuzz.js';
import { fixtureSeeds, generatedSeeds } from './seeds.js';

const MAX_INPUT = 1 << 20;
const HANG_SECONDS = 10;

interface Options {
  seconds: number;
  seed: number;
  out: string;
}

interface WorkerInit {
  seeds: Uint8Array[];
  seed: number;
  seconds: number;
  current: SharedArrayBuffer; // [length: u32][bytes…] of the input being executed
  heartbeat: SharedArrayBuffer; // executions so far
}

type Report =
  | { kind: 'finding'; input: Uint8Array; error: string }
  | { kind: 'done'; executions: number; corpus: number; outcomes: [string, number][] };

function parseOptions(argv: readonly string[]): Options {
  const value = (flag: string, fallback: string): string => {
    const i = argv.indexOf(flag);
    return i >= 0 && argv[i + 1] !== undefined ? argv[i + 1]! : fallback;
  };
  return {
    seconds: Number(value('--seconds', process.env['FUZZ_SECONDS'] ?? '60')),
    seed: Number(value('--seed', String(Date.now() % 2 ** 31))),
    out: value('--out', '.fuzz-corpus/safetensors-findings'),
  };
}

// ----------------------------------------------------------------------------------------------
// Worker: the fuzzing loop.

// xorshift32: reproducible from --seed.
function rng(seed: number): () => number {
  let state = seed >>> 0 || 0x9e3779b9;
  return () => {
    state ^= state << 13;
    state >>>= 0;
    state ^= state >>> 17;
    state ^= state << 5;
    state >>>= 0;
    return state / 2 ** 32;
  };
}

const JSON_TOKENS = [
  '"', '{', '}', '[', ']', ',', ':', ' ', '\\', '\\u0000', '\\ud800', '\\"', 'null', 'true', '-0', '-1', '0', '1',
  '2.5', '1e400', '4294967296', '9007199254740991', '9007199254740993', '18446744073709551616', '"F16"', '"BF16"',
  '"I64"', '"U64"', '"F8_E4M3"', '"BOOL"', '"F4"', '"__metadata__"', '"dtype"', '"shape"', '"data_offsets"', '"__proto__"',
  '{"dtype":"U8","shape":[0],"data_offsets":[0,0]}', '[0,0]', '[]', '{}',
];
const INTERESTING_LENGTHS = [0n, 1n, 2n, 7n, 8n, 100_000_000n, 100_000_001n, 2n ** 32n, 2n ** 53n, 2n ** 63n, 2n ** 64n - 1n];

function mutate(input: Uint8Array, corpus: readonly Uint8Array[], random: () => number): Uint8Array {
  const pick = <T>(items: readonly T[]): T => items[Math.floor(random() * items.length)]!;
  let bytes = input;
  const rounds = 1 + Math.floor(random() * 3);
  for (let r = 0; r < rounds; r++) {
    const at = Math.floor(random() * (bytes.length + 1));
    const choice = random();
    if (choice < 0.15 && bytes.length > 0) {
      bytes = bytes.slice();
      const index = Math.min(at, bytes.length - 1);
      bytes[index] = bytes[index]! ^ (1 << Math.floor(random() * 8));
    } else if (choice < 0.25 && bytes.length > 0) {
      bytes = bytes.slice();
      bytes[Math.min(at, bytes.length - 1)] = pick([0, 0x20, 0x22, 0x2c, 0x5b, 0x5d, 0x7b, 0x7d, 0x7f, 0x80, 0xff]);
    } else if (choice < 0.32) {
      bytes = concat(bytes.subarray(0, at), bytes.subarray(at + 1 + Math.floor(random() * 16)));
    } else if (choice < 0.38) {
      bytes = bytes.subarray(0, at);
    } else if (choice < 0.45) {
      const other = pick(corpus);
      const from = Math.floor(random() * other.length);
      bytes = concat(bytes.subarray(0, at), other.subarray(from, from + Math.floor(random() * 64)), bytes.subarray(at));
    } else if (choice < 0.5 && bytes.length >= 8) {
      bytes = bytes.slice();
      new DataView(bytes.buffer, bytes.byteOffset).setBigUint64(0, BigInt.asUintN(64, pick(INTERESTING_LENGTHS) + BigInt(Math.floor(random() * 3) - 1)), true);
    } else {
      bytes = mutateJson(bytes, random, pick);
    }
  }
  return bytes.length > MAX_INPUT ? bytes.subarray(0, MAX_INPUT) : bytes;
}

// Edits the header text and keeps the length prefix in step, so the edit reaches the JSON checks.
function mutateJson(bytes: Uint8Array, random: () => number, pick: <T>(items: readonly T[]) => T): Uint8Array {
  if (bytes.length < 8) return bytes;
  const declared = new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(0, true);
  if (declared > BigInt(bytes.length - 8)) return bytes;
  const n = Number(declared);
  const json = bytes.subarray(8, 8 + n);
  const data = bytes.subarray(8 + n);
  const text = new TextDecoder().decode(json);
  let edited: string;
  const numbers = [...text.matchAll(/-?\d+(\.\d+)?([eE][+-]?\d+)?/g)];
  if (random() < 0.4 && numbers.length > 0) {
    // Replace a number (a dimension or an offset) by a boundary value or a near neighbour.
    const m = pick(numbers);
    const original = Number(m[0]);
    const replacement = pick([String(original + 1), String(original - 1), String(original * 2), '0', '-1', '2.5', '4294967296', '9007199254740993', '1e400']);
    edited = text.slice(0, m.index) + replacement + text.slice(m.index! + m[0].length);
  } else {
    const at = Math.floor(random() * (text.length + 1));
    edited = text.slice(0, at) + pick(JSON_TOKENS) + text.slice(at + Math.floor(random() * 8));
  }
  const editedBytes = new TextEncoder().encode(edited);
  const out = new Uint8Array(8 + editedBytes.length + (random() < 0.8 ? data.length : Math.floor(random() * (data.length + 16))));
  new DataView(out.buffer).setBigUint64(0, BigInt(editedBytes.length), true);
  out.set(editedBytes, 8);
  out.set(data.subarray(0, out.length - 8 - editedBytes.length), 8 + editedBytes.length);
  return out;
}

function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

// A coarse "outcome" stands in for coverage: the error text without numbers and names, or the
// dtype/rank mix of a successful parse.
async function outcomeOf(input: Uint8Array): Promise<string> {
  try {
    const { SafetensorsFile } = await import('../../src/io/safetensors.js');
    const file = SafetensorsFile.fromBytes(input, 'f');
    return `ok:${[...new Set([...file.tensors.values()].map((t) => `${t.dtype}/${Math.min(t.shape.length, 3)}`))].sort().join(',')}`;
  } catch (error) {
    const message = error instanceof Error ? error.message : String(error);
    // JSON.parse messages quote pieces of the input: keep only their first words.
    const syntax = /found a syntax error \((\w+(?: \w+)?)/.exec(message);
    if (syntax !== null) return `syntax error: ${syntax[1]}`;
    return message.replace(/"(?:[^"\\]|\\.)*"/g, '""').replace(/-?\d+(\.\d+)?(e[+-]?\d+)?/gi, 'N').slice(0, 120);
  }
}

async function workerMain(init: WorkerInit): Promise<void> {
  const random = rng(init.seed);
  const corpus = [...init.seeds];
  const outcomes = new Map<string, number>();
  for (const seed of corpus) outcomes.set(await outcomeOf(seed), 1);
  const current = new Uint8Array(init.current);
  const currentLength = new Uint32Array(init.current, 0, 1);
  const heartbeat = new Int32Array(init.heartbeat);
  const deadline = Date.now() + init.seconds * 1000;
  let executions = 0;
  while (Date.now() < deadline) {
    const input = mutate(corpus[Math.floor(random() * corpus.length)]!, corpus, random);
    currentLength[0] = input.length;
    current.set(input, 4);
    try {
      await fuzz(input);
    } catch (error) {
      parentPort!.postMessage({ kind: 'finding', input, error: error instanceof Error ? `${error.name}: ${error.message}\n${error.stack ?? ''}` : String(error) } satisfies Report);
    }
    executions++;
    Atomics.store(heartbeat, 0, executions);
    if (executions % 8 === 0) {
      const outcome = await outcomeOf(input);
      const seen = outcomes.get(outcome) ?? 0;
      outcomes.set(outcome, seen + 1);
      if (seen === 0 && corpus.length < 5000) corpus.push(input);
    }
  }
  parentPort!.postMessage({ kind: 'done', executions, corpus: corpus.length, outcomes: [...outcomes] } satisfies Report);
}

// ----------------------------------------------------------------------------------------------
// Main thread: start the worker, save findings, watch for hangs.

async function main(): Promise<void> {
  const options = parseOptions(process.argv.slice(2));
  const seeds = [...generatedSeeds().values(), ...(await fixtureSeeds()).values()];
  const current = new SharedArrayBuffer(4 + MAX_INPUT);
  const heartbeat = new SharedArrayBuffer(4);
  const init: WorkerInit = { seeds, seed: options.seed, seconds: options.seconds, current, heartbeat };
  console.log(`fuzzing the safetensors reader for ${options.seconds} s (seed ${options.seed}, ${seeds.length} seeds)`);
  // Loader hooks registered by `tsx` do not reach worker threads on Node 20, so the worker
  // registers tsx itself before importing this file.
  const bootstrap = `import(${JSON.stringify(import.meta.resolve('tsx/esm/api'))}).then((tsx) => { tsx.register(); return import(${JSON.stringify(import.meta.url)}); })`;
  const worker = new Worker(bootstrap, { eval: true, workerData: init });
  const findings: string[] = [];
  const saveFinding = async (input: Uint8Array, error: string): Promise<void> => {
    await mkdir(options.out, { recursive: true });
    const path = join(options.out, `finding-${findings.length}.safetensors`);
    await writeFile(path, input);
    await writeFile(`${path}.txt`, error);
    findings.push(path);
    console.log(`FINDING ${path}: ${error.split('\n')[0]}`);
  };

  let lastBeat = -1;
  let stalledSince = Date.now();
  const watchdog = setInterval(() => {
    const beat = Atomics.load(new Int32Array(heartbeat), 0);
    if (beat !== lastBeat) {
      lastBeat = beat;
      stalledSince = Date.now();
      return;
    }
    if (Date.now() - stalledSince > HANG_SECONDS * 1000) {
      clearInterval(watchdog);
      const length = new Uint32Array(current, 0, 1)[0]!;
      const input = new Uint8Array(current, 4, length).slice();
      void saveFinding(input, `hang: no progress for ${HANG_SECONDS} s`).then(() => worker.terminate());
    }
  }, 500);

  const done = await new Promise<Extract<Report, { kind: 'done' }> | undefined>((resolvePromise) => {
    worker.on('message', (report: Report) => {
      if (report.kind === 'finding') void saveFinding(report.input, report.error);
      else resolvePromise(report);
    });
    worker.on('error', (error) => {
      console.error(`worker crashed: ${error.stack ?? error.message}`);
      resolvePromise(undefined);
    });
    worker.on('exit', () => resolvePromise(undefined));
  });
  clearInterval(watchdog);
  await worker.terminate();
  if (done !== undefined) {
    console.log(`${done.executions} executions (${Math.round(done.executions / options.seconds)}/s), corpus ${done.corpus}, ${done.outcomes.length} distinct outcomes`);
    const parsed = done.outcomes.filter(([o]) => o.startsWith('ok:'));
    console.log(`sampled outcomes: ${parsed.reduce((n, [, c]) => n + c, 0)} valid files of ${parsed.length} dtype/rank mixes; most frequent:`);
    for (const [outcome, count] of done.outcomes.sort((a, b) => b[1] - a[1]).slice(0, 25)) console.log(`  ${String(count).padStart(7)}  ${outcome}`);
  }
  console.log(findings.length === 0 ? 'no findings' : `${findings.length} findings in ${options.out}`);
  process.exitCode = findings.length === 0 && done !== undefined ? 0 : 1;
}

if (isMainThread) {
  await main();
} else {
  await workerMain(workerData as WorkerInit);
}
