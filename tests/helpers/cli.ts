/** Runs the `sdwb` CLI from source (through tsx) as a child process, for end-to-end tests. */
import { execFile } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const exec = promisify(execFile);

/** The package root. */
export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const MAIN = path.join(ROOT, 'src/cli/main.ts');

export interface CliResult {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

export interface CliOptions {
  /** Forces a tfjs backend in the child (SDWB_BACKEND). */
  readonly backend?: 'wasm' | 'cpu';
  readonly timeoutMs?: number;
}

/** `sdwb <args>` with its exit code and output; never throws for a non-zero exit. */
export async function runSdwb(args: readonly string[], opts: CliOptions = {}): Promise<CliResult> {
  try {
    const r = await exec(process.execPath, ['--import', 'tsx', MAIN, ...args], {
      cwd: ROOT,
      maxBuffer: 1 << 26,
      ...(opts.timeoutMs !== undefined ? { timeout: opts.timeoutMs } : {}),
      env: opts.backend !== undefined ? { ...process.env, SDWB_BACKEND: opts.backend } : process.env,
    });
    return { code: 0, stdout: r.stdout, stderr: r.stderr };
  } catch (e) {
    const err = e as { code?: number; stdout?: string; stderr?: string };
    return { code: err.code ?? -1, stdout: err.stdout ?? '', stderr: err.stderr ?? '' };
  }
}
