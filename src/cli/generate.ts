/**
 * `sdwb generate`: txt2img / img2img on tfjs from a diffusers folder, PNGs with A1111 parameters.
 * Progress goes to stderr; the seed and the files written go to stdout.
 */
import path from 'node:path';
import { InvalidArgumentError, Option, type Command } from 'commander';
import sharp from 'sharp';
import { initBackend } from '../backend.js';
import { SafetensorsFile, writeSafetensors } from '../io/safetensors.js';
import type { Image8 } from '../models/vae/vae.js';
import { disposeStableDiffusion, loadStableDiffusion, type StableDiffusion } from '../pipeline/load.js';
import { writeImages } from '../pipeline/png.js';
import { checkImageSize, generate, img2img, type CommonOptions, type GenerateResult, type Seed } from '../pipeline/txt2img.js';
import { SAMPLER_KINDS, type SamplerKind } from '../schedulers/sampler.js';
import { ProgressReporter } from '../train/progress.js';
import { runCommand, UsageError } from './errors.js';

interface GenerateFlags {
  model: string;
  prompt: string;
  negativePrompt: string;
  steps: number;
  guidance: number;
  seed?: Seed;
  sampler?: SamplerKind;
  karras?: boolean;
  eta?: number;
  width?: number;
  height?: number;
  batch: number;
  initLatents?: string;
  saveLatents?: string;
  initImage?: string;
  strength: number;
  clipSkip: number;
  variant?: string;
  engine: 'tfjs' | 'onnx';
  out: string;
}

function positiveInt(what: string) {
  return (v: string): number => {
    const n = Number(v);
    if (!/^\d+$/.test(v.trim()) || !Number.isSafeInteger(n) || n < 1) throw new InvalidArgumentError(`${what} must be a positive integer, got '${v}'`);
    return n;
  };
}

function finite(what: string) {
  return (v: string): number => {
    const n = Number(v);
    if (v.trim() === '' || !Number.isFinite(n)) throw new InvalidArgumentError(`${what} must be a number, got '${v}'`);
    return n;
  };
}

/** A seed as torch accepts it: an integer in [−2⁶³, 2⁶⁴), kept exact beyond 2⁵³ as a bigint. */
function parseSeed(v: string): Seed {
  if (!/^-?\d+$/.test(v.trim())) throw new InvalidArgumentError(`seed must be an integer, got '${v}'`);
  const big = BigInt(v.trim());
  if (big < -(1n << 63n) || big >= 1n << 64n) throw new InvalidArgumentError(`seed must be in [-2^63, 2^64), got ${v}`);
  return big >= BigInt(Number.MIN_SAFE_INTEGER) && big <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(big) : big;
}

/**
 * The NCHW tensor of an --init-latents file: its only tensor, or the one named `latents`, which
 * must have shape `expected`.
 */
async function readInitLatents(file: string, expected: readonly number[], what: string): Promise<Float32Array> {
  const f = await SafetensorsFile.open(file);
  try {
    const keys = f.keys();
    const name = keys.length === 1 ? keys[0]! : keys.includes('latents') ? 'latents' : undefined;
    if (name === undefined) {
      throw new Error(`${file}: ${keys.length === 0 ? 'holds no tensor' : `holds ${keys.length} tensors (${keys.join(', ')}) and none is named 'latents'`}`);
    }
    const shape = f.info(name).shape;
    if (shape.length !== expected.length || shape.some((d, i) => d !== expected[i])) {
      throw new Error(`${file}: tensor '${name}' has shape [${shape.join(', ')}], expected [${expected.join(', ')}] = [batch, latent channels, height/f, width/f] (${what})`);
    }
    return await f.readFloat32(name);
  } finally {
    await f.close();
  }
}

/** An image file as 8-bit RGB, resized (cover) to `size` when given. */
async function readRgb(file: string, size?: { width: number; height: number }): Promise<Image8> {
  let img = sharp(file).removeAlpha().toColourspace('srgb');
  if (size !== undefined) img = img.resize(size.width, size.height, { fit: 'cover', kernel: 'lanczos3' });
  const { data, info } = await img.raw().toBuffer({ resolveWithObject: true }).catch((e: unknown) => {
    throw new Error(`${file}: cannot read image (${e instanceof Error ? e.message : String(e)})`);
  });
  if (info.channels !== 3) throw new Error(`${file}: expected an RGB image, found ${info.channels} channels`);
  return { width: info.width, height: info.height, channels: 3, data: new Uint8Array(data.buffer, data.byteOffset, data.byteLength) };
}

async function run(flags: GenerateFlags): Promise<void> {
  if (flags.engine === 'onnx') {
    throw new Error('--engine onnx: the onnxruntime pipeline is not available yet; use --engine tfjs');
  }
  if (flags.initLatents !== undefined && flags.initImage !== undefined) {
    throw new UsageError('--init-latents and --init-image cannot be combined (img2img makes its own latents)');
  }
  if (flags.clipSkip < 1) throw new UsageError(`--clip-skip counts from 1 (no skip), got ${flags.clipSkip}`);
  await initBackend();
  const model = await loadStableDiffusion(flags.model, flags.variant === undefined ? {} : { variant: flags.variant });
  try {
    await generateWith(model, flags);
  } finally {
    disposeStableDiffusion(model);
  }
}

async function generateWith(model: StableDiffusion, flags: GenerateFlags): Promise<void> {
  let progress: ProgressReporter | undefined;
  const common: CommonOptions = {
    prompts: [flags.prompt],
    negativePrompt: flags.negativePrompt,
    imagesPerPrompt: flags.batch,
    steps: flags.steps,
    guidance: flags.guidance,
    clipSkip: flags.clipSkip - 1,
    ...(flags.seed !== undefined ? { seed: flags.seed } : {}),
    ...(flags.sampler !== undefined ? { sampler: flags.sampler } : {}),
    ...(flags.karras !== undefined ? { karras: flags.karras } : {}),
    ...(flags.eta !== undefined ? { eta: flags.eta } : {}),
    onStart: (total) => {
      progress = new ProgressReporter({ total, plainIntervalMs: 5_000 });
    },
    onStep: (done) => progress?.update({ step: done }),
  };
  const width = flags.width ?? (flags.initImage === undefined ? model.defaultSize.width : undefined);
  const height = flags.height ?? (flags.initImage === undefined ? model.defaultSize.height : undefined);
  if ((width === undefined) !== (height === undefined)) throw new UsageError('give both --width and --height, or neither');

  let result: GenerateResult;
  if (flags.initImage !== undefined) {
    const image = await readRgb(flags.initImage, width !== undefined && height !== undefined ? { width, height } : undefined);
    result = await img2img(model, { ...common, initImages: [image], strength: flags.strength });
  } else {
    checkImageSize(model, width!, height!);
    const f = model.vae.cfg.downscale;
    const expected = [flags.batch, model.unet.cfg.inChannels, height! / f, width! / f];
    const initLatents =
      flags.initLatents === undefined
        ? undefined
        : await readInitLatents(flags.initLatents, expected, `--batch ${flags.batch} at ${width}x${height}, f = ${f}`);
    result = await generate(model, { ...common, width: width!, height: height!, ...(initLatents ? { initLatents } : {}) });
  }
  progress?.done();
  for (const w of result.warnings) process.stderr.write(`warning: ${w}\n`);
  process.stdout.write(`seed: ${String(result.seed)}\n`);

  if (flags.saveLatents !== undefined) {
    await writeSafetensors(
      flags.saveLatents,
      { latents: { dtype: 'F32', shape: result.latentShape, data: result.latents } },
      { generator: 'sdwb generate', seed: String(result.seed), model_hash: model.modelHash, layout: 'NCHW, before VAE decoding (scaled)' },
    );
    process.stdout.write(`latents: ${flags.saveLatents}\n`);
  }
  for (const file of await writeImages(model, result, flags.out)) process.stdout.write(`image: ${file}\n`);
}

/** `sdwb generate`: txt2img (or img2img with --init-image) on tfjs, PNGs with A1111 parameters. */
export function registerGenerate(program: Command): void {
  program
    .command('generate')
    .description('generate images from a prompt (txt2img, or img2img with --init-image) on tfjs')
    .requiredOption('--model <dir>', 'diffusers model folder')
    .requiredOption('--prompt <text>', 'the prompt')
    .option('--negative-prompt <text>', 'negative prompt (the unconditional text)', '')
    .option('--steps <n>', 'sampling steps', positiveInt('--steps'), 20)
    .option('--guidance <w>', 'classifier-free guidance scale (≤ 1: no negative pass)', finite('--guidance'), 7.5)
    .option('--seed <n>', 'generator seed (default: random, printed)', parseSeed)
    .addOption(new Option('--sampler <kind>', "sampler (default: the model folder's scheduler)").choices(SAMPLER_KINDS))
    .option('--karras', 'Karras noise levels (lms, euler, dpmpp_2m)')
    .option('--eta <x>', 'DDIM eta (0: deterministic)', finite('--eta'))
    .option('--width <px>', 'image width (default: the UNet sample size × the VAE factor)', positiveInt('--width'))
    .option('--height <px>', 'image height', positiveInt('--height'))
    .option('--batch <n>', 'images per prompt (one generator: latents drawn as one batch)', positiveInt('--batch'), 1)
    .option('--init-latents <file>', 'initial latents x_T: a safetensors tensor [batch, C, height/f, width/f] (NCHW)')
    .option('--save-latents <file>', "write the final latents (NCHW, before decoding) as tensor 'latents'")
    .option('--init-image <file>', 'img2img: start from this image (resized to --width/--height when given)')
    .option('--strength <s>', 'img2img: fraction of the schedule to re-run, in (0, 1]', finite('--strength'), 0.8)
    .option('--clip-skip <n>', 'A1111 convention: 1 = last text-encoder layer, 2 = penultimate', positiveInt('--clip-skip'), 1)
    .option('--variant <name>', 'weight variant to load (fp16)')
    .addOption(new Option('--engine <name>', 'inference engine').choices(['tfjs', 'onnx']).default('tfjs'))
    .requiredOption('--out <dir>', 'folder for the PNGs (<index>-<seed>.png)')
    .action((flags: GenerateFlags) => runCommand('generate', () => run({ ...flags, out: path.resolve(flags.out) })));
}
