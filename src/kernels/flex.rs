//! The `flex` CPU backend's fused kernels: one pass over contiguous f32 rows per composite,
//! split over rayon's threads, each row loop compiled for AVX-512, AVX2 + FMA and the baseline
//! (chosen at run time by `multiversion`); attention runs each (sample, head) as two small
//! GEMMs (the `gemm` crate flex itself uses) on token-major memory, so no head transpose is
//! ever copied. Other dtypes (bf16 / f16 weights) take the composed ops.

use burn::tensor::ops::FloatTensor;
use burn::tensor::{Bytes, DType, Shape, TensorMetadata};
use burn_flex::{Flex, FlexTensor, Layout};
use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::flex_rows::*;
use super::{Backend, composed};

/// Whether every tensor is f32 (the kernels' dtype).
fn all_f32(tensors: &[&FlexTensor]) -> bool {
    tensors.iter().all(|t| t.dtype() == DType::F32)
}

/// `t` with a contiguous, offset-free f32 buffer.
fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() { t } else { t.to_contiguous() }
}

fn data(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32")
}

/// A buffer of `len` values that `fill` writes through `MaybeUninit` slices (no zeroing first).
///
/// # Safety
/// `fill` must write every one of the `len` elements.
unsafe fn written(len: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut out = Vec::<f32>::with_capacity(len);
    fill(&mut out.spare_capacity_mut()[..len]);
    // SAFETY: every element was written (the caller's contract).
    unsafe { out.set_len(len) };
    out
}

fn output(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::new(Bytes::from_elems(values), Layout::contiguous(shape), DType::F32)
}

/// `acc += part`, element by element (partial sums of parallel tasks).
fn add_assign(mut acc: Vec<f32>, part: &[f32]) -> Vec<f32> {
    acc.iter_mut().zip(part).for_each(|(a, b)| *a += b);
    acc
}

/// Rows per parallel task: about four tasks a thread, at least one row.
fn rows_per_task(rows: usize) -> usize {
    (rows / (4 * rayon::current_num_threads())).max(1)
}

/// A raw pointer shared by tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// `dst (m x n, row stride dst_rs) = (read ? dst : 0) + beta * lhs (m x k) * rhs (k x n)`, with
/// `lhs` and `rhs` at any strides `(row, column)`, on the calling thread.
///
/// # Safety
/// Every pointer with its strides must address valid memory for the shapes.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    read: bool,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    beta: f32,
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            read,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Shapes of a token-major attention input `[B, S, H * hd]`.
#[derive(Clone, Copy)]
struct Heads {
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
}

impl Heads {
    fn of(q: &FlexTensor, heads: usize) -> Self {
        let shape = q.shape();
        let (batch, tokens, dim) = (shape[0], shape[1], shape[2]);
        Self { batch, tokens, heads, head_dim: dim / heads }
    }

    fn dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Offset of head `h` of sample `b`'s first token.
    fn offset(&self, task: usize) -> usize {
        let (b, h) = (task / self.heads, task % self.heads);
        b * self.tokens * self.dim() + h * self.head_dim
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// Scores, softmax and `P V` of one (sample, head): `probs` gets `P [S, S]`, `out` the head's
/// columns of the output.
///
/// # Safety
/// `q, k, v, out` address `[B, S, H * hd]` buffers of shape `s`.
unsafe fn attention_head(s: Heads, task: usize, q: *const f32, k: *const f32, v: *const f32, out: SharedMut, probs: &mut [f32]) {
    let (n, hd, dim) = (s.tokens, s.head_dim, s.dim());
    let off = s.offset(task);
    unsafe {
        gemm((n, n, hd), probs.as_mut_ptr(), n, false, q.add(off), (dim, 1), k.add(off), (1, dim), s.scale());
        softmax_rows(probs, n);
        gemm((n, hd, n), out.ptr().add(off), dim, false, probs.as_ptr(), (n, 1), v.add(off), (dim, 1), 1.0);
    }
}

fn attention_impl(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor, heads: usize, keep_probs: bool) -> (FlexTensor, Option<FlexTensor>) {
    let s = Heads::of(q, heads);
    let n = s.tokens;
    let (qd, kd, vd) = (data(q).as_ptr() as usize, data(k).as_ptr() as usize, data(v).as_ptr() as usize);
    let mut out = vec![0.0f32; s.batch * n * s.dim()];
    let shared = SharedMut(out.as_mut_ptr());
    let tasks = s.batch * s.heads;
    let run = |task: usize, probs: &mut [f32]| unsafe {
        attention_head(s, task, qd as *const f32, kd as *const f32, vd as *const f32, shared, probs)
    };
    let probs = if keep_probs {
        let mut probs = vec![0.0f32; tasks * n * n];
        probs.par_chunks_mut(n * n).enumerate().for_each(|(task, p)| run(task, p));
        Some(output(probs, Shape::new([s.batch, s.heads, n, n])))
    } else {
        (0..tasks).into_par_iter().for_each_init(|| vec![0.0f32; n * n], |p, task| run(task, p));
        None
    };
    (output(out, q.shape()), probs)
}

/// `out [m, n] = (read ? out : 0) + a [m, k] b` for row-major `a` (row stride `k`), split
/// into row blocks over rayon's threads (each block one single-threaded GEMM).
///
/// # Safety
/// The pointers must address the shapes.
unsafe fn par_gemm_rows((m, n, k): (usize, usize, usize), out: *mut f32, read: bool, a: *const f32, b: *const f32, (b_rs, b_cs): (usize, usize)) {
    let blocks = if m * n * k < 1 << 20 { 1 } else { (4 * rayon::current_num_threads()).min(m.div_ceil(32)) };
    let span = m.div_ceil(blocks);
    let (out, a, b) = (SharedMut(out), a as usize, b as usize);
    (0..blocks).into_par_iter().for_each(|block| {
        let (start, end) = (block * span, ((block + 1) * span).min(m));
        if start < end {
            unsafe {
                gemm((end - start, n, k), out.ptr().add(start * n), n, read, (a as *const f32).add(start * k), (k, 1), b as *const f32, (b_rs, b_cs), 1.0)
            }
        }
    });
}

/// Column sums of `[rows, n]` and `a^T g` for `a [rows, k]`, `g [rows, n]`, split over rows
/// among the threads (each computes a partial product; partials are added).
fn weight_and_bias_grads(a: &[f32], g: &[f32], k: usize, n: usize, want_weight: bool, want_bias: bool) -> (Vec<f32>, Vec<f32>) {
    let rows = g.len() / n;
    let parts = rayon::current_num_threads().min(rows.div_ceil(64)).max(1);
    let span = rows.div_ceil(parts);
    (0..parts)
        .into_par_iter()
        .map(|part| {
            let (start, end) = (part * span, ((part + 1) * span).min(rows));
            let mut dw = if want_weight { vec![0.0f32; k * n] } else { Vec::new() };
            let mut db = if want_bias { vec![0.0f32; n] } else { Vec::new() };
            if start < end {
                if want_weight {
                    // dW [k, n] = a[start..end]^T g[start..end]
                    unsafe {
                        gemm((k, n, end - start), dw.as_mut_ptr(), n, false, a[start * k..].as_ptr(), (1, k), g[start * n..].as_ptr(), (n, 1), 1.0)
                    };
                }
                if want_bias {
                    for row in g[start * n..end * n].chunks_exact(n) {
                        db.iter_mut().zip(row).for_each(|(d, v)| *d += v);
                    }
                }
            }
            (dw, db)
        })
        .reduce(
            || (vec![0.0f32; if want_weight { k * n } else { 0 }], vec![0.0f32; if want_bias { n } else { 0 }]),
            |(aw, ab), (bw, bb)| (add_assign(aw, &bw), add_assign(ab, &bb)),
        )
}

impl Backend for Flex {
    fn contiguous_broadcast() -> bool {
        true
    }

    fn attention_keeps_probs() -> bool {
        true
    }

    fn fused_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: Option<FloatTensor<Self>>) -> FloatTensor<Self> {
        if !all_f32(&[&x, &weight]) || bias.as_ref().is_some_and(|b| b.dtype() != DType::F32) {
            return composed::linear::<Self>(x, weight, bias);
        }
        let (x, weight) = (contiguous(x), contiguous(weight));
        let wshape = weight.shape();
        let (k, n) = (wshape[0], wshape[1]);
        let xs = data(&x);
        let rows = xs.len() / k;
        let out = match bias.map(contiguous) {
            Some(bias) => {
                let b = data(&bias);
                let mut out = vec![0.0f32; rows * n];
                out.par_chunks_mut(n * rows_per_task(rows)).for_each(|o| o.chunks_exact_mut(n).for_each(|row| row.copy_from_slice(b)));
                unsafe { par_gemm_rows((rows, n, k), out.as_mut_ptr(), true, xs.as_ptr(), data(&weight).as_ptr(), (n, 1)) };
                out
            }
            // SAFETY: the GEMM writes every element (it does not read `out`).
            None => unsafe { written(rows * n, |out| par_gemm_rows((rows, n, k), out.as_mut_ptr().cast(), false, xs.as_ptr(), data(&weight).as_ptr(), (n, 1))) },
        };
        let mut shape = x.shape();
        let last = shape.num_dims() - 1;
        shape[last] = n;
        output(out, shape)
    }

    fn fused_linear_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        wanted: [bool; 3],
    ) -> [Option<FloatTensor<Self>>; 3] {
        if !all_f32(&[&x, &weight, &grad]) {
            return composed::linear_backward::<Self>(x, weight, grad, wanted);
        }
        let (x, weight, grad) = (contiguous(x), contiguous(weight), contiguous(grad));
        let wshape = weight.shape();
        let (k, n) = (wshape[0], wshape[1]);
        let (xs, gs) = (data(&x), data(&grad));
        let rows = gs.len() / n;
        let dx = wanted[0].then(|| {
            // dx [rows, k] = g [rows, n] W^T
            // SAFETY: the GEMM writes every element.
            let dx = unsafe { written(rows * k, |dx| par_gemm_rows((rows, k, n), dx.as_mut_ptr().cast(), false, gs.as_ptr(), data(&weight).as_ptr(), (1, n))) };
            output(dx, x.shape())
        });
        let (dw, db) = if wanted[1] || wanted[2] { weight_and_bias_grads(xs, gs, k, n, wanted[1], wanted[2]) } else { (Vec::new(), Vec::new()) };
        let dw = wanted[1].then(|| output(dw, wshape));
        let db = wanted[2].then(|| output(db, Shape::new([n])));
        [dx, dw, db]
    }

    fn layer_norm_modulate(x: FloatTensor<Self>, shift: FloatTensor<Self>, scale: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        if !all_f32(&[&x, &shift, &scale]) {
            return composed::layer_norm_modulate::<Self>(x, shift, scale, eps);
        }
        let (x, shift, scale) = (contiguous(x), contiguous(shift), contiguous(scale));
        let shape = x.shape();
        let (tokens, d) = (shape[1], shape[2]);
        let (xs, shifts, scales) = (data(&x), data(&shift), data(&scale));
        // One task per sample when there are enough samples, else per row block.
        let per = tokens * d;
        let rows = if shape[0] >= 2 * rayon::current_num_threads() { tokens } else { rows_per_task(shape.num_elements() / d) };
        // SAFETY: the blocks tile the output and each row of a block is written.
        let out = unsafe { written(xs.len(), |out| out.par_chunks_mut(rows * d).enumerate().for_each(|(task, o)| {
            let start = task * rows * d;
            // A block never spans two samples when `rows` divides `tokens`; split it where it does.
            let mut at = 0;
            while at < o.len() {
                let b = (start + at) / per;
                let end = ((b + 1) * per - start).min(o.len());
                layer_norm_modulate_rows(&xs[start + at..start + end], &shifts[b * d..(b + 1) * d], &scales[b * d..(b + 1) * d], &mut o[at..end], eps as f32);
                at = end;
            }
        })) };
        output(out, shape)
    }

    fn layer_norm_modulate_backward(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        if !all_f32(&[&x, &scale, &grad]) {
            return composed::layer_norm_modulate_backward::<Self>(x, scale, grad, eps);
        }
        let (x, scale, grad) = (contiguous(x), contiguous(scale), contiguous(grad));
        let shape = x.shape();
        let (batch, tokens, d) = (shape[0], shape[1], shape[2]);
        let (xs, scales, gs) = (data(&x), data(&scale), data(&grad));
        let mut dshift = vec![0.0f32; batch * d];
        let mut dscale = vec![0.0f32; batch * d];
        let per = tokens * d;
        // SAFETY: each sample's rows of `dx` are written.
        let dx = unsafe {
            written(xs.len(), |dx| {
                dx.par_chunks_mut(per).zip(dshift.par_chunks_mut(d)).zip(dscale.par_chunks_mut(d)).enumerate().for_each(
                    |(b, ((dx, dshift), dscale))| {
                        let range = b * per..(b + 1) * per;
                        layer_norm_modulate_backward_sample(&xs[range.clone()], &scales[b * d..(b + 1) * d], &gs[range], dx, dshift, dscale, eps as f32);
                    },
                )
            })
        };
        (output(dx, shape), output(dshift, Shape::new([batch, d])), output(dscale, Shape::new([batch, d])))
    }

    fn gated_residual(x: FloatTensor<Self>, gate: FloatTensor<Self>, y: FloatTensor<Self>) -> FloatTensor<Self> {
        if !all_f32(&[&x, &gate, &y]) {
            return composed::gated_residual::<Self>(x, gate, y);
        }
        let (x, gate, y) = (contiguous(x), contiguous(gate), contiguous(y));
        let shape = x.shape();
        let (tokens, d) = (shape[1], shape[2]);
        let (xs, gates, ys) = (data(&x), data(&gate), data(&y));
        let per = tokens * d;
        // SAFETY: each sample's rows are written.
        let out = unsafe {
            written(xs.len(), |out| {
                out.par_chunks_mut(per).enumerate().for_each(|(b, o)| {
                    let range = b * per..(b + 1) * per;
                    gated_rows(&xs[range.clone()], &gates[b * d..(b + 1) * d], &ys[range], o);
                })
            })
        };
        output(out, shape)
    }

    fn gated_residual_backward(
        gate: FloatTensor<Self>,
        y: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !all_f32(&[&gate, &y, &grad]) {
            return composed::gated_residual_backward::<Self>(gate, y, grad);
        }
        let (gate, y, grad) = (contiguous(gate), contiguous(y), contiguous(grad));
        let shape = y.shape();
        let (batch, tokens, d) = (shape[0], shape[1], shape[2]);
        let (gates, ys, gs) = (data(&gate), data(&y), data(&grad));
        let mut dgate = vec![0.0f32; batch * d];
        let per = tokens * d;
        // SAFETY: each sample's rows of `dy` are written.
        let dy = unsafe {
            written(ys.len(), |dy| {
                dy.par_chunks_mut(per).zip(dgate.par_chunks_mut(d)).enumerate().for_each(|(b, (dy, dgate))| {
                    let range = b * per..(b + 1) * per;
                    gated_backward_sample(&gates[b * d..(b + 1) * d], &ys[range.clone()], &gs[range], dgate, dy);
                })
            })
        };
        (output(dgate, Shape::new([batch, d])), output(dy, shape))
    }

    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        if !all_f32(&[&x]) {
            return composed::gelu_tanh::<Self>(x);
        }
        let x = contiguous(x);
        let xs = data(&x);
        // SAFETY: the chunks of `out` and `x` pair up and every element is written.
        let out = unsafe { written(xs.len(), |out| out.par_chunks_mut(CHUNK).zip(xs.par_chunks(CHUNK)).for_each(|(o, x)| gelu_rows(x, o))) };
        output(out, x.shape())
    }

    fn gelu_tanh_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        if !all_f32(&[&x, &grad]) {
            return composed::gelu_tanh_backward::<Self>(x, grad);
        }
        let (x, grad) = (contiguous(x), contiguous(grad));
        let (xs, gs) = (data(&x), data(&grad));
        // SAFETY: the chunks pair up and every element is written.
        let out = unsafe {
            written(xs.len(), |out| {
                out.par_chunks_mut(CHUNK).zip(xs.par_chunks(CHUNK)).zip(gs.par_chunks(CHUNK)).for_each(|((o, x), g)| gelu_backward_rows(x, g, o))
            })
        };
        output(out, x.shape())
    }

    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        if !all_f32(&[&x, &weight]) {
            return composed::rms_norm::<Self>(x, weight, eps);
        }
        let (x, weight) = (contiguous(x), contiguous(weight));
        let (xs, w) = (data(&x), data(&weight));
        let d = w.len();
        let span = rows_per_task(xs.len() / d) * d;
        // SAFETY: the row blocks pair up and every row is written.
        let out = unsafe { written(xs.len(), |out| out.par_chunks_mut(span).zip(xs.par_chunks(span)).for_each(|(o, x)| rms_rows(x, w, o, eps as f32))) };
        output(out, x.shape())
    }

    fn rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !all_f32(&[&x, &weight, &grad]) {
            return composed::rms_norm_backward::<Self>(x, weight, grad, eps);
        }
        let (x, weight, grad) = (contiguous(x), contiguous(weight), contiguous(grad));
        let (xs, w, gs) = (data(&x), data(&weight), data(&grad));
        let d = w.len();
        let span = rows_per_task(xs.len() / d) * d;
        let mut dweight = Vec::new();
        // SAFETY: every row of `dx` is written.
        let dx = unsafe {
            written(xs.len(), |dx| {
                dweight = dx
            .par_chunks_mut(span)
            .zip(xs.par_chunks(span))
            .zip(gs.par_chunks(span))
            .map(|((dx, x), g)| {
                let mut dw = vec![0.0f32; d];
                rms_backward_rows(x, w, g, dx, &mut dw, eps as f32);
                dw
            })
            .reduce(|| vec![0.0f32; d], |a, b| add_assign(a, &b));
            })
        };
        (output(dx, x.shape()), output(dweight, weight.shape()))
    }

    fn token_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, heads: usize) -> FloatTensor<Self> {
        if !all_f32(&[&q, &k, &v]) {
            return composed::token_attention::<Self>(q, k, v, heads);
        }
        let (q, k, v) = (contiguous(q), contiguous(k), contiguous(v));
        attention_impl(&q, &k, &v, heads, false).0
    }

    fn token_attention_with_probs(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        heads: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !all_f32(&[&q, &k, &v]) {
            return composed::token_attention_with_probs::<Self>(q, k, v, heads);
        }
        let (q, k, v) = (contiguous(q), contiguous(k), contiguous(v));
        let (out, probs) = attention_impl(&q, &k, &v, heads, true);
        (out, probs.expect("kept"))
    }

    fn token_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        heads: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        if !all_f32(&[&q, &k, &v, &probs, &grad]) {
            return composed::token_attention_backward::<Self>(q, k, v, probs, grad, heads);
        }
        let (q, k, v, probs, grad) = (contiguous(q), contiguous(k), contiguous(v), contiguous(probs), contiguous(grad));
        let s = Heads::of(&q, heads);
        let (n, hd, dim) = (s.tokens, s.head_dim, s.dim());
        let len = s.batch * n * dim;
        let (mut dq, mut dk, mut dv) = (vec![0.0f32; len], vec![0.0f32; len], vec![0.0f32; len]);
        let (dqp, dkp, dvp) = (SharedMut(dq.as_mut_ptr()), SharedMut(dk.as_mut_ptr()), SharedMut(dv.as_mut_ptr()));
        let ptr = |t: &FlexTensor| data(t).as_ptr() as usize;
        let (qd, kd, vd, gd) = (ptr(&q), ptr(&k), ptr(&v), ptr(&grad));
        let ps = data(&probs);
        let scale = s.scale();
        (0..s.batch * s.heads).into_par_iter().for_each_init(
            || vec![0.0f32; n * n],
            |dp, task| unsafe {
                let off = s.offset(task);
                let p = &ps[task * n * n..(task + 1) * n * n];
                let (q, k, v, g) = ((qd as *const f32).add(off), (kd as *const f32).add(off), (vd as *const f32).add(off), (gd as *const f32).add(off));
                // dV = P^T dO; dP = dO V^T; dS = P (dP - rowsum(dP P)) scale; dQ = dS K; dK = dS^T Q.
                gemm((n, hd, n), dvp.ptr().add(off), dim, false, p.as_ptr(), (1, n), g, (dim, 1), 1.0);
                gemm((n, n, hd), dp.as_mut_ptr(), n, false, g, (dim, 1), v, (1, dim), 1.0);
                softmax_backward_rows(p, dp, n, scale);
                gemm((n, hd, n), dqp.ptr().add(off), dim, false, dp.as_ptr(), (n, 1), k, (dim, 1), 1.0);
                gemm((n, hd, n), dkp.ptr().add(off), dim, false, dp.as_ptr(), (1, n), q, (dim, 1), 1.0);
            },
        );
        let shape = q.shape();
        (output(dq, shape.clone()), output(dk, shape.clone()), output(dv, shape))
    }
}
