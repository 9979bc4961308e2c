//! Rewards: the [`Reward`] trait and the synthetic world's four built-in rewards.
//!
//! A reward scores a batch of (image, prompt) pairs. It sees 8-bit RGB images of any size
//! and prompt text only, as the paper's rewards do (GenEval's detector, the OCR model,
//! PickScore, DeQA), so a remote scorer for real 512-pixel images implements the same trait.
//! Each [`RewardScore`] carries the value the trainer optimises (`value`, roughly 0-1) and
//! the number the paper's tables report (`metric`).
//!
//! | reward | stands in for | `value` (training) | `metric` (tables) |
//! | --- | --- | --- | --- |
//! | [`CompositionReward`] | GenEval | fraction of checks passed (or graded near misses, [`CompositionCredit`]) | strict 0/1 accuracy |
//! | [`OcrReward`] | OCR | `(1 - d / len + text likeness) / 2` | `1 - d / len` |
//! | [`PreferenceReward`] | PickScore | raw / 26 | raw, 17-26 |
//! | [`QualityReward`] | DeQA | raw / 5 | raw, 1-5 |
//!
//! Table 2's average is `mean(GenEval, OCR, DeQA / 5, PickScore / 26)`: the mean of the
//! `value`s where composition contributes its strict accuracy.

use image::RgbImage;
use thiserror::Error;

use crate::world::grammar::ParseError;
use crate::world::image::{Image32, ImageError};
use crate::world::spec::Task;

pub mod composition;
pub mod ocr;
pub mod preference;
pub mod quality;
pub mod remote;

pub use composition::{CompositionCredit, CompositionReward};
pub use ocr::OcrReward;
pub use preference::PreferenceReward;
pub use quality::QualityReward;
pub use remote::{RemoteReward, RemoteRewardConfig};

/// One image to score with the prompt it was generated from.
#[derive(Clone, Debug, PartialEq)]
pub struct RewardInput {
    /// The image, 8-bit RGB (the world's rewards need 32 x 32).
    pub image: RgbImage,
    /// The prompt text.
    pub prompt: String,
    /// The prompt's task, when the caller knows it (for routing and remote scorers; the
    /// world's rewards read everything they need from the prompt text).
    pub task: Option<Task>,
}

impl RewardInput {
    /// An input without a task tag.
    pub fn new(image: RgbImage, prompt: impl Into<String>) -> Self {
        Self { image, prompt: prompt.into(), task: None }
    }

    /// An input from a world image (quantised to 8 bits, as a saved PNG would be).
    pub fn from_image32(image: &Image32, prompt: impl Into<String>) -> Self {
        Self::new(image.to_rgb_image(), prompt)
    }

    /// The same input tagged with its task.
    pub fn with_task(mut self, task: Task) -> Self {
        self.task = Some(task);
        self
    }
}

/// A reward's verdict on one input.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RewardScore {
    /// The training reward, roughly in `[0, 1]` (partial credit, raw / scale).
    pub value: f32,
    /// The evaluation metric on the paper's scale (strict accuracy, raw PickScore, DeQA 1-5).
    pub metric: f32,
}

/// Errors of a reward.
#[derive(Debug, Error)]
pub enum RewardError {
    /// An image the reward cannot take.
    #[error("reward `{reward}`, input {index}: {source}")]
    Image {
        /// Reward name.
        reward: String,
        /// Index of the input in the batch.
        index: usize,
        /// What is wrong with the image.
        source: ImageError,
    },
    /// A prompt outside the world's grammar.
    #[error("reward `{reward}`, input {index}: {source}")]
    Prompt {
        /// Reward name.
        reward: String,
        /// Index of the input in the batch.
        index: usize,
        /// The parse error (it names the prompt and the word at fault).
        source: ParseError,
    },
    /// A prompt that gives the reward nothing to check.
    #[error("reward `{reward}`, input {index}: prompt {prompt:?} {reason}")]
    NothingToScore {
        /// Reward name.
        reward: String,
        /// Index of the input in the batch.
        index: usize,
        /// The prompt.
        prompt: String,
        /// Why it cannot be scored.
        reason: &'static str,
    },
    /// A remote reward's configuration is unusable.
    #[error("reward `{reward}`: invalid remote reward config: {message}")]
    RemoteConfig {
        /// Reward name.
        reward: String,
        /// What is wrong.
        message: String,
    },
    /// An image could not be encoded for a remote reward.
    #[error("reward `{reward}`, input {index}: cannot encode the image as PNG: {message}")]
    Encode {
        /// Reward name.
        reward: String,
        /// Index of the input in the batch.
        index: usize,
        /// The encoder's message.
        message: String,
    },
    /// The reward server could not be reached (connection refused, DNS, reset).
    #[error(
        "reward `{reward}`: the reward server at {url} is not reachable after {attempts} attempt(s): {message}; is the server running and is the URL right?"
    )]
    RemoteUnreachable {
        /// Reward name.
        reward: String,
        /// The URL requested.
        url: String,
        /// The transport error.
        message: String,
        /// Attempts made.
        attempts: u32,
    },
    /// The reward server did not answer within the timeout.
    #[error("reward `{reward}`: the reward server at {url} did not answer within {timeout_secs} s (timeout)")]
    RemoteTimeout {
        /// Reward name.
        reward: String,
        /// The URL requested.
        url: String,
        /// The configured per-request timeout.
        timeout_secs: f64,
    },
    /// The reward server answered with an error status.
    #[error("reward `{reward}`: the reward server at {url} answered HTTP {status}: {message}")]
    RemoteStatus {
        /// Reward name.
        reward: String,
        /// The URL requested.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The server's error message (the `error` field of its JSON body, or the body).
        message: String,
    },
    /// The reward server's reply is not the protocol's JSON.
    #[error("reward `{reward}`: malformed reply from the reward server at {url}: {problem}; body: {body}")]
    RemoteMalformed {
        /// Reward name.
        reward: String,
        /// The URL requested.
        url: String,
        /// What is wrong with it.
        problem: String,
        /// The body received (truncated).
        body: String,
    },
    /// The reward server returned a different number of scores than images sent.
    #[error("reward `{reward}`: the reward server at {url} returned {found} scores for {expected} images")]
    RemoteCount {
        /// Reward name.
        reward: String,
        /// The URL requested.
        url: String,
        /// Images sent.
        expected: usize,
        /// Scores received.
        found: usize,
    },
}

/// Scores a batch: the reward of a remote or local scorer for generated images.
pub trait Reward: Send + Sync {
    /// A short stable name (`composition`, `ocr`, …) for logs and metrics.
    fn name(&self) -> &str;

    /// Scores every input, in order. Fails on the first input it cannot score, naming it.
    fn score(&self, batch: &[RewardInput]) -> Result<Vec<RewardScore>, RewardError>;
}

/// The world's built-in reward for a task.
pub fn world_reward(task: Task) -> Box<dyn Reward> {
    match task {
        Task::Composition => Box::new(CompositionReward::default()),
        Task::Text => Box::new(OcrReward),
        Task::Preference => Box::new(PreferenceReward),
        Task::Quality => Box::new(QualityReward),
    }
}

/// The reward of every task: a remote server where one is configured, the world's built-in
/// reward otherwise.
pub struct RewardSet {
    rewards: std::collections::BTreeMap<Task, Box<dyn Reward>>,
}

impl RewardSet {
    /// `remote`: task -> server (docs/reward_protocol.md).
    pub fn new(remote: &std::collections::BTreeMap<Task, RemoteRewardConfig>) -> Result<Self, RewardError> {
        let mut rewards = std::collections::BTreeMap::new();
        for task in [Task::Composition, Task::Text, Task::Preference, Task::Quality] {
            let reward: Box<dyn Reward> = match remote.get(&task) {
                Some(config) => Box::new(RemoteReward::new(config.clone())?),
                None => world_reward(task),
            };
            rewards.insert(task, reward);
        }
        Ok(Self { rewards })
    }

    /// Uses `reward` for `task` instead.
    pub fn set(&mut self, task: Task, reward: Box<dyn Reward>) {
        self.rewards.insert(task, reward);
    }

    pub fn get(&self, task: Task) -> &dyn Reward {
        self.rewards[&task].as_ref()
    }
}

/// Scores each input of a batch with `score_one(index, image, prompt)`, converting images to
/// the world's [`Image32`] (which must be 32 x 32).
pub(crate) fn score_each(
    reward: &str,
    batch: &[RewardInput],
    score_one: impl Fn(usize, &Image32, &str) -> Result<RewardScore, RewardError>,
) -> Result<Vec<RewardScore>, RewardError> {
    batch
        .iter()
        .enumerate()
        .map(|(index, input)| {
            let image = Image32::from_rgb_image(&input.image).map_err(|source| RewardError::Image {
                reward: reward.to_string(),
                index,
                source,
            })?;
            score_one(index, &image, &input.prompt)
        })
        .collect()
}

/// Helpers shared by the rewards' tests: test prompts, ground-truth and mismatched renders,
/// blank and noise images, and mean scores.
#[cfg(test)]
pub(crate) mod fixtures {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::{Reward, RewardInput, RewardScore};
    use crate::world::image::Image32;
    use crate::world::prompts::{Prompt, Split, shipped_prompts};
    use crate::world::random::unit;
    use crate::world::render::{Layout, render_with};
    use crate::world::spec::Task;

    /// The first `n` shipped test prompts of a task.
    pub fn test_prompts(task: Task, n: usize) -> Vec<Prompt> {
        shipped_prompts(Split::Test).into_iter().filter(|p| p.task() == task).take(n).collect()
    }

    /// One ground-truth render per prompt (seeded by position).
    pub fn renders(prompts: &[Prompt], seed: u64) -> Vec<Image32> {
        renders_with(prompts, Layout::Scattered, seed)
    }

    /// One ground-truth render per prompt in the given layout.
    pub fn renders_with(prompts: &[Prompt], style: Layout, seed: u64) -> Vec<Image32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        prompts.iter().map(|p| render_with(&p.spec, style, &mut rng)).collect()
    }

    /// A mid-grey image.
    pub fn blank() -> Image32 {
        Image32::filled([0.5; 3])
    }

    /// Uniform noise in every channel.
    pub fn noise(seed: u64) -> Image32 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Image32::from_fn(|_, _| [unit(&mut rng), unit(&mut rng), unit(&mut rng)])
    }

    /// Scores `images[i]` against `prompts[(i + shift) % n]`; returns the mean value and the
    /// mean metric.
    pub fn mean_scores(reward: &dyn Reward, prompts: &[Prompt], images: &[Image32], shift: usize) -> (f32, f32) {
        let batch: Vec<RewardInput> = images
            .iter()
            .enumerate()
            .map(|(i, img)| RewardInput::from_image32(img, prompts[(i + shift) % prompts.len()].text.clone()))
            .collect();
        let scores: Vec<RewardScore> = reward.score(&batch).unwrap();
        let n = scores.len() as f32;
        (scores.iter().map(|s| s.value).sum::<f32>() / n, scores.iter().map(|s| s.metric).sum::<f32>() / n)
    }

    /// A prompt shift that pairs every image with a different prompt of the same task.
    pub fn mismatch_shift(prompts: &[Prompt]) -> usize {
        prompts.len() / 2 + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A canonical scene is a valid scene: its renders of every test prompt pass the strict
    /// composition check and read back exactly, and score as clean images.
    #[test]
    fn canonical_renders_are_ground_truth() {
        use fixtures::{mean_scores, renders_with, test_prompts};
        use crate::world::render::Layout;
        for (task, seed) in [(Task::Composition, 81), (Task::Text, 82), (Task::Quality, 83)] {
            let prompts = test_prompts(task, 640);
            let images = renders_with(&prompts, Layout::Canonical, seed);
            let (_, metric) = mean_scores(world_reward(task).as_ref(), &prompts, &images, 0);
            let (_, scattered) =
                mean_scores(world_reward(task).as_ref(), &prompts, &fixtures::renders(&prompts, seed), 0);
            match task {
                Task::Quality => assert!(metric >= scattered - 0.1, "quality {metric} vs scattered {scattered}"),
                _ => assert_eq!(metric, 1.0, "{task}: canonical ground truth scores {metric}"),
            }
        }
    }

    #[test]
    fn wrong_image_sizes_name_the_reward_and_input() {
        for task in Task::ALL {
            let prompt = if task == Task::Text { "a sign that says \"A\"" } else { "a photo of a circle" };
            let ok = RewardInput::from_image32(&Image32::filled([0.5; 3]), prompt);
            let big = RewardInput::new(RgbImage::new(64, 64), prompt).with_task(task);
            let reward = world_reward(task);
            let err = reward.score(&[ok.clone(), big.clone()]).unwrap_err();
            let text = err.to_string();
            assert!(text.starts_with(&format!("reward `{}`, input 1: image is 64x64", reward.name())), "{text}");
        }
    }

    #[test]
    fn rewards_have_distinct_names_and_keep_batch_order() {
        let names: Vec<String> = Task::ALL.iter().map(|&t| world_reward(t).name().to_string()).collect();
        assert_eq!(names, ["composition", "ocr", "preference", "quality"]);
        let blank = RewardInput::from_image32(&Image32::filled([0.5; 3]), "a sign that says \"A\"");
        let mut text = Image32::filled([0.9; 3]);
        crate::world::font::Font::builtin().draw(&mut text, "A", 10, 10, [0.0; 3]);
        let good = RewardInput::from_image32(&text, "a sign that says \"A\"");
        let scores = OcrReward.score(&[blank, good.clone(), good]).unwrap();
        assert_eq!(scores.iter().map(|s| s.metric).collect::<Vec<_>>(), [0.0, 1.0, 1.0]);
    }
}
