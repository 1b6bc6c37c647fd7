/**
 * StridedSlice forward for cpu and wasm.
 *
 * tfjs 4.22's kernels (both backends) return wrong values when shrinkAxisMask is combined with
 * a non-unit stride anywhere, e.g. x[:, 1, ::2] (cpu throws or misindexes; wasm reads the wrong
 * elements). Without a shrink they are right, so we run that case as a dense, unshrunk slice and
 * reshape to the final shape. Everything else goes straight to the backend's own kernel.
 */
import * as tf from '@tensorflow/tfjs';
import type { KernelFunc, TensorInfo } from '@tensorflow/tfjs';

import { isDisposingBackend, type KernelArgs, kernelInput, nativeKernel, singleOutput } from './kernel-util.js';

export function makeStridedSlice(backendName: 'wasm' | 'cpu'): KernelFunc {
  return (args: KernelArgs): TensorInfo | TensorInfo[] => {
    const native = nativeKernel(tf.StridedSlice, backendName);
    const a = args.attrs as unknown as tf.StridedSliceAttrs;
    const strides = a.strides ?? [];
    if (a.shrinkAxisMask === 0 || strides.every((s) => s === 1)) return native(args);

    const x = kernelInput(args.inputs, 'x', 'StridedSlice');
    const info = tf.slice_util.sliceInfo(
      x.shape,
      a.begin,
      a.end,
      strides,
      a.beginMask,
      a.endMask,
      a.ellipsisMask,
      a.newAxisMask,
      a.shrinkAxisMask,
    );
    const sizes = tf.slice_util.computeOutShape(info.begin, info.end, info.strides);
    if (sizes.some((s) => s <= 0)) return native(args); // empty result: nothing to get wrong

    // Canonical ends of reversed slices can be -1 ("past index 0"); as an explicit end that would
    // wrap to the last element, so those axes run to their end via endMask instead.
    let endMask = 0;
    const end = info.end.map((e, i) => {
      if (info.strides[i]! < 0 && e < 0) {
        endMask |= 1 << i;
        return 0;
      }
      return e;
    });
    const dense: tf.StridedSliceAttrs = {
      begin: info.begin,
      end,
      strides: info.strides,
      beginMask: 0,
      endMask,
      ellipsisMask: 0,
      newAxisMask: 0,
      shrinkAxisMask: 0,
    };
    const backend = args.backend;
    const sliced = singleOutput(native({ inputs: { x }, backend, attrs: { ...dense } }));
    const out = singleOutput(
      nativeKernel(tf.Reshape, backendName)({ inputs: { x: sliced }, backend, attrs: { shape: info.finalShape } }),
    );
    if (isDisposingBackend(backend)) backend.disposeData(sliced.dataId);
    return out;
  };
}
