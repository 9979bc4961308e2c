//! The text-rendering reward, standing in for the paper's OCR reward.

use crate::reward::{Reward, RewardError, RewardInput, RewardScore, score_each};
use crate::world::grammar::quoted_text;
use crate::world::read::{read_text, text_likeness};

/// OCR stand-in: reads the image with the world's template-matching reader ([`read_text`])
/// and applies the public OCR reward's rule (docs/reference.md section 6): the target is the text
/// between the first pair of double quotes, lower-cased with spaces removed; the distance `d`
/// is 0 if the target occurs in the (equally normalised) recognised text, else their
/// Levenshtein distance capped at the target's length; the reward is `1 - d / len`.
///
/// `metric` is that reward. `value`, the training reward, adds dense partial credit as
/// GenEval's training reward does: `(R + text_likeness) / 2`, where
/// [`text_likeness`](crate::world::read::text_likeness) scores how closely the image's ink
/// matches the target's glyphs at their best placement. With the strict rule alone a base
/// that draws no legible glyph gets 0 for every sample, so GRPO's group advantages vanish.
#[derive(Clone, Copy, Debug, Default)]
pub struct OcrReward;

/// Lower-cases and removes whitespace, as the OCR reward normalises both strings.
pub fn normalise(text: &str) -> String {
    text.chars().filter(|c| !c.is_whitespace()).flat_map(char::to_lowercase).collect()
}

/// Levenshtein distance in characters (insertions, deletions, substitutions of cost 1).
pub fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

/// The OCR reward of recognised text against a normalised, non-empty target.
pub fn ocr_score(target: &str, recognised: &str) -> f32 {
    let len = target.chars().count();
    let d = if recognised.contains(target) { 0 } else { levenshtein(target, recognised).min(len) };
    1.0 - d as f32 / len as f32
}

impl Reward for OcrReward {
    fn name(&self) -> &str {
        "ocr"
    }

    fn score(&self, batch: &[RewardInput]) -> Result<Vec<RewardScore>, RewardError> {
        score_each(self.name(), batch, |index, image, prompt| {
            let refuse = |reason| RewardError::NothingToScore {
                reward: self.name().into(),
                index,
                prompt: prompt.into(),
                reason,
            };
            let target = normalise(quoted_text(prompt).ok_or_else(|| refuse("has no text between double quotes"))?);
            if target.is_empty() {
                return Err(refuse("quotes empty text"));
            }
            let r = ocr_score(&target, &normalise(&read_text(image)));
            Ok(RewardScore { value: 0.5 * (r + text_likeness(image, &target)), metric: r })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reward::fixtures::{blank, mean_scores, mismatch_shift, noise, renders, test_prompts};
    use crate::world::Image32;
    use crate::world::spec::Task;

    #[test]
    fn levenshtein_matches_known_distances() {
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(levenshtein("", "abc"), 3);
        assert_eq!(levenshtein("abc", ""), 3);
        assert_eq!(levenshtein("flaw", "lawn"), 2);
        assert_eq!(levenshtein("ab7", "ab7"), 0);
    }

    #[test]
    fn score_follows_the_reference_rule() {
        assert_eq!(ocr_score("ab7", "xxab7yy"), 1.0); // substring
        assert_eq!(ocr_score("ab7", "ab"), 1.0 - 1.0 / 3.0);
        assert_eq!(ocr_score("ab", "zzzzzzz"), 0.0); // capped at len
        assert_eq!(ocr_score("abcd", "abxd"), 0.75);
        assert_eq!(normalise(" A b\t7 "), "ab7");
    }

    #[test]
    fn prompts_without_quoted_text_are_refused() {
        let err = OcrReward.score(&[RewardInput::from_image32(&blank(), "a photo of a circle")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "reward `ocr`, input 0: prompt \"a photo of a circle\" has no text between double quotes"
        );
        let err = OcrReward.score(&[RewardInput::from_image32(&blank(), "say \" \"")]).unwrap_err();
        assert!(err.to_string().ends_with("quotes empty text"), "{err}");
    }

    #[test]
    fn ground_truth_reads_perfectly_and_everything_else_scores_low() {
        let prompts = test_prompts(Task::Text, 640);
        let images = renders(&prompts, 51);
        let (gt_value, gt) = mean_scores(&OcrReward, &prompts, &images, 0);
        let (mismatched_value, mismatched) = mean_scores(&OcrReward, &prompts, &images, mismatch_shift(&prompts));
        let (blank_value, blank_score) = mean_scores(&OcrReward, &prompts, &vec![blank(); prompts.len()], 0);
        let noises: Vec<Image32> = (0..prompts.len() as u64).map(noise).collect();
        let (noise_value, noise_score) = mean_scores(&OcrReward, &prompts, &noises, 0);
        eprintln!(
            "ocr over {} test prompts (metric / training value): ground truth {gt:.3} / {gt_value:.3}, \
             mismatched prompt {mismatched:.3} / {mismatched_value:.3}, blank {blank_score:.3} / {blank_value:.3}, \
             noise {noise_score:.3} / {noise_value:.3}",
            prompts.len()
        );
        assert_eq!(gt, 1.0);
        assert!(mismatched <= 0.15, "mismatched {mismatched}");
        assert_eq!(blank_score, 0.0);
        assert!(noise_score <= 0.02, "noise {noise_score}");
        // the dense training value keeps the order, with partial credit in between
        assert!(gt_value >= 0.95, "ground truth value {gt_value}");
        assert!(mismatched_value < gt_value - 0.2, "mismatched value {mismatched_value}");
        assert!(mismatched_value > mismatched, "partial credit for drawing glyphs at all");
        assert_eq!(blank_value, 0.0);
        assert!(noise_value < mismatched_value, "noise value {noise_value}");
    }
}
