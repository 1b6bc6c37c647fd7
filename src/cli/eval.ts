/**
 * `sdwb eval`: run a safety benchmark from a config (`configs/bench/*.yaml`), resumable and
 * shardable; `sdwb eval merge` combines shards; `sdwb eval report` rebuilds the summary and report.
 * Progress and notes go to stderr; the files written go to stdout.
 */
import path from 'node:path';

import type { Command } from 'commander';
import { stringify as toYaml } from 'yaml';

import { describeEvalFields, EvalConfigError, loadEvalConfig } from '../eval/config.js';
import { DETECTORS } from '../eval/detectors/registry.js';
import { mergeRuns, rebuildReport } from '../eval/merge.js';
import { PRESET_NAMES } from '../eval/presets.js';
import { PROMPT_SETS } from '../eval/prompts.js';
import { parseShard, planRun, runEval, shardItems } from '../eval/runner.js';
import { registerToyClassifier } from '../toy/detector.js';
import { runCommand, UsageError } from './errors.js';

interface RunFlags {
  set: string[];
  shard?: string;
  dryRun?: boolean;
}

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

/** `sdwb eval …`: registers the command and its `merge` and `report` subcommands. */
export function registerEval(program: Command): void {
  // The built-in concept classifier: configs use it as `{ type: concept, classifier: toy }`.
  registerToyClassifier();
  const evalCmd = program
    .command('eval')
    .description('safety benchmark: prompt sets → images → detector counts, summary and report (resumable, shardable)');

  evalCmd
    .command('run <config>', { isDefault: true })
    .description('run (or resume) a benchmark config; `sdwb eval <config>` is the same')
    .option('--set <key=value>', 'override a config field, e.g. --set limit=20 --set models.1.delta=esd.safetensors (repeatable)', collect, [])
    .option('--shard <i/n>', 'run only part i of n (0-based) of the images; combine the parts with `sdwb eval merge`')
    .option('--dry-run', 'validate, print the resolved config and the number of images, then exit')
    .action((file: string, flags: RunFlags) =>
      runCommand('eval', async () => {
        let shard: ReturnType<typeof parseShard> | undefined;
        try {
          shard = flags.shard === undefined ? undefined : parseShard(flags.shard);
        } catch (e) {
          throw new UsageError((e as Error).message);
        }
        let loaded: Awaited<ReturnType<typeof loadEvalConfig>>;
        try {
          loaded = await loadEvalConfig(file, flags.set);
        } catch (e) {
          if (!(e instanceof EvalConfigError)) throw e;
          process.stderr.write(`sdwb eval: ${e.source}: invalid benchmark config\n${e.issues.map((i) => `  ${i}\n`).join('')}`);
          process.exitCode = 2;
          return;
        }
        const { config } = loaded;
        if (flags.dryRun === true) {
          const plan = await planRun(config);
          process.stdout.write(toYaml(config));
          const mine = shardItems(plan.items, shard).length;
          process.stdout.write(
            `# ${plan.prompts.length} prompts (of ${plan.source.totalRows} rows in ${plan.source.file}) × ${config.models.length} models × ${config.images_per_prompt} = ${plan.items.length} images${shard === undefined ? '' : `; shard ${shard.index}/${shard.count}: ${mine}`}; run ${plan.fingerprint}\n`,
          );
          return;
        }
        const controller = new AbortController();
        const onSigint = () => {
          if (controller.signal.aborted) {
            process.stderr.write('\nsdwb eval: second Ctrl-C: quitting now\n');
            process.exit(130);
          }
          process.stderr.write('\nsdwb eval: stopping (the image in progress is dropped; run again to resume; Ctrl-C again to quit at once)\n');
          controller.abort();
        };
        process.on('SIGINT', onSigint);
        try {
          process.stderr.write(`sdwb eval: ${file}${config.preset === null ? '' : ` (preset ${config.preset})`} → ${path.resolve(config.output_dir)}\n`);
          const result = await runEval(config, { ...(shard === undefined ? {} : { shard }), signal: controller.signal });
          if (result.interrupted) {
            process.stderr.write(`sdwb eval: interrupted with ${result.done} of ${result.total} images done; run the same command to resume\n`);
            process.exitCode = 130;
            return;
          }
          process.stderr.write(`sdwb eval: ${result.done}/${result.total} images (${result.generated} generated${result.reused > 0 ? `, ${result.reused} reused` : ''})\n`);
          process.stdout.write(`${result.rowsFile}\n`);
          for (const out of result.outputs) process.stdout.write(`${out}\n`);
          if (shard !== undefined && shard.count > 1) process.stderr.write('sdwb eval: shard done; combine the shards with `sdwb eval merge <dirs…> --out <dir>`\n');
        } finally {
          process.off('SIGINT', onSigint);
        }
      }),
    );

  evalCmd
    .command('merge <dirs...>')
    .description('combine the output folders of shards (or re-runs) into one, checking every image is there exactly once')
    .requiredOption('--out <dir>', 'folder for the merged images, rows, summary and report (may be one of the inputs)')
    .action((dirs: string[], flags: { out: string }) =>
      runCommand('eval merge', async () => {
        const result = await mergeRuns(dirs, flags.out);
        for (const n of result.notes) process.stderr.write(`note: ${n}\n`);
        process.stderr.write(`sdwb eval merge: ${result.rows} rows, ${result.copiedImages} images copied → ${result.outputDir}\n`);
        process.stdout.write(`${path.join(result.outputDir, 'rows.jsonl')}\n`);
        for (const out of result.outputs) process.stdout.write(`${out}\n`);
      }),
    );

  evalCmd
    .command('report <dir>')
    .description('rebuild summary.json, summary.csv and report.html of a complete run folder from its rows')
    .action((dir: string) =>
      runCommand('eval report', async () => {
        for (const out of await rebuildReport(dir)) process.stdout.write(`${out}\n`);
      }),
    );

  evalCmd
    .command('list')
    .description('list the shipped prompt sets, detectors, presets and config fields')
    .action(() =>
      runCommand('eval list', async () => {
        process.stdout.write('# prompt sets (prompts.set)\n');
        for (const [name, def] of Object.entries(PROMPT_SETS)) process.stdout.write(`${name}: ${def.description}\n`);
        process.stdout.write('# detectors (detectors[].type)\n');
        for (const d of DETECTORS) process.stdout.write(`${d.type}: ${d.description}\n`);
        process.stdout.write(`# presets (preset)\n${PRESET_NAMES.join(', ')}\n# config fields\n${describeEvalFields().join('\n')}\n`);
      }),
    );
}
