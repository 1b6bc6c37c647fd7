/**
 * `sdwb demo`: the workbench's methods on the bundled toy model, measured (see src/toy/demo.ts).
 * The table goes to stdout (or results.json with --json); progress goes to stderr.
 */
import path from 'node:path';

import type { Command } from 'commander';

import { assetPath } from '../assets.js';
import { DemoInterrupted, FAST_SCALE, FULL_SCALE, runDemo } from '../toy/demo.js';
import { demoTable, writeDemoReport } from '../toy/demo-report.js';
import { runCommand, UsageError } from './errors.js';

interface DemoFlags {
  fast?: boolean;
  out: string;
  json?: boolean;
  model?: string;
}

/** Registers `sdwb demo`. */
export function registerDemo(program: Command): void {
  program
    .command('demo')
    .description('train textual inversion, ESD-x, a hypernetwork and a DreamBooth-LoRA on the bundled toy model and measure each against its bar (results.json, report.html)')
    .option('--fast', 'short training and small rows: shows the direction of each effect in a fraction of the time (bars are not judged)')
    .option('--out <dir>', 'output folder (a finished step is reused when run again)', 'sdwb-demo')
    .option('--json', 'print results.json instead of the table')
    .option('--model <dir>', 'toy model folder (default: the bundled assets/toy-sd)')
    .action((flags: DemoFlags) =>
      runCommand('demo', async () => {
        if (flags.out.trim() === '') throw new UsageError('--out: expected a folder');
        const controller = new AbortController();
        const onSigint = () => {
          process.stderr.write('\nsdwb demo: stopping after the current step (run again to continue)\n');
          controller.abort();
        };
        process.on('SIGINT', onSigint);
        try {
          const backend = process.env.SDWB_BACKEND === 'cpu' ? 'cpu' : 'wasm';
          const results = await runDemo({
            model: flags.model ?? (await assetPath('toy-sd')),
            out: flags.out,
            scale: flags.fast === true ? FAST_SCALE : FULL_SCALE,
            fast: flags.fast === true,
            backend,
            signal: controller.signal,
          });
          const report = await writeDemoReport(path.resolve(flags.out), results);
          if (flags.json === true) process.stdout.write(`${JSON.stringify(results, null, 2)}\n`);
          else process.stdout.write(`${demoTable(results)}\nwrote ${path.join(path.resolve(flags.out), 'results.json')} and ${report}\n`);
        } catch (e) {
          if (e instanceof DemoInterrupted) {
            process.stderr.write(`sdwb demo: ${e.message}; finished steps are kept in ${flags.out}\n`);
            process.exitCode = 130;
            return;
          }
          throw e;
        } finally {
          process.off('SIGINT', onSigint);
        }
      }),
    );
}
