//! Sampling helpers over a bare [`RngCore`].
//!
//! The world draws every random choice through these few functions, built only on
//! `next_u32`/`next_u64`, so prompt files and renders depend on the generator's bit stream
//! (ChaCha8 for the shipped sets) and not on the sampling algorithms of a `rand` version.

use rand::RngCore;

/// A uniform index in `0..n` (Lemire's multiply-shift; the bias is below 2^-50 for the small
/// `n` used here). `n` must be positive.
pub(crate) fn below<R: RngCore + ?Sized>(rng: &mut R, n: usize) -> usize {
    debug_assert!(n > 0, "below(0) has no valid index");
    ((u128::from(rng.next_u64()) * n as u128) >> 64) as usize
}

/// A uniform integer in the closed range `lo..=hi`.
pub(crate) fn int_in<R: RngCore + ?Sized>(rng: &mut R, lo: i32, hi: i32) -> i32 {
    debug_assert!(lo <= hi, "empty range {lo}..={hi}");
    lo + below(rng, (hi - lo + 1) as usize) as i32
}

/// A uniform `f32` in `[0, 1)` with 24 bits of resolution.
pub(crate) fn unit<R: RngCore + ?Sized>(rng: &mut R) -> f32 {
    (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32
}

/// A uniform `f32` in `[lo, hi)`.
pub(crate) fn float_in<R: RngCore + ?Sized>(rng: &mut R, lo: f32, hi: f32) -> f32 {
    lo + (hi - lo) * unit(rng)
}

/// `true` with probability `p`.
pub(crate) fn chance<R: RngCore + ?Sized>(rng: &mut R, p: f32) -> bool {
    unit(rng) < p
}

/// A uniformly chosen element of a non-empty slice.
pub(crate) fn pick<'a, T, R: RngCore + ?Sized>(rng: &mut R, items: &'a [T]) -> &'a T {
    &items[below(rng, items.len())]
}

/// A standard normal sample (Box-Muller).
pub(crate) fn gaussian<R: RngCore + ?Sized>(rng: &mut R) -> f32 {
    let u1 = unit(rng).max(1e-7);
    let u2 = unit(rng);
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn below_covers_every_index_evenly() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut counts = [0usize; 6];
        for _ in 0..60_000 {
            counts[below(&mut rng, 6)] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            assert!((9_400..10_600).contains(&c), "index {i} drawn {c} times of 60000");
        }
    }

    #[test]
    fn int_in_is_inclusive_and_unit_is_half_open() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let draws: Vec<i32> = (0..2_000).map(|_| int_in(&mut rng, -2, 2)).collect();
        assert_eq!(*draws.iter().min().unwrap(), -2);
        assert_eq!(*draws.iter().max().unwrap(), 2);
        assert!((0..10_000).all(|_| (0.0..1.0).contains(&unit(&mut rng))));
    }

    #[test]
    fn gaussian_has_unit_moments() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let xs: Vec<f32> = (0..50_000).map(|_| gaussian(&mut rng)).collect();
        let mean = xs.iter().sum::<f32>() / xs.len() as f32;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / xs.len() as f32;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.03, "variance {var}");
    }
}
