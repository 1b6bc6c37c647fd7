/**
 * Toy measurements read from eval rows: target labels round-trip, the classifier's top label per
 * head decides a hit, and prompt sets are seeded and well-formed captions.
 */
import { describe, expect, it } from 'vitest';

import type { ResultRow } from '../../src/eval/rows.js';
import { HEAD_NAMES, HEADS } from '../../src/toy/classifier.js';
import { conceptName } from '../../src/toy/detector.js';
import { accuracyOf, headHit, labelRate, parseTargetLabel, promptsCsv, rowHits, scenePrompts, targetLabel } from '../../src/toy/eval.js';
import { parseCaption } from '../../src/toy/world.js';

/** A row whose toy detector puts 0.9 on the given labels and spreads the rest. */
function row(label: string, top: Record<string, string>): ResultRow {
  const detections = HEAD_NAMES.flatMap((h) => (HEADS[h] as readonly string[]).map((l) => ({ label: conceptName(h, l), score: top[h] === l ? 0.9 : 0.1 / HEADS[h].length })));
  return { key: `m/p/0`, label, model: 'm', detectors: { toy: { version: 'v', detections } } } as unknown as ResultRow;
}

describe('toy eval rows', () => {
  it('labels round-trip and reject unknown heads or values', () => {
    const t = { shape: 'circle', colour: 'red', style: 'solid' };
    expect(targetLabel(t)).toBe('shape=circle colour=red style=solid');
    expect(parseTargetLabel(targetLabel(t))).toEqual(t);
    expect(() => parseTargetLabel('shape=blob')).toThrow(/shape=blob/);
    expect(() => parseTargetLabel('size=big')).toThrow(/size=big/);
  });

  it('hits follow the top label of each asked head', () => {
    const good = row('shape=star colour=blue', { shape: 'star', colour: 'blue', style: 'dotted', background: 'grey' });
    const wrongColour = row('shape=star colour=blue', { shape: 'star', colour: 'red', style: 'dotted', background: 'grey' });
    expect(rowHits(good, 'toy')).toBe(true);
    expect(rowHits(wrongColour, 'toy')).toBe(false);
    expect(headHit(wrongColour, 'toy', 'shape')).toBe(true);
    expect(headHit(wrongColour, 'toy', 'style')).toBe(false); // the label does not ask for a style
    expect(accuracyOf([good, wrongColour], 'toy')).toEqual({ hits: 1, images: 2, rate: 0.5 });
    expect(labelRate([good, wrongColour], 'toy', 'colour', 'red').rate).toBe(0.5);
    expect(() => rowHits(good, 'other')).toThrow(/no results of detector 'other'/);
  });

  it('scene prompts are seeded world captions; the CSV quotes nothing it need not', () => {
    const a = scenePrompts({ shapes: ['circle', 'star'], perShape: 6, styles: ['solid', 'striped'], seed: 3 });
    expect(scenePrompts({ shapes: ['circle', 'star'], perShape: 6, styles: ['solid', 'striped'], seed: 3 })).toEqual(a);
    expect(a).toHaveLength(12);
    for (const p of a) expect(parseCaption(p.prompt)).toEqual(p.target);
    expect(new Set(a.slice(0, 6).map((p) => p.target.colour)).size).toBe(6);
    expect(new Set(a.map((p) => p.seed)).size).toBe(12);
    const csv = promptsCsv(a.slice(0, 1)).split('\n');
    expect(csv[0]).toBe('case_number,prompt,label,evaluation_seed');
    expect(csv[1]).toBe(`${a[0]!.id},${a[0]!.prompt},${targetLabel(a[0]!.target)},${a[0]!.seed}`);
  });
});
