/**
 * ResizeNearestNeighborGrad for the cpu backend.
 *
 * tfjs-backend-cpu 4.22's version indexes dy with the *input* image's batch stride and ignores
 * halfPixelCenters, so for batch > 1 (or half-pixel centres) it returns wrong gradients; the
 * wasm kernel is correct. This one is the exact adjoint of the cpu forward kernel: the same
 * source-pixel rule, scattered back.
 */
import type { TensorInfo } from '@tensorflow/tfjs';

import { isCpuLike, type KernelArgs, kernelInput } from './kernel-util.js';

interface ResizeAttrs {
  alignCorners?: boolean;
  halfPixelCenters?: boolean;
}

/** For each output coordinate, the input coordinate the forward pass copies from. */
export function nearestSourceIndex(inSize: number, outSize: number, alignCorners: boolean, halfPixelCenters: boolean): Int32Array {
  const effIn = alignCorners && outSize > 1 ? inSize - 1 : inSize;
  const effOut = alignCorners && outSize > 1 ? outSize - 1 : outSize;
  const ratio = effIn / effOut;
  const map = new Int32Array(outSize);
  for (let o = 0; o < outSize; o++) {
    const frac = halfPixelCenters ? ratio * (o + 0.5) : ratio * o;
    let s = Math.min(inSize - 1, alignCorners ? Math.round(frac) : Math.floor(frac));
    if (halfPixelCenters) s = Math.max(0, s);
    map[o] = s;
  }
  return map;
}

export function resizeNearestNeighborGradCpu(args: KernelArgs): TensorInfo {
  const backend = args.backend;
  if (!isCpuLike(backend)) throw new Error('ResizeNearestNeighborGrad: incompatible cpu backend object');
  const images = kernelInput(args.inputs, 'images', 'ResizeNearestNeighborGrad');
  const dy = kernelInput(args.inputs, 'dy', 'ResizeNearestNeighborGrad');
  const attrs = (args.attrs ?? {}) as ResizeAttrs;
  const [B, H, W, C] = images.shape as [number, number, number, number];
  const [dB, Ho, Wo, dC] = dy.shape as [number, number, number, number];
  if (images.shape.length !== 4 || dy.shape.length !== 4 || dB !== B || dC !== C) {
    throw new Error(`ResizeNearestNeighborGrad: dy [${dy.shape}] does not match images [${images.shape}]`);
  }
  const dyv = backend.readSync(dy.dataId);
  if (!(dyv instanceof Float32Array)) throw new Error('ResizeNearestNeighborGrad: dy must be float32');
  const ac = attrs.alignCorners === true;
  const hp = attrs.halfPixelCenters === true;
  const rows = nearestSourceIndex(H, Ho, ac, hp);
  const cols = nearestSourceIndex(W, Wo, ac, hp);
  const out = new Float32Array(B * H * W * C);
  let src = 0;
  for (let b = 0; b < B; b++) {
    for (let y = 0; y < Ho; y++) {
      const rowBase = (b * H + rows[y]!) * W;
      for (let x = 0; x < Wo; x++) {
        const dst = (rowBase + cols[x]!) * C;
        for (let c = 0; c < C; c++) out[dst + c]! += dyv[src++]!;
      }
    }
  }
  return backend.makeTensorInfo([B, H, W, C], 'float32', out);
}
