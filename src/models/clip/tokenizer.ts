/**
 * CLIP's byte-level BPE tokenizer, matching transformers' slow `CLIPTokenizer` as diffusers runs it
 * (without ftfy installed): BERT BasicTokenizer cleanup, CLIP's word regex, BPE with `</w>` word
 * ends, BOS/EOS, truncation to 77 and padding. Plus textual-inversion tokens and AUTOMATIC1111-style
 * chunking of long prompts.
 */
import { access, readFile } from 'node:fs/promises';
import path from 'node:path';
import { gunzipSync } from 'node:zlib';
import { z } from 'zod';
import { assetPath } from '../../assets.js';
import {
  BytePairEncoder,
  byteAlphabet,
  END_OF_WORD,
  parseMergesText,
  vocabFromMerges,
  type Merge,
} from './bpe.js';

// ---------------------------------------------------------------------------------------------
// Text cleanup (BERT BasicTokenizer with do_lower_case, strip_accents=False, do_split_on_punc=False)

/** Unicode "other" (Cc, Cf, Cs, Co, Cn) and U+FFFD are dropped; tab, LF and CR count as spaces instead. */
const DROPPED_CHARS = /(?![\t\n\r])[\p{C}\uFFFD]/gu;
const SPACE_CHARS = /[\t\n\r\p{Zs}]/gu;
/** BERT's "Chinese character" blocks (CJK ideographs, not kana or hangul). */
const CJK_IDEOGRAPHS =
  /[\u3400-\u4DBF\u4E00-\u9FFF\uF900-\uFAFF\u{20000}-\u{2A6DF}\u{2A700}-\u{2B73F}\u{2B740}-\u{2B81F}\u{2B820}-\u{2CEAF}\u{2F800}-\u{2FA1F}]/gu;
const PRINTABLE_ASCII = /^[\x20-\x7e]*$/;
/** Python's str.split() separators (str.isspace); after cleanup only U+2028/U+2029 add to the space. */
const PYTHON_WHITESPACE = /[\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+/u;
/**
 * CLIP's word pattern, compiled in the reference with the `regex` module and IGNORECASE. On
 * lower-cased text that flag still has two effects, spelled out here instead of using JS's `i`
 * (whose folding differs): `ſ` (U+017F) matches `s`, and U+0345, which case-folds to a letter, is
 * excluded from the "other" class without joining `\p{L}+`, so it matches nothing and is dropped.
 */
const CLIP_WORD =
  /<\|[sſ]tartoftext\|>|<\|endoftext\|>|'[sſ]|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}\u0345]+/gu;

/**
 * The cleaned, lower-cased text CLIP's word regex runs on: control and format characters removed,
 * NFC, spaces around CJK ideographs, every run of whitespace collapsed to one space.
 */
export function clipCleanText(text: string): string {
  // Printable ASCII (most prompts) has nothing to drop, re-space or normalise.
  if (PRINTABLE_ASCII.test(text)) return text.split(' ').filter((w) => w !== '').join(' ').toLowerCase();
  const spaced = text
    .replace(DROPPED_CHARS, '')
    .replace(SPACE_CHARS, ' ')
    .replace(CJK_IDEOGRAPHS, ' $& ')
    .normalize('NFC');
  // Lower-casing the joined words equals lower-casing each word: the space between words is neither
  // cased nor case-ignorable, so it ends Final_Sigma contexts exactly like a word boundary.
  return spaced
    .split(PYTHON_WHITESPACE)
    .filter((w) => w !== '')
    .join(' ')
    .toLowerCase();
}

// ---------------------------------------------------------------------------------------------
// Vocabulary

const BOS_TOKEN = '<|startoftext|>';
const EOS_TOKEN = '<|endoftext|>';
const DEFAULT_MAX_LENGTH = 77;
/** transformers writes int(1e30) as model_max_length when a tokenizer has none. */
const UNSET_MAX_LENGTH_ABOVE = 1e6;

/** Cached words before the id cache is dropped; bounds memory on adversarial input. */
const WORD_CACHE_LIMIT = 200_000;

/** The immutable part of a tokenizer (base vocabulary and merges), shared between instances. */
class BaseVocabulary {
  readonly idToToken: readonly (string | undefined)[];
  readonly bpe: BytePairEncoder;
  readonly size: number;

  constructor(
    readonly tokenToId: ReadonlyMap<string, number>,
    merges: readonly Merge[],
  ) {
    const byId: (string | undefined)[] = [];
    let maxId = -1;
    for (const [token, id] of tokenToId) {
      byId[id] = token;
      if (id > maxId) maxId = id;
    }
    this.idToToken = byId;
    this.size = maxId + 1;
    this.bpe = new BytePairEncoder(merges);
  }

  private readonly wordIds = new Map<string, readonly (number | undefined)[]>();

  /** Ids of a word's BPE tokens (undefined where vocab.json lacks the token), cached per word. */
  idsOfWord(word: string): readonly (number | undefined)[] {
    let ids = this.wordIds.get(word);
    if (!ids) {
      ids = this.bpe.encodeWord(word).map((t) => this.tokenToId.get(t));
      if (this.wordIds.size >= WORD_CACHE_LIMIT) this.wordIds.clear();
      this.wordIds.set(word, ids);
    }
    return ids;
  }
}

/** Special tokens and lengths read from tokenizer_config.json / special_tokens_map.json, or given. */
export interface ClipTokenizerOptions {
  /** Padding token: `<|endoftext|>` for SD 1.x (the default), `!` (id 0) for SD 2.x. */
  readonly padToken?: string;
  readonly bosToken?: string;
  readonly eosToken?: string;
  readonly unkToken?: string;
  /** Sequence length including BOS and EOS; 77 for every SD text encoder. */
  readonly modelMaxLength?: number;
}

/** Options of {@link ClipTokenizer.encode}. */
export interface EncodeOptions {
  /** `max_length` (default) pads with the pad id up to `maxLength`; `none` leaves the length as is. */
  readonly padding?: 'max_length' | 'none';
  /** Keep BOS + the first `maxLength - 2` tokens + EOS (default true). */
  readonly truncation?: boolean;
  /** Defaults to the tokenizer's model_max_length (77). */
  readonly maxLength?: number;
}

/** Token ids with their attention mask (1 on BOS, content and EOS, 0 on padding). */
export interface Encoding {
  readonly inputIds: number[];
  readonly attentionMask: number[];
}

/** Options of {@link ClipTokenizer.encodeChunked}. */
export interface ChunkOptions {
  /**
   * `a1111` (default): AUTOMATIC1111's rule, breaking after the last comma when it lies within the
   * last `commaBacktrack` tokens of a full chunk. `fixed`: plain consecutive runs of 75 tokens.
   */
  readonly chunks?: 'a1111' | 'fixed';
  /** A1111's `comma_padding_backtrack` setting (default 20; 0 disables). Ignored for `fixed`. */
  readonly commaBacktrack?: number;
}

/** Options of {@link ClipTokenizer.decode}. */
export interface DecodeOptions {
  /** Leave out BOS, EOS, UNK, the pad token and other special tokens (default false). */
  readonly skipSpecialTokens?: boolean;
}

interface AddedToken {
  readonly id: number;
  readonly special: boolean;
}

/** Tokens of one piece of text, split into added tokens and ordinary text. */
type Segment = { readonly added: string } | { readonly text: string };

const CHUNK_CONTENT = 75;
const A1111_COMMA_BACKTRACK = 20;

/** CLIP BPE tokenizer with transformers' slow CLIPTokenizer behaviour. */
export class ClipTokenizer {
  /** Added tokens (specials from the config, textual-inversion tokens) matched verbatim before cleanup. */
  private readonly added = new Map<string, AddedToken>();
  private readonly addedById = new Map<number, string>();
  private addedPattern: RegExp | undefined;
  private nextId: number;

  readonly bosId: number;
  readonly eosId: number;
  readonly padId: number;
  readonly unkId: number;
  /** Sequence length including BOS and EOS (77). */
  readonly modelMaxLength: number;
  /** Id of `,</w>`, where A1111 prefers to break long prompts. */
  private readonly commaId: number | undefined;

  private constructor(
    private readonly base: BaseVocabulary,
    options: ClipTokenizerOptions,
    extraAdded: ReadonlyMap<string, AddedToken>,
    source: string,
  ) {
    this.nextId = base.size;
    const bos = options.bosToken ?? BOS_TOKEN;
    const eos = options.eosToken ?? EOS_TOKEN;
    const unk = options.unkToken ?? EOS_TOKEN;
    const pad = options.padToken ?? EOS_TOKEN;
    for (const [content, token] of extraAdded) this.register(content, token.id, token.special, source);
    // transformers adds every special token to its added-token trie, so e.g. SD 2.x's pad token `!`
    // is split out of the text and becomes id 0 instead of joining BPE words (diffusers issue #4153).
    const specialId = (content: string, role: string): number => {
      const id = this.tokenToId(content);
      if (id === undefined) throw new Error(`${source}: ${role} ${JSON.stringify(content)} is not in the vocabulary`);
      this.register(content, id, true, source);
      return id;
    };
    this.bosId = specialId(bos, 'bos_token');
    this.eosId = specialId(eos, 'eos_token');
    this.unkId = specialId(unk, 'unk_token');
    this.padId = specialId(pad, 'pad_token');
    const maxLength = options.modelMaxLength;
    this.modelMaxLength =
      maxLength === undefined || maxLength > UNSET_MAX_LENGTH_ABOVE ? DEFAULT_MAX_LENGTH : maxLength;
    if (!Number.isInteger(this.modelMaxLength) || this.modelMaxLength < 2) {
      throw new Error(`${source}: model_max_length must be an integer >= 2, found ${String(maxLength)}`);
    }
    this.commaId = base.tokenToId.get(`,${END_OF_WORD}`);
  }

  /**
   * Load a Hugging Face tokenizer folder: `vocab.json` (one-line or pretty-printed), `merges.txt`,
   * and if present `tokenizer_config.json`, `special_tokens_map.json`, `added_tokens.json`.
   * `overrides` win over the folder's config files.
   */
  static async fromDir(dir: string, overrides: ClipTokenizerOptions = {}): Promise<ClipTokenizer> {
    const base = await loadBaseVocabulary(dir);
    const config = await readTokenizerConfig(dir);
    return new ClipTokenizer(base, { ...config.options, ...definedOnly(overrides) }, config.added, dir);
  }

  /**
   * Build the tokenizer from OpenAI's `bpe_simple_vocab_16e6.txt.gz`: merges are lines 1..48894,
   * the vocabulary follows from them (see {@link vocabFromMerges}).
   */
  static async fromBpeGz(file: string, options: ClipTokenizerOptions = {}): Promise<ClipTokenizer> {
    const compressed = await readRequired(file);
    let text: string;
    try {
      text = new TextDecoder('utf-8', { fatal: true }).decode(gunzipSync(compressed));
    } catch (err) {
      throw new Error(`${file}: not a gzip-compressed UTF-8 merge list (${errorMessage(err)})`);
    }
    // The original file keeps going past the merges CLIP uses; only its first line is a header.
    const merges = parseMergesText(text, file, 'any');
    if (merges.length < 1) throw new Error(`${file}: no merges found after the header line`);
    return new ClipTokenizer(new BaseVocabulary(vocabFromMerges(merges), merges), options, new Map(), file);
  }

  /** Number of token ids, added tokens included (= rows of the token-embedding table needed). */
  get vocabSize(): number {
    return this.nextId;
  }

  /** The token string of an id, or undefined. */
  idToToken(id: number): string | undefined {
    return this.addedById.get(id) ?? this.base.idToToken[id];
  }

  /** The id of a token string (BPE token such as `cat</w>`, or an added token), or undefined. */
  tokenToId(token: string): number | undefined {
    return this.added.get(token)?.id ?? this.base.tokenToId.get(token);
  }

  /**
   * Add whole-word tokens (textual-inversion placeholders such as `<my-cat>`) that are matched
   * verbatim (case-sensitive) in text before cleanup, like transformers' `add_tokens`. Returns their
   * new ids, `vocabSize`, `vocabSize + 1`, …. Throws for a token already in the vocabulary, since
   * reusing its id would make the new embedding overwrite an existing one.
   */
  addTokens(tokens: readonly string[]): number[] {
    return tokens.map((token) => {
      if (token === '') throw new Error('addTokens: a token must not be empty');
      const existing = this.tokenToId(token);
      if (existing !== undefined) {
        throw new Error(`addTokens: ${JSON.stringify(token)} is already in the vocabulary (id ${existing})`);
      }
      const id = this.nextId;
      this.register(token, id, false, 'addTokens');
      return id;
    });
  }

  /** The BPE tokens of `text` (transformers' `tokenizer.tokenize`), without BOS/EOS. */
  tokenize(text: string): string[] {
    const out: string[] = [];
    for (const segment of this.segments(text)) {
      if ('added' in segment) {
        out.push(segment.added);
        continue;
      }
      for (const match of clipCleanText(segment.text).matchAll(CLIP_WORD)) {
        for (const piece of this.base.bpe.encodeWord(match[0])) out.push(piece);
      }
    }
    return out;
  }

  /** Ids of BPE or added tokens; unknown tokens map to the unk id, as in transformers. */
  convertTokensToIds(tokens: readonly string[]): number[] {
    return tokens.map((t) => this.tokenToId(t) ?? this.unkId);
  }

  /** Ids of {@link tokenize}'s tokens (no BOS/EOS, no truncation); the fast path of every encode. */
  contentIds(text: string): number[] {
    const out: number[] = [];
    for (const segment of this.segments(text)) {
      if ('added' in segment) {
        out.push(this.added.get(segment.added)?.id ?? this.unkId);
        continue;
      }
      for (const match of clipCleanText(segment.text).matchAll(CLIP_WORD)) {
        for (const id of this.base.idsOfWord(match[0])) out.push(id ?? this.unkId);
      }
    }
    return out;
  }

  /** Token ids of `text` with BOS/EOS; by default truncated and padded to 77 as SD pipelines do. */
  encode(text: string, options: EncodeOptions = {}): number[] {
    return this.encodeWithMask(text, options).inputIds;
  }

  /** {@link encode} plus the attention mask (SD pipelines do not pass the mask to the text encoder). */
  encodeWithMask(text: string, options: EncodeOptions = {}): Encoding {
    const maxLength = options.maxLength ?? this.modelMaxLength;
    const truncation = options.truncation ?? true;
    const padding = options.padding ?? 'max_length';
    if (!Number.isInteger(maxLength) || maxLength < 2) {
      throw new RangeError(`encode: maxLength must be an integer >= 2 (room for BOS and EOS), got ${maxLength}`);
    }
    let content = this.contentIds(text);
    if (truncation && content.length > maxLength - 2) content = content.slice(0, maxLength - 2);
    const inputIds = [this.bosId, ...content, this.eosId];
    const attentionMask = inputIds.map(() => 1);
    if (padding === 'max_length') {
      while (inputIds.length < maxLength) {
        inputIds.push(this.padId);
        attentionMask.push(0);
      }
    }
    return { inputIds, attentionMask };
  }

  /**
   * AUTOMATIC1111's long-prompt convention: the prompt's token ids (no truncation) are cut into
   * chunks of at most 75, each sent as BOS + chunk + EOS padded to 77, and the text encoder runs
   * once per chunk. A1111 pads a chunk with EOS and, when the pad id differs from EOS (SD 2.x),
   * replaces everything after the first EOS with the pad id; this does the same.
   *
   * With `chunks: 'a1111'` (default) a chunk that is full while the next token is not a comma is
   * broken right after its last comma if that comma is within the last `commaBacktrack` (20)
   * tokens, moving the words after it to the next chunk — exactly A1111's `tokenize_line` with
   * emphasis parsing disabled (`(word:1.2)` and `BREAK` are tokenized literally, not interpreted).
   * An empty prompt gives one chunk. Normal truncation ({@link encode}) remains the default elsewhere.
   */
  encodeChunked(text: string, options: ChunkOptions = {}): number[][] {
    const backtrack = options.chunks === 'fixed' ? 0 : (options.commaBacktrack ?? A1111_COMMA_BACKTRACK);
    const ids = this.contentIds(text);
    const chunks: number[][] = [];
    let current: number[] = [];
    let lastComma = -1;
    const closeChunk = (): void => {
      const padded = [this.bosId, ...current];
      while (padded.length < CHUNK_CONTENT + 1) padded.push(this.eosId);
      padded.push(this.eosId);
      if (this.padId !== this.eosId) {
        const firstEos = padded.indexOf(this.eosId);
        padded.fill(this.padId, firstEos + 1);
      }
      chunks.push(padded);
      current = [];
      lastComma = -1;
    };
    for (const id of ids) {
      if (id === this.commaId) {
        lastComma = current.length;
      } else if (
        backtrack > 0 &&
        current.length === CHUNK_CONTENT &&
        lastComma !== -1 &&
        current.length - lastComma <= backtrack
      ) {
        const moved = current.slice(lastComma + 1);
        current = current.slice(0, lastComma + 1);
        closeChunk();
        current = moved;
      }
      if (current.length === CHUNK_CONTENT) closeChunk();
      current.push(id);
    }
    if (current.length > 0 || chunks.length === 0) closeChunk();
    return chunks;
  }

  /**
   * Text of token ids: BPE tokens are turned back into UTF-8 bytes (invalid sequences become
   * U+FFFD) with `</w>` as a space; added tokens appear verbatim, separated by spaces. Unlike
   * transformers' `decode` this does not re-attach punctuation (`clean_up_tokenization_spaces`).
   */
  decode(ids: readonly number[], options: DecodeOptions = {}): string {
    const parts: string[] = [];
    let run: string[] = [];
    const flush = (): void => {
      if (run.length > 0) parts.push(bytesToText(run));
      run = [];
    };
    for (const id of ids) {
      const token = this.idToToken(id);
      if (token === undefined) throw new RangeError(`decode: id ${id} is not in the vocabulary`);
      const added = this.added.get(token);
      if (added && added.id === id) {
        flush();
        if (!(options.skipSpecialTokens && added.special)) parts.push(token);
      } else {
        run.push(token);
      }
    }
    flush();
    return parts.join(' ');
  }

  private register(content: string, id: number, special: boolean, source: string): void {
    // transformers skips empty added tokens; an empty pattern alternative would match everywhere.
    if (content === '') return;
    const clash = this.idToToken(id);
    if (clash !== undefined && clash !== content) {
      throw new Error(`${source}: added token ${JSON.stringify(content)} has id ${id}, which is ${JSON.stringify(clash)}`);
    }
    // BPE output is looked up in the base vocabulary only, so an added token must not re-map one of its entries.
    const baseId = this.base.tokenToId.get(content);
    if (baseId !== undefined && baseId !== id) {
      throw new Error(`${source}: added token ${JSON.stringify(content)} has id ${id}, but the vocabulary gives it ${baseId}`);
    }
    const previous = this.added.get(content);
    this.added.set(content, { id, special: special || (previous?.special ?? false) });
    this.addedById.set(id, content);
    if (id >= this.nextId) this.nextId = id + 1;
    this.addedPattern = undefined;
  }

  /** Split on added tokens, leftmost first and longest among those starting at the same place. */
  private segments(text: string): Segment[] {
    if (!this.addedPattern) {
      // Alternatives are tried in order, so longest-first gives the longest match at each position.
      const alternatives = [...this.added.keys()]
        .sort((a, b) => b.length - a.length)
        .map((t) => t.replace(/[\\^$.*+?()[\]{}|/]/g, '\\$&'));
      this.addedPattern = new RegExp(alternatives.length > 0 ? alternatives.join('|') : '(?!)', 'gu');
    }
    const out: Segment[] = [];
    let start = 0;
    for (const match of text.matchAll(this.addedPattern)) {
      if (match.index > start) out.push({ text: text.slice(start, match.index) });
      out.push({ added: match[0] });
      start = match.index + match[0].length;
    }
    if (start < text.length) out.push({ text: text.slice(start) });
    return out;
  }
}

const utf8 = new TextEncoder();

function bytesToText(tokens: readonly string[]): string {
  const { symbolToByte } = byteAlphabet();
  const joined = tokens.join('');
  const bytes: number[] = [];
  for (const symbol of joined) {
    const b = symbolToByte.get(symbol);
    // Only tokens from a foreign vocabulary can hold non-alphabet characters; keep them as text.
    if (b === undefined) bytes.push(...utf8.encode(symbol));
    else bytes.push(b);
  }
  return new TextDecoder('utf-8').decode(new Uint8Array(bytes)).replaceAll(END_OF_WORD, ' ').trim();
}

// ---------------------------------------------------------------------------------------------
// Files

async function readRequired(file: string): Promise<Buffer> {
  try {
    return await readFile(file);
  } catch (err) {
    throw new Error(`${file}: cannot read (${errorMessage(err)})`);
  }
}

async function readOptionalJson(file: string): Promise<unknown> {
  try {
    await access(file);
  } catch {
    return undefined;
  }
  return parseJson((await readRequired(file)).toString('utf8'), file);
}

function parseJson(text: string, file: string): unknown {
  try {
    return JSON.parse(text) as unknown;
  } catch (err) {
    throw new Error(`${file}: not valid JSON (${errorMessage(err)})`);
  }
}

function parseVocabJson(text: string, file: string): Map<string, number> {
  const parsed = parseJson(text, file);
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
    const found = parsed === null ? 'null' : Array.isArray(parsed) ? 'an array' : `a ${typeof parsed}`;
    throw new Error(`${file}: expected a JSON object of token → id, found ${found}`);
  }
  const vocab = new Map<string, number>();
  const seen = new Map<number, string>();
  for (const [token, id] of Object.entries(parsed)) {
    if (typeof id !== 'number' || !Number.isSafeInteger(id) || id < 0) {
      throw new Error(
        `${file}: expected a JSON object of token → id; token ${JSON.stringify(token)} has id ${JSON.stringify(id)}, not a non-negative integer`,
      );
    }
    const other = seen.get(id);
    if (other !== undefined) {
      throw new Error(`${file}: id ${id} is used by both ${JSON.stringify(other)} and ${JSON.stringify(token)}`);
    }
    seen.set(id, token);
    vocab.set(token, id);
  }
  if (vocab.size === 0) throw new Error(`${file}: expected a JSON object of token → id, found an empty object`);
  return vocab;
}

function checkMergesAgainstVocab(merges: readonly Merge[], vocab: ReadonlyMap<string, number>, mergesFile: string, vocabFile: string): void {
  merges.forEach(([a, b], i) => {
    if (!vocab.has(a + b)) {
      throw new Error(
        `${mergesFile} line ${i + 2}: merge result ${JSON.stringify(a + b)} is not in ${vocabFile} (files from different tokenizers?)`,
      );
    }
  });
}

const baseCache = new Map<string, Promise<BaseVocabulary>>();

/** Parsed vocab.json + merges.txt of a folder, parsed once per process (they are immutable). */
function loadBaseVocabulary(dir: string): Promise<BaseVocabulary> {
  const key = path.resolve(dir);
  let pending = baseCache.get(key);
  if (!pending) {
    pending = (async () => {
      const vocabFile = path.join(key, 'vocab.json');
      const mergesFile = path.join(key, 'merges.txt');
      const [vocabText, mergesText] = await Promise.all([readRequired(vocabFile), readRequired(mergesFile)]);
      const vocab = parseVocabJson(vocabText.toString('utf8'), vocabFile);
      const merges = parseMergesText(mergesText.toString('utf8'), mergesFile);
      checkMergesAgainstVocab(merges, vocab, mergesFile, vocabFile);
      return new BaseVocabulary(vocab, merges);
    })();
    // A failed load is not cached, so a corrected file is picked up on the next call.
    pending.catch(() => baseCache.delete(key));
    baseCache.set(key, pending);
  }
  return pending;
}

/** A special token as transformers serialises it: a string or an AddedToken object. */
const tokenSpec = z.union([z.string(), z.object({ content: z.string() })]).nullable();

const specialTokensSchema = z.object({
  bos_token: tokenSpec.optional(),
  eos_token: tokenSpec.optional(),
  unk_token: tokenSpec.optional(),
  pad_token: tokenSpec.optional(),
  additional_special_tokens: z.array(tokenSpec).optional(),
});

const tokenizerConfigSchema = specialTokensSchema.extend({
  model_max_length: z.number().optional(),
  added_tokens_decoder: z
    .record(z.string().regex(/^\d+$/, 'expected a token id'), z.object({ content: z.string(), special: z.boolean().optional() }))
    .optional(),
});

const addedTokensSchema = z.record(z.string(), z.number().int().nonnegative());

function parseWith<T>(schema: z.ZodType<T>, value: unknown, file: string): T {
  const result = schema.safeParse(value);
  if (result.success) return result.data;
  const issue = result.error.issues[0];
  const where = issue && issue.path.length > 0 ? `${issue.path.join('.')}: ` : '';
  throw new Error(`${file}: ${where}${issue?.message ?? 'invalid content'}`);
}

function tokenContent(spec: z.infer<typeof tokenSpec> | undefined): string | undefined {
  if (spec === undefined || spec === null) return undefined;
  return typeof spec === 'string' ? spec : spec.content;
}

interface FolderConfig {
  readonly options: ClipTokenizerOptions;
  readonly added: Map<string, AddedToken>;
}

/** Special tokens, max length and added tokens; special_tokens_map.json wins, as in transformers. */
async function readTokenizerConfig(dir: string): Promise<FolderConfig> {
  const configFile = path.join(dir, 'tokenizer_config.json');
  const mapFile = path.join(dir, 'special_tokens_map.json');
  const addedFile = path.join(dir, 'added_tokens.json');
  const configRaw = await readOptionalJson(configFile);
  const mapRaw = await readOptionalJson(mapFile);
  const addedRaw = await readOptionalJson(addedFile);
  const config = configRaw === undefined ? {} : parseWith(tokenizerConfigSchema, configRaw, configFile);
  const map = mapRaw === undefined ? {} : parseWith(specialTokensSchema, mapRaw, mapFile);
  const pick = (key: 'bos_token' | 'eos_token' | 'unk_token' | 'pad_token'): string | undefined =>
    tokenContent(map[key]) ?? tokenContent(config[key]);
  const added = new Map<string, AddedToken>();
  for (const [id, token] of Object.entries(config.added_tokens_decoder ?? {})) {
    added.set(token.content, { id: Number(id), special: token.special ?? false });
  }
  if (addedRaw !== undefined) {
    for (const [content, id] of Object.entries(parseWith(addedTokensSchema, addedRaw, addedFile))) {
      if (!added.has(content)) added.set(content, { id, special: false });
    }
  }
  for (const spec of [...(config.additional_special_tokens ?? []), ...(map.additional_special_tokens ?? [])]) {
    const content = tokenContent(spec);
    const known = content === undefined ? undefined : added.get(content);
    if (known) added.set(content as string, { id: known.id, special: true });
  }
  const options: ClipTokenizerOptions = definedOnly({
    bosToken: pick('bos_token'),
    eosToken: pick('eos_token'),
    unkToken: pick('unk_token'),
    padToken: pick('pad_token'),
    modelMaxLength: config.model_max_length,
  });
  return { options, added };
}

function definedOnly(options: ClipTokenizerOptions): ClipTokenizerOptions {
  return Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined)) as ClipTokenizerOptions;
}

function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

// ---------------------------------------------------------------------------------------------
// Bundled vocabulary

/** Folder of the bundled CLIP vocabulary (`assets/clip-tokenizer`). */
export async function defaultTokenizerDir(): Promise<string> {
  return assetPath('clip-tokenizer');
}

/**
 * The bundled CLIP tokenizer (OpenAI's bpe_simple_vocab_16e6): SD 1.x pads with `<|endoftext|>`,
 * SD 2.x with `!` (id 0). Each call returns a fresh instance, so added tokens do not leak.
 */
export async function defaultTokenizer(kind: 'sd1' | 'sd2'): Promise<ClipTokenizer> {
  const padToken = kind === 'sd2' ? '!' : EOS_TOKEN;
  return ClipTokenizer.fromDir(await defaultTokenizerDir(), { padToken, modelMaxLength: DEFAULT_MAX_LENGTH });
}
