/**
 * Original (LDM `AutoencoderKL`: `taming`-style Encoder/Decoder) VAE names ↔ diffusers
 * `AutoencoderKL` names.
 *
 * LDM counts decoder levels bottom-up (`decoder.up.0` is the full-resolution level) while diffusers
 * counts them in execution order (`decoder.up_blocks.0` is the lowest resolution), hence
 * `up.{n−1−i}` ↔ `up_blocks.i`. The mid-block attention stores q/k/v/proj_out as 1×1 convolutions
 * in LDM and as Linear layers in diffusers: same numbers, shape [C, C, 1, 1] vs [C, C].
 */
import type { VaeConfig } from '../../models/vae/config.js';
import { CONV1X1, type InnerRow, type Keymap, type Row } from './apply.js';

const RESNET: readonly InnerRow[] = [['conv_shortcut.', 'nin_shortcut.']];

const MID_ATTENTION: readonly InnerRow[] = [
  ['group_norm.', 'norm.'],
  ['to_q.', 'q.', CONV1X1],
  ['to_k.', 'k.', CONV1X1],
  ['to_v.', 'v.', CONV1X1],
  ['to_out.0.', 'proj_out.', CONV1X1],
];

/** The parts of a VAE config that decide the LDM numbering. */
export type VaeLayout = Pick<VaeConfig, 'blockChannels' | 'layersPerBlock'>;

/** The LDM ↔ diffusers keymap of a VAE with this layout (LDM names without `first_stage_model.`). */
export function ldmVaeKeymap(layout: VaeLayout): Keymap {
  const levels = layout.blockChannels.length;
  const verbatim: Row[] = [['quant_conv.', 'quant_conv.'], ['post_quant_conv.', 'post_quant_conv.']];
  const resnets: Row[] = [];
  const attentions: Row[] = [];
  for (const part of ['encoder', 'decoder'] as const) {
    verbatim.push([`${part}.conv_in.`, `${part}.conv_in.`], [`${part}.conv_out.`, `${part}.conv_out.`]);
    verbatim.push([`${part}.conv_norm_out.`, `${part}.norm_out.`]);
    resnets.push([`${part}.mid_block.resnets.0.`, `${part}.mid.block_1.`], [`${part}.mid_block.resnets.1.`, `${part}.mid.block_2.`]);
    attentions.push([`${part}.mid_block.attentions.0.`, `${part}.mid.attn_1.`]);
  }
  for (let i = 0; i < levels; i++) {
    for (let j = 0; j < layout.layersPerBlock; j++) resnets.push([`encoder.down_blocks.${i}.resnets.${j}.`, `encoder.down.${i}.block.${j}.`]);
    if (i < levels - 1) verbatim.push([`encoder.down_blocks.${i}.downsamplers.0.`, `encoder.down.${i}.downsample.`]);
    const ldmLevel = levels - 1 - i;
    // Decoder blocks have one ResNet more than encoder blocks.
    for (let j = 0; j <= layout.layersPerBlock; j++) resnets.push([`decoder.up_blocks.${i}.resnets.${j}.`, `decoder.up.${ldmLevel}.block.${j}.`]);
    if (i < levels - 1) verbatim.push([`decoder.up_blocks.${i}.upsamplers.0.`, `decoder.up.${ldmLevel}.upsample.`]);
  }
  return {
    name: 'LDM VAE',
    sections: [{ modules: verbatim }, { modules: resnets, inner: RESNET }, { modules: attentions, inner: MID_ATTENTION }],
  };
}
