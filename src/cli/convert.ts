import { promises as fs } from 'node:fs';
import type { Command } from 'commander';
import {
  convertDiffusersToSingleFile,
  convertSingleFileToDiffusers,
  isPredictionType,
  readSingleFile,
  writeSingleFile,
  type OutputDType,
} from '../io/single-file.js';
import { runCommand, UsageError } from './errors.js';

interface ConvertFlags {
  to?: string;
  out?: string;
  dtype?: string;
  ema?: boolean;
  predictionType?: string;
  config?: string;
  overwrite?: boolean;
}

/** `sdwb convert`: single-file checkpoint ↔ diffusers folder, safetensors only, written atomically. */
export function registerConvert(program: Command): void {
  program
    .command('convert')
    .description('convert a single-file SD 1.x/2.x checkpoint to a diffusers folder or back (safetensors only; atomic)')
    .argument('<input>', 'a single-file checkpoint (.safetensors) or a diffusers model folder')
    .requiredOption('--to <format>', 'diffusers | single-file')
    .requiredOption('--out <path>', 'output folder (diffusers) or .safetensors file (single-file)')
    .option('--dtype <dtype>', 'fp16 | fp32 (default: keep the stored precision)')
    .option('--ema', 'single file: take the UNet from its EMA weights (model_ema.*)')
    .option('--prediction-type <type>', 'epsilon | v_prediction: what the UNet predicts (cannot be read from weights)')
    .option('--config <path>', 'configs the weights cannot show: a diffusers folder, an original LDM yaml, or a yaml/json of diffusers config overrides')
    .option('--overwrite', 'replace an existing output')
    .action((input: string, flags: ConvertFlags) =>
      runCommand('convert', async () => {
        const to = flags.to;
        if (to !== 'diffusers' && to !== 'single-file') throw new UsageError(`--to: expected diffusers or single-file, found ${JSON.stringify(to)}`);
        const out = flags.out!;
        let dtype: OutputDType = 'keep';
        if (flags.dtype !== undefined) {
          if (flags.dtype !== 'fp16' && flags.dtype !== 'fp32') throw new UsageError(`--dtype: expected fp16 or fp32, found ${JSON.stringify(flags.dtype)}`);
          dtype = flags.dtype;
        }
        if (flags.predictionType !== undefined && !isPredictionType(flags.predictionType)) {
          throw new UsageError(`--prediction-type: expected epsilon or v_prediction, found ${JSON.stringify(flags.predictionType)}`);
        }
        if (to === 'single-file' && !out.endsWith('.safetensors')) throw new UsageError(`--out: a single file is written as .safetensors, found ${JSON.stringify(out)}`);
        const stat = await fs.stat(input).catch(() => undefined);
        if (stat === undefined) throw new Error(`${input}: no such file or folder`);
        const singleFileOpts = {
          dtype,
          overwrite: flags.overwrite === true,
          ...(flags.ema ? { ema: true } : {}),
          ...(flags.predictionType !== undefined && isPredictionType(flags.predictionType) ? { predictionType: flags.predictionType } : {}),
          ...(flags.config !== undefined ? { config: flags.config } : {}),
        };
        let notes: readonly string[];
        if (stat.isDirectory()) {
          if (to === 'diffusers') throw new UsageError(`${input} is already a diffusers folder; use --to single-file`);
          if (flags.ema || flags.predictionType !== undefined || flags.config !== undefined) {
            throw new UsageError('--ema, --prediction-type and --config apply to single-file input; a diffusers folder carries its own configs');
          }
          notes = await convertDiffusersToSingleFile(input, out, { dtype, overwrite: flags.overwrite === true });
        } else if (to === 'diffusers') {
          notes = await convertSingleFileToDiffusers(input, out, singleFileOpts);
        } else {
          // single file → single file: re-save (e.g. fp16, EMA applied, extras dropped) through the same mapping.
          if (!flags.overwrite && (await fs.stat(out).catch(() => undefined)) !== undefined) throw new Error(`${out}: already exists (choose another --out, or --overwrite)`);
          const model = await readSingleFile(input, singleFileOpts);
          try {
            await writeSingleFile(out, model, { dtype });
            notes = model.notes;
          } finally {
            await model.close();
          }
        }
        for (const note of notes) process.stderr.write(`note: ${note}\n`);
        process.stdout.write(`wrote ${out}\n`);
      }),
    );
}
