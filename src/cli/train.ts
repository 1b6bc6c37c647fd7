import path from 'node:path';

import type { Command } from 'commander';
import { stringify as toYaml } from 'yaml';

import { getMethod, METHODS, trainingConfigSchema } from '../methods/registry.js';
import { readCheckpoint } from '../train/checkpoint.js';
import {
  applyOverrides,
  ConfigError,
  describeFields,
  parseOverride,
  parseTrainingConfig,
  readConfigFile,
  type RawConfig,
} from '../train/config.js';
import { train } from '../train/loop.js';
import { runCommand, UsageError } from './errors.js';

interface TrainFlags {
  set: string[];
  resume?: string | true;
  dryRun?: boolean;
  fields?: string | true;
  methods?: boolean;
}

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

/** `sdwb train`: run a training config (YAML/JSON), with --set overrides, resume and Ctrl-C checkpoints. */
export function registerTrain(program: Command): void {
  program
    .command('train')
    .description('train a method from a config file (YAML or JSON); Ctrl-C saves a checkpoint, --resume continues')
    .argument('[config]', 'run config (.yaml/.yml/.json); optional with --resume <checkpoint folder>')
    .option('--set <key=value>', 'override a config field, e.g. --set steps=100 --set data.dir=imgs (repeatable)', collect, [])
    .option('--resume [checkpoint]', "continue from a checkpoint folder, or 'latest' in output_dir (the default)")
    .option('--dry-run', 'validate and print the resolved config, then exit')
    .option('--fields [method]', 'list the config fields of a method (or all methods) with defaults, then exit')
    .option('--methods', 'list the training methods, then exit')
    .action((file: string | undefined, flags: TrainFlags) =>
      runCommand('train', async () => {
        if (flags.methods === true) {
          for (const m of METHODS) process.stdout.write(`${m.id}: ${m.description}\n`);
          return;
        }
        if (flags.fields !== undefined) {
          const methods = flags.fields === true ? METHODS : [getMethod(flags.fields)];
          for (const m of methods) {
            process.stdout.write(`# method: ${m.id}\n${describeFields(m.configSchema).join('\n')}\n`);
          }
          return;
        }
        let resume = flags.resume === true ? 'latest' : flags.resume;
        // `sdwb train --resume run.yaml`: commander hands the config to --resume's optional value.
        if (file === undefined && resume !== undefined && /\.(ya?ml|json)$/i.test(resume)) {
          file = resume;
          resume = 'latest';
        }
        let resolved: Awaited<ReturnType<typeof resolveConfig>>;
        try {
          resolved = await resolveConfig(file, resume, flags.set);
        } catch (e) {
          if (!(e instanceof ConfigError)) throw e;
          // One line per issue reads better than the error boundary's single joined line.
          process.stderr.write(`sdwb train: ${e.source}: invalid training config\n${e.issues.map((i) => `  ${i}\n`).join('')}`);
          process.exitCode = 2;
          return;
        }
        const { config, source } = resolved;
        if (flags.dryRun === true) {
          process.stdout.write(toYaml(config));
          return;
        }
        const controller = new AbortController();
        const onSigint = () => {
          if (controller.signal.aborted) {
            process.stderr.write('\nsdwb train: second Ctrl-C: quitting without a checkpoint\n');
            process.exit(130);
          }
          process.stderr.write('\nsdwb train: stopping after this step and saving a checkpoint (Ctrl-C again to quit at once)\n');
          controller.abort();
        };
        process.on('SIGINT', onSigint);
        try {
          process.stderr.write(`sdwb train: ${config.method} from ${source}, ${config.steps} steps → ${path.resolve(config.output_dir)}\n`);
          const result = await train(config, { ...(resume === undefined ? {} : { resume }), signal: controller.signal });
          if (result.interrupted) {
            process.stderr.write(`sdwb train: interrupted at step ${result.step}; checkpoint ${result.checkpoint}\n`);
            process.exitCode = 130;
            return;
          }
          for (const out of result.outputs) process.stdout.write(`${out}\n`);
        } finally {
          process.off('SIGINT', onSigint);
        }
      }),
    );
}

async function resolveConfig(file: string | undefined, resume: string | undefined, sets: readonly string[]) {
  const schema = trainingConfigSchema();
  let raw: RawConfig;
  let source: string;
  if (file !== undefined) {
    raw = await readConfigFile(file);
    source = file;
  } else if (resume !== undefined && resume !== 'latest') {
    // The checkpoint carries the config it was trained with.
    const ckpt = await readCheckpoint(path.resolve(resume));
    raw = ckpt.config as RawConfig;
    source = path.join(resume, 'config.json');
  } else if (sets.length > 0) {
    raw = {};
    source = '--set';
  } else {
    throw new UsageError('give a config file (or --resume <checkpoint folder>); see configs/textual-inversion.yaml');
  }
  const config = parseTrainingConfig(applyOverrides(raw, sets.map(parseOverride)), schema, source);
  return { config, source };
}
