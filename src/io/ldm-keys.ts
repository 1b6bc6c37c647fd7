/**
 * Original single-file (CompVis/LDM) checkpoint names ↔ diffusers/transformers names for the three
 * Stable Diffusion components, in both directions.
 *
 * A single file holds every component under its LDM prefix:
 *   `model.diffusion_model.*`          the UNet
 *   `first_stage_model.*`              the VAE
 *   `cond_stage_model.transformer.*`   SD 1.x: transformers' CLIPTextModel (names verbatim)
 *   `cond_stage_model.model.*`         SD 2.x: an OpenCLIP text tower
 * The renaming itself lives in the tables of `keymaps/`; this module picks the tables for a layout,
 * adds the prefixes and knows which LDM keys are not weights of the three models.
 */
import {
  mapKey,
  mapKeys,
  withForeignPrefix,
  type KeyPair,
  type Keymap,
  type MappedKey,
} from './keymaps/apply.js';
import { ldmClipKeymap } from './keymaps/ldm-clip.js';
import { ldmUnetKeymap, type UnetLayout } from './keymaps/ldm-unet.js';
import { ldmVaeKeymap, type VaeLayout } from './keymaps/ldm-vae.js';
import { openClipKeymap } from './keymaps/openclip.js';

export type { KeyPair, MappedKey, Transform } from './keymaps/apply.js';

/** The components of a single file, named as diffusers names their folders. */
export type ComponentName = 'unet' | 'vae' | 'text_encoder';
export const COMPONENT_NAMES: readonly ComponentName[] = ['unet', 'vae', 'text_encoder'];

/** SD 1.x stores transformers' CLIP; SD 2.x stores OpenCLIP. */
export type TextEncoderLayout = 'clip' | 'openclip';

export const LDM_PREFIX = {
  unet: 'model.diffusion_model.',
  vae: 'first_stage_model.',
  clip: 'cond_stage_model.transformer.',
  openclip: 'cond_stage_model.model.',
} as const;

/** EMA weights: LDM's `LitEma` registers each UNet parameter as a buffer named without its dots. */
export const EMA_PREFIX = 'model_ema.';

/** What decides the single-file names of a model. */
export interface LdmLayout {
  readonly unet: UnetLayout;
  readonly vae: VaeLayout;
  readonly textEncoder: { readonly layout: TextEncoderLayout; readonly numLayers: number };
}

const keymapCache = new WeakMap<LdmLayout, Readonly<Record<ComponentName, Keymap>>>();

/** The prefixed keymap of every component (foreign side = full single-file names); cached per layout object. */
export function ldmKeymaps(layout: LdmLayout): Readonly<Record<ComponentName, Keymap>> {
  const cached = keymapCache.get(layout);
  if (cached !== undefined) return cached;
  const text =
    layout.textEncoder.layout === 'clip'
      ? withForeignPrefix(ldmClipKeymap(), LDM_PREFIX.clip)
      : withForeignPrefix(openClipKeymap(layout.textEncoder.numLayers), LDM_PREFIX.openclip);
  const maps = {
    unet: withForeignPrefix(ldmUnetKeymap(layout.unet), LDM_PREFIX.unet),
    vae: withForeignPrefix(ldmVaeKeymap(layout.vae), LDM_PREFIX.vae),
    text_encoder: text,
  };
  keymapCache.set(layout, maps);
  return maps;
}

/** The component whose LDM prefix `key` carries, if any. */
export function componentOfLdmKey(key: string): ComponentName | undefined {
  if (key.startsWith(LDM_PREFIX.unet)) return 'unet';
  if (key.startsWith(LDM_PREFIX.vae)) return 'vae';
  if (key.startsWith(LDM_PREFIX.clip) || key.startsWith(LDM_PREFIX.openclip)) return 'text_encoder';
  return undefined;
}

/** A single-file key's diffusers name(s) (several for a fused tensor; none if not a mapped weight or ignored). */
export function ldmToDiffusers(layout: LdmLayout, ldmKey: string): { component: ComponentName; mapped: MappedKey[] } | undefined {
  const component = componentOfLdmKey(ldmKey);
  if (component === undefined || ignoredLdmKey(ldmKey, layout.textEncoder.numLayers) !== undefined) return undefined;
  const mapped = mapKey(ldmKeymaps(layout)[component], ldmKey, 'foreign');
  return mapped.length > 0 ? { component, mapped } : undefined;
}

/** A diffusers key's single-file name (with the transform to apply to its tensor). */
export function diffusersToLdm(layout: LdmLayout, component: ComponentName, key: string): MappedKey | undefined {
  return mapKey(ldmKeymaps(layout)[component], key, 'diffusers')[0];
}

/** The correspondence for a component's diffusers keys; throws if a key has no single-file name. */
export function ldmPairsOf(layout: LdmLayout, component: ComponentName, diffusersKeys: Iterable<string>): KeyPair[] {
  const { pairs, unmapped } = mapKeys(ldmKeymaps(layout)[component], diffusersKeys, 'diffusers');
  if (unmapped.length > 0) {
    throw new Error(`${component}: ${unmapped.length} key(s) have no single-file name (first: '${unmapped[0]}')`);
  }
  return pairs;
}

/**
 * Older SD 1.x files name the CLIP text encoder without CLIPTextModel's `text_model.` level (saved
 * with an older transformers); AUTOMATIC1111 renames them the same way when loading. Read-only
 * aliases: they are applied before mapping and never written.
 */
const LEGACY_LDM_PREFIXES: readonly (readonly [legacy: string, canonical: string])[] = [
  [`${LDM_PREFIX.clip}embeddings.`, `${LDM_PREFIX.clip}text_model.embeddings.`],
  [`${LDM_PREFIX.clip}encoder.`, `${LDM_PREFIX.clip}text_model.encoder.`],
  [`${LDM_PREFIX.clip}final_layer_norm.`, `${LDM_PREFIX.clip}text_model.final_layer_norm.`],
];

/** A single-file key with legacy aliases resolved (see {@link LEGACY_LDM_PREFIXES}). */
export function canonicalLdmKey(key: string): string {
  for (const [legacy, canonical] of LEGACY_LDM_PREFIXES) {
    if (key.startsWith(legacy)) return canonical + key.slice(legacy.length);
  }
  return key;
}

/** The EMA buffer name of a single-file UNet key (`model.diffusion_model.a.b` → `model_ema.diffusion_modelab`). */
export function emaKeyOf(ldmUnetKey: string): string {
  if (!ldmUnetKey.startsWith(LDM_PREFIX.unet)) throw new Error(`'${ldmUnetKey}' is not a UNet key (no '${LDM_PREFIX.unet}' prefix)`);
  return EMA_PREFIX + ldmUnetKey.slice('model.'.length).replaceAll('.', '');
}

/** The 12 DDPM schedule buffers LDM's `register_schedule` saves at the top level. */
const SCHEDULE_BUFFERS: ReadonlySet<string> = new Set([
  'betas',
  'alphas_cumprod',
  'alphas_cumprod_prev',
  'sqrt_alphas_cumprod',
  'sqrt_one_minus_alphas_cumprod',
  'log_one_minus_alphas_cumprod',
  'sqrt_recip_alphas_cumprod',
  'sqrt_recipm1_alphas_cumprod',
  'posterior_variance',
  'posterior_log_variance_clipped',
  'posterior_mean_coef1',
  'posterior_mean_coef2',
]);

/**
 * Why a single-file key is deliberately not loaded, or undefined if it should be a weight.
 * `textLayers` is the text encoder's layer count: OpenCLIP resblocks at or above it are unused.
 */
export function ignoredLdmKey(key: string, textLayers?: number): string | undefined {
  if (SCHEDULE_BUFFERS.has(key)) return 'DDPM schedule buffer (the scheduler config describes the schedule)';
  if (key === 'logvar') return 'LDM loss weighting, not a model weight';
  if (key === 'model_ema.decay' || key === 'model_ema.num_updates') return 'EMA bookkeeping';
  if (key.startsWith(EMA_PREFIX)) return 'EMA copy of a UNet weight (used instead of the UNet weights with --ema)';
  if (key === `${LDM_PREFIX.clip}text_model.embeddings.position_ids`) return 'position-id buffer of the old transformers CLIPTextModel, not a weight';
  if (key === `${LDM_PREFIX.openclip}text_projection`) return "OpenCLIP's text projection: not part of CLIPTextModel (SD 2.x conditions on token states)";
  if (key === `${LDM_PREFIX.openclip}logit_scale`) return "OpenCLIP's contrastive temperature: not used by Stable Diffusion";
  if (key === `${LDM_PREFIX.openclip}attn_mask`) return "OpenCLIP's causal-mask buffer (rebuilt by the model)";
  if (key.startsWith(`${LDM_PREFIX.vae}loss.`)) return 'VAE training loss (LPIPS/discriminator) weights';
  const block = /^cond_stage_model\.model\.transformer\.resblocks\.(\d+)\./.exec(key);
  if (block !== null && textLayers !== undefined && Number(block[1]) >= textLayers) {
    return `OpenCLIP resblock ${block[1]}: SD 2.x takes the penultimate layer's output, so this block never runs (diffusers drops it too)`;
  }
  return undefined;
}
