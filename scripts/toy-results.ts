/**
 * Prints the measured tables of docs/results.md from the files that hold them, so the document
 * never carries a number typed by hand:
 *   tsx scripts/toy-results.ts [--summary assets/toy-sd/summary.json] [--demo sdwb-demo/results.json]
 */
import { readFile } from 'node:fs/promises';
import { parseArgs } from 'node:util';

import { layoutText, type DemoResults } from '../src/toy/demo.js';

const { values } = parseArgs({
  options: {
    summary: { type: 'string', default: 'assets/toy-sd/summary.json' },
    demo: { type: 'string', default: 'sdwb-demo/results.json' },
  },
});

interface Base {
  guidance: number;
  images: number;
  shape: Record<string, { rate: number; images: number }>;
  colour: Record<string, { rate: number; images: number }>;
  mean_shape: number;
  mean_colour: number;
  shapes_at_80: number;
}
interface Summary {
  vae_check?: Record<string, number>;
  vae_all_check?: Record<string, number>;
  vae_decoder_check?: Record<string, number>;
  vae_stage?: { steps?: number; all_concepts_steps?: number };
  curve?: Record<string, Base>;
  guidance_search?: Record<string, Base>;
  base?: Base;
}

const pct = (x: number | undefined) => (x === undefined ? '–' : `${(100 * x).toFixed(1)} %`);
const s = JSON.parse(await readFile(values.summary, 'utf8')) as Summary;
const out: string[] = [];

out.push('### VAE: classifier accuracy on reconstructions of 512 fresh scenes (all concepts)', '');
out.push('| VAE | MSE | shape | colour | style | solid | striped | dotted | outlined | checkered |', '|---|---|---|---|---|---|---|---|---|---|');
const steps = (stage: { steps?: number } | undefined) => (stage?.steps === undefined ? '' : `, ${stage.steps} steps`);
for (const [name, v] of [
  [`stage 1: encoder + decoder, pretraining split${steps(s.vae_stage)}`, s.vae_check],
  [`stage 1b: encoder + decoder, every concept${steps({ steps: s.vae_stage?.all_concepts_steps })}`, s.vae_all_check],
  ['decoder fine-tune, every concept', s.vae_decoder_check],
] as const) {
  if (v === undefined) continue;
  out.push(`| ${name} | ${v['mse']!.toFixed(4)} | ${pct(v['shape_accuracy'])} | ${pct(v['colour_accuracy'])} | ${pct(v['style_accuracy'])} | ${['solid', 'striped', 'dotted', 'outlined', 'checkered'].map((st) => pct(v[`style_${st}_accuracy`])).join(' | ')} |`);
}

const shapes = ['circle', 'square', 'triangle', 'star', 'cross'];
const table = (title: string, rows: [string, Base][]) => {
  out.push('', title, '');
  out.push(`| | images | ${shapes.join(' | ')} | mean shape | mean colour |`, `|---|---|${shapes.map(() => '---').join('|')}|---|---|`);
  for (const [k, b] of rows) out.push(`| ${k} | ${b.images} | ${shapes.map((sh) => pct(b.shape[sh]?.rate)).join(' | ')} | ${pct(b.mean_shape)} | ${pct(b.mean_colour)} |`);
};
if (s.curve !== undefined) table('### Base model accuracy against training steps (CFG 4, 25 DDIM steps)', Object.entries(s.curve).sort((a, b) => Number(a[0]) - Number(b[0])).map(([k, v]) => [`step ${k}`, v]));
if (s.guidance_search !== undefined) table('### CFG scale search (final model)', Object.entries(s.guidance_search).map(([k, v]) => [`CFG ${k}`, v]));
if (s.base !== undefined) table(`### Final base model at the chosen CFG ${s.base.guidance}`, [['base', s.base]]);

try {
  const d = JSON.parse(await readFile(values.demo, 'utf8')) as DemoResults;
  out.push('', `### \`sdwb demo\`${d.fast ? ' --fast' : ''} (${d.seconds.toFixed(0)} s; CFG ${d.sampling.guidance}, ${d.sampling.steps} ${d.sampling.sampler} steps, per measurement ${layoutText(d.sampling)})`, '');
  out.push('| check | value | bar | images | result |', '|---|---|---|---|---|');
  for (const c of d.checks) {
    const v = c.id === 'base.shapes_at_80' ? String(c.value) : pct(c.value);
    const t = c.id === 'base.shapes_at_80' ? String(c.threshold) : pct(c.threshold);
    out.push(`| ${c.id}: ${c.description} | ${v} | ${c.op} ${t} | ${c.images} | ${c.pass ? 'pass' : c.met ? 'met, too few images' : '**fail**'} |`);
  }
  out.push('', '| row | what | rate | hits / images | mean classifier probability of the target |', '|---|---|---|---|---|');
  for (const [k, r] of Object.entries(d.rows)) out.push(`| ${k} | ${r.what} | ${pct(r.rate)} | ${r.hits} / ${r.images} | ${r.mean_score === undefined ? '' : r.mean_score.toFixed(4)} |`);
  out.push('', '| method | steps | time |', '|---|---|---|');
  for (const [k, m] of Object.entries(d.methods)) out.push(`| ${k} | ${m.steps} | ${m.seconds.toFixed(0)} s |`);
} catch (e) {
  out.push('', `(no demo results: ${(e as Error).message})`);
}
process.stdout.write(`${out.join('\n')}\n`);
