/**
 * PNG text chunks and AUTOMATIC1111's `parameters` convention, so images we write carry their
 * generation settings the way every SD UI reads them (PNG Info, ComfyUI, civitai uploads).
 *
 * sharp writes the pixels; it cannot add arbitrary tEXt chunks, so they are spliced in here.
 */

const PNG_SIGNATURE = Uint8Array.of(0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a);

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

/** CRC-32 (ISO-HDLC, as PNG uses) of `bytes`. */
export function crc32(bytes: Uint8Array): number {
  let c = 0xffffffff;
  for (const b of bytes) c = CRC_TABLE[(c ^ b) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

interface Chunk {
  readonly type: string;
  readonly data: Uint8Array;
  /** Offset of the chunk's length field in the file. */
  readonly offset: number;
}

function chunksOf(png: Uint8Array): Chunk[] {
  if (png.length < 8 || !PNG_SIGNATURE.every((b, i) => png[i] === b)) throw new Error('not a PNG file (bad signature)');
  const view = new DataView(png.buffer, png.byteOffset, png.byteLength);
  const out: Chunk[] = [];
  let pos = 8;
  while (pos < png.length) {
    if (pos + 12 > png.length) throw new Error(`PNG truncated at byte ${pos}`);
    const length = view.getUint32(pos);
    if (pos + 12 + length > png.length) throw new Error(`PNG chunk at byte ${pos} runs past the end of the file`);
    const type = String.fromCharCode(...png.subarray(pos + 4, pos + 8));
    out.push({ type, data: png.subarray(pos + 8, pos + 8 + length), offset: pos });
    pos += 12 + length;
    if (type === 'IEND') break;
  }
  return out;
}

function makeChunk(type: string, data: Uint8Array): Uint8Array {
  const out = new Uint8Array(12 + data.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, data.length);
  out.set(new TextEncoder().encode(type), 4);
  out.set(data, 8);
  view.setUint32(8 + data.length, crc32(out.subarray(4, 8 + data.length)));
  return out;
}

/**
 * Add text chunks after IHDR. Values that are plain Latin-1 go in `tEXt` (what A1111 writes);
 * anything else in an uncompressed UTF-8 `iTXt`, so prompts in any language survive.
 */
export function addPngText(png: Uint8Array, entries: Readonly<Record<string, string>>): Uint8Array {
  const chunks = chunksOf(png);
  const ihdr = chunks[0];
  if (ihdr?.type !== 'IHDR') throw new Error('PNG does not start with IHDR');
  const insertAt = ihdr.offset + 12 + ihdr.data.length;
  const extra: Uint8Array[] = [];
  for (const [key, value] of Object.entries(entries)) {
    if (!/^[\x20-\x7e]{1,79}$/.test(key)) throw new Error(`PNG text key '${key}' must be 1-79 printable ASCII characters`);
    const latin1 = /^[\x00-\xff]*$/.test(value) && !value.includes('\0');
    if (latin1) {
      const data = new Uint8Array(key.length + 1 + value.length);
      for (let i = 0; i < key.length; i++) data[i] = key.charCodeAt(i);
      for (let i = 0; i < value.length; i++) data[key.length + 1 + i] = value.charCodeAt(i);
      extra.push(makeChunk('tEXt', data));
    } else {
      const k = new TextEncoder().encode(key);
      const v = new TextEncoder().encode(value);
      // keyword \0 compression-flag(0) method(0) language\0 translated-keyword\0 text
      const data = new Uint8Array(k.length + 5 + v.length);
      data.set(k, 0);
      data.set(v, k.length + 5);
      extra.push(makeChunk('iTXt', data));
    }
  }
  const total = extra.reduce((n, c) => n + c.length, 0);
  const out = new Uint8Array(png.length + total);
  out.set(png.subarray(0, insertAt), 0);
  let pos = insertAt;
  for (const c of extra) {
    out.set(c, pos);
    pos += c.length;
  }
  out.set(png.subarray(insertAt), pos);
  return out;
}

/** Every tEXt and uncompressed iTXt entry of a PNG. */
export function readPngText(png: Uint8Array): Record<string, string> {
  const out: Record<string, string> = {};
  for (const c of chunksOf(png)) {
    if (c.type === 'tEXt') {
      const sep = c.data.indexOf(0);
      if (sep < 0) continue;
      out[String.fromCharCode(...c.data.subarray(0, sep))] = Array.from(c.data.subarray(sep + 1), (b) => String.fromCharCode(b)).join('');
    } else if (c.type === 'iTXt') {
      const sep = c.data.indexOf(0);
      if (sep < 0 || c.data[sep + 1] !== 0) continue; // compressed iTXt: not written by us
      const langEnd = c.data.indexOf(0, sep + 3);
      const transEnd = langEnd < 0 ? -1 : c.data.indexOf(0, langEnd + 1);
      if (transEnd < 0) continue;
      out[new TextDecoder().decode(c.data.subarray(0, sep))] = new TextDecoder().decode(c.data.subarray(transEnd + 1));
    }
  }
  return out;
}

/** Generation settings as AUTOMATIC1111 records them in the `parameters` text chunk. */
export interface GenerationParameters {
  readonly prompt: string;
  readonly negativePrompt: string;
  /** Ordered `Key: value` settings (Steps, Sampler, CFG scale, Seed, Size, Model hash, …). */
  readonly settings: Readonly<Record<string, string>>;
}

function quoteIfNeeded(v: string): string {
  return /[,:"\n]/.test(v) ? JSON.stringify(v) : v;
}

/** The `parameters` text: prompt, `Negative prompt: …`, then one line of `Key: value` settings. */
export function formatParameters(p: GenerationParameters): string {
  const settings = Object.entries(p.settings)
    .map(([k, v]) => `${k}: ${quoteIfNeeded(v)}`)
    .join(', ');
  const lines = [p.prompt];
  if (p.negativePrompt !== '') lines.push(`Negative prompt: ${p.negativePrompt}`);
  lines.push(settings);
  return lines.join('\n');
}

/** Parse a `parameters` text (ours or A1111's) back into prompt, negative prompt and settings. */
export function parseParameters(text: string): GenerationParameters {
  const lines = text.split('\n');
  const last = lines.at(-1) ?? '';
  const hasSettings = /^\s*Steps: /.test(last) || /(^|, )[A-Z][\w ]*: /.test(last);
  const body = hasSettings ? lines.slice(0, -1) : lines;
  const negAt = body.findIndex((l) => l.startsWith('Negative prompt: '));
  const prompt = (negAt < 0 ? body : body.slice(0, negAt)).join('\n');
  const negativePrompt = negAt < 0 ? '' : body.slice(negAt).join('\n').slice('Negative prompt: '.length);
  const settings: Record<string, string> = {};
  if (hasSettings) {
    // `Key: value` pairs separated by ", "; values may be JSON-quoted when they hold , : or ".
    const re = /\s*([^,:]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)/g;
    for (const m of last.matchAll(re)) {
      const key = m[1]!.trim();
      const raw = m[2]!.trim();
      settings[key] = raw.startsWith('"') ? (JSON.parse(raw) as string) : raw;
    }
  }
  return { prompt, negativePrompt, settings };
}
