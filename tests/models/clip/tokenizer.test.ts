/**
 * CLIP tokenizer against transformers' slow CLIPTokenizer outputs (tiny-sd-reference/tokens.json),
 * loaded three ways: the tiny-sd tokenizer folder, OpenAI's original .gz, and the bundled assets.
 */
import { copyFile, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ClipTokenizer, defaultTokenizer, defaultTokenizerDir } from '../../../src/models/clip/tokenizer.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const SHARED = path.resolve(here, '../../../../shared');
const TINY_SD_TOKENIZER = path.join(SHARED, 'fixtures/tiny-sd/tokenizer');
const CLIP_TOKENIZER = path.join(SHARED, 'fixtures/clip-tokenizer');
const BPE_GZ = path.join(SHARED, 'data/clip/bpe_simple_vocab_16e6.txt.gz');
const TOKENS_JSON = path.join(SHARED, 'fixtures/tiny-sd-reference/tokens.json');
const I2P_CSV = path.join(SHARED, 'data/i2p/unsafe-prompts4703.csv');

interface FixturePrompt {
  key: string;
  text: string;
  bpe_tokens: string[];
  input_ids: number[];
  attention_mask: number[];
  untruncated_ids: number[];
  num_untruncated_ids: number;
  truncated: boolean;
}
interface TokensFixture {
  tokenizer: { bos_token_id: number; eos_token_id: number; pad_token_id: number; vocab_size: number; model_max_length: number };
  prompts: FixturePrompt[];
}

const fixture = JSON.parse(await readFile(TOKENS_JSON, 'utf8')) as TokensFixture;
const prompts = fixture.prompts;
const byKey = (key: string): FixturePrompt => {
  const p = prompts.find((x) => x.key === key);
  if (!p) throw new Error(`fixture prompt ${key} missing`);
  return p;
};
const BOS = fixture.tokenizer.bos_token_id;
const EOS = fixture.tokenizer.eos_token_id;

const tempDirs: string[] = [];
async function tempTokenizerDir(files: Record<string, string>, copyVocab = true): Promise<string> {
  const dir = await mkdtemp(path.join(tmpdir(), 'sdwb-clip-tok-'));
  tempDirs.push(dir);
  if (copyVocab) {
    await copyFile(path.join(CLIP_TOKENIZER, 'vocab.json'), path.join(dir, 'vocab.json'));
    await copyFile(path.join(CLIP_TOKENIZER, 'merges.txt'), path.join(dir, 'merges.txt'));
  }
  for (const [name, content] of Object.entries(files)) await writeFile(path.join(dir, name), content);
  return dir;
}
afterAll(async () => {
  await Promise.all(tempDirs.map((d) => rm(d, { recursive: true, force: true })));
});

const loaders: [string, () => Promise<ClipTokenizer>][] = [
  ['tiny-sd tokenizer folder (pretty-printed vocab.json)', () => ClipTokenizer.fromDir(TINY_SD_TOKENIZER)],
  ['bpe_simple_vocab_16e6.txt.gz', () => ClipTokenizer.fromBpeGz(BPE_GZ)],
  ["defaultTokenizer('sd1') (bundled one-line vocab.json)", () => defaultTokenizer('sd1')],
];

describe.each(loaders)('reference prompts via %s', (_name, load) => {
  let tok: ClipTokenizer;
  beforeAll(async () => {
    tok = await load();
  });

  it('covers all 27 fixture prompts and has the fixture special ids', () => {
    expect(prompts).toHaveLength(27);
    expect(tok.bosId).toBe(fixture.tokenizer.bos_token_id);
    expect(tok.eosId).toBe(fixture.tokenizer.eos_token_id);
    expect(tok.padId).toBe(fixture.tokenizer.pad_token_id);
    expect(tok.vocabSize).toBe(fixture.tokenizer.vocab_size);
    expect(tok.modelMaxLength).toBe(fixture.tokenizer.model_max_length);
  });

  it.each(prompts.map((p) => [p.key, p] as const))('%s', (_key, p) => {
    expect(tok.tokenize(p.text)).toEqual(p.bpe_tokens);
    const enc = tok.encodeWithMask(p.text);
    expect(enc.inputIds).toEqual(p.input_ids);
    expect(enc.attentionMask).toEqual(p.attention_mask);
    expect(tok.encode(p.text)).toEqual(p.input_ids);
    const untruncated = tok.encode(p.text, { padding: 'none', truncation: false });
    expect(untruncated).toEqual(p.untruncated_ids);
    expect(untruncated.length).toBe(p.num_untruncated_ids);
    expect(untruncated.length > p.input_ids.length).toBe(p.truncated);
  });
});

describe('token ↔ id maps and decode', () => {
  it('maps the fixture BPE tokens to the fixture ids and back', async () => {
    const tok = await defaultTokenizer('sd1');
    for (const p of prompts) {
      const content = p.untruncated_ids.slice(1, -1);
      expect(p.bpe_tokens.map((t) => tok.tokenToId(t))).toEqual(content);
      expect(content.map((id) => tok.idToToken(id))).toEqual(p.bpe_tokens);
    }
    expect(tok.idToToken(BOS)).toBe('<|startoftext|>');
    expect(tok.idToToken(EOS)).toBe('<|endoftext|>');
    expect(tok.idToToken(fixture.tokenizer.vocab_size)).toBeUndefined();
  });

  it('decodes fixture ids back to the lower-cased prompt', async () => {
    const tok = await defaultTokenizer('sd1');
    for (const key of ['astronaut', 'astronaut_caps', 'van_gogh_style']) {
      const p = byKey(key);
      expect(tok.decode(p.input_ids, { skipSpecialTokens: true })).toBe(
        p.text.toLowerCase().replace(',', ' ,'),
      );
    }
    expect(tok.decode(byKey('astronaut').untruncated_ids)).toBe(
      '<|startoftext|> a photo of an astronaut riding a horse <|endoftext|>',
    );
    expect(() => tok.decode([fixture.tokenizer.vocab_size])).toThrow(/id 49408 is not in the vocabulary/);
  });
});

describe('SD 2.x pad token `!`', () => {
  it('pads with id 0 after EOS when tokenizer_config.json says pad_token "!"', async () => {
    const dir = await tempTokenizerDir({
      'tokenizer_config.json': JSON.stringify({ model_max_length: 77, pad_token: '!', tokenizer_class: 'CLIPTokenizer' }),
    });
    const tok = await ClipTokenizer.fromDir(dir);
    expect(tok.padId).toBe(0);
    // `!` is itself the pad token here and is split out of words (next test), so those prompts differ.
    for (const p of prompts.filter((x) => !x.text.includes('!'))) {
      const enc = tok.encodeWithMask(p.text);
      const kept = p.attention_mask.reduce((a, b) => a + b, 0);
      expect(enc.inputIds.slice(0, kept)).toEqual(p.input_ids.slice(0, kept));
      expect(enc.inputIds.slice(kept)).toEqual(new Array<number>(77 - kept).fill(0));
      expect(enc.attentionMask).toEqual(p.attention_mask);
    }
  });

  it("splits `!` out of words as the pad token, as diffusers' SD 2.x tokenizer does", async () => {
    // Output of transformers' CLIPTokenizer for SD 2.x/XL reported in huggingface/diffusers#4153.
    const expected = [49406, 0, 0, 0, 0, 0, 0, 49407, ...new Array<number>(69).fill(0)];
    const tok = await defaultTokenizer('sd2');
    expect(tok.padId).toBe(0);
    expect(tok.encode('! !! !!!')).toEqual(expected);
    // SD 1.x keeps `!` inside BPE words: the fixture's `!` prompt is the single token `!</w>`.
    const sd1 = await defaultTokenizer('sd1');
    expect(sd1.tokenize('!')).toEqual(byKey('exclamation').bpe_tokens);
  });

  it('lets special_tokens_map.json override tokenizer_config.json, as transformers does', async () => {
    const dir = await tempTokenizerDir({
      'tokenizer_config.json': JSON.stringify({ pad_token: '!' }),
      'special_tokens_map.json': JSON.stringify({
        pad_token: { content: '<|endoftext|>', lstrip: false, normalized: true, rstrip: false, single_word: false },
      }),
    });
    const tok = await ClipTokenizer.fromDir(dir);
    expect(tok.padId).toBe(fixture.tokenizer.pad_token_id);
    expect(tok.encode(byKey('astronaut').text)).toEqual(byKey('astronaut').input_ids);
  });
});

describe('AUTOMATIC1111 chunking', () => {
  let tok: ClipTokenizer;
  beforeAll(async () => {
    tok = await defaultTokenizer('sd1');
  });
  const contentOf = (chunk: number[]): number[] => {
    const inner = chunk.slice(1, -1);
    let end = inner.length;
    while (end > 0 && inner[end - 1] === EOS) end--;
    return inner.slice(0, end);
  };

  it('fixed chunks: the first is the truncated encoding, the rest continue the untruncated ids', () => {
    const p = byKey('long');
    const chunks = tok.encodeChunked(p.text, { chunks: 'fixed' });
    const content = p.untruncated_ids.slice(1, -1);
    expect(chunks).toHaveLength(Math.ceil(content.length / 75));
    expect(chunks[0]).toEqual(p.input_ids);
    for (const c of chunks) {
      expect(c).toHaveLength(77);
      expect(c[0]).toBe(BOS);
      expect(c[76]).toBe(EOS);
    }
    expect(chunks.flatMap(contentOf)).toEqual(content);
  });

  it('a1111 chunks break after the last comma within the last 20 tokens of a full chunk', () => {
    const p = byKey('long');
    const content = p.untruncated_ids.slice(1, -1);
    const lastComma = p.bpe_tokens.slice(0, 75).lastIndexOf(',</w>');
    expect(75 - lastComma).toBeLessThanOrEqual(20);
    const chunks = tok.encodeChunked(p.text);
    expect(chunks).toHaveLength(2);
    for (const c of chunks) {
      expect(c).toHaveLength(77);
      expect(c[0]).toBe(BOS);
      expect(c[76]).toBe(EOS);
    }
    const first = contentOf(chunks[0] ?? []);
    expect(first).toEqual(content.slice(0, lastComma + 1));
    expect(chunks[0]?.slice(lastComma + 2)).toEqual(new Array<number>(77 - lastComma - 2).fill(EOS));
    expect(chunks.flatMap(contentOf)).toEqual(content);
    // With the comma rule off the result is the plain split.
    expect(tok.encodeChunked(p.text, { commaBacktrack: 0 })).toEqual(tok.encodeChunked(p.text, { chunks: 'fixed' }));
  });

  it('uses one chunk up to 75 tokens and a second from 76', () => {
    expect(tok.encodeChunked('')).toEqual([byKey('empty').input_ids]);
    expect(tok.encodeChunked(byKey('len_75').text)).toEqual([byKey('len_75').input_ids]);
    const p76 = byKey('len_76');
    const chunks = tok.encodeChunked(p76.text);
    expect(chunks).toHaveLength(2);
    expect(chunks[0]).toEqual(p76.input_ids);
    expect(contentOf(chunks[1] ?? [])).toEqual(p76.untruncated_ids.slice(76, -1));
  });

  it('pads with 0 after the first EOS for SD 2.x', async () => {
    const sd2 = await defaultTokenizer('sd2');
    const p = byKey('long');
    const content = p.untruncated_ids.slice(1, -1);
    const chunks = sd2.encodeChunked(p.text, { chunks: 'fixed' });
    const second = chunks[1] ?? [];
    const rest = content.slice(75);
    expect(second.slice(0, rest.length + 2)).toEqual([BOS, ...rest, EOS]);
    expect(second.slice(rest.length + 2)).toEqual(new Array<number>(77 - rest.length - 2).fill(0));
  });
});

describe('added tokens (textual inversion)', () => {
  it('matches an added token as one new id, leaving the surrounding ids unchanged', async () => {
    const tok = await defaultTokenizer('sd1');
    const [catId] = tok.addTokens(['<my-cat>']);
    expect(catId).toBe(fixture.tokenizer.vocab_size);
    expect(tok.vocabSize).toBe(fixture.tokenizer.vocab_size + 1);
    expect(tok.tokenToId('<my-cat>')).toBe(catId);
    expect(tok.idToToken(fixture.tokenizer.vocab_size)).toBe('<my-cat>');
    // "a photo of" and "riding a horse" ids come from the fixture's astronaut prompt.
    const astronaut = byKey('astronaut').untruncated_ids;
    expect(tok.encode('a photo of <my-cat> riding a horse', { padding: 'none' })).toEqual([
      BOS,
      ...astronaut.slice(1, 4),
      catId,
      ...astronaut.slice(6, 9),
      EOS,
    ]);
    expect(tok.addTokens(['<other>'])).toEqual([fixture.tokenizer.vocab_size + 1]);
    expect(tok.decode(tok.encode('a photo of <my-cat>', { padding: 'none' }), { skipSpecialTokens: true })).toBe(
      'a photo of <my-cat>',
    );
  });

  it('splits on the placeholder before cleanup: case-sensitive, even inside words', async () => {
    const p = byKey('ti_placeholder');
    const tok = await defaultTokenizer('sd1');
    expect(tok.tokenize(p.text)).toEqual(p.bpe_tokens);
    const [id] = tok.addTokens(['<cat-toy>']);
    const start = p.bpe_tokens.indexOf('<</w>');
    const expected = [...p.bpe_tokens.slice(0, start), '<cat-toy>', ...p.bpe_tokens.slice(start + 5)];
    expect(tok.tokenize(p.text)).toEqual(expected);
    expect(tok.encode(p.text, { padding: 'none' })).toEqual([
      ...p.untruncated_ids.slice(0, start + 1),
      id,
      ...p.untruncated_ids.slice(start + 6),
    ]);
    expect(tok.tokenize(p.text.toUpperCase())).toEqual(p.bpe_tokens);
    // Instances are independent: another default tokenizer has not learned the placeholder.
    expect((await defaultTokenizer('sd1')).tokenize(p.text)).toEqual(p.bpe_tokens);
  });

  it('rejects tokens that already exist', async () => {
    const tok = await defaultTokenizer('sd1');
    expect(() => tok.addTokens(['cat</w>'])).toThrow(/"cat<\/w>" is already in the vocabulary \(id \d+\)/);
    tok.addTokens(['<x>']);
    expect(() => tok.addTokens(['<x>'])).toThrow(/already in the vocabulary/);
    expect(() => tok.addTokens([''])).toThrow(/must not be empty/);
  });

  it('reads added_tokens.json from a tokenizer folder', async () => {
    const p = byKey('ti_placeholder');
    const dir = await tempTokenizerDir({ 'added_tokens.json': JSON.stringify({ '<cat-toy>': 49408 }) });
    const tok = await ClipTokenizer.fromDir(dir);
    expect(tok.vocabSize).toBe(49409);
    expect(tok.tokenize(p.text)).toContain('<cat-toy>');
    expect(tok.encode(p.text, { padding: 'none' })).toContain(49408);
  });
});

describe('properties', () => {
  const fragments = fc.constantFrom(
    '<|endoftext|>', '<|startoftext|>', '<|ENDOFTEXT|>', "'s", "'LL", ',', '!', '\u200d', '\u2028', '\u00a0',
    '\ufeff', '\ud800', '\udfff', '\u0345', 'ſ', 'İ', 'ΑΣ', '東京', '\u0301', '🐱', '👩\u200d🚀', '\t', '\n',
  );
  const text = fc
    .array(fc.oneof(fc.string({ unit: 'binary', maxLength: 12 }), fragments, fc.string({ maxLength: 12 })), { maxLength: 40 })
    .map((parts) => parts.join(''));

  it('encode never throws, always gives 77 ids starting with BOS, and agrees with tokenize', async () => {
    const tok = await defaultTokenizer('sd1');
    fc.assert(
      fc.property(text, (s) => {
        const ids = tok.encode(s);
        expect(ids).toHaveLength(77);
        expect(ids[0]).toBe(49406);
        const tokens = tok.tokenize(s);
        const content = tokens.map((t) => tok.tokenToId(t));
        expect(content.every((id) => id !== undefined)).toBe(true);
        expect(tok.encode(s, { padding: 'none', truncation: false })).toEqual([49406, ...content, 49407]);
        expect(tok.encodeWithMask(s).attentionMask.reduce((a, b) => a + b, 0)).toBe(Math.min(tokens.length + 2, 77));
      }),
      { numRuns: 500 },
    );
  });

  it('chunks always have 77 ids and carry every token id in order', async () => {
    const tok = await defaultTokenizer('sd1');
    fc.assert(
      fc.property(fc.array(fc.constantFrom('cat', 'red apple', ',', 'a, b', 'x'), { maxLength: 200 }), (words) => {
        const s = words.join(' ');
        const ids = tok.encode(s, { padding: 'none', truncation: false }).slice(1, -1);
        const chunks = tok.encodeChunked(s);
        for (const c of chunks) {
          expect(c).toHaveLength(77);
          expect(c[0]).toBe(49406);
          expect(c[76]).toBe(49407);
        }
        expect(chunks.flatMap((c) => c.slice(1, -1).filter((id) => id !== 49407))).toEqual(ids);
      }),
      { numRuns: 200 },
    );
  });
});

describe('malformed files', () => {
  const vocabText = async (): Promise<string> => readFile(path.join(CLIP_TOKENIZER, 'vocab.json'), 'utf8');
  const mergesText = async (): Promise<string> => readFile(path.join(CLIP_TOKENIZER, 'merges.txt'), 'utf8');

  it('names vocab.json when it is missing, not JSON, or not an object of ids', async () => {
    const merges = await mergesText();
    const missing = await tempTokenizerDir({ 'merges.txt': merges }, false);
    await expect(ClipTokenizer.fromDir(missing)).rejects.toThrow(/vocab\.json: cannot read/);
    const notJson = await tempTokenizerDir({ 'vocab.json': '{"a": 1,', 'merges.txt': merges }, false);
    await expect(ClipTokenizer.fromDir(notJson)).rejects.toThrow(/vocab\.json: not valid JSON/);
    const array = await tempTokenizerDir({ 'vocab.json': '["a", "b"]', 'merges.txt': merges }, false);
    await expect(ClipTokenizer.fromDir(array)).rejects.toThrow(/vocab\.json: expected a JSON object of token → id, found an array/);
    const badId = await tempTokenizerDir({ 'vocab.json': '{"a": 0, "b": "1"}', 'merges.txt': merges }, false);
    await expect(ClipTokenizer.fromDir(badId)).rejects.toThrow(/vocab\.json: expected a JSON object of token → id; token "b" has id "1"/);
    const dupId = await tempTokenizerDir({ 'vocab.json': '{"a": 0, "b": 0}', 'merges.txt': merges }, false);
    await expect(ClipTokenizer.fromDir(dupId)).rejects.toThrow(/vocab\.json: id 0 is used by both "a" and "b"/);
  });

  it('names merges.txt when it is missing, headerless, has a bad line, or does not fit the vocab', async () => {
    const vocab = await vocabText();
    const merges = await mergesText();
    const missing = await tempTokenizerDir({ 'vocab.json': vocab }, false);
    await expect(ClipTokenizer.fromDir(missing)).rejects.toThrow(/merges\.txt: cannot read/);
    const headerless = await tempTokenizerDir({ 'vocab.json': vocab, 'merges.txt': 'i n\nt h\n' }, false);
    await expect(ClipTokenizer.fromDir(headerless)).rejects.toThrow(/merges\.txt: expected a '#version: …' header on line 1/);
    const badLine = await tempTokenizerDir({ 'vocab.json': vocab, 'merges.txt': '#version: 0.2\ni n\nt h e\n' }, false);
    await expect(ClipTokenizer.fromDir(badLine)).rejects.toThrow(/merges\.txt line 3: expected two symbols separated by a space, found "t h e"/);
    const shifted = merges.replace('\ni n\n', '\nq z\n');
    const foreign = await tempTokenizerDir({ 'vocab.json': vocab, 'merges.txt': shifted }, false);
    await expect(ClipTokenizer.fromDir(foreign)).rejects.toThrow(/merges\.txt line 2: merge result "qz" is not in .*vocab\.json/);
  });

  it('names tokenizer_config.json for a bad field or an unknown special token', async () => {
    const badField = await tempTokenizerDir({ 'tokenizer_config.json': JSON.stringify({ model_max_length: '77' }) });
    await expect(ClipTokenizer.fromDir(badField)).rejects.toThrow(/tokenizer_config\.json: model_max_length: /);
    const unknownPad = await tempTokenizerDir({ 'tokenizer_config.json': JSON.stringify({ pad_token: '<pad>' }) });
    await expect(ClipTokenizer.fromDir(unknownPad)).rejects.toThrow(/pad_token "<pad>" is not in the vocabulary/);
    const badAdded = await tempTokenizerDir({ 'added_tokens.json': JSON.stringify({ '<x>': 'one' }) });
    await expect(ClipTokenizer.fromDir(badAdded)).rejects.toThrow(/added_tokens\.json: <x>: /);
  });

  it('names the .gz file when it is not gzip or has no merges', async () => {
    const dir = await tempTokenizerDir({ 'plain.txt.gz': 'not gzip', 'empty.txt.gz': '' }, false);
    await writeFile(path.join(dir, 'header-only.txt.gz'), gzipSync('"bpe_simple_vocab_16e6.txt#version: 0.2\n'));
    await expect(ClipTokenizer.fromBpeGz(path.join(dir, 'plain.txt.gz'))).rejects.toThrow(/plain\.txt\.gz: not a gzip-compressed UTF-8 merge list/);
    await expect(ClipTokenizer.fromBpeGz(path.join(dir, 'header-only.txt.gz'))).rejects.toThrow(/header-only\.txt\.gz: no merges found/);
    await expect(ClipTokenizer.fromBpeGz(path.join(dir, 'absent.txt.gz'))).rejects.toThrow(/absent\.txt\.gz: cannot read/);
  });
});

describe('bundled assets and speed', () => {
  it('ships vocab.json and merges.txt identical to the reference files', async () => {
    const dir = await defaultTokenizerDir();
    for (const name of ['vocab.json', 'merges.txt']) {
      const shipped = await readFile(path.join(dir, name));
      const reference = await readFile(path.join(CLIP_TOKENIZER, name));
      expect(shipped.equals(reference)).toBe(true);
    }
  });

  it('tokenizes the 4,703 I2P prompts in well under a second', async () => {
    const csv = await readFile(I2P_CSV, 'utf8');
    const texts = parseCsv(csv)
      .slice(1)
      .map((row) => row[1] ?? '');
    expect(texts).toHaveLength(4703);
    const tok = await ClipTokenizer.fromDir(CLIP_TOKENIZER);
    // CPU time rather than wall time: other test files share the 2 cores.
    const start = process.cpuUsage();
    let count = 0;
    for (const t of texts) count += tok.encode(t).length;
    const used = process.cpuUsage(start);
    expect(count).toBe(4703 * 77);
    // ~0.25 s with a cold word cache on the dev machine.
    expect((used.user + used.system) / 1000).toBeLessThan(1000);
  });
});

/** RFC 4180 rows (quoted fields may hold commas, quotes and newlines). */
function parseCsv(text: string): string[][] {
  const rows: string[][] = [];
  let row: string[] = [];
  let field = '';
  let quoted = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') {
        field += '"';
        i++;
      } else if (c === '"') {
        quoted = false;
      } else {
        field += c;
      }
    } else if (c === '"') {
      quoted = true;
    } else if (c === ',') {
      row.push(field);
      field = '';
    } else if (c === '\n') {
      row.push(field);
      rows.push(row);
      row = [];
      field = '';
    } else if (c !== '\r') {
      field += c;
    }
  }
  if (field !== '' || row.length > 0) {
    row.push(field);
    rows.push(row);
  }
  return rows;
}
