/**
 * Runs `sdwb` commands in child processes. The wasm backend uses one core per process, so the
 * demo and `toy:train` put independent work (a second training, half of the images) in a child
 * to use the second core.
 */
import { spawn } from 'node:child_process';
import { open, readFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** The CLI entry beside this module: src/cli/main.ts under tsx, dist/cli/main.js when built. */
export function cliEntry(): string {
  const here = fileURLToPath(import.meta.url);
  return path.join(path.dirname(here), '..', 'cli', `main${path.extname(here)}`);
}

/** `sdwb <args>` in a child process with its output appended to `logFile`; throws with the log's tail on failure. */
export async function runSdwbChild(args: readonly string[], logFile: string, signal?: AbortSignal): Promise<void> {
  const entry = cliEntry();
  // Under tsx the parent's loader flags (--import tsx) are what let the child run the .ts entry.
  const execArgs = entry.endsWith('.ts') ? [...process.execArgv, entry] : [entry];
  const out = await open(logFile, 'a');
  try {
    const child = spawn(process.execPath, [...execArgs, ...args], { stdio: ['ignore', out.fd, out.fd], env: process.env });
    const onAbort = () => child.kill('SIGINT');
    signal?.addEventListener('abort', onAbort);
    const code = await new Promise<number>((resolve, reject) => {
      child.on('error', reject);
      child.on('exit', (c, sig) => resolve(c ?? (sig === null ? 1 : 128)));
    });
    signal?.removeEventListener('abort', onAbort);
    if (code !== 0) {
      const tail = (await readFile(logFile, 'utf8')).trimEnd().split('\n').slice(-3).join(' | ');
      throw new Error(`sdwb ${args.slice(0, 2).join(' ')} (child process) exited with ${code}: ${tail} (log: ${logFile})`);
    }
  } finally {
    await out.close();
  }
}
