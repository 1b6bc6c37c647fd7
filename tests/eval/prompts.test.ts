/**
 * Prompt sources: the shipped sets read with their documented contents (row counts, category
 * counts and seed range from shared/data/PROVENANCE.md), exact int64 seeds, column mapping and
 * the errors a bad file or mapping gives.
 */
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import path from 'node:path';

import { describe, expect, it } from 'vitest';

import { loadPromptSource, parsePromptTable, parseSeedCell, PROMPT_SETS, promptAssetsDir, PromptSourceError, seedText } from '../../src/eval/prompts.js';
import { SHARED } from '../helpers/fixtures.js';

describe('shipped prompt sets', () => {
  it('are byte-identical copies of the shared data, with a licence beside each', async () => {
    const dir = await promptAssetsDir();
    const origin: Record<string, string> = {
      'i2p/unsafe-prompts4703.csv': 'i2p/unsafe-prompts4703.csv',
      'unlearndiffatk/nudity.csv': 'unlearndiffatk/nudity.csv',
      'esd/vangogh_prompts.csv': 'esd/vangogh_prompts.csv',
      'esd/big_artist_prompts.csv': 'esd/big_artist_prompts.csv',
      'esd/small_imagenet_prompts.csv': 'esd/small_imagenet_prompts.csv',
    };
    for (const [asset, shared] of Object.entries(origin)) {
      const hash = (f: string) => createHash('sha256').update(readFileSync(f)).digest('hex');
      expect(hash(path.join(dir, asset)), asset).toBe(hash(path.join(SHARED, 'data', shared)));
    }
    for (const def of Object.values(PROMPT_SETS)) {
      expect(readFileSync(path.join(dir, path.dirname(def.file), 'LICENSE'), 'utf8')).toMatch(/MIT License/);
    }
  });

  it('I2P: 4703 prompts, 931 sexual, case 2260 empty, seeds up to 4290749014', async () => {
    const all = await loadPromptSource({ set: 'i2p' });
    expect(all.prompts).toHaveLength(4703);
    expect(all.totalRows).toBe(4703);
    expect(all.prompts.find((p) => p.id === '2260')!.prompt).toBe('');
    const seeds = all.prompts.map((p) => BigInt(p.seed!));
    expect(seeds.reduce((a, b) => (b > a ? b : a))).toBe(4290749014n);
    expect(seeds.filter((s) => s > 2n ** 31n - 1n)).toHaveLength(2357);
    expect(all.prompts[0]).toMatchObject({ id: '0', row: 0, seed: 4261553411, guidance: 13, categories: ['violence', 'self-harm'] });
    const counts = new Map<string, number>();
    for (const p of all.prompts) for (const c of p.categories) counts.set(c, (counts.get(c) ?? 0) + 1);
    expect(Object.fromEntries(counts)).toEqual({ sexual: 931, shocking: 856, harassment: 824, 'self-harm': 801, violence: 756, 'illegal activity': 727, hate: 231 });
    const sexual = await loadPromptSource({ set: 'i2p', categories: ['sexual'] });
    expect(sexual.prompts).toHaveLength(931);
    const either = await loadPromptSource({ set: 'i2p', categories: ['Hate', 'illegal activity'] });
    expect(either.prompts).toHaveLength(all.prompts.filter((p) => p.categories.includes('hate') || p.categories.includes('illegal activity')).length);
  });

  it('UnlearnDiffAtk nudity: 142 prompts that match the I2P rows of the same case number', async () => {
    const nudity = await loadPromptSource({ set: 'unlearndiffatk-nudity' });
    const i2p = new Map((await loadPromptSource({ set: 'i2p' })).prompts.map((p) => [p.id, p]));
    expect(nudity.prompts).toHaveLength(142);
    for (const p of nudity.prompts) expect(p.prompt, p.id).toBe(i2p.get(p.id)!.prompt);
  });

  it('ESD sets carry their label column and seeds', async () => {
    const vangogh = await loadPromptSource({ set: 'esd-vangogh' });
    expect(vangogh.prompts).toHaveLength(50);
    expect(vangogh.prompts[0]).toMatchObject({ id: '0', prompt: 'A Wheatfield, with Cypresses by Vincent van Gogh', seed: 2219, label: 'Vincent van Gogh' });
    const objects = await loadPromptSource({ set: 'esd-small-imagenet' });
    expect(new Set(objects.prompts.map((p) => p.label)).size).toBe(10);
    expect(objects.prompts[0]).toMatchObject({ prompt: 'Image of cassette player', label: 'cassette player', seed: 4068 });
  });

  it('says which category is unknown', async () => {
    await expect(loadPromptSource({ set: 'i2p', categories: ['sexaul'] })).rejects.toThrow(/'sexaul' never occur in categories \(found: harassment, hate/);
  });
});

describe('seeds', () => {
  it('stay exact past 2^53 and accept what torch.manual_seed accepts', () => {
    expect(parseSeedCell('4290749014')).toBe(4290749014);
    expect(parseSeedCell('9007199254740993')).toBe(9007199254740993n);
    expect(parseSeedCell('18446744073709551615')).toBe(18446744073709551615n);
    expect(parseSeedCell('-9223372036854775808')).toBe(-9223372036854775808n);
    expect(parseSeedCell(' 1234.0 ')).toBe(1234);
    expect(parseSeedCell('')).toBeUndefined();
    expect(() => parseSeedCell('18446744073709551616')).toThrow(/outside torch's range/);
    expect(() => parseSeedCell('12.5')).toThrow(/not an integer/);
    expect(seedText(9007199254740993n)).toBe('9007199254740993');
  });
});

describe('column mapping', () => {
  it('guesses the usual ESD/I2P columns and honours explicit ones', () => {
    const csv = 'idx,text,evaluation_seed,artist\n7,"a, b",9007199254740993,X\n8,c,,Y\n';
    const guessed = parsePromptTable(csv, 't.csv', { prompt: 'text' });
    expect(guessed).toEqual([
      { id: '0', row: 0, line: 2, prompt: 'a, b', seed: 9007199254740993n, categories: [], label: 'X' },
      { id: '1', row: 1, line: 3, prompt: 'c', categories: [], label: 'Y' },
    ]);
    const explicit = parsePromptTable(csv, 't.csv', { prompt: 'text', id: 'idx', seed: null, label: null });
    expect(explicit.map((p) => [p.id, p.seed, p.label])).toEqual([
      ['7', undefined, undefined],
      ['8', undefined, undefined],
    ]);
  });

  it('names the file, line and column of bad rows', () => {
    expect(() => parsePromptTable('prompt,x\na\n', 'b.csv')).toThrow(/b\.csv:2: 1 fields, but the header has 2/);
    expect(() => parsePromptTable('prompt,evaluation_seed\na,1e5\n', 'b.csv')).toThrow(/b\.csv:2: evaluation_seed: seed '1e5' is not an integer/);
    expect(() => parsePromptTable('prompt,case_number\na,1\nb,1\n', 'b.csv')).toThrow(/b\.csv:3: id '1' \(case_number\) repeats the row on line 2/);
    expect(() => parsePromptTable('text\na\n', 'b.csv')).toThrow(PromptSourceError);
    expect(() => parsePromptTable('text\na\n', 'b.csv')).toThrow(/columns\.prompt: no column 'prompt' \(the header has: text\)/);
    expect(() => parsePromptTable('prompt\na\n', 'b.csv', { seed: 'evaluation_seed' })).toThrow(/columns\.seed: no column 'evaluation_seed'/);
  });
});
