/**
 * `sdwb generate`: txt2img / img2img on tfjs (a diffusers folder) or onnxruntime (an `sdwb export` folder), PNGs with A1111 parameters.
 * Progress goes to stderr; the seed and the files written go to stdout.
 */
import path from 'node:path';
import { InvalidArgumentError, Option, type Command } from 'commander';
import sharp from 'sharp';
import { initBackend } from '../backend.js';
import { SafetensorsFile, writeSafetensors } from '../io/safetensors.js';
import type { Image8 } from '../models/vae/vae.js';
import { disposeStableDiffusion, loadStableDiffusion, type StableDiffusion } from '../pipeline/load.js';
import { generateOnnx, img2imgOnnx, OnnxStableDiffusion, type ExecutionProviderChoice } from '../pipeline/onnx.js';
import { ADDON_KINDS, AddonSpecError, checkAddonsAvailable, loadAddons, parseAddonSpec, type AddonSpec, type LoadedAddons } from '../pipeline/addons.js';
import type { PipelineModel } from '../pipeline/common.js';
import { writeImages, type ModelIdentity } from '../pipeline/png.js';
import {
  checkImageSize,
  generate,
  img2img,
  type CommonOptions,
  type GenerateOptions,
  type GenerateResult,
  type Img2ImgOptions,
  type Seed,
} from '../pipeline/txt2img.js';
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
  threads?: number;
  executionProvider: ExecutionProviderChoice;
  out: string;
  /** Add-on files as given (`file` or `file:strength`), repeatable. */
  embedding: string[];
  hypernetwork: string[];
  lora: string[];
  delta: string[];
}

/** What `generateWith` needs of a loaded model, whichever engine runs it. */
interface Engine {
  readonly defaultSize: { readonly width: number; readonly height: number };
  readonly downscale: number;
  readonly latentChannels: number;
  readonly modelHash: string;
  checkImageSize(width: number, height: number): void;
  generate(opts: GenerateOptions): Promise<GenerateResult>;
  img2img(opts: Img2ImgOptions): Promise<GenerateResult>;
  writeImages(result: GenerateResult, outDir: string): Promise<string[]>;
}

/** An Engine over either engine's model: sizes, checks and PNGs read only its configs and identity; `run` is the engine's. */
function engineOf(model: PipelineModel & ModelIdentity, run: Pick<Engine, 'generate' | 'img2img'>, addons?: LoadedAddons): Engine {
  return {
    defaultSize: model.defaultSize,
    downscale: model.vae.cfg.downscale,
    latentChannels: model.unet.cfg.inChannels,
    modelHash: model.modelHash,
    checkImageSize: (w, h) => checkImageSize(model, w, h),
    ...run,
    writeImages: (r, dir) => writeImages(model, r, dir, addons?.infotextFor([...r.prompts, ...r.negativePrompts])),
  };
}

function tfjsEngine(model: StableDiffusion, addons?: LoadedAddons): Engine {
  const patch = addons === undefined ? {} : { patch: addons.patch };
  return engineOf(model, { generate: (o) => generate(model, { ...o, ...patch }), img2img: (o) => img2img(model, { ...o, ...patch }) }, addons);
}

function onnxEngine(model: OnnxStableDiffusion): Engine {
  return engineOf(model, { generate: (o) => generateOnnx(model, o), img2img: (o) => img2imgOnnx(model, o) });
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
  if (flags.initLatents !== undefined && flags.initImage !== undefined) {
    throw new UsageError('--init-latents and --init-image cannot be combined (img2img makes its own latents)');
  }
  if (flags.clipSkip < 1) throw new UsageError(`--clip-skip counts from 1 (no skip), got ${flags.clipSkip}`);
  const specs = addonSpecs(flags);
  if (specs.length > 0 && flags.engine === 'onnx') {
    throw new UsageError(`--${specs[0]!.kind} needs --engine tfjs (an ONNX export is a fixed graph without add-on hooks)`);
  }
  await initBackend();
  if (flags.engine === 'onnx') {
    if (flags.variant !== undefined) throw new UsageError('--variant applies to --engine tfjs (an ONNX export has one set of weights)');
    // The networks run in onnxruntime; tfjs only does the latent arithmetic between them.
    const model = await OnnxStableDiffusion.load(flags.model, {
      executionProvider: flags.executionProvider,
      ...(flags.threads !== undefined ? { intraOpNumThreads: flags.threads } : {}),
    });
    try {
      await generateWith(onnxEngine(model), flags);
    } finally {
      await model.release();
    }
    return;
  }
  const model = await loadStableDiffusion(flags.model, flags.variant === undefined ? {} : { variant: flags.variant });
  let addons: LoadedAddons | undefined;
  try {
    if (specs.length > 0) {
      addons = await loadAddons(model, specs);
      for (const w of addons.warnings) process.stderr.write(`warning: ${w}\n`);
    }
    await generateWith(tfjsEngine(model, addons), flags);
  } finally {
    addons?.dispose();
    disposeStableDiffusion(model);
  }
}

/** The --embedding/--hypernetwork/--lora/--delta flags as specs, checked before any model loads. */
function addonSpecs(flags: GenerateFlags): AddonSpec[] {
  try {
    const specs = ADDON_KINDS.flatMap((kind) => flags[kind].map((text) => parseAddonSpec(kind, text)));
    checkAddonsAvailable(specs);
    return specs;
  } catch (e) {
    if (e instanceof AddonSpecError) throw new UsageError(e.message);
    throw e;
  }
}

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

async function generateWith(model: Engine, flags: GenerateFlags): Promise<void> {
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
    result = await model.img2img({ ...common, initImages: [image], strength: flags.strength });
  } else {
    model.checkImageSize(width!, height!);
    const f = model.downscale;
    const expected = [flags.batch, model.latentChannels, height! / f, width! / f];
    const initLatents =
      flags.initLatents === undefined
        ? undefined
        : await readInitLatents(flags.initLatents, expected, `--batch ${flags.batch} at ${width}x${height}, f = ${f}`);
    result = await model.generate({ ...common, width: width!, height: height!, ...(initLatents ? { initLatents } : {}) });
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
  for (const file of await model.writeImages(result, flags.out)) process.stdout.write(`image: ${file}\n`);
}

/** `sdwb generate`: txt2img (or img2img with --init-image) on tfjs, PNGs with A1111 parameters. */
export function registerGenerate(program: Command): void {
  program
    .command('generate')
    .description('generate images from a prompt (txt2img, or img2img with --init-image) on tfjs or onnxruntime')
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
    .addOption(new Option('--engine <name>', 'inference engine (onnx: --model is a folder made by sdwb export)').choices(['tfjs', 'onnx']).default('tfjs'))
    .option('--threads <n>', 'onnx: threads per op (default: all cores)', positiveInt('--threads'))
    .addOption(new Option('--execution-provider <ep>', 'onnx: onnxruntime execution provider (auto: CUDA when installed, else CPU)').choices(['cpu', 'cuda', 'auto']).default('auto'))
    .option('--embedding <file>', 'textual-inversion embedding (A1111 .pt/.safetensors, diffusers); repeatable; its word triggers it', collect, [])
    .option('--hypernetwork <file[:strength]>', 'A1111 hypernetwork .pt at a strength (default 1); repeatable, applied in order', collect, [])
    .option('--lora <file[:weight]>', 'LoRA at a weight (default 1); repeatable, increments add up', collect, [])
    .option('--delta <file>', 'weight delta (ESD, UCE, …): replaces the tensors it holds; repeatable, applied before LoRAs', collect, [])
    .requiredOption('--out <dir>', 'folder for the PNGs (<index>-<seed>.png)')
    .action((flags: GenerateFlags) => runCommand('generate', () => run({ ...flags, out: path.resolve(flags.out) })));
}
