/**
 * Progress display for long loops: step/total, smoothed loss, lr, it/s and ETA.
 *
 * On a TTY the line is redrawn in place (carriage return + erase-to-end-of-line) at most
 * `ttyIntervalMs` apart; elsewhere (CI, log files) a plain line is printed every
 * `plainIntervalMs`, plus the first and the last step, so logs stay short and greppable.
 * The formatting functions are pure; the reporter takes an injectable clock and stream.
 */

/**
 * Seconds in tqdm's layout: `MM:SS` below an hour, `H:MM:SS` from an hour on. Rounded to the
 * nearest second (tqdm truncates; rounding keeps a smoothed 48.9999 s from showing as 48).
 */
export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return '--:--';
  const total = Math.round(seconds);
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  const mm = String(m).padStart(2, '0');
  const ss = String(s).padStart(2, '0');
  return h > 0 ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
}

/** A rate as `x.xx it/s`, or `s/it` when slower than one step per second (as tqdm does). */
export function formatRate(itersPerSecond: number): string {
  if (!Number.isFinite(itersPerSecond) || itersPerSecond <= 0) return '?it/s';
  return itersPerSecond >= 1 ? `${itersPerSecond.toFixed(2)}it/s` : `${(1 / itersPerSecond).toFixed(2)}s/it`;
}

/** Everything one progress line shows. */
export interface ProgressSnapshot {
  readonly step: number;
  readonly total: number;
  /** Smoothed loss; undefined before the first finite loss. */
  readonly loss?: number;
  readonly lr?: number;
  /** Steps per second; undefined until measurable. */
  readonly rate?: number;
  /** Seconds since the reporter started. */
  readonly elapsed: number;
  /** Steps skipped as non-finite so far (shown only when > 0). */
  readonly skipped?: number;
}

/** Formats one progress line, e.g. `step 120/1000 (12%) | loss 0.1234 | lr 1.00e-4 | 2.35it/s | 00:51<06:14`. */
export function formatProgress(p: ProgressSnapshot): string {
  const width = String(p.total).length;
  const pct = p.total > 0 ? Math.floor((100 * p.step) / p.total) : 0;
  const parts = [`step ${String(p.step).padStart(width)}/${p.total} (${String(pct).padStart(3)}%)`];
  if (p.loss !== undefined) parts.push(`loss ${formatLoss(p.loss)}`);
  if (p.lr !== undefined) parts.push(`lr ${p.lr.toExponential(2)}`);
  parts.push(formatRate(p.rate ?? NaN));
  const remaining = p.rate !== undefined && p.rate > 0 ? (p.total - p.step) / p.rate : NaN;
  parts.push(`${formatDuration(p.elapsed)}<${formatDuration(remaining)}`);
  if (p.skipped !== undefined && p.skipped > 0) parts.push(`skipped ${p.skipped}`);
  return parts.join(' | ');
}

function formatLoss(x: number): string {
  if (!Number.isFinite(x)) return String(x);
  return Math.abs(x) >= 1e-3 && Math.abs(x) < 1e4 ? x.toFixed(4) : x.toExponential(3);
}

/**
 * Exponential moving average with bias correction (as Adam's moments and tqdm's smoothing):
 * s_n = (1−α)·s_{n−1} + α·x_n, reported as s_n / (1 − (1−α)ⁿ), so early values are not pulled
 * towards the zero start. Non-finite samples are ignored.
 */
export class Ema {
  readonly alpha: number;
  #s = 0;
  #n = 0;

  constructor(alpha: number) {
    if (!(alpha > 0 && alpha <= 1)) throw new Error(`EMA alpha must be in (0, 1], got ${alpha}`);
    this.alpha = alpha;
  }

  /** Adds a sample and returns the current smoothed value. */
  push(x: number): number | undefined {
    if (Number.isFinite(x)) {
      this.#s = (1 - this.alpha) * this.#s + this.alpha * x;
      this.#n += 1;
    }
    return this.value;
  }

  /** The bias-corrected average, undefined before the first finite sample. */
  get value(): number | undefined {
    return this.#n === 0 ? undefined : this.#s / (1 - (1 - this.alpha) ** this.#n);
  }
}

/** Where progress goes: stderr or any stream-like sink. */
export interface ProgressStream {
  write(chunk: string): unknown;
  readonly isTTY?: boolean;
  readonly columns?: number;
}

/** Options for {@link ProgressReporter}. */
export interface ProgressOptions {
  readonly total: number;
  /** Step to start from (resume); rates count only steps done in this process. */
  readonly startStep?: number;
  /** Default process.stderr. */
  readonly stream?: ProgressStream;
  /** Override the stream's TTY detection. */
  readonly tty?: boolean;
  /** Loss smoothing factor α (default 0.05, roughly the last 20 steps). */
  readonly lossSmoothing?: number;
  /** Rate smoothing factor α over per-step durations (default 0.1). */
  readonly rateSmoothing?: number;
  /** Minimum time between redraws on a TTY (default 100 ms). */
  readonly ttyIntervalMs?: number;
  /** Time between plain lines when not a TTY (default 30 s). */
  readonly plainIntervalMs?: number;
  /** Monotonic clock in ms (default performance.now). */
  readonly now?: () => number;
}

/** One update from the loop. */
export interface ProgressUpdate {
  /** Optimizer steps completed. */
  readonly step: number;
  readonly loss?: number;
  readonly lr?: number;
  readonly skipped?: number;
}

/** Renders progress for a loop to a TTY (in place) or a log (periodic lines). */
export class ProgressReporter {
  readonly total: number;
  readonly #stream: ProgressStream;
  readonly #tty: boolean;
  readonly #now: () => number;
  readonly #loss: Ema;
  readonly #stepTime: Ema;
  readonly #ttyInterval: number;
  readonly #plainInterval: number;
  readonly #start: number;
  #lastStep: number;
  #lastTime: number;
  #lastDraw = -Infinity;
  #lineOpen = false;
  #lastPrinted: string | undefined;
  #lastSnapshot: ProgressSnapshot | undefined;
  #lr: number | undefined;
  #skipped = 0;

  constructor(opts: ProgressOptions) {
    this.total = opts.total;
    this.#stream = opts.stream ?? process.stderr;
    this.#tty = opts.tty ?? this.#stream.isTTY === true;
    this.#now = opts.now ?? (() => performance.now());
    this.#loss = new Ema(opts.lossSmoothing ?? 0.05);
    this.#stepTime = new Ema(opts.rateSmoothing ?? 0.1);
    this.#ttyInterval = opts.ttyIntervalMs ?? 100;
    this.#plainInterval = opts.plainIntervalMs ?? 30_000;
    this.#start = this.#now();
    this.#lastStep = opts.startStep ?? 0;
    this.#lastTime = this.#start;
  }

  /** Records the loop's state after a step and redraws/prints when due. */
  update(u: ProgressUpdate): void {
    const t = this.#now();
    if (u.loss !== undefined) this.#loss.push(u.loss);
    if (u.lr !== undefined) this.#lr = u.lr;
    if (u.skipped !== undefined) this.#skipped = u.skipped;
    const steps = u.step - this.#lastStep;
    if (steps > 0) {
      this.#stepTime.push((t - this.#lastTime) / steps);
      this.#lastStep = u.step;
      this.#lastTime = t;
    }
    const snap = this.#snapshot(u.step, t);
    this.#lastSnapshot = snap;
    const last = u.step >= this.total;
    const interval = this.#tty ? this.#ttyInterval : this.#plainInterval;
    if (last || t - this.#lastDraw >= interval) this.#draw(snap, t);
  }

  /** Prints a message on its own line without garbling the TTY progress line. */
  log(message: string): void {
    if (this.#tty && this.#lineOpen) {
      this.#stream.write(`\r\x1b[K${message}\n`);
      if (this.#lastSnapshot !== undefined) this.#stream.write(this.#fit(formatProgress(this.#lastSnapshot)));
    } else {
      this.#stream.write(`${message}\n`);
    }
  }

  /** Draws the final state and ends the TTY line. */
  done(): void {
    if (this.#lastSnapshot !== undefined) this.#draw(this.#lastSnapshot, this.#now(), true);
    if (this.#tty && this.#lineOpen) this.#stream.write('\n');
    this.#lineOpen = false;
  }

  #snapshot(step: number, t: number): ProgressSnapshot {
    const perStep = this.#stepTime.value;
    const snap: ProgressSnapshot = {
      step,
      total: this.total,
      elapsed: (t - this.#start) / 1000,
      skipped: this.#skipped,
      ...(this.#loss.value !== undefined ? { loss: this.#loss.value } : {}),
      ...(this.#lr !== undefined ? { lr: this.#lr } : {}),
      ...(perStep !== undefined && perStep > 0 ? { rate: 1000 / perStep } : {}),
    };
    return snap;
  }

  #draw(snap: ProgressSnapshot, t: number, force = false): void {
    if (!force && t === this.#lastDraw) return;
    this.#lastDraw = t;
    const line = formatProgress(snap);
    if (this.#tty) {
      this.#stream.write(`\r${this.#fit(line)}\x1b[K`);
      this.#lineOpen = true;
    } else if (!force || this.#lastPrinted !== line) {
      this.#stream.write(`${line}\n`);
      this.#lastPrinted = line;
    }
  }

  // Keeps the in-place line within the terminal width so it never wraps (a wrapped line
  // cannot be redrawn with \r).
  #fit(line: string): string {
    const cols = this.#stream.columns;
    return cols !== undefined && cols > 1 && line.length >= cols ? line.slice(0, cols - 1) : line;
  }
}
