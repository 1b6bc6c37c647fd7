/**
 * The CLI's error boundary: every failure becomes one line on stderr and a non-zero exit code.
 * Expected failures (bad files, bad flags) carry their own clear message; only with SDWB_DEBUG=1
 * is a stack trace printed, for bug reports.
 */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UsageError';
  }
}

/** Run a command body, reporting any error as `sdwb <command>: <message>` and exiting 1 (2 for usage). */
export async function runCommand(name: string, body: () => Promise<void>): Promise<void> {
  try {
    await body();
  } catch (e) {
    const err = e instanceof Error ? e : new Error(String(e));
    const oneLine = err.message
      .split('\n')
      .map((l) => l.trim())
      .filter((l) => l !== '')
      .join('; ');
    process.stderr.write(`sdwb ${name}: ${oneLine}\n`);
    if (process.env.SDWB_DEBUG === '1' && err.stack) process.stderr.write(`${err.stack}\n`);
    process.exitCode = err instanceof UsageError ? 2 : 1;
  }
}
