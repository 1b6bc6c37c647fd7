import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['tests/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // tfjs backends are process-global: one file at a time per worker keeps them from racing.
    pool: 'forks',
    fileParallelism: true,
  },
});
