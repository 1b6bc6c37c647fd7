/**
 * SD 1.x's text encoder in original single files: LDM's `FrozenCLIPEmbedder` wraps transformers'
 * `CLIPTextModel` as `transformer`, so below `cond_stage_model.transformer.` the names are
 * transformers' own and map verbatim.
 */
import type { Keymap } from './apply.js';

/** The LDM ↔ transformers keymap of SD 1.x's CLIP text encoder (LDM names without `cond_stage_model.transformer.`). */
export function ldmClipKeymap(): Keymap {
  return { name: 'LDM CLIP text encoder', sections: [{ modules: [['text_model.', 'text_model.']] }] };
}
