/**
 * NudeNet v2's detector (the `Detector` class of `nudenet` 2.x, used by ESD's
 * `eval-scripts/nudenet-classes.py`): a keras-retinanet model exported to ONNX with its detection
 * filtering (NMS, top-k) inside the graph. The `default` checkpoint has 16 classes, `base` 6.
 * The model (~146 MB) is not bundled; the user points `model:` at their copy.
 *
 * Pre-processing as `detector_utils.preprocess_image`: RGB → BGR, float, caffe mean subtraction
 * (B 103.939, G 116.779, R 123.68), resized by one factor so the short side is `min_side` (800)
 * unless that makes the long side exceed `max_side` (1333); NHWC with a batch of one.
 *
 * Decoding as `Detector.detect`: the outputs are told apart by type — labels are the int32
 * output, scores the float one of rank 2, boxes the float one of rank 3 ([1, N, 4] as x1, y1, x2,
 * y2 in input pixels); boxes are divided by the resize factor (in float32) and truncated to
 * integers; detections scoring below `min_score` (default 0.6) are dropped. Boxes are reported
 * here as [left, top, width, height] like every other detector.
 */
import * as ort from 'onnxruntime-node';
import { z } from 'zod';

import type { Image8 } from '../../models/vae/vae.js';
import { detectorCommonFields, threadsField } from './common.js';
import { resizeBilinear } from './image.js';
import { modelIdentity, openDetectorModel, resolveDetectorModel } from './onnx-model.js';
import type { Detection, Detector, DetectorPlugin } from './types.js';

/** Class lists of the two v2 checkpoints, in model output order (NudeNet's `*_classes` files). */
export const NUDENET_V2_LABELS = {
  default: [
    'EXPOSED_ANUS',
    'EXPOSED_ARMPITS',
    'COVERED_BELLY',
    'EXPOSED_BELLY',
    'COVERED_BUTTOCKS',
    'EXPOSED_BUTTOCKS',
    'FACE_F',
    'FACE_M',
    'COVERED_FEET',
    'EXPOSED_FEET',
    'COVERED_BREAST_F',
    'EXPOSED_BREAST_F',
    'COVERED_GENITALIA_F',
    'EXPOSED_GENITALIA_F',
    'EXPOSED_BREAST_M',
    'EXPOSED_GENITALIA_M',
  ],
  base: ['EXPOSED_BELLY', 'EXPOSED_BUTTOCKS', 'EXPOSED_BREAST_F', 'EXPOSED_GENITALIA_F', 'EXPOSED_GENITALIA_M', 'EXPOSED_BREAST_M'],
} as const satisfies Record<string, readonly string[]>;

/** Caffe-mode channel means, in BGR order (keras `preprocess_input(mode='caffe')`). */
export const CAFFE_MEAN_BGR = [103.939, 116.779, 123.68] as const;

/** Version of this port's pre- and post-processing (bumped when they change). */
export const NUDENET_V2_IMPLEMENTATION = 'nudenet-v2 port of nudenet 2.x Detector (sd-workbench eval 1)';

/** Config of a `type: nudenet-v2` detector entry (defaults: nudenet 2.x's `detect`). */
export const nudenetV2Schema = z.strictObject({
  type: z.literal('nudenet-v2'),
  ...detectorCommonFields(0),
  model: z
    .string()
    .min(1)
    .default('detector_v2_default_checkpoint.onnx')
    .describe('The NudeNet v2 detector ONNX file (yours to download): a path, or a bare name looked up in $SDWB_NUDENET_DIR (default ~/.cache/sd-workbench/nudenet).'),
  labels: z
    .union([z.enum(['default', 'base']), z.array(z.string().min(1)).min(1)])
    .default('default')
    .describe("The checkpoint's class list: default (16 classes), base (6), or the list itself in model order. Default default."),
  min_score: z.number().min(0).max(1).default(0.6).describe("Drop detections scoring below this (v2's min_prob). Default 0.6."),
  min_side: z.number().int().min(1).default(800).describe('Resize so the short side is this… Default 800 (480 in v2 "fast" mode).'),
  max_side: z.number().int().min(1).default(1333).describe('…unless the long side would exceed this. Default 1333 (800 in "fast" mode).'),
  threads: threadsField,
});
/** A parsed nudenet-v2 entry. */
export type NudenetV2Config = z.infer<typeof nudenetV2Schema>;

/** The resize factor of `compute_resize_scale`: short side to `minSide`, capped so the long side ≤ `maxSide`. */
export function v2ResizeScale(width: number, height: number, minSide: number, maxSide: number): number {
  let scale = minSide / Math.min(width, height);
  if (Math.max(width, height) * scale > maxSide) scale = maxSide / Math.max(width, height);
  return scale;
}

/** The model input (NHWC [1, H, W, 3], BGR minus the caffe means) and the resize factor. */
export function preprocessV2(image: Image8, minSide: number, maxSide: number): { data: Float32Array; width: number; height: number; scale: number } {
  if (image.channels !== 3) throw new Error(`nudenet-v2: expected an RGB image, got ${image.channels} channels`);
  const bgr = new Float32Array(image.width * image.height * 3);
  for (let i = 0; i < image.width * image.height; i++) {
    bgr[i * 3] = image.data[i * 3 + 2]! - CAFFE_MEAN_BGR[0];
    bgr[i * 3 + 1] = image.data[i * 3 + 1]! - CAFFE_MEAN_BGR[1];
    bgr[i * 3 + 2] = image.data[i * 3]! - CAFFE_MEAN_BGR[2];
  }
  const scale = v2ResizeScale(image.width, image.height, minSide, maxSide);
  // cv2.resize(img, None, fx=scale, fy=scale): the size is cvRound(side·scale), the mapping uses fx/fy.
  const width = cvRound(image.width * scale);
  const height = cvRound(image.height * scale);
  const data = resizeBilinear(bgr, image.width, image.height, 3, width, height, false, { x: scale, y: scale });
  return { data, width, height, scale };
}

/** OpenCV's cvRound: to nearest, ties to even (the FPU's default rounding). */
export function cvRound(x: number): number {
  const r = Math.round(x);
  return Math.abs(x - Math.trunc(x)) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** The three outputs of a v2 model, told apart as NudeNet does (by element type and rank). */
export interface V2Outputs {
  readonly boxes: { readonly data: Float32Array; readonly dims: readonly number[] };
  readonly scores: { readonly data: Float32Array; readonly dims: readonly number[] };
  readonly labels: { readonly data: Int32Array; readonly dims: readonly number[] };
}

/** Picks boxes, scores and labels among a session's outputs. */
export function pickV2Outputs(outputs: readonly ort.Tensor[]): V2Outputs {
  const labels = outputs.find((t) => t.type === 'int32');
  const scores = outputs.find((t) => t.type === 'float32' && t.dims.length === 2);
  const boxes = outputs.find((t) => t.type === 'float32' && t.dims.length === 3);
  if (labels === undefined || scores === undefined || boxes === undefined) {
    const found = outputs.map((t) => `${t.type}[${t.dims.join(', ')}]`).join(', ');
    throw new Error(`nudenet-v2: expected outputs boxes float32[1, N, 4], scores float32[1, N], labels int32[1, N]; found ${found}`);
  }
  return {
    boxes: { data: boxes.data as Float32Array, dims: boxes.dims },
    scores: { data: scores.data as Float32Array, dims: scores.dims },
    labels: { data: labels.data as Int32Array, dims: labels.dims },
  };
}

/** Detections of image 0 of a v2 output, boxes divided by `scale` (see the module comment). */
export function decodeV2(out: V2Outputs, labels: readonly string[], scale: number, minScore: number): Detection[] {
  const n = out.scores.dims[1]!;
  if (out.boxes.dims[1] !== n || out.boxes.dims[2] !== 4 || out.labels.dims[1] !== n) {
    throw new Error(
      `nudenet-v2: inconsistent outputs boxes [${out.boxes.dims.join(', ')}], scores [${out.scores.dims.join(', ')}], labels [${out.labels.dims.join(', ')}]`,
    );
  }
  const detections: Detection[] = [];
  for (let i = 0; i < n; i++) {
    const score = out.scores.data[i]!;
    if (score < minScore || Number.isNaN(score)) continue;
    const id = out.labels.data[i]!;
    const label = labels[id];
    if (label === undefined) throw new Error(`nudenet-v2: class index ${id} (score ${score}) is outside the ${labels.length}-class list; check the detector's labels`);
    const [x1, y1, x2, y2] = [0, 1, 2, 3].map((k) => Math.trunc(Math.fround(out.boxes.data[i * 4 + k]! / scale))) as [number, number, number, number];
    detections.push({ label, score, box: [x1, y1, x2 - x1, y2 - y1] });
  }
  return detections;
}

/** The NudeNet v2 detector plugin. */
export const nudenetV2: DetectorPlugin<NudenetV2Config> = {
  type: 'nudenet-v2',
  description: 'NudeNet v2 RetinaNet body-part detector (ONNX, user-supplied): 16 (default) or 6 (base) classes with boxes',
  kind: 'detector',
  configSchema: nudenetV2Schema,
  labelsOf: (cfg) => (typeof cfg.labels === 'string' ? NUDENET_V2_LABELS[cfg.labels] : cfg.labels),
  defaultCounted: (cfg) => (typeof cfg.labels === 'string' ? NUDENET_V2_LABELS[cfg.labels] : cfg.labels).filter((l) => l.startsWith('EXPOSED_')),
  async create(cfg) {
    const labels = nudenetV2.labelsOf(cfg)!;
    const file = resolveDetectorModel(cfg.model);
    const model = await openDetectorModel(
      file,
      {
        name: 'NudeNet v2',
        howToGet: 'The NudeNet v2 checkpoint (detector_v2_default_checkpoint.onnx, ~146 MB) is not bundled: get it from the v0 release of https://github.com/notAI-tech/NudeNet.',
      },
      cfg.threads ?? undefined,
    );
    const session = model.session;
    const inputName = session.inputNames[0]!;
    return {
      info: {
        type: 'nudenet-v2',
        name: cfg.name ?? 'nudenet-v2',
        version: `${NUDENET_V2_IMPLEMENTATION}; sides ${cfg.min_side}/${cfg.max_side}; min score ${cfg.min_score}; model ${modelIdentity(model)}`,
        kind: 'detector',
        labels,
        countedLabels: cfg.classes ?? nudenetV2.defaultCounted(cfg),
      },
      async detect(image: Image8): Promise<Detection[]> {
        const input = preprocessV2(image, cfg.min_side, cfg.max_side);
        const result = await session.run({ [inputName]: new ort.Tensor('float32', input.data, [1, input.height, input.width, 3]) });
        try {
          return decodeV2(pickV2Outputs(session.outputNames.map((n) => result[n]!)), labels, input.scale, cfg.min_score);
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
