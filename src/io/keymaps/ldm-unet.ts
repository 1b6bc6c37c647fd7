/**
 * Original (CompVis/LDM `openaimodel.UNetModel`) UNet names ↔ diffusers `UNet2DConditionModel`
 * names, for SD 1.x and 2.x and any size of that architecture.
 *
 * LDM numbers its blocks flat: `input_blocks.0` is conv_in, then for each level one entry per
 * ResNet (its attention, if any, is sub-module `.1` of the same entry) and one for the
 * downsampler; `output_blocks` likewise per up block, with the upsampler appended to the last
 * entry of the block. The module table below is generated from those counts; what is inside each
 * module is renamed by small fixed tables. The transformer blocks have the same names on both
 * sides (LDM's SpatialTransformer is what diffusers copied), so attentions map verbatim.
 */
import type { UnetConfig } from '../../models/unet/config.js';
import type { InnerRow, Keymap, Row, Section } from './apply.js';

/** Inside a ResBlock: LDM's Sequential indices ↔ diffusers' named layers. */
const RESNET: readonly InnerRow[] = [
  ['norm1.', 'in_layers.0.'],
  ['conv1.', 'in_layers.2.'],
  ['time_emb_proj.', 'emb_layers.1.'],
  ['norm2.', 'out_layers.0.'],
  ['conv2.', 'out_layers.3.'],
  ['conv_shortcut.', 'skip_connection.'],
];

/** Top-level layers outside the blocks. */
const TOP: readonly Row[] = [
  ['conv_in.', 'input_blocks.0.0.'],
  ['time_embedding.linear_1.', 'time_embed.0.'],
  ['time_embedding.linear_2.', 'time_embed.2.'],
  ['conv_norm_out.', 'out.0.'],
  ['conv_out.', 'out.2.'],
];

/** The parts of a UNet config that decide LDM's block numbering. */
export type UnetLayout = Pick<UnetConfig, 'layersPerBlock' | 'downBlocks' | 'upBlocks'>;

/** The LDM ↔ diffusers keymap of a UNet with this layout (LDM names without `model.diffusion_model.`). */
export function ldmUnetKeymap(layout: UnetLayout): Keymap {
  const levels = layout.layersPerBlock.length;
  const resnets: Row[] = [
    ['mid_block.resnets.0.', 'middle_block.0.'],
    ['mid_block.resnets.1.', 'middle_block.2.'],
  ];
  const verbatim: Row[] = [...TOP, ['mid_block.attentions.0.', 'middle_block.1.']];

  let input = 1;
  for (let i = 0; i < levels; i++) {
    const attn = layout.downBlocks[i] === 'CrossAttnDownBlock2D';
    for (let j = 0; j < layout.layersPerBlock[i]!; j++, input++) {
      resnets.push([`down_blocks.${i}.resnets.${j}.`, `input_blocks.${input}.0.`]);
      if (attn) verbatim.push([`down_blocks.${i}.attentions.${j}.`, `input_blocks.${input}.1.`]);
    }
    if (i < levels - 1) verbatim.push([`down_blocks.${i}.downsamplers.0.conv.`, `input_blocks.${input++}.0.op.`]);
  }

  let output = 0;
  for (let i = 0; i < levels; i++) {
    const attn = layout.upBlocks[i] === 'CrossAttnUpBlock2D';
    // Up block i mirrors level levels−1−i and has one ResNet more (it also takes the downsampler's skip).
    const layers = layout.layersPerBlock[levels - 1 - i]! + 1;
    for (let j = 0; j < layers; j++, output++) {
      resnets.push([`up_blocks.${i}.resnets.${j}.`, `output_blocks.${output}.0.`]);
      if (attn) verbatim.push([`up_blocks.${i}.attentions.${j}.`, `output_blocks.${output}.1.`]);
      if (j === layers - 1 && i < levels - 1) {
        verbatim.push([`up_blocks.${i}.upsamplers.0.`, `output_blocks.${output}.${attn ? 2 : 1}.`]);
      }
    }
  }
  const sections: Section[] = [{ modules: resnets, inner: RESNET }, { modules: verbatim }];
  return { name: 'LDM UNet', sections };
}
