/**
 * TensorBoard event-file writer: scalars and PNG images, readable by `tensorboard --logdir`.
 *
 * An event file is a sequence of TFRecords (tensorflow/core/lib/io/record_writer.cc):
 *   uint64 length (LE) | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)
 * where each `data` is a serialized `tensorboard.Event`. The first record carries only
 * `wall_time` and `file_version = "brain.Event:2"`; every later one a `Summary` for one step.
 *
 * Each record is written with a single synchronous write on a file opened for appending, so the
 * file on disk always ends in whole records unless the process dies inside that one write call —
 * TensorBoard's reader stops quietly at a truncated last record.
 */
import { mkdirSync } from 'node:fs';
import { AppendFile } from './append-file.js';
import { hostname } from 'node:os';
import path from 'node:path';

import protobuf from 'protobufjs';

import { maskedCrc32c } from './crc32c.js';

// The subset of tensorboard/compat/proto/{event,summary}.proto this writer emits, with the real
// field numbers (fields we never write are left out; their numbers stay reserved by omission).
const EVENT_PROTO = `
syntax = "proto3";
package tensorboard;

message Summary {
  message Image {
    int32 height = 1;
    int32 width = 2;
    int32 colorspace = 3;
    bytes encoded_image_string = 4;
  }
  message Value {
    string tag = 1;
    oneof value {
      float simple_value = 2;
      Image image = 4;
    }
  }
  repeated Value value = 1;
}

message Event {
  double wall_time = 1;
  int64 step = 2;
  oneof what {
    string file_version = 3;
    Summary summary = 5;
  }
}
`;

const root = protobuf.parse(EVENT_PROTO, { keepCase: true }).root;
/** The `tensorboard.Event` message type (proto field names kept snake_case). */
export const EventType: protobuf.Type = root.lookupType('tensorboard.Event');

/** The version string TensorBoard expects in the first record of an event file. */
export const FILE_VERSION = 'brain.Event:2';

/** `Summary.Image.colorspace` values (summary.proto). */
export type ImageColorspace = 1 | 2 | 3 | 4;

/** One summary value as encoded into an Event. */
type SummaryValue =
  | { tag: string; simple_value: number }
  | {
      tag: string;
      image: { height: number; width: number; colorspace: number; encoded_image_string: Uint8Array };
    };

/** Frames one serialized record as a TFRecord (length, masked CRCs), in one buffer. */
export function frameRecord(data: Uint8Array): Uint8Array {
  const out = new Uint8Array(8 + 4 + data.length + 4);
  const view = new DataView(out.buffer);
  view.setBigUint64(0, BigInt(data.length), true);
  view.setUint32(8, maskedCrc32c(out.subarray(0, 8)), true);
  out.set(data, 12);
  view.setUint32(12 + data.length, maskedCrc32c(data), true);
  return out;
}

const PNG_SIGNATURE = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a] as const;

/** Width, height and TensorBoard colorspace of a PNG, read from its IHDR chunk. */
export function pngInfo(png: Uint8Array): { width: number; height: number; colorspace: ImageColorspace } {
  const ok =
    png.length >= 33 &&
    PNG_SIGNATURE.every((b, i) => png[i] === b) &&
    String.fromCharCode(png[12]!, png[13]!, png[14]!, png[15]!) === 'IHDR';
  if (!ok) throw new Error(`not a PNG (expected the 8-byte PNG signature followed by an IHDR chunk)`);
  const view = new DataView(png.buffer, png.byteOffset, png.byteLength);
  const width = view.getUint32(16, false);
  const height = view.getUint32(20, false);
  // PNG colour types (PNG spec §11.2.2): 0 grey, 2 RGB, 3 palette, 4 grey+alpha, 6 RGBA.
  const colourType = png[25]!;
  const colorspace: ImageColorspace =
    colourType === 0 ? 1 : colourType === 4 ? 2 : colourType === 6 ? 4 : 3;
  return { width, height, colorspace };
}

let filesOpened = 0;

/** Options for {@link EventWriter.open}. */
export interface EventWriterOptions {
  /** Appended to the file name after a dot (like torch's `filename_suffix`). */
  readonly suffix?: string;
  /** Clock in milliseconds since the epoch (tests); default `Date.now`. */
  readonly now?: () => number;
}

/** Appends TensorBoard events (scalars, PNG images) to one `events.out.tfevents.*` file. */
export class EventWriter {
  readonly #file: AppendFile;
  readonly #now: () => number;

  private constructor(file: AppendFile, now: () => number) {
    this.#file = file;
    this.#now = now;
  }

  /** Absolute path of the event file. */
  get path(): string {
    return this.#file.path;
  }

  /**
   * Creates `logDir` if needed and starts a new event file there, named like TensorBoard's own
   * writer: `events.out.tfevents.<10-digit unix seconds>.<hostname>.<pid>.<n>` (pid and counter
   * keep two writers started within the same second apart).
   */
  static open(logDir: string, opts: EventWriterOptions = {}): EventWriter {
    const now = opts.now ?? Date.now;
    mkdirSync(logDir, { recursive: true });
    const seconds = String(Math.floor(now() / 1000)).padStart(10, '0');
    const suffix = opts.suffix === undefined || opts.suffix === '' ? '' : `.${opts.suffix}`;
    const name = `events.out.tfevents.${seconds}.${hostname()}.${process.pid}.${filesOpened++}${suffix}`;
    const writer = new EventWriter(AppendFile.open(path.resolve(logDir, name), 'event writer'), now);
    writer.#writeEvent({ wall_time: writer.#wallTime(), file_version: FILE_VERSION });
    return writer;
  }

  /** Logs one scalar (stored as float32 `simple_value`) at `step`. */
  addScalar(tag: string, value: number, step: number): void {
    this.#writeSummary(step, [{ tag, simple_value: value }]);
  }

  /** Logs several scalars at `step` in one event. */
  addScalars(values: Readonly<Record<string, number>>, step: number): void {
    const entries = Object.entries(values).map(([tag, v]): SummaryValue => ({ tag, simple_value: v }));
    if (entries.length > 0) this.#writeSummary(step, entries);
  }

  /** Logs an encoded PNG at `step`; its width, height and colorspace are read from the PNG. */
  addImage(tag: string, png: Uint8Array, step: number): void {
    let info: ReturnType<typeof pngInfo>;
    try {
      info = pngInfo(png);
    } catch (e) {
      throw new Error(`${this.path}: image '${tag}' at step ${step}: ${(e as Error).message}`);
    }
    this.#writeSummary(step, [
      {
        tag,
        image: { height: info.height, width: info.width, colorspace: info.colorspace, encoded_image_string: png },
      },
    ]);
  }

  /** Forces written events to stable storage (each write already reached the OS). */
  flush(): void {
    this.#file.flush();
  }

  /** Flushes and closes the file; further writes throw. Idempotent. */
  close(): void {
    this.#file.close();
  }

  #wallTime(): number {
    return this.#now() / 1000;
  }

  #writeSummary(step: number, value: SummaryValue[]): void {
    if (!Number.isSafeInteger(step) || step < 0) {
      throw new Error(`${this.path}: step must be a non-negative integer, got ${step}`);
    }
    this.#writeEvent({ wall_time: this.#wallTime(), step, summary: { value } });
  }

  #writeEvent(event: Record<string, unknown>): void {
    const err = EventType.verify(event);
    if (err !== null) throw new Error(`${this.path}: invalid event: ${err}`);
    const data = EventType.encode(EventType.fromObject(event)).finish();
    this.#file.append(frameRecord(data));
  }
}
