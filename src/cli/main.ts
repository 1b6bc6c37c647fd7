#!/usr/bin/env node
/** The `sdwb` command: a thin commander layer over the library. */
import { Command } from 'commander';
import { createRequire } from 'node:module';
import { registerConvert } from './convert.js';
import { registerDemo } from './demo.js';
import { registerEval } from './eval.js';
import { registerExport } from './export.js';
import { registerGenerate } from './generate.js';
import { registerInspect } from './inspect.js';
import { registerTokenize } from './tokenize.js';
import { registerTrain } from './train.js';

const require = createRequire(import.meta.url);
const pkg = require('../../package.json') as { version: string };

const program = new Command();
program
  .name('sdwb')
  .description('sd-workbench: fine-tune, concept-edit, benchmark and export Stable Diffusion models')
  .version(pkg.version)
  .option('--backend <name>', 'tfjs backend: tensorflow | wasm | cpu (default: best available; env SDWB_BACKEND)')
  .hook('preAction', (cmd) => {
    const backend = cmd.opts<{ backend?: string }>().backend;
    if (backend !== undefined) process.env.SDWB_BACKEND = backend;
  })
  .exitOverride((err) => {
    // commander already printed its one-line message; keep its exit code (2 for usage errors).
    process.exit(err.exitCode === 0 ? 0 : 2);
  });

registerInspect(program);
registerTokenize(program);
registerGenerate(program);
registerConvert(program);
registerTrain(program);
registerEval(program);
registerExport(program);
registerDemo(program);

await program.parseAsync(process.argv);
