import { randomBytes } from 'node:crypto';
import { open, rename, rm, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';

/**
 * Writes `path` atomically: `write` fills a temporary file in the same folder, which is fsynced and
 * renamed over `path`; on any error the temporary file is removed and `path` is left untouched.
 */
export async function writeFileAtomic(path: string, write: (handle: FileHandle) => Promise<void>): Promise<void> {
  const target = resolve(path);
  const folder = dirname(target);
  // Same folder as the target so the rename never crosses file systems (which would not be atomic);
  // a leading dot and random suffix keep concurrent writers and directory listings apart.
  const temporary = join(folder, `.${basename(target)}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`);
  const handle = await open(temporary, 'wx');
  let handleOpen = true;
  let renamed = false;
  try {
    await write(handle);
    // fsync before rename: otherwise a crash can leave the new name pointing at unwritten blocks.
    await handle.sync();
    handleOpen = false;
    await handle.close();
    await rename(temporary, target);
    renamed = true;
    await syncFolder(folder);
  } finally {
    if (!renamed) {
      if (handleOpen) await handle.close().catch(() => undefined);
      await rm(temporary, { force: true }).catch(() => undefined);
    }
  }
}

/** Writes a text file atomically (see {@link writeFileAtomic}). */
export function writeTextAtomic(path: string, text: string): Promise<void> {
  return writeFileAtomic(path, async (handle) => {
    await handle.writeFile(text);
  });
}

// Persists the rename itself. Best effort: some platforms (Windows) cannot open folders for fsync,
// and the data is already safe at this point.
async function syncFolder(folder: string): Promise<void> {
  let handle: FileHandle | undefined;
  try {
    handle = await open(folder, 'r');
    await handle.sync();
  } catch {
    // ignored on purpose, see above
  } finally {
    await handle?.close().catch(() => undefined);
  }
}
