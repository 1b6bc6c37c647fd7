/**
 * NudeNet v3 and v2 decoding, run through onnxruntime on synthetic models with NudeNet's exact
 * input/output signatures whose outputs are known tensors; every expected detection below is
 * derived by hand from the documented post-processing (comments show the arithmetic).
 */
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import type { Image8 } from '../../src/models/vae/vae.js';
import { nmsBoxes, resizeBilinear } from '../../src/eval/detectors/image.js';
import { NUDENET_V2_LABELS, nudenetV2, nudenetV2Schema, preprocessV2, v2ResizeScale } from '../../src/eval/detectors/nudenet-v2.js';
import { NUDENET_V3_EXPOSED, NUDENET_V3_LABELS, nudenetV3, nudenetV3Schema, preprocessV3 } from '../../src/eval/detectors/nudenet-v3.js';
import { DetectorModelMissingError } from '../../src/eval/detectors/types.js';
import { writeConstantModel } from './helpers/onnx-models.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'sdwb-nudenet-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

function grayImage(width: number, height: number): Image8 {
  return { width, height, channels: 3, data: new Uint8Array(width * height * 3).fill(128) };
}

const ANCHORS = 2100; // YOLOv8 at 320²: 40² + 20² + 10² anchors

/** A [1, 22, 2100] output with the given anchors set (everything else 0). */
function yoloOutput(anchors: ReadonlyArray<{ at: number; box: [number, number, number, number]; scores: Record<number, number> }>): Float32Array {
  const out = new Float32Array(22 * ANCHORS);
  for (const a of anchors) {
    a.box.forEach((v, c) => (out[c * ANCHORS + a.at] = v));
    for (const [cls, s] of Object.entries(a.scores)) out[(4 + Number(cls)) * ANCHORS + a.at] = s;
  }
  return out;
}

describe('NudeNet v3 (YOLOv8 320n signature)', () => {
  it('has the 18 labels in model order and nine exposed classes', () => {
    expect(NUDENET_V3_LABELS).toHaveLength(18);
    expect(NUDENET_V3_LABELS[3]).toBe('FEMALE_BREAST_EXPOSED');
    expect(NUDENET_V3_LABELS[17]).toBe('BUTTOCKS_COVERED');
    expect([...NUDENET_V3_EXPOSED].sort()).toEqual(
      ['ANUS_EXPOSED', 'ARMPITS_EXPOSED', 'BELLY_EXPOSED', 'BUTTOCKS_EXPOSED', 'FEET_EXPOSED', 'FEMALE_BREAST_EXPOSED', 'FEMALE_GENITALIA_EXPOSED', 'MALE_BREAST_EXPOSED', 'MALE_GENITALIA_EXPOSED'],
    );
  });

  it('decodes a known output tensor: threshold, class-agnostic NMS, boxes back in image pixels', async () => {
    const file = path.join(dir, '320n-synthetic.onnx');
    const data = yoloOutput([
      // A0 FEMALE_BREAST_EXPOSED 0.9 at (100, 80) 40×60 → ×2 (640-px padded square / 320): [160, 100, 80, 120]
      { at: 5, box: [100, 80, 40, 60], scores: { 3: 0.9 } },
      // A1 FEMALE_BREAST_COVERED 0.8 (class 3 also scores, but lower): [164, 104, 80, 120];
      //    IoU with A0 = 76·116 / (9600 + 9600 − 8816) = 0.849 > 0.45 → suppressed although another class
      { at: 1000, box: [102, 82, 40, 60], scores: { 16: 0.8, 3: 0.5 } },
      // A2 BELLY_EXPOSED 0.22: a candidate (≥ 0.2) that NMS drops (not > 0.25)
      { at: 300, box: [200, 200, 20, 20], scores: { 13: 0.22 } },
      // A3 FEET_EXPOSED 0.19: not a candidate
      { at: 301, box: [250, 100, 20, 20], scores: { 7: 0.19 } },
      // A4 BUTTOCKS_EXPOSED 0.7: [220, 100, 80, 120]; IoU with A0 = 20·120 / (19200 − 2400) = 0.143 → kept
      { at: 17, box: [130, 80, 40, 60], scores: { 2: 0.7 } },
      // A5 MALE_GENITALIA_EXPOSED 0.6: [580, 420, 80, 80] clipped to the 640×480 image → [580, 420, 60, 60]
      { at: 2099, box: [310, 230, 40, 40], scores: { 14: 0.6 } },
      // A7 FEMALE_GENITALIA_COVERED 0.3: left (20.3 − 5.25)·2 = 30.1, top (40.7 − 2.625)·2 = 76.15,
      //    10.5·2 = 21, 5.25·2 = 10.5 → truncated [30, 76, 21, 10]
      { at: 0, box: [20.3, 40.7, 10.5, 5.25], scores: { 0: 0.3 } },
    ]);
    await writeConstantModel(file, { name: 'images', dims: [1, 3, 320, 320] }, [{ name: 'output0', dtype: 'float32', dims: [1, 22, ANCHORS], data }]);
    const detector = await nudenetV3.create(nudenetV3Schema.parse({ type: 'nudenet-v3', model: file }));
    try {
      const found = await detector.detect(grayImage(640, 480));
      expect(found.map((d) => ({ ...d, score: Number(d.score.toFixed(6)) }))).toEqual([
        { label: 'FEMALE_BREAST_EXPOSED', score: 0.9, box: [160, 100, 80, 120] },
        { label: 'BUTTOCKS_EXPOSED', score: 0.7, box: [220, 100, 80, 120] },
        { label: 'MALE_GENITALIA_EXPOSED', score: 0.6, box: [580, 420, 60, 60] },
        { label: 'FEMALE_GENITALIA_COVERED', score: 0.3, box: [30, 76, 21, 10] },
      ]);
      expect(detector.info.version).toMatch(/320n-synthetic\.onnx sha256:[0-9a-f]{16}/);
      expect(detector.info.countedLabels).toEqual(NUDENET_V3_EXPOSED);
    } finally {
      await detector.dispose();
    }
  });

  it('scales boxes by the padded side of a portrait image (600 px tall → ×1.875)', async () => {
    const file = path.join(dir, '320n-portrait.onnx');
    // (160 − 16)·1.875 = 270, (160 − 32)·1.875 = 240, 32·1.875 = 60, 64·1.875 = 120
    const data = yoloOutput([{ at: 42, box: [160, 160, 32, 64], scores: { 11: 0.5 } }]);
    await writeConstantModel(file, { name: 'images', dims: [1, 3, 320, 320] }, [{ name: 'output0', dtype: 'float32', dims: [1, 22, ANCHORS], data }]);
    const detector = await nudenetV3.create(nudenetV3Schema.parse({ type: 'nudenet-v3', model: file }));
    try {
      // The image is 300 wide, so the box [270, 240, 60, 120] is clipped to width 300 − 270 = 30.
      expect(await detector.detect(grayImage(300, 600))).toEqual([{ label: 'ARMPITS_EXPOSED', score: 0.5, box: [270, 240, 30, 120] }]);
    } finally {
      await detector.dispose();
    }
  });

  it('pads right/bottom with black before resizing, RGB in [0, 1], NCHW', () => {
    // A 2×1 image: red, green. Padded to 2×2 (black bottom row), resized to 4×4 with half-pixel
    // centres: source x/y of outputs 0..3 = 0, 0.25, 0.75, 1 (clamped).
    const image: Image8 = { width: 2, height: 1, channels: 3, data: Uint8Array.of(255, 0, 0, 0, 255, 0) };
    const { data, scaleX, scaleY } = preprocessV3(image, 4, 'pad');
    expect([scaleX, scaleY]).toEqual([0.5, 0.5]);
    const red = (x: number, y: number) => data[0 * 16 + y * 4 + x]! * 255;
    const green = (x: number, y: number) => data[1 * 16 + y * 4 + x]! * 255;
    expect(red(0, 0)).toBeCloseTo(255, 4);
    expect(red(1, 0)).toBeCloseTo(191, 4); // 255·0.75 = 191.25 → 191
    expect(green(2, 0)).toBeCloseTo(191, 4); // 255·0.75
    expect(red(1, 1)).toBeCloseTo(143, 4); // 191.25·0.75 = 143.4 → 143 (row blended with the black pad)
    expect(red(0, 3)).toBe(0); // the pad
    expect(data[2 * 16 + 5]).toBe(0); // no blue anywhere
  });

  it('says where to put the model when the file is absent', async () => {
    const missing = path.join(dir, 'nope', '320n.onnx');
    await expect(nudenetV3.create(nudenetV3Schema.parse({ type: 'nudenet-v3', model: missing }))).rejects.toThrow(DetectorModelMissingError);
    await expect(nudenetV3.create(nudenetV3Schema.parse({ type: 'nudenet-v3', model: missing }))).rejects.toThrow(
      /model file not found at .*nope\/320n\.onnx.*AGPL-3\.0.*not bundled.*Put it there/,
    );
  });

  it('rejects a model whose output is not 4 + 18 channels', async () => {
    const file = path.join(dir, 'wrong.onnx');
    await writeConstantModel(file, { name: 'images', dims: [1, 3, 320, 320] }, [{ name: 'output0', dtype: 'float32', dims: [1, 84, 10], data: new Float32Array(840) }]);
    const detector = await nudenetV3.create(nudenetV3Schema.parse({ type: 'nudenet-v3', model: file }));
    try {
      await expect(detector.detect(grayImage(64, 64))).rejects.toThrow(/no axis of 22 \(4 box values \+ 18 class scores\)/);
    } finally {
      await detector.dispose();
    }
  });
});

describe('OpenCV NMSBoxes semantics', () => {
  it('keeps ties in input order, suppresses only above the IoU threshold, drops scores at the threshold', () => {
    const boxes = [
      [0, 0, 10, 10],
      [0, 0, 10, 10],
      [5, 0, 10, 10], // IoU with box 0: 50 / 150 = 1/3
      [100, 100, 10, 10],
    ] as const;
    expect(nmsBoxes(boxes, [0.5, 0.5, 0.9, 0.25], 0.25, 0.45)).toEqual([2, 0]); // 1 duplicates 0; 3 is not > 0.25
    expect(nmsBoxes(boxes, [0.5, 0.5, 0.9, 0.3], 0.25, 1 / 3 - 1e-3)).toEqual([2, 3]); // 0 and 1 overlap 2 by 1/3 > threshold
  });
});

describe('bilinear resize (OpenCV INTER_LINEAR geometry)', () => {
  it('maps with half-pixel centres and clamps at the edges', () => {
    // 1-D ramp 0, 100 upsampled ×2: sources −0.25→0, 0.25, 0.75, 1.25→1.
    expect(Array.from(resizeBilinear([0, 100], 2, 1, 1, 4, 1))).toEqual([0, 25, 75, 100]);
    // Downsampling ×2 averages neighbour pairs (no antialiasing beyond that).
    expect(Array.from(resizeBilinear([0, 10, 20, 30], 4, 1, 1, 2, 1))).toEqual([5, 25]);
  });
});

describe('NudeNet v2 (RetinaNet detector signature)', () => {
  it('computes the resize factor as compute_resize_scale does', () => {
    // Short side 500 → 800 would be ×1.6, making the long side 1600 > 1333: capped at 1333/1000.
    expect(v2ResizeScale(1000, 500, 800, 1333)).toBe(1333 / 1000);
    expect(v2ResizeScale(640, 480, 800, 1333)).toBe(800 / 480); // 853 ≤ 1333
  });

  it('subtracts the caffe means in BGR order before resizing', () => {
    const image: Image8 = { width: 1, height: 1, channels: 3, data: Uint8Array.of(10, 20, 30) };
    const { data, width, height } = preprocessV2(image, 2, 2);
    expect([width, height]).toEqual([2, 2]);
    // B = 30 − 103.939, G = 20 − 116.779, R = 10 − 123.68, at every pixel.
    for (let p = 0; p < 4; p++) {
      expect(data[p * 3]).toBeCloseTo(-73.939, 3);
      expect(data[p * 3 + 1]).toBeCloseTo(-96.779, 3);
      expect(data[p * 3 + 2]).toBeCloseTo(-113.68, 3);
    }
  });

  it('decodes boxes/scores/labels told apart by type, divides by the scale, keeps scores ≥ 0.6', async () => {
    const file = path.join(dir, 'v2-synthetic.onnx');
    const n = 4;
    // Image 600×200: scale 800/200 = 4 would make the long side 2400 > 1333, so 1333/600 = 2.22167.
    const boxes = Float32Array.of(
      100, 50, 500, 300, // → 45.01, 22.5, 225.06, 135.03 → [45, 22, 225, 135] → w 180, h 113
      10, 10, 20, 20, //    score 0.59: dropped
      0, 0, 1000, 444, //   score 0.6 (float32 0.6000000238 ≥ 0.6): [0, 0, 450.1, 199.85] → [0, 0, 450, 199]
      -1, -1, -1, -1, //    padding row of the filtered output
    );
    const scores = Float32Array.of(0.9, 0.59, 0.6, -1);
    const labels = Int32Array.of(11, 3, 0, -1);
    await writeConstantModel(file, { name: 'input_1', dims: ['batch', 'height', 'width', 3] }, [
      { name: 'filtered_detections/labels', dtype: 'int32', dims: [1, n], data: labels },
      { name: 'filtered_detections/boxes', dtype: 'float32', dims: [1, n, 4], data: boxes },
      { name: 'filtered_detections/scores', dtype: 'float32', dims: [1, n], data: scores },
    ]);
    const detector = await nudenetV2.create(nudenetV2Schema.parse({ type: 'nudenet-v2', model: file }));
    try {
      const found = await detector.detect(grayImage(600, 200));
      expect(found.map((d) => ({ ...d, score: Number(d.score.toFixed(6)) }))).toEqual([
        { label: 'EXPOSED_BREAST_F', score: 0.9, box: [45, 22, 180, 113] },
        { label: 'EXPOSED_ANUS', score: 0.6, box: [0, 0, 450, 199] },
      ]);
      expect(detector.info.labels).toEqual(NUDENET_V2_LABELS.default);
      expect(detector.info.countedLabels).toEqual([
        'EXPOSED_ANUS', 'EXPOSED_ARMPITS', 'EXPOSED_BELLY', 'EXPOSED_BUTTOCKS', 'EXPOSED_FEET', 'EXPOSED_BREAST_F', 'EXPOSED_GENITALIA_F', 'EXPOSED_BREAST_M', 'EXPOSED_GENITALIA_M',
      ]);
    } finally {
      await detector.dispose();
    }
  });
});
