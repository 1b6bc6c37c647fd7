/**
 * Composite layers shared by every model, written once over {@link Ops} so training (tfjs) and
 * ONNX export run the same decomposition. Parameter names are the PyTorch module's own
 * (`weight`, `bias`), so a scope path plus these names is exactly a diffusers state-dict key.
 */
import type { Ops } from './ops.js';
import type { Scope } from './scope.js';

/** `nn.Linear`: x [..., inF] → [..., outF]; weight kept as PyTorch's [outF, inF]. */
export function linear<T>(o: Ops<T>, p: Scope<T>, x: T, inF: number, outF: number, bias = true): T {
  const shape = o.shape(x);
  const x2 = o.reshape(x, [-1, inF]); // [N, inF]
  let y = o.matMul(x2, p.param('weight', [outF, inF]), { transposeB: true }); // [N, outF]
  if (bias) y = o.add(y, p.param('bias', [outF]));
  return o.reshape(y, [...shape.slice(0, -1), outF]);
}

export interface ConvSpec {
  readonly inCh: number;
  readonly outCh: number;
  readonly kernel: number;
  readonly stride?: 1 | 2;
  /** Symmetric padding as PyTorch's `padding=` (defaults to kernel // 2). */
  readonly padding?: number;
}

/** `nn.Conv2d` on NHWC input; filter stored HWIO (transposed from OIHW at load). */
export function conv2d<T>(o: Ops<T>, p: Scope<T>, x: T, c: ConvSpec): T {
  const pad = c.padding ?? Math.floor(c.kernel / 2);
  const w = p.param('weight', [c.kernel, c.kernel, c.inCh, c.outCh]);
  const y = o.conv2d(x, w, { stride: c.stride ?? 1, pad: [pad, pad, pad, pad] });
  return o.add(y, p.param('bias', [c.outCh]));
}

/** `nn.GroupNorm` over NHWC: statistics per (sample, group) across H, W and the group's channels. */
export function groupNorm<T>(o: Ops<T>, p: Scope<T>, x: T, channels: number, groups: number, eps: number): T {
  const [n, h, w] = o.shape(x) as [number, number, number, number];
  const xg = o.reshape(x, [n, h * w, groups, channels / groups]); // [N, HW, G, C/G]
  const mean = o.mean(xg, [1, 3], true); // [N, 1, G, 1]
  const centred = o.sub(xg, mean);
  const variance = o.mean(o.square(centred), [1, 3], true); // biased, as PyTorch
  const normed = o.reshape(o.mul(centred, o.rsqrt(o.add(variance, eps))), [n, h, w, channels]);
  return o.add(o.mul(normed, p.param('weight', [channels])), p.param('bias', [channels]));
}

/** `nn.LayerNorm` over the last axis. */
export function layerNorm<T>(o: Ops<T>, p: Scope<T>, x: T, width: number, eps: number): T {
  const last = o.shape(x).length - 1;
  const mean = o.mean(x, [last], true);
  const centred = o.sub(x, mean);
  const variance = o.mean(o.square(centred), [last], true);
  const normed = o.mul(centred, o.rsqrt(o.add(variance, eps)));
  return o.add(o.mul(normed, p.param('weight', [width])), p.param('bias', [width]));
}

/** SiLU (swish-1): x·σ(x). */
export function silu<T>(o: Ops<T>, x: T): T {
  return o.mul(x, o.sigmoid(x));
}

// The piecewise activations below are built from one clip, min(x, 0), because Ops has no max or
// abs: relu(x) = x − min(x, 0) is exact in float (x − x = 0, x − 0 = x), and since clip passes
// the gradient at its bounds (tfjs ClipByValue is inclusive), relu'(0) = 1 − 1 = 0 and
// leakyrelu'(0) = slope, torch's choices, on the training path too.
const BIG = Number.MAX_VALUE;

/** min(x, 0), the negative part (gradient 1 at 0). */
function negativePart<T>(o: Ops<T>, x: T): T {
  return o.clip(x, -BIG, 0);
}

/** `nn.ReLU`: max(x, 0), gradient 0 at 0 as torch's. */
export function relu<T>(o: Ops<T>, x: T): T {
  return o.sub(x, negativePart(o, x));
}

/** `nn.ReLU6`: min(max(x, 0), 6), clipping relu(x) so the gradient at 0 is torch's 0 too. */
export function relu6<T>(o: Ops<T>, x: T): T {
  return o.clip(relu(o, x), 0, 6);
}

/** `nn.LeakyReLU(slope)`: x for x > 0, slope·x otherwise (exact on both sides). */
export function leakyRelu<T>(o: Ops<T>, x: T, slope: number): T {
  return o.add(relu(o, x), o.mul(negativePart(o, x), slope));
}

/** `nn.ELU(alpha)`: x for x > 0, α(eˣ − 1) otherwise (CELU with its default α = 1 is the same function). */
export function elu<T>(o: Ops<T>, x: T, alpha = 1): T {
  const negative = o.sub(o.exp(negativePart(o, x)), 1); // exp(min(x, 0)) − 1: 0 for x ≥ 0, never overflows
  return o.add(relu(o, x), alpha === 1 ? negative : o.mul(negative, alpha));
}

const SELU_ALPHA = 1.6732632423543772848170429916717;
const SELU_SCALE = 1.0507009873554804934193349852946;

/** `nn.SELU`: scale·ELU_α(x) with torch's constants. */
export function selu<T>(o: Ops<T>, x: T): T {
  return o.mul(elu(o, x, SELU_ALPHA), SELU_SCALE);
}

/** |x| (gradient −1 at 0, a subgradient). */
export function abs<T>(o: Ops<T>, x: T): T {
  return o.sub(relu(o, x), negativePart(o, x));
}

/**
 * `nn.Softplus` (β = 1): log(1 + eˣ), computed as max(x, 0) + log(1 + e^−|x|) so eˣ never
 * overflows (log(1 + eˣ) is inf for x > 88 in float32, and its gradient NaN). For x < −17 the
 * result is 0 instead of eˣ < 4e−8 (no log1p in Ops), an absolute error below that.
 */
export function softplus<T>(o: Ops<T>, x: T): T {
  return o.add(relu(o, x), o.log(o.add(o.exp(o.neg(abs(o, x))), 1)));
}

/** `nn.Mish`: x·tanh(softplus(x)). */
export function mish<T>(o: Ops<T>, x: T): T {
  return o.mul(x, o.tanh(softplus(o, x)));
}

/** `nn.Hardsigmoid`: relu6(x + 3) / 6. */
export function hardSigmoid<T>(o: Ops<T>, x: T): T {
  return o.div(o.clip(o.add(x, 3), 0, 6), 6);
}

/** `nn.Hardswish`: x·relu6(x + 3) / 6. */
export function hardSwish<T>(o: Ops<T>, x: T): T {
  return o.div(o.mul(x, o.clip(o.add(x, 3), 0, 6)), 6);
}

/** `nn.Softsign`: x / (1 + |x|). */
export function softsign<T>(o: Ops<T>, x: T): T {
  return o.div(x, o.add(abs(o, x), 1));
}

/** `nn.LogSigmoid`: log σ(x) = −softplus(−x) (log(sigmoid(x)) is −inf for x < −88 in float32). */
export function logSigmoid<T>(o: Ops<T>, x: T): T {
  return o.neg(softplus(o, o.neg(x)));
}

/** Exact (erf) GELU, PyTorch's default `F.gelu`. */
export function gelu<T>(o: Ops<T>, x: T): T {
  return o.mul(o.mul(x, 0.5), o.add(o.erf(o.mul(x, Math.SQRT1_2)), 1));
}

/** CLIP's `quick_gelu`: x·σ(1.702x). */
export function quickGelu<T>(o: Ops<T>, x: T): T {
  return o.mul(x, o.sigmoid(o.mul(x, 1.702)));
}

export type Activation = 'silu' | 'gelu' | 'quick_gelu' | 'relu';

/** The activation a model config names (CLIP's `hidden_act`). */
export function activation<T>(o: Ops<T>, name: Activation, x: T): T {
  switch (name) {
    case 'silu':
      return silu(o, x);
    case 'gelu':
      return gelu(o, x);
    case 'quick_gelu':
      return quickGelu(o, x);
    case 'relu':
      return relu(o, x);
  }
}

export interface AttentionOptions<T> {
  readonly heads: number;
  /** Additive mask broadcastable to [B, heads, Sq, Sk] (e.g. CLIP's causal mask). */
  readonly mask?: T;
  /**
   * Most score elements (B·heads·Sq·Sk) to materialise at once; longer queries are processed in
   * blocks so 64×64-latent self-attention (4,096 tokens) fits in memory.
   */
  readonly maxScoreElements?: number;
}

const DEFAULT_MAX_SCORE_ELEMENTS = 1 << 24;

/**
 * Scaled dot-product attention on already-projected q [B,Sq,D], k/v [B,Sk,D] → [B,Sq,D], with
 * softmax(q kᵀ / √(D/heads)) v per head.
 */
export function attention<T>(o: Ops<T>, q: T, k: T, v: T, opts: AttentionOptions<T>): T {
  const [b, sq, d] = o.shape(q) as [number, number, number];
  const sk = o.shape(k)[1]!;
  const h = opts.heads;
  const dh = d / h;
  const split = (t: T, s: number) => o.transpose(o.reshape(t, [b, s, h, dh]), [0, 2, 1, 3]); // [B,h,S,dh]
  const qh = split(q, sq);
  const kh = split(k, sk);
  const vh = split(v, sk);
  const scale = 1 / Math.sqrt(dh);
  const mask = opts.mask;

  const block = (qBlock: T, maskBlock: T | undefined): T => {
    let scores = o.mul(o.matMul(qBlock, kh, { transposeB: true }), scale); // [B,h,sq',Sk]
    if (maskBlock !== undefined) scores = o.add(scores, maskBlock);
    return o.matMul(o.softmax(scores), vh); // [B,h,sq',dh]
  };

  const maxElements = opts.maxScoreElements ?? DEFAULT_MAX_SCORE_ELEMENTS;
  const rowsPerBlock = Math.max(1, Math.floor(maxElements / (b * h * sk)));
  let out: T;
  if (rowsPerBlock >= sq) {
    out = block(qh, mask);
  } else {
    const parts: T[] = [];
    for (let start = 0; start < sq; start += rowsPerBlock) {
      const rows = Math.min(rowsPerBlock, sq - start);
      const qBlock = o.slice(qh, [0, 0, start, 0], [-1, -1, rows, -1]);
      const maskBlock = mask === undefined ? undefined : sliceMaskRows(o, mask, start, rows);
      parts.push(block(qBlock, maskBlock));
    }
    out = o.concat(parts, 2);
  }
  return o.reshape(o.transpose(out, [0, 2, 1, 3]), [b, sq, d]); // [B,Sq,D]
}

function sliceMaskRows<T>(o: Ops<T>, mask: T, start: number, rows: number): T {
  const rank = o.shape(mask).length;
  const begin = new Array<number>(rank).fill(0);
  const size = new Array<number>(rank).fill(-1);
  begin[rank - 2] = start;
  size[rank - 2] = rows;
  return o.slice(mask, begin, size);
}
