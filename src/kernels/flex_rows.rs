//! The `flex` kernels' row loops: 16-lane reductions, a vectorisable `exp`, and the per-row
//! loops of each fused composite, each compiled for AVX-512, AVX2 + FMA and the baseline
//! (`multiversion` picks one at run time). [`super::flex`] splits rows over threads and calls
//! these.

use std::mem::MaybeUninit;

use multiversion::multiversion;

/// Sum with 16 independent lanes (vectorisable without reassociating a single accumulator).
#[inline(always)]
pub(super) fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let chunks = xs.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (a, x) in acc.iter_mut().zip(chunk) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `sum(a * b)` with 16 lanes.
#[inline(always)]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `sum(a * b * c)` with 16 lanes.
#[inline(always)]
pub(super) fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let n = a.len() / 16 * 16;
    for i in (0..n).step_by(16) {
        for j in 0..16 {
            acc[j] += a[i + j] * b[i + j] * c[i + j];
        }
    }
    let tail: f32 = (n..a.len()).map(|i| a[i] * b[i] * c[i]).sum();
    acc.iter().sum::<f32>() + tail
}

/// `sum((x - mean)^2)` with 16 lanes.
#[inline(always)]
pub(super) fn centered_squares(xs: &[f32], mean: f32) -> f32 {
    let mut acc = [0.0f32; 16];
    let chunks = xs.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|x| (x - mean) * (x - mean)).sum();
    for chunk in chunks {
        for (a, x) in acc.iter_mut().zip(chunk) {
            *a += (x - mean) * (x - mean);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Largest value, with 16 lanes.
#[inline(always)]
pub(super) fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = xs.chunks_exact(16);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a = a.max(x);
        }
    }
    acc.iter().fold(tail, |m, &v| m.max(v))
}

/// `e^x` in f32 (Cody-Waite range reduction and a degree-6 polynomial, about 1 ulp),
/// branch-free so that loops over it vectorise; inputs are clamped to [-87, 88].
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting it rounds to an integer
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.max(-87.0).min(88.0);
    // `t` holds round(x log2 e) in its low mantissa bits (t = ROUND + n exactly, |n| < 2^22),
    // which gives 2^n by integer ops alone (a float-to-int cast would not vectorise).
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23)
}

pub(super) const SQRT_2_OVER_PI: f32 = 0.797_884_6;
pub(super) const GELU_CUBIC: f32 = 0.044715;

/// `tanh(sqrt(2/pi) (x + 0.044715 x^3))`, as the composed op computes it.
#[inline(always)]
pub(super) fn gelu_tanh_inner(x: f32) -> f32 {
    let u = (x * (x * x * GELU_CUBIC + 1.0) * SQRT_2_OVER_PI).max(-15.0).min(15.0);
    1.0 - 2.0 / (exp(2.0 * u) + 1.0)
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub(super) fn gelu_rows(x: &[f32], out: &mut [MaybeUninit<f32>]) {
    for (o, &x) in out.iter_mut().zip(x) {
        o.write(0.5 * x * (1.0 + gelu_tanh_inner(x)));
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub(super) fn gelu_backward_rows(x: &[f32], grad: &[f32], out: &mut [MaybeUninit<f32>]) {
    for ((o, &x), &g) in out.iter_mut().zip(x).zip(grad) {
        let t = gelu_tanh_inner(x);
        let slope = 0.5 * (1.0 + t) + 0.5 * SQRT_2_OVER_PI * x * (1.0 - t * t) * (1.0 + 3.0 * GELU_CUBIC * x * x);
        o.write(g * slope);
    }
}

/// Element-wise kernels run over chunks of this many values a task.
pub(super) const CHUNK: usize = 16 * 1024;

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub(super) fn layer_norm_modulate_rows(x: &[f32], shift: &[f32], scale: &[f32], out: &mut [MaybeUninit<f32>], eps: f32) {
    let d = shift.len();
    for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mean = sum(row) / d as f32;
        let rstd = 1.0 / (centered_squares(row, mean) / d as f32 + eps).sqrt();
        for i in 0..d {
            o[i].write((row[i] - mean) * rstd * (1.0 + scale[i]) + shift[i]);
        }
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub(super) fn layer_norm_modulate_backward_sample(
    x: &[f32],
    scale: &[f32],
    grad: &[f32],
    dx: &mut [MaybeUninit<f32>],
    dshift: &mut [f32],
    dscale: &mut [f32],
    eps: f32,
) {
    let d = scale.len();
    let mut gh = vec![0.0f32; d];
    let mut xhat = vec![0.0f32; d];
    for ((row, g), dxr) in x.chunks_exact(d).zip(grad.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
        let mean = sum(row) / d as f32;
        let rstd = 1.0 / (centered_squares(row, mean) / d as f32 + eps).sqrt();
        for i in 0..d {
            xhat[i] = (row[i] - mean) * rstd;
            gh[i] = g[i] * (1.0 + scale[i]);
            dshift[i] += g[i];
            dscale[i] += g[i] * xhat[i];
        }
        let mean_gh = sum(&gh) / d as f32;
        let mean_ghx = dot(&gh, &xhat) / d as f32;
        for i in 0..d {
            dxr[i].write(rstd * (gh[i] - mean_gh - xhat[i] * mean_ghx));
        }
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub(super) fn gated_rows(x: &[f32], gate: &[f32], y: &[f32], out: &mut [MaybeUninit<f32>]) {
    let d = gate.len();
    for ((xr, yr), o) in x.chunks_exact(d).zip(y.chunks_exact(d)).zip(out.chunks_exact_mut(d)) {
        for i in 0..d {
            o[i].write(xr[i] + gate[i] * yr[i]);
        }
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub(super) fn gated_backward_sample(gate: &[f32], y: &[f32], grad: &[f32], dgate: &mut [f32], dy: &mut [MaybeUninit<f32>]) {
    let d = gate.len();
    for ((yr, g), dyr) in y.chunks_exact(d).zip(grad.chunks_exact(d)).zip(dy.chunks_exact_mut(d)) {
        for i in 0..d {
            dgate[i] += g[i] * yr[i];
            dyr[i].write(g[i] * gate[i]);
        }
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub(super) fn rms_rows(x: &[f32], weight: &[f32], out: &mut [MaybeUninit<f32>], eps: f32) {
    let d = weight.len();
    for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let r = 1.0 / (dot(row, row) / d as f32 + eps).sqrt();
        for i in 0..d {
            o[i].write(row[i] * r * weight[i]);
        }
    }
}

/// RMSNorm backward over a run of rows: writes `dx`, adds the rows' share of `dweight`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub(super) fn rms_backward_rows(x: &[f32], weight: &[f32], grad: &[f32], dx: &mut [MaybeUninit<f32>], dweight: &mut [f32], eps: f32) {
    let d = weight.len();
    for ((row, g), dxr) in x.chunks_exact(d).zip(grad.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
        let r = 1.0 / (dot(row, row) / d as f32 + eps).sqrt();
        let c = dot3(g, weight, row) * r * r / d as f32;
        for i in 0..d {
            dweight[i] += g[i] * row[i] * r;
            dxr[i].write(r * (g[i] * weight[i] - row[i] * c));
        }
    }
}

/// In-place softmax of each `cols`-wide row of `scores`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub(super) fn softmax_rows(scores: &mut [f32], cols: usize) {
    for row in scores.chunks_exact_mut(cols) {
        let max = max(row);
        for v in row.iter_mut() {
            *v = exp(*v - max);
        }
        let inv = 1.0 / sum(row);
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// `ds = p * (dp - rowsum(dp * p)) * scale`, in place in `dp`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub(super) fn softmax_backward_rows(probs: &[f32], dp: &mut [f32], cols: usize, scale: f32) {
    for (p, d) in probs.chunks_exact(cols).zip(dp.chunks_exact_mut(cols)) {
        let inner = dot(p, d);
        for i in 0..cols {
            d[i] = p[i] * (d[i] - inner) * scale;
        }
    }
}

