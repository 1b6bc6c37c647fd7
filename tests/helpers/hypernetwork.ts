/**
 * Hypernetwork contents with weights large enough to change a UNet visibly (A1111's initial
 * weights are N(0, 0.01) and its LayerNorm weights too, which would make a test near-vacuous),
 * drawn from a seeded generator independent of the code under test.
 */
import { moduleLayout, moduleParams, writeHypernetworkPt, type HypernetworkArch, type HypernetworkFileContents, type ModuleStateDict } from '../../src/methods/hypernetwork-file.js';

/** mulberry32 → Box–Muller: N(0, 1) values from a seed. */
function normals(seed: number): () => number {
  let a = seed >>> 0;
  const uniform = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return () => Math.sqrt(-2 * Math.log(1 - uniform())) * Math.cos(2 * Math.PI * uniform());
}

/** One module's state dict: Linear weights N(0, 1/in), biases N(0, 0.1²), LayerNorm weights 1 + N(0, 0.1²). */
function moduleDict(width: number, arch: HypernetworkArch, next: () => number): ModuleStateDict {
  const norms = new Set(moduleLayout(width, arch).flatMap((l) => (l.kind === 'layer_norm' ? [l.index] : [])));
  const dict = new Map<string, { shape: number[]; data: Float32Array }>();
  for (const { key, shape } of moduleParams(width, arch)) {
    const index = Number(key.split('.')[1]);
    const n = shape.reduce((a, b) => a * b, 1);
    const value = norms.has(index)
      ? key.endsWith('weight')
        ? () => 1 + 0.1 * next()
        : () => 0.1 * next()
      : key.endsWith('weight')
        ? () => next() / Math.sqrt(shape[1]!)
        : () => 0.1 * next();
    dict.set(key, { shape, data: Float32Array.from({ length: n }, value) });
  }
  return dict;
}

/** Contents of a hypernetwork for context `widths` with random (seeded) weights. */
export function testHypernetwork(name: string, widths: readonly number[], arch: HypernetworkArch, seed: number): HypernetworkFileContents {
  const next = normals(seed);
  const modules = new Map<number, readonly [ModuleStateDict, ModuleStateDict]>();
  for (const w of widths) modules.set(w, [moduleDict(w, arch, next), moduleDict(w, arch, next)]);
  return {
    name,
    step: 1,
    arch,
    weightInitialization: 'Normal',
    useDropout: arch.dropoutStructure.some((p) => p > 0),
    sdCheckpoint: null,
    sdCheckpointName: null,
    optionalInfo: null,
    modules,
  };
}

/** Writes {@link testHypernetwork}'s contents as an A1111 .pt file; returns them. */
export async function writeTestHypernetwork(file: string, widths: readonly number[], arch: HypernetworkArch, seed: number): Promise<HypernetworkFileContents> {
  const contents = testHypernetwork(file.replace(/^.*[\\/]/, '').replace(/\.[^.]*$/, ''), widths, arch, seed);
  await writeHypernetworkPt(file, contents);
  return contents;
}
