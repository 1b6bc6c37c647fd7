/**
 * Byte-level BPE for CLIP: the byte ↔ symbol alphabet, merge tables and the per-word merge loop.
 * Text cleanup and the tokenizer API live in `tokenizer.ts`.
 */

/** Suffix CLIP appends to the last symbol of every word. */
export const END_OF_WORD = '</w>';

/** Number of merges CLIP uses: 49,152 BPE tokens minus 256 bytes minus the 2 special tokens. */
export const CLIP_MERGE_COUNT = 49152 - 256 - 2;

/**
 * The 256 byte symbols in GPT-2/CLIP order: index i holds the symbol for the byte at position i of
 * the alphabet, and `byteToSymbol[b]` maps a byte value to its one-character symbol.
 */
export interface ByteAlphabet {
  /** Symbols in vocabulary order (ids 0..255). */
  readonly symbolsInOrder: readonly string[];
  /** byte value → symbol. */
  readonly byteToSymbol: readonly string[];
  /** symbol → byte value. */
  readonly symbolToByte: ReadonlyMap<string, number>;
}

let alphabet: ByteAlphabet | undefined;

/** The GPT-2 byte alphabet: printable Latin-1 bytes map to themselves, the rest to U+0100 onwards. */
export function byteAlphabet(): ByteAlphabet {
  if (alphabet) return alphabet;
  const printable = (b: number): boolean =>
    (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
  const order: number[] = [];
  const codeOf = new Array<number>(256);
  for (let b = 0; b < 256; b++) {
    if (printable(b)) {
      order.push(b);
      codeOf[b] = b;
    }
  }
  // Whitespace and control bytes get stand-in symbols so that a BPE word never contains a space.
  let next = 0;
  for (let b = 0; b < 256; b++) {
    if (!printable(b)) {
      order.push(b);
      codeOf[b] = 256 + next++;
    }
  }
  const byteToSymbol = codeOf.map((c) => String.fromCharCode(c));
  const symbolToByte = new Map<string, number>();
  byteToSymbol.forEach((s, b) => symbolToByte.set(s, b));
  alphabet = { symbolsInOrder: order.map((b) => byteToSymbol[b] as string), byteToSymbol, symbolToByte };
  return alphabet;
}

/** One merge rule `left right`; its rank is its position in the merge list. */
export type Merge = readonly [left: string, right: string];

/**
 * Parse merge lines the way CLIP does: line 1 is a header (`#version: 0.2` in merges.txt; the
 * original .gz starts with `"bpe_simple_vocab_16e6.txt#version: 0.2`), at most
 * {@link CLIP_MERGE_COUNT} merges follow, each two symbols separated by whitespace.
 */
export function parseMergesText(text: string, file: string, header: 'hash' | 'any' = 'hash'): Merge[] {
  const lines = text.trim().split('\n');
  const first = lines[0] ?? '';
  // Checking the header catches a headerless file, which would otherwise silently lose its first merge.
  if (header === 'hash' && !first.startsWith('#')) {
    throw new Error(`${file}: expected a '#version: …' header on line 1, found ${JSON.stringify(first.slice(0, 40))}`);
  }
  const count = Math.min(lines.length - 1, CLIP_MERGE_COUNT);
  const merges: Merge[] = new Array<Merge>(count);
  for (let i = 0; i < count; i++) {
    const line = lines[i + 1] as string;
    const parts = line.trim().split(/\s+/);
    if (parts.length !== 2 || parts[0] === '' || parts[1] === '') {
      throw new Error(
        `${file} line ${i + 2}: expected two symbols separated by a space, found ${JSON.stringify(line.slice(0, 60))}`,
      );
    }
    merges[i] = [parts[0] as string, parts[1] as string];
  }
  return merges;
}

/**
 * The vocabulary CLIP derives from its merge list: 256 byte symbols, the same with `</w>`, one token
 * per merge, then `<|startoftext|>` and `<|endoftext|>` (clip-tokenizer/README.md).
 */
export function vocabFromMerges(merges: readonly Merge[]): Map<string, number> {
  const symbols = byteAlphabet().symbolsInOrder;
  const tokens = [...symbols, ...symbols.map((s) => s + END_OF_WORD), ...merges.map(([a, b]) => a + b)];
  tokens.push('<|startoftext|>', '<|endoftext|>');
  const vocab = new Map<string, number>();
  tokens.forEach((t, id) => vocab.set(t, id));
  return vocab;
}

const utf8 = new TextEncoder();

/** A word as byte symbols (the BPE alphabet), from its UTF-8 bytes. */
export function toByteSymbols(word: string): string {
  const { byteToSymbol } = byteAlphabet();
  let out = '';
  for (const b of utf8.encode(word)) out += byteToSymbol[b];
  return out;
}

/** Words whose BPE result is the word itself (transformers seeds its cache with them). */
const VERBATIM_WORDS: ReadonlySet<string> = new Set(['<|startoftext|>', '<|endoftext|>']);

/** Cached entries before the cache is dropped; bounds memory on adversarial input. */
const CACHE_LIMIT = 200_000;

/** Applies ranked merges to single words; results are cached because prompts repeat words heavily. */
export class BytePairEncoder {
  private readonly ranks = new Map<string, number>();
  private readonly cache = new Map<string, readonly string[]>();

  constructor(merges: readonly Merge[]) {
    // Symbols never contain a space (byte 0x20 has a stand-in symbol), so "left right" is unambiguous.
    // A repeated merge keeps its last rank, as transformers' dict(zip(merges, ranks)) does.
    merges.forEach(([a, b], rank) => this.ranks.set(`${a} ${b}`, rank));
  }

  /** The BPE tokens of one word (text, not yet byte-mapped); the last token carries `</w>`. */
  encodeWord(word: string): readonly string[] {
    const cached = this.cache.get(word);
    if (cached) return cached;
    const result = VERBATIM_WORDS.has(word) ? [word] : this.merge(toByteSymbols(word));
    if (this.cache.size >= CACHE_LIMIT) this.cache.clear();
    this.cache.set(word, result);
    return result;
  }

  private merge(word: string): string[] {
    let symbols = Array.from(word);
    const last = symbols.length - 1;
    symbols[last] = symbols[last] + END_OF_WORD;
    // pairRanks[i] = rank of (symbols[i], symbols[i+1]); kept across steps so that only pairs
    // touching a merge are looked up again (long words would otherwise cost O(n²) string lookups).
    let pairRanks = new Float64Array(Math.max(symbols.length - 1, 0));
    for (let i = 0; i < pairRanks.length; i++) pairRanks[i] = this.rankOf(symbols[i] as string, symbols[i + 1] as string);
    while (symbols.length > 1) {
      let best = 0;
      for (let i = 1; i < pairRanks.length; i++) if ((pairRanks[i] as number) < (pairRanks[best] as number)) best = i;
      if (pairRanks[best] === Infinity) break;
      const left = symbols[best] as string;
      const right = symbols[best + 1] as string;
      // Every non-overlapping occurrence of the lowest-ranked pair, scanning left to right, merges in
      // the same step (ranks are unique per pair, so `best` is its first occurrence).
      const merged: string[] = symbols.slice(0, best);
      const fresh: boolean[] = new Array<boolean>(best).fill(false);
      const oldIndex: number[] = Array.from({ length: best }, (_, i) => i);
      for (let i = best; i < symbols.length; ) {
        if (i < symbols.length - 1 && symbols[i] === left && symbols[i + 1] === right) {
          merged.push(left + right);
          fresh.push(true);
          oldIndex.push(i);
          i += 2;
        } else {
          merged.push(symbols[i] as string);
          fresh.push(false);
          oldIndex.push(i);
          i += 1;
        }
      }
      const nextRanks = new Float64Array(merged.length - 1);
      for (let j = 0; j < nextRanks.length; j++) {
        // Two untouched neighbours were neighbours before, so their pair rank is unchanged.
        nextRanks[j] =
          fresh[j] || fresh[j + 1]
            ? this.rankOf(merged[j] as string, merged[j + 1] as string)
            : (pairRanks[oldIndex[j] as number] as number);
      }
      symbols = merged;
      pairRanks = nextRanks;
    }
    return symbols;
  }

  private rankOf(left: string, right: string): number {
    return this.ranks.get(`${left} ${right}`) ?? Infinity;
  }
}
