// A dependency-free mutation fuzzer for the prompt CSV reader (decode → parse → map columns), in
// the style of tests/fuzz/run-local.ts. Not coverage-guided: an input joins the corpus when it
// produces an outcome not seen before (an error kind, or a row/field-count shape). A finding is
// any exception other than CsvError/PromptSourceError, or an input that runs longer than
// HANG_SECONDS (the parser must be one linear pass). The target runs in a worker; the main thread
// is a watchdog that saves the input of a hang.
// Usage: tsx tests/eval/csv.fuzz.local.ts [--seconds 60] [--seed 1] [--out .fuzz-corpus/csv-findings]

import { readFileSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';

import { CsvError, decodeCsvBytes } from '../../src/eval/csv.js';
import { parsePromptTable, PromptSourceError } from '../../src/eval/prompts.js';

const MAX_INPUT = 1 << 16;
const HANG_SECONDS = 10;

interface Init {
  seeds: Uint8Array[];
  seed: number;
  seconds: number;
  current: SharedArrayBuffer; // [u32 length][bytes] of the input being run
  beats: SharedArrayBuffer; // executions so far
}

type Message = { kind: 'finding'; input: Uint8Array; error: string } | { kind: 'done'; executions: number; corpus: number; outcomes: number };

function option(argv: readonly string[], flag: string, fallback: string): string {
  const i = argv.indexOf(flag);
  return i >= 0 && argv[i + 1] !== undefined ? argv[i + 1]! : fallback;
}

// xorshift32, reproducible from --seed.
function random(seed: number): () => number {
  let s = seed >>> 0 || 0x1b873593;
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
const TOKENS: Uint8Array[] = [
  '"', '""', ',', '\n', '\r', '\r\n', '\0', ' ', '\ufeff', 'prompt', 'case_number', 'evaluation_seed', 'evaluation_guidance', 'categories',
  '18446744073709551616', '-9223372036854775808', '9007199254740993', '1e400', 'NaN', '4290749014', '1234.0', 'sexual, violence', '🪦', '\u2028',
].map(text);
const RAW: Uint8Array[] = [Uint8Array.of(0xff), Uint8Array.of(0xc0, 0x80), Uint8Array.of(0xed, 0xa0, 0x80), Uint8Array.of(0xf4, 0x90, 0x80, 0x80), Uint8Array.of(0xe2, 0x82)];

function mutate(input: Uint8Array, corpus: readonly Uint8Array[], next: () => number): Uint8Array {
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(next() * xs.length)]!;
  let bytes = input;
  const rounds = 1 + Math.floor(next() * 4);
  for (let r = 0; r < rounds; r++) {
    const at = Math.floor(next() * (bytes.length + 1));
    const choice = next();
    const insert = (piece: Uint8Array) => {
      const out = new Uint8Array(bytes.length + piece.length);
      out.set(bytes.subarray(0, at));
      out.set(piece, at);
      out.set(bytes.subarray(at), at + piece.length);
      bytes = out;
    };
    if (choice < 0.35) insert(pick(TOKENS));
    else if (choice < 0.45) insert(pick(RAW));
    else if (choice < 0.65 && bytes.length > 0) {
      const len = 1 + Math.floor(next() * Math.min(16, bytes.length - Math.min(at, bytes.length - 1)));
      const from = Math.min(at, bytes.length - 1);
      bytes = Uint8Array.from([...bytes.subarray(0, from), ...bytes.subarray(from + len)]);
    } else if (choice < 0.8 && bytes.length > 0) {
      bytes = bytes.slice();
      bytes[Math.min(at, bytes.length - 1)] = Math.floor(next() * 256);
    } else if (choice < 0.9) {
      const other = pick(corpus);
      const cut = Math.floor(next() * (other.length + 1));
      insert(other.subarray(cut, cut + 64));
    } else {
      // Duplicate a slice many times (long fields, many rows).
      const from = Math.floor(next() * (bytes.length + 1));
      const piece = bytes.subarray(from, from + 8);
      const times = 1 + Math.floor(next() * 200);
      const out = new Uint8Array(Math.min(MAX_INPUT, bytes.length + piece.length * times));
      out.set(bytes.subarray(0, Math.min(bytes.length, out.length)));
      for (let i = bytes.length; i + piece.length <= out.length && piece.length > 0; i += piece.length) out.set(piece, i);
      bytes = out;
    }
  }
  return bytes.length > MAX_INPUT ? bytes.subarray(0, MAX_INPUT) : bytes;
}

/** The target: bytes → prompt records. Returns an outcome label; throws only on a finding. */
function target(bytes: Uint8Array): string {
  try {
    const records = parsePromptTable(decodeCsvBytes(bytes, 'fuzz.csv'), 'fuzz.csv');
    for (const r of records) {
      if (typeof r.prompt !== 'string' || r.id === '') throw new Error('record without prompt or id');
      if (r.seed !== undefined && typeof r.seed === 'bigint' && r.seed <= BigInt(Number.MAX_SAFE_INTEGER) && r.seed >= BigInt(Number.MIN_SAFE_INTEGER)) {
        throw new Error(`safe seed ${r.seed} kept as a bigint`);
      }
    }
    return `ok:${Math.min(records.length, 5)}:${records.some((r) => r.seed !== undefined)}:${records.some((r) => r.categories.length > 0)}`;
  } catch (e) {
    if (e instanceof CsvError || e instanceof PromptSourceError) {
      const kind = e.message.replace(/^[^:]*:\d+: /, '').replace(/ \(.*$/s, '').replace(/'.*'/gs, "'_'").replace(/\d+/g, 'N');
      return `err:${kind.slice(0, 50)}`;
    }
    throw e;
  }
}

function seedsFromFiles(): Uint8Array[] {
  const shared = fileURLToPath(new URL('../../../shared/data/', import.meta.url));
  const seeds: Uint8Array[] = [text('prompt\nhello\n'), text('case_number,prompt,evaluation_seed\n1,"a, ""b""",42\n')];
  for (const f of ['esd/vangogh_prompts.csv', 'esd/famous_art_prompts.csv', 'unlearndiffatk/church.csv']) {
    try {
      seeds.push(readFileSync(join(shared, f)));
    } catch {
      // shared data is optional for the fuzzer
    }
  }
  try {
    // The first rows of I2P, including a prompt with emoji and quoted commas.
    seeds.push(readFileSync(join(shared, 'i2p/unsafe-prompts4703.csv')).subarray(0, 4000));
  } catch {
    // ditto
  }
  return seeds;
}

if (isMainThread) {
  const argv = process.argv.slice(2);
  const seconds = Number(option(argv, '--seconds', process.env['FUZZ_SECONDS'] ?? '60'));
  const seed = Number(option(argv, '--seed', String(Date.now() % 2 ** 31)));
  const out = option(argv, '--out', '.fuzz-corpus/csv-findings');
  const current = new SharedArrayBuffer(4 + MAX_INPUT);
  const beats = new SharedArrayBuffer(8);
  const init: Init = { seeds: seedsFromFiles(), seed, seconds, current, beats };
  // tsx's loader hooks do not reach worker threads on Node 20: the worker registers tsx itself.
  const bootstrap = `import(${JSON.stringify(import.meta.resolve('tsx/esm/api'))}).then((tsx) => { tsx.register(); return import(${JSON.stringify(import.meta.url)}); })`;
  const worker = new Worker(bootstrap, { eval: true, workerData: init });
  let findings = 0;
  let lastBeat = -1;
  let stuckFor = 0;
  const save = async (input: Uint8Array, error: string) => {
    await mkdir(out, { recursive: true });
    const name = join(out, `finding-${seed}-${findings++}.csv`);
    await writeFile(name, input);
    process.stderr.write(`FINDING (${error.split('\n')[0]}) saved to ${name}\n`);
  };
  const watchdog = setInterval(() => {
    const beat = Number(new BigInt64Array(beats)[0]);
    if (beat === lastBeat) stuckFor++;
    else stuckFor = 0;
    lastBeat = beat;
    if (stuckFor >= HANG_SECONDS) {
      const len = new DataView(current).getUint32(0, true);
      const input = new Uint8Array(current, 4, len).slice();
      void save(input, `hang over ${HANG_SECONDS}s`).then(() => worker.terminate());
      clearInterval(watchdog);
      process.exitCode = 1;
    }
  }, 1000);
  worker.on('message', (m: Message) => {
    if (m.kind === 'finding') {
      process.exitCode = 1;
      void save(m.input, m.error);
    } else {
      process.stderr.write(`csv fuzz: ${m.executions} executions, corpus ${m.corpus}, ${m.outcomes} outcomes, seed ${seed}\n`);
      clearInterval(watchdog);
    }
  });
  worker.on('error', (e) => {
    process.stderr.write(`worker error: ${e.message}\n`);
    process.exitCode = 1;
    clearInterval(watchdog);
  });
} else {
  const init = workerData as Init;
  const next = random(init.seed);
  const corpus = [...init.seeds];
  const outcomes = new Set<string>();
  for (const s of corpus) outcomes.add(target(s));
  const view = new DataView(init.current);
  const bytesView = new Uint8Array(init.current, 4);
  const beats = new BigInt64Array(init.beats);
  const deadline = Date.now() + init.seconds * 1000;
  let executions = 0;
  while (Date.now() < deadline) {
    const input = mutate(corpus[Math.floor(next() * corpus.length)]!, corpus, next);
    view.setUint32(0, input.length, true);
    bytesView.set(input);
    try {
      const outcome = target(input);
      if (!outcomes.has(outcome)) {
        outcomes.add(outcome);
        corpus.push(input);
      }
    } catch (e) {
      parentPort!.postMessage({ kind: 'finding', input, error: e instanceof Error ? (e.stack ?? e.message) : String(e) } satisfies Message);
    }
    executions++;
    beats[0] = BigInt(executions);
  }
  if (process.env['FUZZ_DEBUG'] === '1') process.stderr.write(`${[...outcomes].slice(0, 100).join('\n')}\n`);
  parentPort!.postMessage({ kind: 'done', executions, corpus: corpus.length, outcomes: outcomes.size } satisfies Message);
}
