/**
 * What the workbench knows about each pipeline component class: how to validate its config and
 * which parameters (names, PyTorch-layout shapes) that config implies. Loaders and `sdwb inspect`
 * use it to check a checkpoint against its architecture before reading any tensor data.
 */
import { ManifestScope } from '../ops/scope.js';
import { shapeOps, type ShapeOnly } from '../ops/shape-ops.js';
import { parseClipTextConfig, type ClipTextConfig } from './clip/config.js';
import { clipTextEncoder, isClipTextBuffer } from './clip/text-encoder.js';
import { parseUnetConfig } from './unet/config.js';
import { parseVaeConfig, type VaeConfig } from './vae/config.js';
import { vaeDecode, vaeEncode } from './vae/vae.js';
import { unetManifest } from './unet/unet.js';

export interface ParsedComponent {
  /** The validated, translated config. */
  readonly config: unknown;
  /** Parameter names → PyTorch-layout shapes the config implies. */
  manifest(): Map<string, number[]>;
}

export interface ComponentKind {
  /** Validate a raw config.json; throws a clear error naming `file` and the key. */
  parse(json: unknown, file: string): ParsedComponent;
  /** Non-parameter buffers a checkpoint may carry (ignored when comparing with the manifest). */
  isBuffer(key: string): boolean;
}

function kind<C>(
  parseConfig: (json: unknown, file: string) => C,
  manifest: (cfg: C) => Map<string, number[]>,
  isBuffer: (key: string) => boolean = () => false,
): ComponentKind {
  return {
    isBuffer,
    parse: (json, file) => {
      const config = parseConfig(json, file);
      return { config, manifest: () => manifest(config) };
    },
  };
}

/** Every key and shape of a CLIP text encoder config, from a dry forward over shapes alone. */
export function clipTextManifest(cfg: ClipTextConfig): Map<string, number[]> {
  const scope = new ManifestScope<ShapeOnly>((_k, shape) => ({ shape: [...shape] }));
  clipTextEncoder(shapeOps, scope, { shape: [1, cfg.maxPositions] }, cfg);
  return new Map([...scope.entries].map(([k, s]) => [k, [...s]]));
}

/** Every key and shape of an AutoencoderKL config: one dry encode and decode over shapes alone. */
export function vaeManifest(cfg: VaeConfig): Map<string, number[]> {
  const scope = new ManifestScope<ShapeOnly>((_k, shape) => ({ shape: [...shape] }));
  const side = cfg.downscale;
  vaeEncode(shapeOps, scope, { shape: [1, side, side, cfg.imageChannels] }, cfg);
  vaeDecode(shapeOps, scope, { shape: [1, 1, 1, cfg.latentChannels] }, cfg);
  return new Map([...scope.entries].map(([k, s]) => [k, s.length === 4 ? [s[3]!, s[2]!, s[0]!, s[1]!] : [...s]]));
}

/** Component kinds by the class name `model_index.json` gives. */
export const COMPONENT_KINDS: ReadonlyMap<string, ComponentKind> = new Map<string, ComponentKind>([
  ['UNet2DConditionModel', kind(parseUnetConfig, unetManifest)],
  ['AutoencoderKL', kind(parseVaeConfig, vaeManifest)],
  ['CLIPTextModel', kind(parseClipTextConfig, clipTextManifest, isClipTextBuffer)],
]);
