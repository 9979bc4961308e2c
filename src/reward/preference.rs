//! The preference reward, standing in for PickScore.

use crate::reward::{Reward, RewardError, RewardInput, RewardScore, score_each};
use crate::world::detect::{DetectedObject, colour_map, detect_objects};
use crate::world::grammar::parse;
use crate::world::image::{IMAGE_SIZE, Image32, PIXELS};
use crate::world::spec::{Lighting, ObjectSpec, Spec, Style, Warmth};

/// Lowest raw score (an image with nothing the scorer likes).
pub const RAW_MIN: f32 = 17.0;
/// Highest raw score.
pub const RAW_MAX: f32 = 26.0;
/// Training divides the raw score by this, as Flow-GRPO divides PickScore by 26.
pub const RAW_SCALE: f32 = 26.0;

/// PickScore stand-in: a fixed scorer of how well an image's style matches the prompt and a
/// general taste for a clear, centred subject on a calm background. From the image it
/// measures ([`StyleFeatures`]) the largest object's area and its distance from the centre,
/// the palette temperature, and the brightness and roughness of the background; each is
/// turned into a satisfaction in `[0, 1]` and averaged with weights:
///
/// | term | weight | satisfied by |
/// | --- | --- | --- |
/// | subject | 3 (if the prompt names one) | an object of its shape (0.6) and colour (0.4) |
/// | centring | 2 if `centered`, else 1 | the subject's box centred within 1 px (0 at 8 px) |
/// | softness | 2 if `soft background`, else 1 | background roughness below 0.003 (0 at 0.015) |
/// | temperature | 2 if `warm`/`cool` | mean `(R - B) / max(R, G, B)` beyond ±0.02 (full at ±0.12) |
/// | brightness | 2 if `bright`/`dark` | background luminance above 0.45 / below 0.4 (full 0.2 / 0.15 further) |
///
/// The mean is scaled by `0.25 + 0.75 * presence`, where presence is the largest object's area
/// over 60 pixels (capped at 1), so an image without a subject scores near the bottom.
/// `metric` is `17 + 9 s` (a PickScore-like raw score, 17-26); `value` is `metric / 26`.
#[derive(Clone, Copy, Debug, Default)]
pub struct PreferenceReward;

/// The image measurements the preference scorer uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StyleFeatures {
    /// Area of the largest detected object in pixels (0 if none).
    pub subject_area: usize,
    /// Distance of the largest object's box centre from the image centre (`None` if none).
    pub subject_offset: Option<f32>,
    /// Mean over all pixels of `(R - B) / max(R, G, B)`: positive is warm, negative cool.
    pub warmth: f32,
    /// Mean luminance of background pixels.
    pub background_luminance: f32,
    /// Mean absolute luminance step between neighbouring background pixels.
    pub background_roughness: f32,
}

/// Measures an image's [`StyleFeatures`]. Background pixels are those that quantise to no
/// palette colour and touch no pixel that does.
pub fn style_features(image: &Image32) -> StyleFeatures {
    let objects = detect_objects(image);
    let subject = objects.iter().max_by_key(|d| d.area);
    let centre = IMAGE_SIZE as f32 / 2.0;
    let subject_offset = subject.map(|d| {
        let (cx, cy) = ((d.bbox.x0 + d.bbox.x1) as f32 / 2.0, (d.bbox.y0 + d.bbox.y1) as f32 / 2.0);
        ((cx - centre).powi(2) + (cy - centre).powi(2)).sqrt()
    });
    let colours = colour_map(image);
    let object_pixel = |x: usize, y: usize| colours[y * IMAGE_SIZE + x].is_some();
    let background: Vec<bool> = (0..PIXELS)
        .map(|i| {
            let (x, y) = (i % IMAGE_SIZE, i / IMAGE_SIZE);
            let near = [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)].iter().any(|&(dx, dy): &(i32, i32)| {
                let (nx, ny) = (x as i32 + dx, y as i32 + dy);
                (0..IMAGE_SIZE as i32).contains(&nx)
                    && (0..IMAGE_SIZE as i32).contains(&ny)
                    && object_pixel(nx as usize, ny as usize)
            });
            !near
        })
        .collect();
    let lum = image.luminance();
    let (mut lum_sum, mut lum_n, mut step_sum, mut step_n) = (0.0f32, 0usize, 0.0f32, 0usize);
    for i in 0..PIXELS {
        if !background[i] {
            continue;
        }
        lum_sum += lum[i];
        lum_n += 1;
        let (x, y) = (i % IMAGE_SIZE, i / IMAGE_SIZE);
        for j in
            [(x + 1 < IMAGE_SIZE).then(|| i + 1), (y + 1 < IMAGE_SIZE).then(|| i + IMAGE_SIZE)].into_iter().flatten()
        {
            if background[j] {
                step_sum += (lum[i] - lum[j]).abs();
                step_n += 1;
            }
        }
    }
    let warmth =
        image.pixels().iter().map(|p| (p[0] - p[2]) / p[0].max(p[1]).max(p[2]).max(0.05)).sum::<f32>() / PIXELS as f32;
    StyleFeatures {
        subject_area: subject.map_or(0, |d| d.area),
        subject_offset,
        warmth,
        background_luminance: if lum_n > 0 { lum_sum / lum_n as f32 } else { lum.iter().sum::<f32>() / PIXELS as f32 },
        background_roughness: if step_n > 0 { step_sum / step_n as f32 } else { 1.0 },
    }
}

fn ramp(x: f32, zero: f32, full: f32) -> f32 {
    ((x - zero) / (full - zero)).clamp(0.0, 1.0)
}

/// How well the best detected object matches the prompt's subject: 0.6 for its shape plus 0.4
/// for its colour (or for any colour when the prompt names none).
fn subject_match(subject: &ObjectSpec, objects: &[DetectedObject]) -> f32 {
    objects
        .iter()
        .filter(|d| d.shape == Some(subject.shape))
        .map(|d| if subject.colour.is_none_or(|c| c == d.colour) { 1.0 } else { 0.6 })
        .fold(0.0, f32::max)
}

/// The raw preference score (17-26) of an image for a prompt's style and subject.
pub fn preference_raw(style: &Style, subject: Option<&ObjectSpec>, image: &Image32) -> f32 {
    let f = style_features(image);
    let mut terms: Vec<(f32, f32)> = Vec::new();
    if let Some(subject) = subject {
        terms.push((3.0, subject_match(subject, &detect_objects(image))));
    }
    let centring = f.subject_offset.map_or(0.0, |d| 1.0 - ramp(d, 1.0, 8.0));
    terms.push((if style.centered { 2.0 } else { 1.0 }, centring));
    let softness = 1.0 - ramp(f.background_roughness, 0.003, 0.015);
    terms.push((if style.soft_background { 2.0 } else { 1.0 }, softness));
    match style.warmth {
        Some(Warmth::Warm) => terms.push((2.0, ramp(f.warmth, 0.02, 0.12))),
        Some(Warmth::Cool) => terms.push((2.0, ramp(-f.warmth, 0.02, 0.12))),
        None => {}
    }
    match style.lighting {
        Some(Lighting::Bright) => terms.push((2.0, ramp(f.background_luminance, 0.45, 0.65))),
        Some(Lighting::Dark) => terms.push((2.0, ramp(-f.background_luminance, -0.4, -0.25))),
        None => {}
    }
    let weight: f32 = terms.iter().map(|t| t.0).sum();
    let mean = terms.iter().map(|(w, v)| w * v).sum::<f32>() / weight;
    let presence = (f.subject_area as f32 / 60.0).min(1.0);
    RAW_MIN + (RAW_MAX - RAW_MIN) * (0.25 + 0.75 * presence) * mean
}

impl Reward for PreferenceReward {
    fn name(&self) -> &str {
        "preference"
    }

    /// Scores any prompt of the grammar: preference prompts by their style words and subject,
    /// other prompts by their first named object (if any) and the general taste alone.
    fn score(&self, batch: &[RewardInput]) -> Result<Vec<RewardScore>, RewardError> {
        score_each(self.name(), batch, |index, image, prompt| {
            let spec =
                parse(prompt).map_err(|source| RewardError::Prompt { reward: self.name().into(), index, source })?;
            let style = match &spec {
                Spec::Preference(p) => p.style,
                _ => Style::default(),
            };
            let subject = spec.objects().first().copied();
            let raw = preference_raw(&style, subject.as_ref(), image);
            Ok(RewardScore { value: raw / RAW_SCALE, metric: raw })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reward::fixtures::{blank, mean_scores, mismatch_shift, noise, renders, test_prompts};
    use crate::world::pairs::{Perturbation, training_pair};
    use crate::world::render::Layout;
    use crate::world::spec::Task;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn ground_truth_scores_near_the_top_and_everything_else_low() {
        let prompts = test_prompts(Task::Preference, 400);
        let images = renders(&prompts, 61);
        let reward = PreferenceReward;
        let (gt_value, gt) = mean_scores(&reward, &prompts, &images, 0);
        let (_, mismatched) = mean_scores(&reward, &prompts, &images, mismatch_shift(&prompts));
        let (_, blank_score) = mean_scores(&reward, &prompts, &vec![blank(); prompts.len()], 0);
        let noises: Vec<Image32> = (0..prompts.len() as u64).map(noise).collect();
        let (_, noise_score) = mean_scores(&reward, &prompts, &noises, 0);
        eprintln!(
            "preference over {} test prompts (raw, 17-26): ground truth {gt:.2} (value {gt_value:.3}), \
             mismatched prompt {mismatched:.2}, blank {blank_score:.2}, noise {noise_score:.2}",
            prompts.len()
        );
        assert!(gt >= 25.5, "ground truth {gt}");
        assert!((gt_value - gt / RAW_SCALE).abs() < 1e-5);
        assert!(mismatched <= gt - 3.0, "mismatched {mismatched} vs {gt}");
        assert!(blank_score <= 18.0, "blank {blank_score}");
        assert!(noise_score <= 17.5, "noise {noise_score}");
    }

    #[test]
    fn flipped_styles_and_unaesthetic_layouts_score_lower_than_ground_truth() {
        let prompts = test_prompts(Task::Preference, 300);
        let mut rng = ChaCha8Rng::seed_from_u64(62);
        let (mut flip, mut ugly) = ((0.0, 0.0, 0), (0.0, 0.0, 0));
        for prompt in &prompts {
            let pair = training_pair(prompt, 1.0, Layout::Scattered, &mut rng);
            let truth = training_pair(prompt, 0.0, Layout::Scattered, &mut rng);
            let s = |img: &Image32| {
                PreferenceReward.score(&[RewardInput::from_image32(img, prompt.text.clone())]).unwrap()[0].metric
            };
            let slot = match pair.perturbation {
                Some(Perturbation::StyleFlip) => &mut flip,
                Some(Perturbation::Unaesthetic) => &mut ugly,
                other => panic!("unexpected perturbation {other:?}"),
            };
            slot.0 += s(&truth.image);
            slot.1 += s(&pair.image);
            slot.2 += 1;
        }
        for (name, (truth, perturbed, n), drop) in [("style flip", flip, 1.5), ("unaesthetic", ugly, 3.0)] {
            let (truth, perturbed) = (truth / n as f32, perturbed / n as f32);
            eprintln!("preference, {name} ({n} prompts): ground truth {truth:.2}, perturbed {perturbed:.2}");
            assert!(perturbed <= truth - drop, "{name}: {perturbed} vs {truth}");
        }
    }

    #[test]
    fn features_read_temperature_brightness_and_centring() {
        use crate::world::palette::Colour;
        use crate::world::render::{Background, PlacedObject, Scene};
        use crate::world::shape::Shape;
        let subject = PlacedObject { shape: Shape::Circle, colour: Colour::Red, x: 9, y: 9, size: 14 };
        let warm_bright =
            Scene { background: Background::Solid([0.9, 0.8, 0.65]), objects: vec![subject], text: None }.draw();
        let f = style_features(&warm_bright);
        assert!(f.warmth > 0.2 && f.background_luminance > 0.75, "{f:?}");
        assert_eq!(f.subject_offset, Some(0.0));
        assert_eq!(f.background_roughness, 0.0);
        let moved = PlacedObject { x: 1, y: 1, ..subject };
        let cool_dark =
            Scene { background: Background::Solid([0.1, 0.14, 0.2]), objects: vec![moved], text: None }.draw();
        let f = style_features(&cool_dark);
        assert!(f.warmth < 0.0 && f.background_luminance < 0.2, "{f:?}");
        assert!(f.subject_offset.unwrap() > 10.0);
    }
}
