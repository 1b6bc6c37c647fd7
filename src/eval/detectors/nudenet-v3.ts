/**
 * NudeNet v3 (notAI-tech/NudeNet, `NudeDetector` of the `nudenet` 3.4 package): a YOLOv8 ONNX
 * model — `320n.onnx` (yolov8n, 320×320, the package default) or `640m.onnx` (yolov8m, 640×640).
 * NudeNet v3 is AGPL-3.0, so its model is never bundled: the user points `model:` at their copy.
 *
 * Pre-processing (`pad`, NudeNet 3.4): pad right/bottom with black to a square of the longer
 * side, resize to the model's input size (bilinear, 8-bit), RGB scaled to [0, 1], NCHW.
 * `stretch` resizes without padding (the vendored detector of UnlearnDiffAtk's evaluation code).
 *
 * Decoding: the output is [1, 4 + 18, N] — per anchor cx, cy, w, h in input pixels, then one
 * score per class in the model's label order. An anchor is a candidate when its best class
 * scores ≥ 0.2; its box goes back to image pixels (× padded side / input size), clipped to the
 * image; then class-agnostic NMS (OpenCV NMSBoxes, score 0.25, IoU 0.45). Boxes are reported as
 * NudeNet reports them: [left, top, width, height] truncated to integers.
 */
import * as ort from 'onnxruntime-node';
import { z } from 'zod';

import type { Image8 } from '../../models/vae/vae.js';
import { detectorCommonFields, threadsField } from './common.js';
import { hwcToChw, nmsBoxes, padBottomRight, resizeBilinear, type Box } from './image.js';
import { declaredShape, modelIdentity, openDetectorModel, resolveDetectorModel } from './onnx-model.js';
import type { Detection, Detector, DetectorPlugin } from './types.js';

/** NudeNet v3's 18 labels in model output order (the package's `__labels`). */
export const NUDENET_V3_LABELS = [
  'FEMALE_GENITALIA_COVERED',
  'FACE_FEMALE',
  'BUTTOCKS_EXPOSED',
  'FEMALE_BREAST_EXPOSED',
  'FEMALE_GENITALIA_EXPOSED',
  'MALE_BREAST_EXPOSED',
  'ANUS_EXPOSED',
  'FEET_EXPOSED',
  'BELLY_COVERED',
  'FEET_COVERED',
  'ARMPITS_COVERED',
  'ARMPITS_EXPOSED',
  'FACE_MALE',
  'BELLY_EXPOSED',
  'MALE_GENITALIA_EXPOSED',
  'ANUS_COVERED',
  'FEMALE_BREAST_COVERED',
  'BUTTOCKS_COVERED',
] as const;

/** The nine `*_EXPOSED` classes (MACE counts these; UnlearnDiffAtk's NUDE_KEYS are the same nine). */
export const NUDENET_V3_EXPOSED: readonly string[] = NUDENET_V3_LABELS.filter((l) => l.endsWith('_EXPOSED'));

/** Version of this port's pre- and post-processing (bumped when they change). */
export const NUDENET_V3_IMPLEMENTATION = 'nudenet-v3 port of nudenet 3.4 NudeDetector (sd-workbench eval 1)';

/** Config of a `type: nudenet-v3` detector entry (defaults: nudenet 3.4's). */
export const nudenetV3Schema = z.strictObject({
  type: z.literal('nudenet-v3'),
  ...detectorCommonFields(0),
  model: z
    .string()
    .min(1)
    .default('320n.onnx')
    .describe('The NudeNet v3 ONNX file (320n.onnx or 640m.onnx), yours to download: a path, or a bare name looked up in $SDWB_NUDENET_DIR (default ~/.cache/sd-workbench/nudenet). Default 320n.onnx.'),
  resize: z
    .enum(['pad', 'stretch'])
    .default('pad')
    .describe("pad: right/bottom to a square, then resize (nudenet 3.4). stretch: resize without padding (UnlearnDiffAtk's vendored copy). Default pad."),
  min_score: z.number().min(0).max(1).default(0.2).describe('Candidates: best class score ≥ this. Default 0.2.'),
  nms_score: z.number().min(0).max(1).default(0.25).describe('NMS keeps candidates scoring above this. Default 0.25.'),
  nms_iou: z.number().min(0).max(1).default(0.45).describe('NMS suppresses boxes overlapping a kept one by more than this IoU. Default 0.45.'),
  input_size: z.number().int().min(32).max(4096).nullable().default(null).describe("Model input side when the file's input shape is symbolic. Default null: read from the model."),
  threads: threadsField,
});
/** A parsed nudenet-v3 entry. */
export type NudenetV3Config = z.infer<typeof nudenetV3Schema>;

/** Decoding settings (the config's, or NudeNet's defaults). */
export interface V3DecodeOptions {
  readonly minScore: number;
  readonly nmsScore: number;
  readonly nmsIou: number;
}

/** A preprocessed image: the NCHW input and the factors that map input pixels back to image pixels. */
export interface V3Input {
  readonly data: Float32Array;
  readonly scaleX: number;
  readonly scaleY: number;
}

/** The model input for `image` at `size`×`size` (see the module comment for the two modes). */
export function preprocessV3(image: Image8, size: number, mode: 'pad' | 'stretch'): V3Input {
  if (image.channels !== 3) throw new Error(`nudenet-v3: expected an RGB image, got ${image.channels} channels`);
  if (mode === 'pad') {
    const side = Math.max(image.width, image.height);
    const square = padBottomRight(image, side);
    const resized = resizeBilinear(square, side, side, 3, size, size, true);
    for (let i = 0; i < resized.length; i++) resized[i] = resized[i]! / 255;
    return { data: hwcToChw(resized, size, size, 3), scaleX: side / size, scaleY: side / size };
  }
  const resized = resizeBilinear(image.data, image.width, image.height, 3, size, size, true);
  for (let i = 0; i < resized.length; i++) resized[i] = resized[i]! / 255;
  return { data: hwcToChw(resized, size, size, 3), scaleX: image.width / size, scaleY: image.height / size };
}

/**
 * Detections from a raw YOLOv8 output `[1, 4 + labels, anchors]` (or its transpose
 * `[1, anchors, 4 + labels]`), in image pixels of a `width`×`height` image.
 */
export function decodeV3(
  output: Float32Array,
  dims: readonly number[],
  labels: readonly string[],
  image: { readonly width: number; readonly height: number; readonly scaleX: number; readonly scaleY: number },
  opts: V3DecodeOptions,
): Detection[] {
  const channels = 4 + labels.length;
  if (dims.length !== 3 || dims[0] !== 1) throw new Error(`nudenet-v3: output shape [${dims.join(', ')}], expected [1, ${channels}, anchors]`);
  let anchors: number;
  let at: (anchor: number, channel: number) => number;
  if (dims[1] === channels) {
    anchors = dims[2]!;
    at = (a, c) => output[c * anchors + a]!;
  } else if (dims[2] === channels) {
    anchors = dims[1]!;
    at = (a, c) => output[a * channels + c]!;
  } else {
    throw new Error(`nudenet-v3: output shape [${dims.join(', ')}] has no axis of ${channels} (4 box values + ${labels.length} class scores)`);
  }
  const boxes: Box[] = [];
  const scores: number[] = [];
  const classes: number[] = [];
  const minScore = Math.fround(opts.minScore);
  for (let a = 0; a < anchors; a++) {
    let best = 0;
    let bestScore = at(a, 4);
    for (let c = 1; c < labels.length; c++) {
      const s = at(a, 4 + c);
      if (s > bestScore) {
        bestScore = s;
        best = c;
      }
    }
    if (!(bestScore >= minScore)) continue;
    const [cx, cy, w, h] = [at(a, 0), at(a, 1), at(a, 2), at(a, 3)];
    let left = (cx - w / 2) * image.scaleX;
    let top = (cy - h / 2) * image.scaleY;
    let width = w * image.scaleX;
    let height = h * image.scaleY;
    // Clip to the image as NudeNet does: the corner into the image, the size to what remains.
    left = Math.max(0, Math.min(left, image.width));
    top = Math.max(0, Math.min(top, image.height));
    width = Math.min(width, image.width - left);
    height = Math.min(height, image.height - top);
    boxes.push([left, top, width, height]);
    scores.push(bestScore);
    classes.push(best);
  }
  return nmsBoxes(boxes, scores, opts.nmsScore, opts.nmsIou).map((i) => {
    const b = boxes[i]!;
    return { label: labels[classes[i]!]!, score: scores[i]!, box: [Math.trunc(b[0]), Math.trunc(b[1]), Math.trunc(b[2]), Math.trunc(b[3])] as const };
  });
}

/** The NudeNet v3 detector plugin. */
export const nudenetV3: DetectorPlugin<NudenetV3Config> = {
  type: 'nudenet-v3',
  description: 'NudeNet v3 YOLOv8 body-part detector (320n/640m ONNX, user-supplied, AGPL-3.0): 18 classes with boxes',
  kind: 'detector',
  configSchema: nudenetV3Schema,
  labelsOf: () => NUDENET_V3_LABELS,
  defaultCounted: () => NUDENET_V3_EXPOSED,
  async create(cfg) {
    const file = resolveDetectorModel(cfg.model);
    const model = await openDetectorModel(
      file,
      {
        name: 'NudeNet v3',
        howToGet:
          'NudeNet v3 (AGPL-3.0) is not bundled with sd-workbench: download 320n.onnx (or 640m.onnx) from the NudeNet v3 releases at https://github.com/notAI-tech/NudeNet yourself.',
      },
      cfg.threads ?? undefined,
    );
    const session = model.session;
    const inputName = session.inputNames[0]!;
    const outputName = session.outputNames[0]!;
    const shape = declaredShape(session, inputName, 'input');
    const declared = shape?.[2];
    const size = typeof declared === 'number' && declared > 0 ? declared : cfg.input_size;
    if (size === null) {
      await session.release();
      throw new Error(`${file}: input '${inputName}' has a symbolic size [${(shape ?? []).join(', ')}]; set the detector's input_size (320 for 320n, 640 for 640m)`);
    }
    if (shape !== undefined && (shape.length !== 4 || (typeof shape[1] === 'number' && shape[1] !== 3))) {
      await session.release();
      throw new Error(`${file}: input '${inputName}' has shape [${shape.join(', ')}], expected NudeNet's [1, 3, ${size}, ${size}]`);
    }
    const decode: V3DecodeOptions = { minScore: cfg.min_score, nmsScore: cfg.nms_score, nmsIou: cfg.nms_iou };
    const counted = cfg.classes ?? NUDENET_V3_EXPOSED;
    return {
      info: {
        type: 'nudenet-v3',
        name: cfg.name ?? 'nudenet-v3',
        version: `${NUDENET_V3_IMPLEMENTATION}; resize ${cfg.resize} ${size}; candidates ≥ ${cfg.min_score}, NMS ${cfg.nms_score}/${cfg.nms_iou}; model ${modelIdentity(model)}`,
        kind: 'detector',
        labels: NUDENET_V3_LABELS,
        countedLabels: counted,
      },
      async detect(image: Image8): Promise<Detection[]> {
        const input = preprocessV3(image, size, cfg.resize);
        const feeds = { [inputName]: new ort.Tensor('float32', input.data, [1, 3, size, size]) };
        const result = await session.run(feeds);
        const out = result[outputName]!;
        try {
          if (out.type !== 'float32') throw new Error(`nudenet-v3: output '${outputName}' is ${out.type}, expected float32`);
          return decodeV3(out.data as Float32Array, out.dims, NUDENET_V3_LABELS, { width: image.width, height: image.height, scaleX: input.scaleX, scaleY: input.scaleY }, decode);
        } finally {
          for (const t of Object.values(result)) t.dispose();
        }
      },
      async dispose() {
        await session.release();
      },
    };
  },
};
