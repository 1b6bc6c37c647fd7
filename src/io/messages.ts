/**
 * Pieces of the one-line error messages the file readers and writers (safetensors, zip, torch
 * checkpoints) build from untrusted names and texts: one definition, so every reader escapes alike.
 */

/** A name or text from a file as a JSON string literal, cut to 120 characters (hostile names can be huge). */
export function quote(text: string): string {
  return JSON.stringify(text.length > 120 ? `${text.slice(0, 120)}…` : text);
}

/** `text` with control characters and line separators escaped (`\uXXXX`), so a message stays on one line. */
export function oneLine(text: string): string {
  return text.replace(/[\u0000-\u001f\u007f\u2028\u2029]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
}

/** The message of a caught error (anything thrown). */
export function describeError(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
