/**
 * The seeded generator: MT19937 against the C++ standard's known answers, and Gaussian noise
 * against the reference fixtures' `torch.randn(..., generator=torch.Generator().manual_seed(s))`.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { Mt19937, TorchGenerator, torchSeedLow32 } from '../../src/schedulers/rng.js';
import { get, readRef, toNhwc, type RefTensor } from '../helpers/fixtures.js';

let refs: Record<string, Map<string, RefTensor>>;

beforeAll(async () => {
  refs = {
    sampling: await readRef('sampling.safetensors'),
    vae: await readRef('vae.safetensors'),
    scheduler: await readRef('scheduler.safetensors'),
    unet: await readRef('unet.safetensors'),
  };
});

describe('Mt19937', () => {
  it('matches std::mt19937 for the default seed 5489', () => {
    const mt = new Mt19937(5489);
    const first = [mt.nextUint32(), mt.nextUint32(), mt.nextUint32()];
    expect(first).toEqual([3499211612, 581869302, 3890346734]);
    let v = 0;
    for (let i = 3; i < 10000; i++) v = mt.nextUint32();
    // C++11 [rand.predef]: "the 10000th consecutive invocation … shall produce the value 4123659995"
    expect(v).toBe(4123659995);
  });

  it('reduces seeds to their low 32 bits as PyTorch does', () => {
    expect(torchSeedLow32(1007)).toBe(1007);
    expect(torchSeedLow32(2n ** 32n + 5n)).toBe(5);
    expect(torchSeedLow32(-1)).toBe(0xffffffff);
    expect(() => torchSeedLow32(2 ** 60)).toThrow(/bigint/);
  });
});

describe('TorchGenerator.randn', () => {
  // [fixture file, key, seed] from the fixture README
  const cases = [
    ['sampling', 'init_latents', 1007],
    ['vae', 'eps', 1004],
    ['scheduler', 'add_noise.original', 1005],
    ['scheduler', 'add_noise.noise', 1006],
    ['unet', 'sample', 1001],
  ] as const;

  it.each(cases)('%s.%s (seed %i) equals torch.randn bit for bit', (file, key, seed) => {
    const expected = get(refs[file]!, key);
    const actual = new TorchGenerator(seed).randn(expected.shape);
    let differing = 0;
    for (let i = 0; i < actual.length; i++) if (actual[i] !== expected.data[i]) differing++;
    expect(differing, `${differing} of ${actual.length} values differ`).toBe(0);
  });

  it('draws latents in NCHW order and returns them NHWC', () => {
    const expected = toNhwc(get(refs.sampling!, 'init_latents'));
    const actual = new TorchGenerator(1007).randnNhwc([1, 16, 16, 4]);
    expect(Array.from(actual)).toEqual(Array.from(expected.data));
  });

  it('continues the stream across calls (one generator, successive draws)', () => {
    const whole = new TorchGenerator(3).randn([64]);
    const g = new TorchGenerator(3);
    const parts = [...g.randn([32]), ...g.randn([32])];
    expect(parts).toEqual(Array.from(whole));
  });
});
