//! The quality reward, standing in for DeQA.

use crate::reward::{Reward, RewardError, RewardInput, RewardScore, score_each};
use crate::world::image::{IMAGE_SIZE, Image32, PIXELS, Rgb, colour_distance};
use crate::world::palette::quantise;

/// Lowest raw score.
pub const RAW_MIN: f32 = 1.0;
/// Highest raw score.
pub const RAW_MAX: f32 = 5.0;
/// Training divides the raw score by this, as Flow-OPD divides DeQA by 5.
pub const RAW_SCALE: f32 = 5.0;

/// DeQA stand-in: scores image quality alone (the prompt is not used) on a 1-5 scale from
/// four measurements ([`QualityFeatures`]):
/// - content: pixels near strong contrast (5 x 5 colour range above 0.3); an image with fewer
///   than 40 has little to judge and scores towards 1;
/// - sharpness: the mean width of edges, `sum(g r) / sum(g^2)` over pixels near strong
///   contrast (gradient `g`, local 5 x 5 range `r`), 1 for a step and about 3 after a 3 x 3
///   blur;
/// - cleanliness: the median colour Laplacian (0 on flat and linear backgrounds, large under
///   noise and speckle);
/// - palette purity: among saturated pixels, the fraction matching no palette colour (smears,
///   ghosting and blur mix colours).
///
/// Each becomes a satisfaction in `[0, 1]` (content: 0 to 40 pixels; sharp: width 1.2 to 3.2;
/// clean: median Laplacian 0.02 to 0.6, Gaussian noise of deviation 0.02 costs a fifth;
/// pure: 5 % to 45 % off-palette), and
/// `raw = 1 + 4 * content * (0.5 sharp + 0.5 pure) * (0.2 + 0.8 clean)`; `metric` is `raw`
/// and `value` is `raw / 5`.
#[derive(Clone, Copy, Debug, Default)]
pub struct QualityReward;

/// The image measurements the quality scorer uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QualityFeatures {
    /// Pixels whose 5 x 5 neighbourhood spans a colour range above 0.3.
    pub contrast_pixels: usize,
    /// Mean edge width in pixels (`f32::INFINITY` without edges).
    pub edge_width: f32,
    /// Median colour Laplacian magnitude.
    pub noise: f32,
    /// Fraction of saturated pixels (channel range above 0.3) matching no palette colour.
    pub off_palette: f32,
}

/// Colour step of each pixel to its right and lower neighbours (the larger), row-major.
fn gradient(image: &Image32) -> Vec<f32> {
    (0..PIXELS)
        .map(|i| {
            let (x, y) = (i % IMAGE_SIZE, i / IMAGE_SIZE);
            let p = image.get(x, y);
            let right = if x + 1 < IMAGE_SIZE { colour_distance(p, image.get(x + 1, y)) } else { 0.0 };
            let down = if y + 1 < IMAGE_SIZE { colour_distance(p, image.get(x, y + 1)) } else { 0.0 };
            right.max(down)
        })
        .collect()
}

/// Per-channel range over the 5 x 5 window around each pixel, as a colour distance.
fn local_range(image: &Image32) -> Vec<f32> {
    (0..PIXELS)
        .map(|i| {
            let (x, y) = (i % IMAGE_SIZE, i / IMAGE_SIZE);
            let (mut lo, mut hi): (Rgb, Rgb) = ([1.0; 3], [0.0; 3]);
            for wy in y.saturating_sub(2)..(y + 3).min(IMAGE_SIZE) {
                for wx in x.saturating_sub(2)..(x + 3).min(IMAGE_SIZE) {
                    let p = image.get(wx, wy);
                    for c in 0..3 {
                        lo[c] = lo[c].min(p[c]);
                        hi[c] = hi[c].max(p[c]);
                    }
                }
            }
            colour_distance(lo, hi)
        })
        .collect()
}

/// Measures an image's [`QualityFeatures`].
pub fn quality_features(image: &Image32) -> QualityFeatures {
    let g = gradient(image);
    let r = local_range(image);
    let contrast_pixels = r.iter().filter(|&&v| v > 0.3).count();
    let (mut gr, mut gg) = (0.0f32, 0.0f32);
    for (gi, ri) in g.iter().zip(&r) {
        if *ri > 0.25 {
            gr += gi * ri;
            gg += gi * gi;
        }
    }
    let edge_width = if gg > 0.0 { gr / gg } else { f32::INFINITY };
    let mut laplacian: Vec<f32> = (0..PIXELS)
        .map(|i| {
            let (x, y) = (i % IMAGE_SIZE, i / IMAGE_SIZE);
            let at = |dx: i32, dy: i32| {
                let last = IMAGE_SIZE as i32 - 1;
                image.get((x as i32 + dx).clamp(0, last) as usize, (y as i32 + dy).clamp(0, last) as usize)
            };
            let (c, l, rr, u, d) = (at(0, 0), at(-1, 0), at(1, 0), at(0, -1), at(0, 1));
            let lap: Rgb = [0, 1, 2].map(|k| l[k] + rr[k] + u[k] + d[k] - 4.0 * c[k]);
            colour_distance(lap, [0.0; 3])
        })
        .collect();
    laplacian.sort_unstable_by(f32::total_cmp);
    let noise = laplacian[PIXELS / 2];
    let saturated: Vec<&Rgb> = image
        .pixels()
        .iter()
        .filter(|p| p.iter().copied().fold(0.0f32, f32::max) - p.iter().copied().fold(1.0f32, f32::min) > 0.3)
        .collect();
    let off = saturated.iter().filter(|p| quantise(***p).is_none()).count();
    let off_palette = if saturated.is_empty() { 0.0 } else { off as f32 / saturated.len() as f32 };
    QualityFeatures { contrast_pixels, edge_width, noise, off_palette }
}

fn ramp(x: f32, zero: f32, full: f32) -> f32 {
    ((x - zero) / (full - zero)).clamp(0.0, 1.0)
}

/// The raw quality score (1-5) of measured features.
pub fn quality_raw(f: &QualityFeatures) -> f32 {
    let content = ramp(f.contrast_pixels as f32, 0.0, 40.0);
    let sharp = 1.0 - ramp(f.edge_width, 1.2, 3.2);
    let clean = 1.0 - ramp(f.noise, 0.02, 0.6);
    let pure = 1.0 - ramp(f.off_palette, 0.05, 0.45);
    RAW_MIN + (RAW_MAX - RAW_MIN) * content * (0.5 * sharp + 0.5 * pure) * (0.2 + 0.8 * clean)
}

impl Reward for QualityReward {
    fn name(&self) -> &str {
        "quality"
    }

    fn score(&self, batch: &[RewardInput]) -> Result<Vec<RewardScore>, RewardError> {
        score_each(self.name(), batch, |_, image, _| {
            let raw = quality_raw(&quality_features(image));
            Ok(RewardScore { value: raw / RAW_SCALE, metric: raw })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reward::fixtures::{blank, mean_scores, mismatch_shift, noise, renders, test_prompts};
    use crate::world::degrade::{add_noise, box_blur, ghost};
    use crate::world::spec::Task;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn mean_raw(images: &[Image32]) -> f32 {
        images.iter().map(|i| quality_raw(&quality_features(i))).sum::<f32>() / images.len() as f32
    }

    fn blend(a: &Image32, b: &Image32, t: f32) -> Image32 {
        Image32::from_fn(|x, y| {
            let (p, q) = (a.get(x, y), b.get(x, y));
            [0, 1, 2].map(|k| p[k] + t * (q[k] - p[k]))
        })
    }

    #[test]
    fn ground_truth_scores_near_the_top_and_degradations_rank_below() {
        let prompts = test_prompts(Task::Quality, 400);
        let images = renders(&prompts, 71);
        let reward = QualityReward;
        let (gt_value, gt) = mean_scores(&reward, &prompts, &images, 0);
        let (_, mismatched) = mean_scores(&reward, &prompts, &images, mismatch_shift(&prompts));
        let (_, blank_score) = mean_scores(&reward, &prompts, &vec![blank(); prompts.len()], 0);
        let noises: Vec<Image32> = (0..prompts.len() as u64).map(noise).collect();
        let (_, noise_score) = mean_scores(&reward, &prompts, &noises, 0);
        let mut rng = ChaCha8Rng::seed_from_u64(72);
        let half_blur = mean_raw(&images.iter().map(|i| blend(i, &box_blur(i), 0.5)).collect::<Vec<_>>());
        let blur = mean_raw(&images.iter().map(box_blur).collect::<Vec<_>>());
        let light_noise = mean_raw(&images.iter().map(|i| add_noise(i, 0.02, &mut rng)).collect::<Vec<_>>());
        let heavy_noise = mean_raw(&images.iter().map(|i| add_noise(i, 0.08, &mut rng)).collect::<Vec<_>>());
        let smear = mean_raw(&images.iter().map(|i| ghost(i, 1, 1, 0.45)).collect::<Vec<_>>());
        eprintln!(
            "quality over {} test prompts (raw, 1-5): ground truth {gt:.2} (value {gt_value:.3}), \
             mismatched prompt {mismatched:.2} (prompt-free, as DeQA), half blur {half_blur:.2}, \
             3x3 blur {blur:.2}, noise sd 0.02 {light_noise:.2}, noise sd 0.08 {heavy_noise:.2}, \
             smear {smear:.2}, blank {blank_score:.2}, uniform noise {noise_score:.2}",
            prompts.len()
        );
        assert!(gt >= 4.9, "ground truth {gt}");
        assert!((gt_value - gt / RAW_SCALE).abs() < 1e-5);
        assert_eq!(mismatched, gt, "the score must not depend on the prompt");
        assert!(gt > half_blur + 0.5 && half_blur > blur + 1.0 && blur <= 3.0, "{gt} {half_blur} {blur}");
        assert!(gt > light_noise + 0.5 && light_noise > heavy_noise + 1.5 && heavy_noise <= 2.0);
        assert!(smear <= gt - 1.0, "smear {smear}");
        assert_eq!(blank_score, 1.0);
        assert!(noise_score <= 1.5, "uniform noise {noise_score}");
    }

    #[test]
    fn features_of_simple_images() {
        let blank = quality_features(&Image32::filled([0.4; 3]));
        assert_eq!((blank.contrast_pixels, blank.noise, blank.off_palette), (0, 0.0, 0.0));
        assert!(blank.edge_width.is_infinite());
        let step = Image32::from_fn(|x, _| if x < 16 { [0.1; 3] } else { [0.9; 3] });
        let f = quality_features(&step);
        assert!((f.edge_width - 1.0).abs() < 1e-5, "{f:?}");
        assert_eq!(f.contrast_pixels, 4 * 32);
        assert_eq!(quality_raw(&f), 5.0);
    }
}
