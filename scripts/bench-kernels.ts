/**
 * Benchmark (not a test): our wasm gradient kernels against the cpu backend's, on UNet-like
 * shapes. Usage: tsx scripts/bench-kernels.ts [--quick]
 */
import * as tf from '@tensorflow/tfjs';

import { initBackend } from '../src/backend.js';
import { originalKernel, setConvChunkElems } from '../src/backend/wasm-grad-kernels.js';

const quick = process.argv.includes('--quick');

function timeIt(fn: () => tf.Tensor, minMs: number, maxReps: number): number {
  tf.dispose(fn()); // warm-up: allocations, XNNPACK operator creation
  const times: number[] = [];
  const start = performance.now();
  while (times.length < maxReps && (times.length === 0 || performance.now() - start < minMs)) {
    const t0 = performance.now();
    const out = fn(); // cpu and wasm kernels run synchronously: no read-back needed
    times.push(performance.now() - t0);
    out.dispose();
  }
  times.sort((a, b) => a - b);
  return times[Math.floor(times.length / 2)]!; // median
}

interface ConvShape {
  label: string;
  x: [number, number, number, number];
  k: number;
  co: number;
  stride: number;
}

const SHAPES: ConvShape[] = [
  { label: 'x[2,32,32,64] 3×3 64→64 s1', x: [2, 32, 32, 64], k: 3, co: 64, stride: 1 },
  { label: 'x[2,32,32,64] 3×3 64→64 s2', x: [2, 32, 32, 64], k: 3, co: 64, stride: 2 },
  { label: 'x[2,16,16,128] 3×3 128→128 s1', x: [2, 16, 16, 128], k: 3, co: 128, stride: 1 },
  { label: 'x[2,64,64,4] 3×3 4→32 s1 (conv_in)', x: [2, 64, 64, 4], k: 3, co: 32, stride: 1 },
  { label: 'x[2,32,32,64] 1×1 64→128 s1', x: [2, 32, 32, 64], k: 1, co: 128, stride: 1 },
];

function convFilterGrad(s: ConvShape): () => tf.Tensor {
  const [b, h, w, ci] = s.x;
  const ho = Math.ceil(h / s.stride);
  const wo = Math.ceil(w / s.stride);
  const x = tf.randomNormal(s.x);
  const dy = tf.randomNormal([b, ho, wo, s.co]);
  const attrs = { strides: [s.stride, s.stride], pad: 'same', dataFormat: 'NHWC', filterShape: [s.k, s.k, ci, s.co] };
  return () => tf.engine().runKernel('Conv2DBackpropFilter', { x, dy }, attrs) as tf.Tensor;
}

function flops(s: ConvShape): number {
  const [b, h, w, ci] = s.x;
  return 2 * b * Math.ceil(h / s.stride) * Math.ceil(w / s.stride) * s.k * s.k * ci * s.co;
}

async function main(): Promise<void> {
  const info = await initBackend({ backend: 'wasm' });
  console.log(`node ${process.version}, wasm threads: ${info.threads ?? '?'}\n`);
  console.log('Conv2DBackpropFilter (median ms; GFLOP/s)');
  console.log(`${'shape'.padEnd(38)} ${'wasm'.padStart(16)} ${'cpu'.padStart(18)} ${'speed-up'.padStart(9)}`);
  for (const s of quick ? SHAPES.slice(0, 2) : SHAPES) {
    await tf.setBackend('wasm');
    const wasmMs = timeIt(convFilterGrad(s), 1000, 50);
    await tf.setBackend('cpu');
    const cpuMs = timeIt(convFilterGrad(s), 0, quick ? 1 : 2);
    const g = (ms: number): string => (flops(s) / ms / 1e6).toFixed(1);
    console.log(
      `${s.label.padEnd(38)} ${`${wasmMs.toFixed(2)} (${g(wasmMs)})`.padStart(16)} ${`${cpuMs.toFixed(1)} (${g(cpuMs)})`.padStart(18)} ${`${(cpuMs / wasmMs).toFixed(0)}×`.padStart(9)}`,
    );
  }

  // The kernels we replace on wasm for speed: tfjs's own (native) against ours.
  await tf.setBackend('wasm');
  const backend = tf.engine().backend;
  const viaNative = (name: string, inputs: tf.NamedTensorMap, attrs: Record<string, unknown>) => (): tf.Tensor => {
    const k = originalKernel(name, 'wasm');
    if (k === undefined) throw new Error(`no native ${name}`);
    const out = k({ inputs, backend, attrs: attrs as tf.NamedAttrMap });
    const info = Array.isArray(out) ? out[0]! : out;
    return tf.engine().makeTensorFromTensorInfo(info);
  };
  const row = (label: string, fl: number, native: () => tf.Tensor, ours: () => tf.Tensor): void => {
    const n = timeIt(native, 500, 20);
    const o = timeIt(ours, 500, 50);
    const g = (ms: number): string => (fl / ms / 1e6).toFixed(1);
    console.log(
      `${label.padEnd(44)} ${`${n.toFixed(2)} (${g(n)})`.padStart(16)} ${`${o.toFixed(2)} (${g(o)})`.padStart(16)} ${`${(n / o).toFixed(1)}×`.padStart(7)}`,
    );
  };
  console.log('\nwasm: native kernel vs ours (median ms; GFLOP/s)');
  console.log(`${'op'.padEnd(44)} ${'native'.padStart(16)} ${'ours'.padStart(16)} ${'gain'.padStart(7)}`);
  const s = SHAPES[0]!;
  const x = tf.randomNormal(s.x) as tf.Tensor4D;
  const f = tf.randomNormal([s.k, s.k, s.x[3], s.co]) as tf.Tensor4D;
  const fwd = timeIt(() => tf.conv2d(x, f, 1, 'same'), 500, 50);
  console.log(`${`conv2d forward (reference) ${s.label}`.padEnd(44)} ${`${fwd.toFixed(2)} (${(flops(s) / fwd / 1e6).toFixed(1)})`.padStart(16)}`);
  for (const stride of [1, 2]) {
    const sh: ConvShape = { ...s, stride };
    const ho = Math.ceil(s.x[1] / stride);
    const dy = tf.randomNormal([s.x[0], ho, ho, s.co]);
    const attrs = { strides: [stride, stride], pad: 'same', dataFormat: 'NHWC', inputShape: s.x };
    row(
      `Conv2DBackpropInput x[2,32,32,64] 3×3 s${stride}`,
      flops(sh),
      viaNative('Conv2DBackpropInput', { dy, filter: f }, attrs),
      () => tf.engine().runKernel('Conv2DBackpropInput', { dy, filter: f }, attrs) as tf.Tensor,
    );
  }
  const mm = (label: string, aShape: number[], bShape: number[], ta: boolean, tb: boolean): void => {
    const a = tf.randomNormal(aShape);
    const b = tf.randomNormal(bShape);
    const y = tf.matMul(a, b, ta, tb);
    const k = ta ? aShape[aShape.length - 2]! : aShape[aShape.length - 1]!;
    const fl = 2 * y.size * k;
    y.dispose();
    const attrs = { transposeA: ta, transposeB: tb };
    row(label, fl, viaNative('BatchMatMul', { a, b }, attrs), () => tf.matMul(a, b, ta, tb));
  };
  mm('matMul [1024,320]ᵀ·[1024,1280] (weight grad)', [1024, 320], [1024, 1280], true, false);
  mm('matMul [1024,1280]·[320,1280]ᵀ (input grad)', [1024, 1280], [320, 1280], false, true);
  mm('matMul [2,1024,320]·[320,1280] (3-D linear)', [2, 1024, 320], [320, 1280], false, false);
  mm('matMul [16,256,64]·[16,256,64]ᵀ (QKᵀ)', [16, 256, 64], [16, 256, 64], false, true);
  mm('matMul [16,256,256]·[16,256,64] (AV)', [16, 256, 256], [16, 256, 64], false, false);
  mm('matMul [24,77,64]·[24,77,64]ᵀ (CLIP QKᵀ)', [24, 77, 64], [24, 77, 64], false, true);

  if (!quick) {
    console.log('\nim2col chunk size (floats) vs Conv2DBackpropFilter ms, x[2,64,64,64] 3×3 64→64 s1:');
    const big: ConvShape = { label: '', x: [2, 64, 64, 64], k: 3, co: 64, stride: 1 };
    for (const elems of [1 << 18, 1 << 19, 1 << 20, 1 << 21, 1 << 22, 1 << 24]) {
      const prev = setConvChunkElems(elems);
      const ms = timeIt(convFilterGrad(big), 1000, 20);
      setConvChunkElems(prev);
      console.log(`  ${String(elems).padStart(9)}: ${ms.toFixed(2)} ms (${(flops(big) / ms / 1e6).toFixed(1)} GFLOP/s)`);
    }
  }

  console.log('\nUnsortedSegmentSum, gather gradient of a 49,408×768 table from 154 ids (median ms):');
  for (const backend of ['wasm', 'cpu'] as const) {
    await tf.setBackend(backend);
    const data = tf.randomNormal([154, 768]);
    const ids = tf.randomUniform([154], 0, 49408, 'int32');
    const ms = timeIt(() => tf.unsortedSegmentSum(data, ids as tf.Tensor1D, 49408), 500, 10);
    console.log(`  ${backend.padEnd(5)} ${ms.toFixed(1)} ms`);
  }
}

await main();
