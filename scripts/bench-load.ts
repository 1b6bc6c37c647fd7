// Load benchmark: a full-size SD 1.5 UNet (diffusers names and shapes from the shared manifest)
// stored as F16 safetensors, loaded tensor by tensor into float32 tfjs tensors.
// Phases run in separate processes so each one's memory is measured on its own:
//   1. build: stream the ~1.7 GB F16 file into os.tmpdir() with writeSafetensorsStreaming;
//   2. load:  open it, read every tensor into a fresh Float32Array, wrap it in tf.tensor, and
//             report peak RSS against the float32 weight bytes (target ratio <= 1.3).
// Usage: npx tsx scripts/bench-load.ts   (the temporary file is deleted at the end)

import { spawn } from 'node:child_process';
import { readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import { f16BitsToF32Bits, f32BitsToF32, f32Bits, f32BitsToF16Bits } from '../src/io/dtypes.js';
import { SafetensorsFile, writeSafetensorsStreaming, type TensorEntry } from '../src/io/safetensors.js';

const here = dirname(fileURLToPath(import.meta.url));
const MANIFEST = resolve(here, '../../shared/fixtures/manifests/sd15.json');
const RESULT_PREFIX = 'RESULT ';
const PATTERN_LENGTH = 4099; // prime, so the pattern does not line up with tensor boundaries
const MB = 1e6;

interface ManifestTensor {
  diffusers: string;
  shape: number[];
}

interface BuildResult {
  tensors: number;
  parameters: number;
  fileBytes: number;
  seconds: number;
}

interface LoadResult {
  backend: string;
  tensors: number;
  parameters: number;
  weightBytes: number;
  fileBytes: number;
  baselineRss: number;
  peakRss: number;
  maxRss: number;
  seconds: number;
  zeroCopy: boolean;
  valuesChecked: number;
}

async function unetEntries(): Promise<TensorEntry[]> {
  const manifest = JSON.parse(await readFile(MANIFEST, 'utf8')) as { components: { unet: { tensors: ManifestTensor[] } } };
  return manifest.components.unet.tensors.map((t) => ({ name: t.diffusers, dtype: 'F16' as const, shape: t.shape }));
}

// Deterministic finite half values in [-2, 2]: element i of every tensor is PATTERN[i % length].
function halfPattern(): Uint16Array {
  const pattern = new Uint16Array(PATTERN_LENGTH);
  let state = 12345;
  for (let i = 0; i < pattern.length; i++) {
    state = (state * 1103515245 + 12345) % 2 ** 31;
    pattern[i] = f32BitsToF16Bits(f32Bits((state / 2 ** 31) * 4 - 2));
  }
  return pattern;
}

async function buildPhase(file: string): Promise<BuildResult> {
  const entries = await unetEntries();
  const counts = entries.map((e) => e.shape.reduce((a, b) => a * b, 1));
  const largest = Math.max(...counts);
  // One buffer covers every tensor: producers return views of it, so building needs ~60 MB.
  const pattern = halfPattern();
  const source = new Uint16Array(largest);
  for (let i = 0; i < source.length; i++) source[i] = pattern[i % PATTERN_LENGTH]!;
  const started = performance.now();
  await writeSafetensorsStreaming(file, entries, { format: 'pt', generator: 'sd-workbench scripts/bench-load.ts' }, (_name, entry) =>
    source.subarray(0, entry.shape.reduce((a, b) => a * b, 1)),
  );
  const seconds = (performance.now() - started) / 1000;
  return { tensors: entries.length, parameters: counts.reduce((a, b) => a + b, 0), fileBytes: (await stat(file)).size, seconds };
}

async function loadPhase(file: string): Promise<LoadResult> {
  const tf = await import('@tensorflow/tfjs');
  // The wasm backend's heap is 32-bit (at most 4 GB): 3.4 GB of float32 weights plus its own
  // workspace does not fit, so full-size weights live on the cpu backend.
  await tf.setBackend('cpu');
  await tf.ready();
  const baselineRss = process.memoryUsage.rss();
  let peakRss = baselineRss;
  const sampler = setInterval(() => {
    peakRss = Math.max(peakRss, process.memoryUsage.rss());
  }, 5);

  const pattern = halfPattern();
  const started = performance.now();
  const st = await SafetensorsFile.open(file);
  const tensors: import('@tensorflow/tfjs').Tensor[] = [];
  let parameters = 0;
  let zeroCopy = true;
  let valuesChecked = 0;
  try {
    for (const name of st.keys()) {
      const info = st.info(name);
      const values = new Float32Array(st.elementCount(name));
      await st.readFloat32(name, values);
      // cpu backend: tf.tensor keeps this very Float32Array as the tensor's storage (no copy),
      // so the loader must not reuse or mutate it afterwards.
      const tensor = tf.tensor(values, [...info.shape], 'float32');
      tensors.push(tensor);
      parameters += values.length;
      if (tensors.length <= 3) zeroCopy &&= tf.backend().readSync(tensor.dataId) === values;
      for (let i = 0; i < Math.min(values.length, 64); i++) {
        const expected = f32BitsToF32(f16BitsToF32Bits(pattern[i % PATTERN_LENGTH]!));
        if (values[i] !== expected) throw new Error(`${name}[${i}] = ${values[i]}, expected ${expected}`);
        valuesChecked++;
      }
      peakRss = Math.max(peakRss, process.memoryUsage.rss());
    }
  } finally {
    await st.close();
  }
  const seconds = (performance.now() - started) / 1000;
  clearInterval(sampler);
  peakRss = Math.max(peakRss, process.memoryUsage.rss());
  const result: LoadResult = {
    backend: tf.getBackend(),
    tensors: tensors.length,
    parameters,
    weightBytes: parameters * 4,
    fileBytes: st.size,
    baselineRss,
    peakRss,
    maxRss: process.resourceUsage().maxRSS * 1024,
    seconds,
    zeroCopy,
    valuesChecked,
  };
  tf.dispose(tensors);
  return result;
}

// Runs this script again as a child in the given phase and returns the JSON it reports.
async function runPhase<T>(phase: 'build' | 'load', file: string): Promise<T> {
  const script = fileURLToPath(import.meta.url);
  const child = spawn(process.execPath, [...process.execArgv, script, '--phase', phase, '--file', file], { stdio: ['ignore', 'pipe', 'inherit'] });
  let output = '';
  child.stdout.setEncoding('utf8').on('data', (chunk: string) => (output += chunk));
  const code = await new Promise<number | null>((done) => child.on('close', done));
  const line = output.split('\n').find((l) => l.startsWith(RESULT_PREFIX));
  if (code !== 0 || line === undefined) throw new Error(`${phase} phase failed (exit ${code}):\n${output}`);
  return JSON.parse(line.slice(RESULT_PREFIX.length)) as T;
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const phase = args[args.indexOf('--phase') + 1];
  const fileArg = args[args.indexOf('--file') + 1];
  if (args.includes('--phase') && fileArg !== undefined) {
    const result = phase === 'build' ? await buildPhase(fileArg) : await loadPhase(fileArg);
    process.stdout.write(`${RESULT_PREFIX}${JSON.stringify(result)}\n`);
    return;
  }

  const file = join(tmpdir(), `sdwb-bench-unet-f16-${process.pid}.safetensors`);
  try {
    console.log(`building a full-size SD 1.5 UNet (F16) at ${file} ...`);
    const built = await runPhase<BuildResult>('build', file);
    console.log(
      `  ${built.tensors} tensors, ${built.parameters.toLocaleString('en')} parameters, ${(built.fileBytes / MB).toFixed(0)} MB written in ${built.seconds.toFixed(1)} s (${(built.fileBytes / MB / built.seconds).toFixed(0)} MB/s, streaming writer)`,
    );
    console.log('loading every tensor into float32 tfjs tensors in a fresh process ...');
    const r = await runPhase<LoadResult>('load', file);
    const ratio = r.peakRss / r.weightBytes;
    console.log(`  backend:             ${r.backend} (the wasm backend's heap is limited to 4 GB, too small for full-size float32 weights)`);
    console.log(`  tensors:             ${r.tensors} (${r.parameters.toLocaleString('en')} parameters)`);
    console.log(`  weights (float32):   ${(r.weightBytes / MB).toFixed(0)} MB   (file: ${(r.fileBytes / MB).toFixed(0)} MB F16)`);
    console.log(`  RSS before loading:  ${(r.baselineRss / MB).toFixed(0)} MB (node + tfjs)`);
    console.log(`  peak RSS (sampled):  ${(r.peakRss / MB).toFixed(0)} MB   (getrusage maxRSS: ${(r.maxRss / MB).toFixed(0)} MB)`);
    console.log(`  peak RSS / weights:  ${ratio.toFixed(3)}   (target <= 1.3: ${ratio <= 1.3 ? 'met' : 'NOT met'})`);
    console.log(`  load time:           ${r.seconds.toFixed(2)} s`);
    console.log(`  throughput:          ${(r.fileBytes / MB / r.seconds).toFixed(0)} MB/s of F16 read, ${(r.weightBytes / MB / r.seconds).toFixed(0)} MB/s of float32 produced`);
    console.log(`  tf.tensor zero-copy: ${r.zeroCopy ? 'yes (the cpu backend keeps the given Float32Array)' : 'NO (tf.tensor copied the array)'}; ${r.valuesChecked} values checked against the written pattern`);
    console.log('  note: the file was just written, so it is read from the page cache (a cold read is disk-bound).');
  } finally {
    await rm(file, { force: true });
  }
}

await main();
