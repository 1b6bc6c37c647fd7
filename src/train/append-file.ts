/**
 * An append-only log file written in whole records: each record reaches the OS in one write call
 * (looping only on a rare short write), so a `kill -9` leaves at most one partial record at the
 * end. Shared by the metrics and TensorBoard writers.
 */
import { closeSync, fsyncSync, mkdirSync, openSync, writeSync } from 'node:fs';
import path from 'node:path';

export class AppendFile {
  /** Absolute path of the file. */
  readonly path: string;
  #fd: number | undefined;
  /** What the file is, for errors (`metrics writer`, `event writer`). */
  readonly #what: string;

  private constructor(file: string, fd: number, what: string) {
    this.path = file;
    this.#fd = fd;
    this.#what = what;
  }

  /**
   * Opens `file` for appending (creating its folder), after `prepare` has looked at the open
   * descriptor (e.g. to cut off a partial record a killed run left).
   */
  static open(file: string, what: string, prepare?: (fd: number) => void): AppendFile {
    const abs = path.resolve(file);
    mkdirSync(path.dirname(abs), { recursive: true });
    const fd = openSync(abs, 'a+');
    try {
      prepare?.(fd);
    } catch (e) {
      closeSync(fd);
      throw e;
    }
    return new AppendFile(abs, fd, what);
  }

  /** Appends one whole record. */
  append(record: Uint8Array): void {
    if (this.#fd === undefined) throw new Error(`${this.path}: ${this.#what} is closed`);
    let off = 0;
    while (off < record.length) off += writeSync(this.#fd, record, off, record.length - off);
  }

  /** Forces written records to stable storage. */
  flush(): void {
    if (this.#fd !== undefined) fsyncSync(this.#fd);
  }

  /** Flushes and closes; further appends throw. Idempotent. */
  close(): void {
    if (this.#fd === undefined) return;
    const fd = this.#fd;
    this.#fd = undefined;
    try {
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
  }
}
