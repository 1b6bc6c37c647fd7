/** Where the files shipped with the package (`assets/`) are, from src/ under tsx or from dist/. */
import { access } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

let root: Promise<string> | undefined;

/** The package root: the nearest folder above this module holding package.json. */
export function packageRoot(): Promise<string> {
  root ??= (async () => {
    let dir = path.dirname(fileURLToPath(import.meta.url));
    for (;;) {
      try {
        await access(path.join(dir, 'package.json'));
        return dir;
      } catch {
        const parent = path.dirname(dir);
        if (parent === dir) throw new Error(`no package.json above ${fileURLToPath(import.meta.url)} (cannot find the bundled assets)`);
        dir = parent;
      }
    }
  })();
  return root;
}

/** A path under the package's `assets/` folder. */
export async function assetPath(...parts: string[]): Promise<string> {
  return path.join(await packageRoot(), 'assets', ...parts);
}
