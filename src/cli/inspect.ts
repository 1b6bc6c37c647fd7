import type { Command } from 'commander';
import { inspectModel, type InspectReport, type TensorStats } from '../io/inspect.js';
import { runCommand } from './errors.js';

function formatCount(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)}B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)}M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}k`;
  return String(n);
}

function formatStats(s: TensorStats): string {
  const dtypes = Object.entries(s.dtypes)
    .map(([d, n]) => `${d}×${n}`)
    .join(' ');
  return `${s.tensors} tensors, ${formatCount(s.parameters)} parameters, ${(s.bytes / 2 ** 20).toFixed(1)} MiB [${dtypes}]`;
}

function printReport(r: InspectReport): void {
  const out: string[] = [`${r.path}`, `  format: ${r.format}`, `  architecture: ${r.architecture}`];
  if (r.pipelineClass) out.push(`  pipeline: ${r.pipelineClass}`);
  if (r.stats) out.push(`  weights: ${formatStats(r.stats)}`);
  if (r.metadata && Object.keys(r.metadata).length > 0) {
    out.push(`  metadata: ${Object.keys(r.metadata).join(', ')}`);
  }
  for (const note of r.notes ?? []) out.push(`  note: ${note}`);
  for (const c of r.components) {
    out.push(`  ${c.name} (${c.library}.${c.className})`);
    if (c.weightFiles.length > 0) out.push(`    files: ${c.weightFiles.join(', ')}${c.variant ? ` (variant ${c.variant})` : ''}`);
    if (c.stats) out.push(`    weights: ${formatStats(c.stats)}`);
    if (c.config !== undefined) out.push(`    config: ${JSON.stringify(c.config)}`);
    for (const p of c.problems) out.push(`    problem: ${p}`);
  }
  out.push(r.problems.length === 0 ? '  no problems found' : `  ${r.problems.length} problem(s)`);
  process.stdout.write(`${out.join('\n')}\n`);
}

/** `sdwb inspect`: components, configs, parameter counts, dtypes and problems of a model. */
export function registerInspect(program: Command): void {
  program
    .command('inspect')
    .description('describe a model folder or weights file and check it against its architecture (reads headers only)')
    .argument('<model>', 'diffusers model folder or .safetensors file')
    .option('--json', 'machine-readable report')
    .action((target: string, flags: { json?: boolean }) =>
      runCommand('inspect', async () => {
        const report = await inspectModel(target);
        if (flags.json) process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
        else printReport(report);
        if (report.problems.length > 0) process.exitCode = 1;
      }),
    );
}
