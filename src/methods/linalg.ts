/**
 * Small dense linear algebra in float64 for closed-form edits (UCE): the Cholesky factorisation
 * A = L·Lᵀ of a symmetric positive-definite n×n matrix and solves with it. Matrices are row-major
 * `Float64Array`s; every inner loop runs along contiguous rows, so a 768×768 factorisation takes
 * tens of milliseconds in plain JS.
 */

/** The lower-triangular Cholesky factor L of a symmetric positive-definite matrix (A = L·Lᵀ). */
export interface Cholesky {
  readonly n: number;
  /** L, row-major n×n; the strict upper triangle is zero. */
  readonly lower: Float64Array;
}

/** Thrown when a matrix given as positive definite is not (a pivot ≤ 0 or not finite). */
export class NotPositiveDefiniteError extends Error {
  override name = 'NotPositiveDefiniteError';
}

/**
 * Cholesky–Banachiewicz: L[i][j] = (A[i][j] − Σ_{k<j} L[i][k]·L[j][k]) / L[j][j] and
 * L[i][i] = √(A[i][i] − Σ_{k<i} L[i][k]²), row by row. Reads only the lower triangle of `a`.
 */
export function cholesky(a: Float64Array, n: number, what = 'matrix'): Cholesky {
  if (a.length !== n * n) throw new RangeError(`cholesky: ${what} has ${a.length} entries, expected ${n}×${n} = ${n * n}`);
  const l = new Float64Array(n * n);
  for (let i = 0; i < n; i++) {
    const rowI = i * n;
    for (let j = 0; j <= i; j++) {
      const rowJ = j * n;
      let sum = a[rowI + j]!;
      for (let k = 0; k < j; k++) sum -= l[rowI + k]! * l[rowJ + k]!;
      if (i === j) {
        if (!(sum > 0) || !Number.isFinite(sum)) {
          throw new NotPositiveDefiniteError(`cholesky: ${what} is not positive definite (pivot ${i} of ${n} is ${sum})`);
        }
        l[rowI + i] = Math.sqrt(sum);
      } else {
        l[rowI + j] = sum / l[rowJ + j]!;
      }
    }
  }
  return { n, lower: l };
}

/**
 * Solves A·x = b for each right-hand side in place: `rhs` holds m vectors of length n one after
 * another (row-major m×n, i.e. Xᵀ), overwritten by the solutions. Forward L·y = b, then Lᵀ·x = y
 * (column-oriented so it reads rows of L).
 */
export function choleskySolveInPlace(f: Cholesky, rhs: Float64Array): void {
  const { n, lower: l } = f;
  if (rhs.length % n !== 0) throw new RangeError(`choleskySolve: right-hand sides of ${rhs.length} values are not a multiple of n = ${n}`);
  const m = rhs.length / n;
  for (let r = 0; r < m; r++) {
    const off = r * n;
    for (let i = 0; i < n; i++) {
      const rowI = i * n;
      let sum = rhs[off + i]!;
      for (let k = 0; k < i; k++) sum -= l[rowI + k]! * rhs[off + k]!;
      rhs[off + i] = sum / l[rowI + i]!;
    }
    for (let i = n - 1; i >= 0; i--) {
      const rowI = i * n;
      const xi = rhs[off + i]! / l[rowI + i]!;
      rhs[off + i] = xi;
      for (let k = 0; k < i; k++) rhs[off + k] = rhs[off + k]! - l[rowI + k]! * xi;
    }
  }
}

/** A⁻¹·B for symmetric positive-definite A (n×n) and m right-hand sides given as rows (m×n); returns the solutions as rows. */
export function solveSpd(a: Float64Array, n: number, rhs: Float64Array, what = 'matrix'): Float64Array {
  const out = Float64Array.from(rhs);
  choleskySolveInPlace(cholesky(a, n, what), out);
  return out;
}
