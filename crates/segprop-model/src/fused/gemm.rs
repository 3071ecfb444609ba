//! Matrix products of f32 data through the `gemm` crate (the kernel burn's flex backend calls),
//! into buffers allocated here. flex's matmul allocates each output as zeroed bytes and then
//! copies them once more to align them, on the calling thread while the pool waits: for the
//! step's linears that was as much serial time as the softmax (docs/benchmarks.md, "Training
//! throughput"). The only `unsafe` of the crate is here: the call into `gemm`, behind bounds
//! checks, and exposing the buffers it initialized.

use std::mem::MaybeUninit;

use burn_flex::FlexTensor;
use rayon::prelude::*;

/// A read-only matrix view: element `(i, j)` is `data[i · row_stride + j · col_stride]`.
#[derive(Clone, Copy)]
pub(super) struct Matrix<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Matrix<'a> {
    /// `data` as a row-major `[rows, cols]` matrix (the tests' views; tensors come through
    /// [`matrices`]).
    #[cfg(test)]
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(
            data.len(),
            rows * cols,
            "a [{rows}, {cols}] matrix needs {} elements",
            rows * cols
        );
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose, as a view of the same data.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Every element `(i, j)` with `i < rows`, `j < cols` lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// Below this many multiply-adds a product runs on the calling thread (flex's threshold).
const PARALLEL_THRESHOLD: usize = 192 * 192 * 192;

/// `a · b` as a new row-major `[a.rows, b.cols]` buffer. Large products are split over the
/// rayon pool by rows and columns of the output only, never along the inner dimension, so the
/// result is the same bits on any number of threads.
pub(super) fn matmul(a: Matrix<'_>, b: Matrix<'_>) -> Vec<f32> {
    assert_eq!(a.cols, b.rows, "matmul: inner dimensions differ");
    assert!(
        a.in_bounds() && b.in_bounds(),
        "matmul: a view outside its data"
    );
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if m == 0 || n == 0 || k == 0 {
        return vec![0.0; m * n];
    }
    let parallelism = if m * n * k >= PARALLEL_THRESHOLD {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    let mut out = Vec::with_capacity(m * n);
    product_into(a, b, &mut out.spare_capacity_mut()[..m * n], parallelism);
    // SAFETY: `product_into` initialized all `m · n` elements.
    #[allow(unsafe_code)]
    unsafe {
        out.set_len(m * n)
    };
    out
}

/// `out = a · b`, `out` row-major `[a.rows, b.cols]`: every element is written (initialized).
fn product_into(
    a: Matrix<'_>,
    b: Matrix<'_>,
    out: &mut [MaybeUninit<f32>],
    parallelism: gemm::Parallelism,
) {
    assert_eq!(a.cols, b.rows, "matmul: inner dimensions differ");
    assert!(
        a.in_bounds() && b.in_bounds(),
        "matmul: a view outside its data"
    );
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(out.len(), m * n, "matmul: the output has the wrong size");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(MaybeUninit::new(0.0));
        return;
    }
    let stride = |s: usize| isize::try_from(s).expect("a stride fits in isize");
    #[allow(unsafe_code)]
    // SAFETY: `in_bounds` checked that every element the strides address lies inside `a.data`
    // and `b.data`, which are borrowed for the call and not written; `out` is an exclusive
    // `m x n` buffer, written row-major (column stride 1, row stride n), and nothing outside
    // it is written. With `read_dst` false gemm never reads the destination: it writes every
    // element on the first block of the inner dimension (k > 0 here) and accumulates into
    // them after, so all of `out` is initialized when it returns.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr().cast::<f32>(),
            1,
            stride(n),
            false,
            a.data.as_ptr(),
            stride(a.col_stride),
            stride(a.row_stride),
            b.data.as_ptr(),
            stride(b.col_stride),
            stride(b.row_stride),
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The `[.., rows, cols]` matrices of a flex f32 tensor as strided views of its storage, batch
/// dimensions flattened in row-major order (no copy; a view with negative strides is copied to
/// contiguous memory first, into `scratch`).
pub(super) fn matrices<'a>(
    t: &'a FlexTensor,
    scratch: &'a mut Option<FlexTensor>,
) -> Vec<Matrix<'a>> {
    let layout = t.layout();
    let negative = layout.strides().iter().any(|s| *s < 0);
    let t = if negative {
        &*scratch.insert(t.to_contiguous())
    } else {
        t
    };
    let layout = t.layout();
    let dims: Vec<usize> = layout.shape().iter().copied().collect();
    let strides: Vec<usize> = layout
        .strides()
        .iter()
        .map(|s| usize::try_from(*s).expect("non-negative strides"))
        .collect();
    let rank = dims.len();
    assert!(rank >= 2, "a matrix product needs rank 2 or more");
    let (rows, cols) = (dims[rank - 2], dims[rank - 1]);
    let (row_stride, col_stride) = (strides[rank - 2], strides[rank - 1]);
    let storage = t.storage::<f32>();
    let batches: usize = dims[..rank - 2].iter().product();
    (0..batches)
        .map(|mut b| {
            let mut offset = layout.start_offset();
            for axis in (0..rank - 2).rev() {
                offset += (b % dims[axis]) * strides[axis];
                b /= dims[axis];
            }
            Matrix {
                data: &storage[offset.min(storage.len())..],
                rows,
                cols,
                row_stride,
                col_stride,
            }
        })
        .collect()
}

/// `a[i] · b[i]` for each pair, each product on one thread and the pairs spread over the pool
/// (a single pair is split over the pool by gemm),
/// as one row-major buffer `[pairs, a.rows, b.cols]` (the same bits on any number of threads).
pub(super) fn matmul_batched(a: &[Matrix<'_>], b: &[Matrix<'_>]) -> Vec<f32> {
    assert_eq!(
        a.len(),
        b.len(),
        "matmul_batched: as many left as right matrices"
    );
    if let ([a], [b]) = (a, b) {
        // One matrix (a linear): gemm splits it over the pool itself.
        return matmul(*a, *b);
    }
    let Some((first_a, first_b)) = a.first().zip(b.first()) else {
        return Vec::new();
    };
    let size = first_a.rows * first_b.cols;
    if size == 0 {
        return Vec::new();
    }
    let total = a.len() * size;
    let mut out = Vec::with_capacity(total);
    out.spare_capacity_mut()[..total]
        .par_chunks_mut(size)
        .zip(a.par_iter().zip(b))
        .for_each(|(out, (a, b))| {
            assert_eq!(
                (a.rows, b.cols),
                (first_a.rows, first_b.cols),
                "ragged batch"
            );
            product_into(*a, *b, out, gemm::Parallelism::None);
        });
    // SAFETY: each of the `total / size` chunks was initialized by `product_into`.
    #[allow(unsafe_code)]
    unsafe {
        out.set_len(total)
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook triple loop.
    fn naive(a: Matrix<'_>, b: Matrix<'_>) -> Vec<f32> {
        let at = |m: &Matrix<'_>, i: usize, j: usize| m.data[i * m.row_stride + j * m.col_stride];
        let mut out = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                out[i * b.cols + j] = (0..a.cols).map(|p| at(&a, i, p) * at(&b, p, j)).sum();
            }
        }
        out
    }

    #[test]
    fn products_of_views_and_transposes_match_the_triple_loop() {
        let values = |n: usize, s: usize| -> Vec<f32> {
            (0..n).map(|i| ((i * s % 13) as f32 - 6.0) * 0.25).collect()
        };
        // Small (one thread) and large enough to split over the pool.
        for (m, k, n) in [(3, 5, 4), (300, 200, 190)] {
            let (a, b) = (values(m * k, 7), values(k * n, 5));
            let (ta, tb) = (values(k * m, 3), values(n * k, 11));
            let cases = [
                (Matrix::row_major(&a, m, k), Matrix::row_major(&b, k, n)),
                (
                    Matrix::row_major(&ta, k, m).t(),
                    Matrix::row_major(&b, k, n),
                ),
                (
                    Matrix::row_major(&a, m, k),
                    Matrix::row_major(&tb, n, k).t(),
                ),
            ];
            for (x, y) in cases {
                let (got, want) = (matmul(x, y), naive(x, y));
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-3 * (1.0 + w.abs()), "{g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn an_empty_inner_dimension_gives_zeros() {
        let out = matmul(Matrix::row_major(&[], 2, 0), Matrix::row_major(&[], 0, 3));
        assert_eq!(out, vec![0.0; 6]);
    }

    #[test]
    #[should_panic(expected = "inner dimensions differ")]
    fn mismatched_shapes_are_refused() {
        matmul(
            Matrix::row_major(&[0.0; 6], 2, 3),
            Matrix::row_major(&[0.0; 6], 2, 3),
        );
    }
}
