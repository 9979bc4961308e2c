//! Image degradations: what a low-quality sample looks like (blur, sensor-like noise, ghosted
//! smear). Used to make imperfect training pairs and to test that the quality reward ranks
//! degraded images below clean ones.

use rand::RngCore;

use crate::world::image::{IMAGE_SIZE, Image32};
use crate::world::random::{gaussian, int_in};

/// A kind of degradation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Degradation {
    /// A 3 x 3 box blur.
    Blur,
    /// Independent Gaussian noise on every channel (standard deviation 0.06 to 0.12).
    Noise,
    /// A ghost copy shifted by 1-2 pixels blended at 45 %: doubled, off-palette edges.
    Smear,
}

impl Degradation {
    /// Every degradation.
    pub const ALL: [Degradation; 3] = [Degradation::Blur, Degradation::Noise, Degradation::Smear];

    /// Applies the degradation.
    pub fn apply<R: RngCore + ?Sized>(self, image: &Image32, rng: &mut R) -> Image32 {
        match self {
            Degradation::Blur => box_blur(image),
            Degradation::Noise => {
                let sigma = 0.06 + 0.06 * crate::world::random::unit(rng);
                add_noise(image, sigma, rng)
            }
            Degradation::Smear => {
                let (dx, dy) = loop {
                    let d = (int_in(rng, -2, 2), int_in(rng, -2, 2));
                    if d != (0, 0) {
                        break d;
                    }
                };
                ghost(image, dx, dy, 0.45)
            }
        }
    }
}

/// The 3 x 3 box blur (edges clamp to the border).
pub fn box_blur(image: &Image32) -> Image32 {
    let last = IMAGE_SIZE as i32 - 1;
    Image32::from_fn(|x, y| {
        let mut acc = [0f32; 3];
        for dy in -1..=1 {
            for dx in -1..=1 {
                let p = image.get((x as i32 + dx).clamp(0, last) as usize, (y as i32 + dy).clamp(0, last) as usize);
                for c in 0..3 {
                    acc[c] += p[c] / 9.0;
                }
            }
        }
        acc
    })
}

/// Adds Gaussian noise of standard deviation `sigma` to every channel, clamped to `[0, 1]`.
pub fn add_noise<R: RngCore + ?Sized>(image: &Image32, sigma: f32, rng: &mut R) -> Image32 {
    let mut out = image.clone();
    for p in out.pixels_mut() {
        for v in p.iter_mut() {
            *v = (*v + sigma * gaussian(rng)).clamp(0.0, 1.0);
        }
    }
    out
}

/// Blends a copy shifted by `(dx, dy)` over the image with weight `alpha`.
pub fn ghost(image: &Image32, dx: i32, dy: i32, alpha: f32) -> Image32 {
    let last = IMAGE_SIZE as i32 - 1;
    let mut out = image.clone();
    for y in 0..IMAGE_SIZE {
        for x in 0..IMAGE_SIZE {
            let src = image.get((x as i32 - dx).clamp(0, last) as usize, (y as i32 - dy).clamp(0, last) as usize);
            out.blend(x, y, src, alpha);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn checker() -> Image32 {
        Image32::from_fn(|x, y| if (x / 4 + y / 4) % 2 == 0 { [1.0; 3] } else { [0.0; 3] })
    }

    #[test]
    fn blur_averages_neighbourhoods_and_keeps_flat_regions() {
        let b = box_blur(&checker());
        assert_eq!(b.get(1, 1), [1.0; 3]);
        assert!((b.get(3, 1)[0] - 2.0 / 3.0).abs() < 1e-6); // one of three columns is dark
        assert_eq!(box_blur(&Image32::filled([0.3; 3])).get(0, 0).map(|v| (v * 1e4).round()), [3000.0; 3]);
    }

    #[test]
    fn noise_has_the_asked_spread_and_ghost_doubles_edges() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let noisy = add_noise(&Image32::filled([0.5; 3]), 0.1, &mut rng);
        let values = noisy.as_hwc();
        let mean = values.iter().sum::<f32>() / values.len() as f32;
        let sd = (values.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / values.len() as f32).sqrt();
        assert!((mean - 0.5).abs() < 0.01 && (sd - 0.1).abs() < 0.01, "{mean} {sd}");
        let g = ghost(&checker(), 2, 0, 0.5);
        assert_eq!(g.get(4, 1), [0.5; 3]); // dark pixel with a light ghost from x = 2
        assert_eq!(g.get(6, 1), [0.0; 3]);
    }
}
