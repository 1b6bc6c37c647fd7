/**
 * Progress of a benchmark run in images: `image 12/100 (12%) | 0.85 img/s | 00:14<01:43`, redrawn
 * in place on a TTY, a plain line every `plainIntervalMs` otherwise (and always the last). The rate
 * is smoothed over recent images and counts only images made in this process (a resumed run does
 * not look fast because of the rows it skipped).
 */
import { Ema, formatDuration, type ProgressStream } from '../train/progress.js';

/** One progress line from its parts. */
export function formatImageProgress(done: number, total: number, rate: number | undefined, elapsed: number): string {
  const width = String(total).length;
  const pct = total > 0 ? Math.floor((100 * done) / total) : 100;
  const speed = rate === undefined || !(rate > 0) ? '? img/s' : rate >= 1 ? `${rate.toFixed(2)} img/s` : `${(1 / rate).toFixed(2)} s/img`;
  const remaining = rate !== undefined && rate > 0 ? (total - done) / rate : NaN;
  return `image ${String(done).padStart(width)}/${total} (${String(pct).padStart(3)}%) | ${speed} | ${formatDuration(elapsed)}<${formatDuration(remaining)}`;
}

/** Renders image progress to a stream. */
export class ImageProgress {
  readonly #stream: ProgressStream;
  readonly #tty: boolean;
  readonly #now: () => number;
  readonly #perImage = new Ema(0.1);
  readonly #start: number;
  readonly #plainInterval: number;
  #last: number;
  #lastDraw = -Infinity;
  #done: number;
  #lineOpen = false;

  constructor(
    readonly total: number,
    opts: { stream?: ProgressStream; startDone?: number; plainIntervalMs?: number; now?: () => number } = {},
  ) {
    this.#stream = opts.stream ?? process.stderr;
    this.#tty = this.#stream.isTTY === true;
    this.#now = opts.now ?? (() => performance.now());
    this.#start = this.#now();
    this.#last = this.#start;
    this.#done = opts.startDone ?? 0;
    this.#plainInterval = opts.plainIntervalMs ?? 30_000;
  }

  /** Records one more finished image (made here, not skipped). */
  tick(): void {
    const t = this.#now();
    this.#perImage.push(t - this.#last);
    this.#last = t;
    this.#done++;
    const interval = this.#tty ? 200 : this.#plainInterval;
    if (this.#done >= this.total || t - this.#lastDraw >= interval) this.#draw(t);
  }

  /** A message on its own line. */
  log(message: string): void {
    this.#stream.write(this.#tty && this.#lineOpen ? `\r\x1b[K${message}\n` : `${message}\n`);
    this.#lineOpen = false;
  }

  /** Ends the progress line. */
  done(): void {
    if (this.#tty && this.#lineOpen) this.#stream.write('\n');
    this.#lineOpen = false;
  }

  #draw(t: number): void {
    this.#lastDraw = t;
    const per = this.#perImage.value;
    const line = formatImageProgress(this.#done, this.total, per !== undefined && per > 0 ? 1000 / per : undefined, (t - this.#start) / 1000);
    if (this.#tty) {
      this.#stream.write(`\r${line}\x1b[K`);
      this.#lineOpen = true;
    } else this.#stream.write(`${line}\n`);
  }
}
