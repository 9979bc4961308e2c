//! The composition reward, standing in for GenEval.

use crate::reward::{Reward, RewardError, RewardInput, RewardScore, score_each};
use crate::world::detect::{DetectedObject, MIN_SHAPE_FIT, detect_objects};
use crate::world::grammar::parse;
use crate::world::image::Image32;
use crate::world::shape::Shape;
use crate::world::spec::{ObjectSpec, Relation};

/// Centres must differ by more than this many pixels along the axis of a relation.
pub const POSITION_MARGIN: f32 = 2.0;

/// How [`CompositionReward`] turns the checks into the training `value`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompositionCredit {
    /// The fraction of checks passed.
    #[default]
    Checks,
    /// Each passed check counts 1 and each failed one up to [`NEAR_MISS_CREDIT`] for near
    /// misses ([`graded_credits`]), so a prompt the policy always fails still ranks its
    /// samples by how close they come.
    Graded,
    /// As [`Graded`](Self::Graded), with a near miss measured by how much the asked shape's
    /// fit still lacks to win the detector's shape test ([`shape_margin_closeness`]), so a
    /// blob that is nearly a square but reads as a circle ranks by how square it is.
    Margin,
}

/// The most a failed check earns under [`CompositionCredit::Graded`].
pub const NEAR_MISS_CREDIT: f32 = 0.5;

/// How close component `d` comes to being detected as `shape`: 1 when it is, else
/// `0.9 * min(1, fit / MIN_SHAPE_FIT)` with its intersection over union with the shape's mask.
pub fn shape_closeness(d: &DetectedObject, shape: Shape) -> f32 {
    if d.shape == Some(shape) { 1.0 } else { 0.9 * (d.fit(shape) / MIN_SHAPE_FIT).min(1.0) }
}

/// The fit margin over which [`shape_margin_closeness`] falls from 0.9 to 0.
pub const SHAPE_MARGIN_SCALE: f32 = 0.25;

/// How close component `d` comes to being detected as `shape`, by what its fit lacks to win the
/// shape test: 1 when it is detected as `shape`, else `0.9 * (1 - gap / SHAPE_MARGIN_SCALE)`
/// (at least 0), `gap` the most of what the fit lacks to [`MIN_SHAPE_FIT`] and to the best
/// other shape's fit. Unlike [`shape_closeness`] it keeps ranking components whose fit already
/// clears [`MIN_SHAPE_FIT`] but loses to another shape.
pub fn shape_margin_closeness(d: &DetectedObject, shape: Shape) -> f32 {
    if d.shape == Some(shape) {
        return 1.0;
    }
    let fit = d.fit(shape);
    let best_other = Shape::ALL.iter().filter(|s| **s != shape).map(|s| d.fit(*s)).fold(0.0f32, f32::max);
    let gap = (MIN_SHAPE_FIT - fit).max(best_other - fit).max(0.0);
    0.9 * (1.0 - gap / SHAPE_MARGIN_SCALE).max(0.0)
}

/// The credit of every check of [`composition_checks`] (same order) under
/// [`CompositionCredit::Graded`]: 1 for a passed check; for a failed one
/// [`NEAR_MISS_CREDIT`] times
/// - count with too few objects of the shape: the mean [`shape_closeness`] of the `n` closest
///   components of any colour (`n` the phrase's count); with too many (an exact count):
///   `n / found`;
/// - colour: the mean closeness of the `n` closest components of the phrase's colour;
/// - relation: the product of the closeness of the closest candidates of the two phrases
///   (of their colours, where named) if they stand in the relation, else 0.
pub fn graded_credits(phrases: &[ObjectSpec], relation: Option<Relation>, detected: &[DetectedObject], checks: &[Check]) -> Vec<f32> {
    graded_credits_with(phrases, relation, detected, checks, shape_closeness)
}

/// [`graded_credits`] with `shape_closeness` replaced by `closeness` (for
/// [`CompositionCredit::Margin`], [`shape_margin_closeness`]).
pub fn graded_credits_with(
    phrases: &[ObjectSpec],
    relation: Option<Relation>,
    detected: &[DetectedObject],
    checks: &[Check],
    closeness: impl Fn(&DetectedObject, Shape) -> f32,
) -> Vec<f32> {
    let closest = |shape: Shape, colour: Option<crate::world::palette::Colour>, n: usize| -> f32 {
        let mut near: Vec<f32> = detected.iter().filter(|d| colour.is_none_or(|c| d.colour == c)).map(|d| closeness(d, shape)).collect();
        near.sort_by(|a, b| b.total_cmp(a));
        near.iter().take(n).sum::<f32>() / n.max(1) as f32
    };
    let best = |phrase: &ObjectSpec| -> Option<(&DetectedObject, f32)> {
        detected
            .iter()
            .filter(|d| phrase.colour.is_none_or(|c| d.colour == c))
            .map(|d| (d, closeness(d, phrase.shape)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
    };
    checks
        .iter()
        .map(|check| {
            if check.passed {
                return 1.0;
            }
            let near = match check.kind {
                CheckKind::Count { phrase } => {
                    let p = &phrases[phrase];
                    let found = detected.iter().filter(|d| d.shape == Some(p.shape)).count();
                    if found > p.count() { p.count() as f32 / found as f32 } else { closest(p.shape, None, p.count()) }
                }
                CheckKind::Colour { phrase } => closest(phrases[phrase].shape, phrases[phrase].colour, phrases[phrase].count()),
                CheckKind::Position => match (relation, phrases) {
                    (Some(relation), [first, second, ..]) => match (best(first), best(second)) {
                        (Some((a, ca)), Some((b, cb))) if stands_in(relation, a, b) => ca * cb,
                        _ => 0.0,
                    },
                    _ => 0.0,
                },
            };
            NEAR_MISS_CREDIT * near
        })
        .collect()
}

/// GenEval stand-in: detects objects with the world's connected-component detector
/// ([`detect_objects`]) and checks the prompt's requirements, as GenEval does with its
/// detector: for every object phrase, the number of detected objects of its shape (at least
/// the count after `a`, exactly the count after a number word) and, if it names a colour, that
/// as many of them have that colour; for a relation, that some object matching the first
/// phrase stands in it to some object matching the second.
///
/// `value` is the partial credit used in training (by default the fraction of checks passed,
/// see [`CompositionCredit`]); `metric` is 1 when all pass, else 0 (GenEval's accuracy).
#[derive(Clone, Copy, Debug, Default)]
pub struct CompositionReward {
    /// How failed checks count in `value`.
    pub credit: CompositionCredit,
}

/// What a check verifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckKind {
    /// Object phrase `phrase` (0 or 1) has enough (or exactly enough) objects of its shape.
    Count {
        /// Index of the object phrase.
        phrase: usize,
    },
    /// Enough objects of phrase `phrase`'s shape have its colour.
    Colour {
        /// Index of the object phrase.
        phrase: usize,
    },
    /// The relation between the two phrases holds.
    Position,
}

/// One requirement of a composition prompt and whether the image meets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Check {
    /// What is checked.
    pub kind: CheckKind,
    /// Whether the image passes.
    pub passed: bool,
}

/// The checks of object phrases (and an optional relation from the first to the second)
/// against detected objects.
pub fn composition_checks(
    phrases: &[ObjectSpec],
    relation: Option<Relation>,
    detected: &[DetectedObject],
) -> Vec<Check> {
    let mut checks = Vec::new();
    let matching = |phrase: &ObjectSpec| -> Vec<&DetectedObject> {
        detected
            .iter()
            .filter(|d| d.shape == Some(phrase.shape) && phrase.colour.is_none_or(|c| d.colour == c))
            .collect()
    };
    for (index, phrase) in phrases.iter().enumerate() {
        let of_shape = detected.iter().filter(|d| d.shape == Some(phrase.shape)).count();
        let count_ok = if phrase.exact_count() { of_shape == phrase.count() } else { of_shape >= phrase.count() };
        checks.push(Check { kind: CheckKind::Count { phrase: index }, passed: count_ok });
        if phrase.colour.is_some() {
            let coloured = matching(phrase).len();
            checks.push(Check { kind: CheckKind::Colour { phrase: index }, passed: coloured >= phrase.count() });
        }
    }
    if let (Some(relation), [first, second, ..]) = (relation, phrases) {
        let (a, b) = (matching(first), matching(second));
        let holds = a.iter().any(|x| b.iter().any(|y| stands_in(relation, x, y)));
        checks.push(Check { kind: CheckKind::Position, passed: holds });
    }
    checks
}

/// Whether `a` stands in `relation` to `b`, judged by their centroids.
pub fn stands_in(relation: Relation, a: &DetectedObject, b: &DetectedObject) -> bool {
    let (ax, ay) = a.centroid;
    let (bx, by) = b.centroid;
    match relation {
        Relation::LeftOf => ax + POSITION_MARGIN < bx,
        Relation::RightOf => ax > bx + POSITION_MARGIN,
        Relation::Above => ay + POSITION_MARGIN < by,
        Relation::Below => ay > by + POSITION_MARGIN,
    }
}

impl CompositionReward {
    /// The checks of `prompt` on `image`; fails for prompts outside the grammar and prompts
    /// that name no object.
    pub fn checks(&self, index: usize, image: &Image32, prompt: &str) -> Result<Vec<Check>, RewardError> {
        let (phrases, relation, detected) = self.inspect(index, image, prompt)?;
        Ok(composition_checks(&phrases, relation, &detected))
    }

    /// The prompt's object phrases and relation, and the objects detected in the image.
    fn inspect(&self, index: usize, image: &Image32, prompt: &str) -> Result<(Vec<ObjectSpec>, Option<Relation>, Vec<DetectedObject>), RewardError> {
        let spec = parse(prompt).map_err(|source| RewardError::Prompt { reward: self.name().into(), index, source })?;
        let phrases = spec.objects();
        if phrases.is_empty() {
            return Err(RewardError::NothingToScore {
                reward: self.name().into(),
                index,
                prompt: prompt.into(),
                reason: "names no object to check",
            });
        }
        let relation = match &spec {
            crate::world::Spec::Composition(c) => c.relation(),
            _ => None,
        };
        Ok((phrases, relation, detect_objects(image)))
    }

    /// The training value of `prompt` on `image` and whether every check passed.
    fn value(&self, index: usize, image: &Image32, prompt: &str) -> Result<(f32, bool), RewardError> {
        let (phrases, relation, detected) = self.inspect(index, image, prompt)?;
        let checks = composition_checks(&phrases, relation, &detected);
        let mean = |credits: Vec<f32>| credits.iter().sum::<f32>() / credits.len() as f32;
        let value = match self.credit {
            CompositionCredit::Checks => checks.iter().filter(|c| c.passed).count() as f32 / checks.len() as f32,
            CompositionCredit::Graded => mean(graded_credits(&phrases, relation, &detected, &checks)),
            CompositionCredit::Margin => mean(graded_credits_with(&phrases, relation, &detected, &checks, shape_margin_closeness)),
        };
        Ok((value, checks.iter().all(|c| c.passed)))
    }
}

impl Reward for CompositionReward {
    fn name(&self) -> &str {
        "composition"
    }

    fn score(&self, batch: &[RewardInput]) -> Result<Vec<RewardScore>, RewardError> {
        score_each(self.name(), batch, |index, image, prompt| {
            let (value, all) = self.value(index, image, prompt)?;
            Ok(RewardScore { value, metric: if all { 1.0 } else { 0.0 } })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reward::fixtures::{blank, mean_scores, mismatch_shift, noise, renders, test_prompts};
    use crate::world::palette::Colour;
    use crate::world::render::{Background, PlacedObject, Scene};
    use crate::world::shape::Shape;
    use crate::world::spec::{Family, Task};

    fn scene(objects: Vec<PlacedObject>) -> Image32 {
        Scene { background: Background::Solid([0.85, 0.85, 0.8]), objects, text: None }.draw()
    }

    fn object(shape: Shape, colour: Colour, x: usize, y: usize) -> PlacedObject {
        PlacedObject { shape, colour, x, y, size: 9 }
    }

    fn score_with(credit: CompositionCredit, image: &Image32, prompt: &str) -> RewardScore {
        CompositionReward { credit }.score(&[RewardInput::from_image32(image, prompt)]).unwrap()[0]
    }

    fn score(image: &Image32, prompt: &str) -> RewardScore {
        score_with(CompositionCredit::Checks, image, prompt)
    }

    #[test]
    fn checks_follow_geneval_semantics() {
        let img = scene(vec![
            object(Shape::Circle, Colour::Red, 2, 2),
            object(Shape::Square, Colour::Blue, 20, 3),
            object(Shape::Circle, Colour::Green, 3, 20),
        ]);
        assert_eq!(score(&img, "a photo of a circle"), RewardScore { value: 1.0, metric: 1.0 });
        // `a` means at least one, a number word means exactly
        assert_eq!(score(&img, "a photo of two circles").metric, 1.0);
        assert_eq!(score(&img, "a photo of three circles"), RewardScore { value: 0.0, metric: 0.0 });
        assert_eq!(score(&img, "a photo of one circle").metric, 0.0);
        // colour: presence passes, colour fails
        assert_eq!(score(&img, "a photo of a blue circle"), RewardScore { value: 0.5, metric: 0.0 });
        assert_eq!(score(&img, "a photo of a red circle and a blue square").metric, 1.0);
        assert_eq!(score(&img, "a photo of a red circle and a blue triangle").value, 0.5);
        // position by centroids: red circle (6.5, 6.5), blue square (24.5, 7.5), green circle (7.5, 24.5)
        assert_eq!(score(&img, "a photo of a circle left of a square").metric, 1.0);
        assert_eq!(score(&img, "a photo of a red circle right of a square"), RewardScore { value: 0.75, metric: 0.0 });
        assert_eq!(score(&img, "a photo of a green circle below a red circle").metric, 1.0);
        assert_eq!(score(&img, "a photo of a green circle above a blue square").metric, 0.0);
        // preference and quality prompts are checked on their subject
        assert_eq!(score(&img, "a warm painting of a red circle, centered").metric, 1.0);
        assert_eq!(score(&img, "a sharp photo of a triangle").metric, 0.0);
    }

    fn graded(image: &Image32, prompt: &str) -> RewardScore {
        score_with(CompositionCredit::Graded, image, prompt)
    }

    /// Intersection over union of a full `size` x `size` square with `shape`'s mask in it.
    fn square_fit(shape: Shape, size: usize) -> f32 {
        shape.mask(size, size).iter().filter(|m| **m).count() as f32 / (size * size) as f32
    }

    #[test]
    fn graded_credit_ranks_near_misses_between_failures_and_passes() {
        let img = scene(vec![
            object(Shape::Circle, Colour::Red, 2, 2),
            object(Shape::Square, Colour::Blue, 20, 3),
            object(Shape::Circle, Colour::Green, 3, 20),
        ]);
        // all checks passed: 1, as with the fraction of checks
        assert_eq!(graded(&img, "a photo of a red circle and a blue square"), RewardScore { value: 1.0, metric: 1.0 });
        // exact count with too many: half of n / found (two circles for `one`)
        assert_eq!(graded(&img, "a photo of one circle"), RewardScore { value: 0.25, metric: 0.0 });
        // nothing of the colour: the colour check earns nothing, the count check passes
        assert_eq!(graded(&img, "a photo of a purple circle").value, 0.5);
        // a blue square for a blue circle: count passes (two circles), colour earns
        // 0.5 * 0.9 * min(1, IoU(square, circle) / 0.6)
        let near = 0.5 * 0.9 * (square_fit(Shape::Circle, 9) / MIN_SHAPE_FIT).min(1.0);
        let blue_circle = graded(&img, "a photo of a blue circle");
        assert!((blue_circle.value - (1.0 + near) / 2.0).abs() < 1e-6, "{blue_circle:?} vs near-miss credit {near}");
        assert_eq!(blue_circle.metric, 0.0);
        // three crosses: no cross anywhere; the three components closest to a cross
        let cross = |shape: Shape| 0.9 * (detect_objects(&img).iter().find(|d| d.shape == Some(shape)).unwrap().fit(Shape::Cross) / MIN_SHAPE_FIT).min(1.0);
        let expected = 0.5 * (2.0 * cross(Shape::Circle) + cross(Shape::Square)) / 3.0;
        assert!((graded(&img, "a photo of three crosses").value - expected).abs() < 1e-6);
        // a relation that does not hold earns nothing, whatever the shapes
        assert_eq!(graded(&img, "a photo of a red circle right of a square").value, 0.75);
        // a relation between near misses earns the product of their closeness
        let red_square_left_of_blue_circle = graded(&img, "a photo of a red square left of a blue circle");
        let (circle_as_square, square_as_circle) = (0.9 * (detect_objects(&img)[0].fit(Shape::Square) / MIN_SHAPE_FIT).min(1.0), 0.9 * (square_fit(Shape::Circle, 9) / MIN_SHAPE_FIT).min(1.0));
        let checks = [1.0, 0.5 * circle_as_square, 1.0, 0.5 * square_as_circle, 0.5 * circle_as_square * square_as_circle];
        assert!((red_square_left_of_blue_circle.value - checks.iter().sum::<f32>() / 5.0).abs() < 1e-6, "{red_square_left_of_blue_circle:?}");
        // a blank image earns nothing
        assert_eq!(graded(&blank(), "a photo of a circle").value, 0.0);
    }

    /// A component detected as `shape` (or as nothing) with the given fits, in the order of
    /// [`Shape::ALL`].
    fn component(fits: [f32; 4]) -> DetectedObject {
        let (best, fit) = fits.iter().enumerate().fold((0, 0.0f32), |b, (i, f)| if *f > b.1 { (i, *f) } else { b });
        DetectedObject {
            colour: Colour::Blue,
            shape: (fit >= MIN_SHAPE_FIT).then_some(Shape::ALL[best]),
            shape_fit: fit,
            fits,
            area: 150,
            bbox: crate::world::detect::BoundingBox { x0: 0, y0: 0, x1: 14, y1: 14 },
            centroid: (7.0, 7.0),
        }
    }

    fn fits_with(circle: f32, square: f32) -> [f32; 4] {
        let mut fits = [0.3; 4];
        fits[Shape::ALL.iter().position(|s| *s == Shape::Circle).unwrap()] = circle;
        fits[Shape::ALL.iter().position(|s| *s == Shape::Square).unwrap()] = square;
        fits
    }

    #[test]
    fn margin_closeness_ranks_what_the_asked_shape_lacks_to_win() {
        // detected as the asked shape: 1
        assert_eq!(shape_margin_closeness(&component(fits_with(0.6, 0.9)), Shape::Square), 1.0);
        // a square-ish blob read as a circle (fits 0.77 vs 0.71, as the base draws squares):
        // 0.9 * (1 - 0.06 / 0.25); the old closeness gives it the full 0.9
        let blob = component(fits_with(0.77, 0.71));
        assert_eq!(blob.shape, Some(Shape::Circle));
        assert!((shape_margin_closeness(&blob, Shape::Square) - 0.9 * (1.0 - 0.06 / SHAPE_MARGIN_SCALE)).abs() < 1e-5);
        assert_eq!(shape_closeness(&blob, Shape::Square), 0.9);
        // rises monotonically as the square's fit closes on the circle's, 0.9 at the tie
        let mut last = -1.0;
        for square in [0.45, 0.52, 0.6, 0.65, 0.7, 0.75, 0.77] {
            let c = shape_margin_closeness(&component(fits_with(0.77, square)), Shape::Square);
            assert!(c > last || (c == 0.0 && last == 0.0), "square fit {square}: {c} after {last}");
            last = c;
        }
        assert!((last - 0.9).abs() < 1e-6);
        // a gap of the margin scale or more earns nothing
        assert_eq!(shape_margin_closeness(&component(fits_with(0.9, 0.65)), Shape::Square), 0.0);
        // nothing wins (all fits below MIN_SHAPE_FIT): the gap is to the threshold
        let faint = component(fits_with(0.5, 0.55));
        assert_eq!(faint.shape, None);
        assert!((shape_margin_closeness(&faint, Shape::Square) - 0.9 * (1.0 - 0.05 / SHAPE_MARGIN_SCALE)).abs() < 1e-5);
    }

    #[test]
    fn margin_credit_keeps_the_metric_and_the_bounds_of_graded_credit() {
        let prompts = test_prompts(Task::Composition, 300);
        let images = renders(&prompts, 44);
        let shift = mismatch_shift(&prompts);
        for (i, image) in images.iter().enumerate() {
            let prompt = &prompts[(i + shift) % prompts.len()].text;
            let checks = CompositionReward::default().checks(i, image, prompt).unwrap();
            let (plain, margin) = (score(image, prompt), score_with(CompositionCredit::Margin, image, prompt));
            assert_eq!(plain.metric, margin.metric, "{prompt}");
            let passed = checks.iter().filter(|c| c.passed).count() as f32;
            let n = checks.len() as f32;
            assert!(margin.value >= plain.value - 1e-6, "{prompt}: margin {} below checks {}", margin.value, plain.value);
            assert!(margin.value <= (passed + NEAR_MISS_CREDIT * (n - passed)) / n + 1e-6, "{prompt}: {}", margin.value);
            // a margin near miss never earns more than the threshold-only near miss
            assert!(margin.value <= graded(image, prompt).value + 1e-6, "{prompt}");
        }
    }

    #[test]
    fn graded_credit_never_falls_below_the_checks_or_lifts_a_failed_check_above_half() {
        let prompts = test_prompts(Task::Composition, 300);
        let images = renders(&prompts, 43);
        let shift = mismatch_shift(&prompts);
        let (mut lifted, mut failed) = (0, 0);
        for (i, image) in images.iter().enumerate() {
            let prompt = &prompts[(i + shift) % prompts.len()].text;
            let checks = CompositionReward::default().checks(i, image, prompt).unwrap();
            let (plain, graded) = (score(image, prompt), graded(image, prompt));
            assert_eq!(plain.metric, graded.metric, "{prompt}");
            let passed = checks.iter().filter(|c| c.passed).count() as f32;
            let n = checks.len() as f32;
            assert!(graded.value >= plain.value - 1e-6, "{prompt}: graded {} below checks {}", graded.value, plain.value);
            assert!(graded.value <= (passed + NEAR_MISS_CREDIT * (n - passed)) / n + 1e-6, "{prompt}: {}", graded.value);
            failed += (passed < n) as usize;
            lifted += (graded.value > plain.value) as usize;
        }
        // most mismatched renders hold some near miss (another shape or colour of an object)
        assert!(failed > 200 && lifted * 2 > failed, "{lifted} of {failed} failed pairs lifted");
    }

    #[test]
    fn prompts_without_objects_are_refused_by_name() {
        let input = RewardInput::from_image32(&blank(), "a sign that says \"AB\"");
        let err = CompositionReward::default().score(&[input]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "reward `composition`, input 0: prompt \"a sign that says \\\"AB\\\"\" names no object to check"
        );
        let input = RewardInput::from_image32(&blank(), "a photo of a dog");
        let err = CompositionReward::default().score(&[input]).unwrap_err().to_string();
        assert!(err.starts_with("reward `composition`, input 0: prompt \"a photo of a dog\": expected"), "{err}");
    }

    #[test]
    fn ground_truth_scores_near_the_top_and_everything_else_low() {
        let prompts = test_prompts(Task::Composition, 600);
        let images = renders(&prompts, 41);
        let reward = CompositionReward::default();
        let (gt_value, gt_strict) = mean_scores(&reward, &prompts, &images, 0);
        let (mm_value, mm_strict) = mean_scores(&reward, &prompts, &images, mismatch_shift(&prompts));
        let blanks = vec![blank(); prompts.len()];
        let (blank_value, blank_strict) = mean_scores(&reward, &prompts, &blanks, 0);
        let noises: Vec<Image32> = (0..prompts.len() as u64).map(noise).collect();
        let (noise_value, noise_strict) = mean_scores(&reward, &prompts, &noises, 0);
        eprintln!(
            "composition over {} test prompts (value = partial credit, metric = strict):\n  \
             ground truth {gt_value:.3} / {gt_strict:.3}\n  mismatched prompt {mm_value:.3} / {mm_strict:.3}\n  \
             blank {blank_value:.3} / {blank_strict:.3}\n  noise {noise_value:.3} / {noise_strict:.3}",
            prompts.len()
        );
        assert!(gt_strict >= 0.99 && gt_value >= 0.995, "ground truth {gt_value} / {gt_strict}");
        assert!(mm_strict <= 0.2, "mismatched strict {mm_strict}");
        assert!(mm_value <= 0.5, "mismatched partial {mm_value}");
        assert_eq!((blank_value, blank_strict), (0.0, 0.0));
        assert!(noise_strict <= 0.02 && noise_value <= 0.05, "noise {noise_value} / {noise_strict}");
        for family in Family::COMPOSITION {
            let fam: Vec<_> = prompts.iter().filter(|p| p.family() == family).cloned().collect();
            let (_, strict) = mean_scores(&reward, &fam, &renders(&fam, 42), 0);
            assert!(strict >= 0.98, "{family}: ground-truth strict accuracy {strict}");
        }
    }
}
