/**
 * Picks and initialises the tfjs backend for everything that needs gradients.
 *
 * Order (DESIGN.md "Engines"): tfjs-node-gpu, tfjs-node (optional peers the user installs),
 * wasm (our default), cpu. Also registers the gradient kernels wasm lacks and the gradients
 * tfjs lacks everywhere, so callers never see "Kernel 'X' not registered".
 */
import { createRequire } from 'node:module';

import * as tf from '@tensorflow/tfjs';
// Side-effect import: registers the 'wasm' backend factory and its kernels in the shared core.
import '@tensorflow/tfjs-backend-wasm';
import { getThreadsCount } from '@tensorflow/tfjs-backend-wasm';

import { registerGradientGaps } from './backend/gradient-gaps.js';
import { registerGradKernels } from './backend/wasm-grad-kernels.js';

/** tfjs backend names we run on. */
export type BackendName = 'tensorflow' | 'wasm' | 'cpu';

/** What a caller may ask for: a backend, a specific native package, or automatic choice. */
export type BackendRequest = BackendName | 'node-gpu' | 'node' | 'auto';

export interface BackendInfo {
  name: BackendName;
  /** What executes the kernels. */
  kind: 'native-gpu' | 'native' | 'wasm' | 'cpu';
  /** XNNPACK threads (wasm only). */
  threads?: number;
  /** wasm only: whether the SIMD build was loaded. */
  simd?: boolean;
  /** For 'tensorflow': the npm package that provided it. */
  package?: string;
}

export interface InitBackendOptions {
  /** Overrides SDWB_BACKEND and the automatic order. */
  backend?: BackendRequest;
  /** Receives the one line naming the backend (default: stderr). */
  log?: (msg: string) => void;
}

const REQUESTS: readonly BackendRequest[] = ['tensorflow', 'wasm', 'cpu', 'node-gpu', 'node', 'auto'];

const NATIVE_PACKAGES = {
  'node-gpu': '@tensorflow/tfjs-node-gpu',
  node: '@tensorflow/tfjs-node',
} as const;
type NativeFlavour = keyof typeof NATIVE_PACKAGES;

export class BackendUnavailableError extends Error {
  override name = 'BackendUnavailableError';
}

/** Parses a user-supplied backend name (CLI flag, env var). */
export function parseBackendRequest(value: string, source = 'backend'): BackendRequest {
  const v = value.trim().toLowerCase();
  const hit = REQUESTS.find((r) => r === v);
  if (hit === undefined) {
    throw new Error(`${source}='${value}' is not one of: ${REQUESTS.join(', ')}`);
  }
  return hit;
}

type Probe = { ok: true; pkg: string } | { ok: false; pkg: string; installed: boolean; reason: string };
const nativeProbes = new Map<NativeFlavour, Promise<Probe>>();

function errorCode(e: unknown): string | undefined {
  if (typeof e === 'object' && e !== null && 'code' in e) {
    const c = (e as { code: unknown }).code;
    return typeof c === 'string' ? c : undefined;
  }
  return undefined;
}

function errorMessage(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

async function loadNative(flavour: NativeFlavour): Promise<Probe> {
  const pkg = NATIVE_PACKAGES[flavour];
  try {
    createRequire(import.meta.url).resolve(pkg);
  } catch (e) {
    const code = errorCode(e);
    const missing = code === 'MODULE_NOT_FOUND' || code === 'ERR_MODULE_NOT_FOUND';
    return { ok: false, pkg, installed: !missing, reason: missing ? 'not installed' : errorMessage(e) };
  }
  try {
    // A variable specifier keeps TypeScript from requiring the optional peer at compile time.
    const spec: string = pkg;
    await import(spec);
  } catch (e) {
    return { ok: false, pkg, installed: true, reason: `failed to load: ${errorMessage(e)}` };
  }
  const factory: unknown = tf.findBackendFactory('tensorflow');
  if (factory == null) {
    return {
      ok: false,
      pkg,
      installed: true,
      reason:
        "loaded, but did not register the 'tensorflow' backend with our @tensorflow/tfjs " +
        '(version mismatch: it must resolve the same @tensorflow/tfjs-core)',
    };
  }
  return { ok: true, pkg };
}

function probeNative(flavour: NativeFlavour): Promise<Probe> {
  let p = nativeProbes.get(flavour);
  if (p === undefined) {
    p = loadNative(flavour);
    nativeProbes.set(flavour, p);
  }
  return p;
}

function unavailable(requested: string, probe: Probe & { ok: false }): BackendUnavailableError {
  const fix = probe.installed ? `reinstall it (npm i ${probe.pkg})` : `npm i ${probe.pkg}`;
  return new BackendUnavailableError(
    `backend '${requested}' requested but ${probe.pkg} ${probe.installed ? `is installed but ${probe.reason}` : 'is not installed'}: ${fix}`,
  );
}

let current: { request: BackendRequest; info: BackendInfo } | undefined;
let registered = false;

function registerOnce(): void {
  if (registered) return;
  registerGradientGaps();
  // Escape hatch should a wasm speed-up kernel (BatchMatMul, Conv2DBackpropInput) be suspected.
  const fastPaths = process.env['SDWB_WASM_FAST_KERNELS'] !== '0';
  registerGradKernels({ backends: ['wasm', 'cpu'], fastPaths });
  registered = true;
}

/**
 * Registers our kernels and gradient fixes without choosing a backend (initBackend does this
 * too). For code that sets backends itself, e.g. tests comparing cpu and wasm.
 */
export function ensureKernelFixes(): void {
  registerOnce();
}

/** tfjs-backend-cpu prints an "install tfjs-node" banner on first use; our own line says it. */
function quietCpuBanner(): void {
  const b: unknown = tf.findBackend('cpu');
  if (typeof b === 'object' && b !== null && 'firstUse' in b) (b as { firstUse: boolean }).firstUse = false;
}

function describe(info: BackendInfo): string {
  switch (info.kind) {
    case 'native-gpu':
    case 'native':
      return `tfjs backend: tensorflow (${info.package ?? 'tfjs-node'}, libtensorflow${info.kind === 'native-gpu' ? ', CUDA' : ''})`;
    case 'wasm':
      return `tfjs backend: wasm (XNNPACK${info.simd === true ? ', SIMD' : ''}, ${info.threads ?? '?'} thread${info.threads === 1 ? '' : 's'})`;
    case 'cpu':
      return 'tfjs backend: cpu (pure JS, slow: small shapes only; npm i @tensorflow/tfjs-node for native speed)';
  }
}

async function activate(name: BackendName): Promise<boolean> {
  if (tf.getBackend() === name) return true;
  let ok = false;
  try {
    ok = await tf.setBackend(name);
  } catch {
    ok = false;
  }
  if (ok) await tf.ready();
  if (ok && name === 'cpu') quietCpuBanner();
  return ok;
}

async function tryNative(
  flavours: readonly NativeFlavour[],
  requested: string | undefined,
  log: (m: string) => void,
): Promise<BackendInfo | undefined> {
  const failures: (Probe & { ok: false })[] = [];
  for (const flavour of flavours) {
    const probe = await probeNative(flavour);
    if (!probe.ok) {
      // Only worth a line when the user installed it and it is broken.
      if (probe.installed) log(`${probe.pkg} is installed but ${probe.reason}; trying the next backend`);
      failures.push(probe);
      continue;
    }
    if (!(await activate('tensorflow'))) {
      const reason = "the 'tensorflow' backend failed to initialise";
      log(`${probe.pkg} is installed but ${reason}; trying the next backend`);
      failures.push({ ok: false, pkg: probe.pkg, installed: true, reason });
      continue;
    }
    return { name: 'tensorflow', kind: flavour === 'node-gpu' ? 'native-gpu' : 'native', package: probe.pkg };
  }
  if (requested === undefined) return undefined;
  // Prefer explaining a broken install; otherwise point at the CPU package, the one that
  // installs everywhere.
  const broken = failures.find((f) => f.installed);
  const report = broken ?? failures[failures.length - 1];
  if (report === undefined) throw new BackendUnavailableError(`backend '${requested}' unavailable`);
  throw unavailable(requested, report);
}

function wasmInfo(): BackendInfo {
  let threads: number | undefined;
  try {
    threads = getThreadsCount();
  } catch {
    threads = undefined;
  }
  const info: BackendInfo = { name: 'wasm', kind: 'wasm', simd: tf.env().getBool('WASM_HAS_SIMD_SUPPORT') };
  if (threads !== undefined && threads > 0) info.threads = threads;
  return info;
}

async function resolve(request: BackendRequest, log: (m: string) => void): Promise<BackendInfo> {
  const explicit = request === 'auto' ? undefined : request;
  switch (request) {
    case 'node-gpu':
    case 'node': {
      const info = await tryNative([request], request, log);
      if (info === undefined) throw new BackendUnavailableError(`backend '${request}' unavailable`);
      return info;
    }
    case 'tensorflow': {
      const info = await tryNative(['node-gpu', 'node'], explicit, log);
      if (info === undefined) throw new BackendUnavailableError(`backend 'tensorflow' unavailable`);
      return info;
    }
    case 'wasm':
      if (!(await activate('wasm'))) {
        throw new BackendUnavailableError("backend 'wasm' requested but @tensorflow/tfjs-backend-wasm failed to initialise");
      }
      return wasmInfo();
    case 'cpu':
      if (!(await activate('cpu'))) throw new BackendUnavailableError("backend 'cpu' failed to initialise");
      return { name: 'cpu', kind: 'cpu' };
    case 'auto': {
      const native = await tryNative(['node-gpu', 'node'], undefined, log);
      if (native !== undefined) return native;
      if (await activate('wasm')) return wasmInfo();
      log('wasm backend failed to initialise; falling back to cpu');
      if (!(await activate('cpu'))) throw new BackendUnavailableError('no tfjs backend could be initialised');
      return { name: 'cpu', kind: 'cpu' };
    }
  }
}

/**
 * Chooses, initialises and returns the tfjs backend. Safe to call repeatedly: a repeat call with
 * the same choice is a no-op (no second log line); a different choice switches backends.
 */
export async function initBackend(opts: InitBackendOptions = {}): Promise<BackendInfo> {
  const log = opts.log ?? ((m: string) => process.stderr.write(`${m}\n`));
  const env = process.env['SDWB_BACKEND'];
  const request: BackendRequest =
    opts.backend !== undefined
      ? parseBackendRequest(opts.backend, 'backend')
      : env !== undefined && env.trim() !== ''
        ? parseBackendRequest(env, 'SDWB_BACKEND')
        : 'auto';

  registerOnce();
  if (current !== undefined && current.request === request && tf.getBackend() === current.info.name) {
    return { ...current.info };
  }
  const info = await resolve(request, log);
  current = { request, info };
  log(describe(info));
  return { ...info };
}

/** The backend chosen by the last successful initBackend, if any. */
export function currentBackend(): BackendInfo | undefined {
  return current === undefined ? undefined : { ...current.info };
}
