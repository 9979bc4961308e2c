//! Prompt generation and the shipped prompt sets (`assets/world/prompts_{train,test}.jsonl`).
//!
//! Each split is generated from a fixed ChaCha8 seed, so the files are a pure function of
//! this code; a unit test regenerates them and compares byte for byte.
//!
//! Sizes. Every task's test set has [`TEST_PROMPTS_PER_TASK`] = 640 prompts: a 0-1 metric
//! has a per-image standard deviation of at most 0.5, so the standard error of its mean is at
//! most 0.5 / sqrt(640) = 0.0198 < 0.02 (PickScore / 26 and DeQA / 5 vary far less). 2,560
//! test images at 40 sampler steps stay cheap for the tiny model. Training has
//! [`TRAIN_PROMPTS_PER_TASK`] = 2,000 prompts per task (8,000), disjoint from the test
//! prompts wherever the family has prompts to spare: families with few distinct prompts
//! (`a photo of a circle`: 4) necessarily share them, as GenEval's single-object category
//! would.
//!
//! Composition prompts cycle through the six GenEval families so each has a sixth of the set.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::world::font::{ALPHABET, MAX_TEXT_LEN};
use crate::world::grammar::{ParseError, parse};
use crate::world::palette::Colour;
use crate::world::random::{below, chance, int_in, pick};
use crate::world::render::style_colours;
use crate::world::shape::Shape;
use crate::world::spec::{
    CompositionSpec, Family, Lighting, Link, ObjectSpec, PreferenceSpec, QualitySpec, QualityTemplate, Relation, Spec,
    Style, Task, TextSpec, TextTemplate, Warmth,
};

/// Test prompts per task (see the module docs for the standard-error argument).
pub const TEST_PROMPTS_PER_TASK: usize = 640;

/// The longest string a text prompt draws before it is cut to
/// [`MAX_TEXT_LEN`](crate::world::font::MAX_TEXT_LEN).
const DRAWN_TEXT_LEN: i32 = 4;
/// Training prompts per task.
pub const TRAIN_PROMPTS_PER_TASK: usize = 2_000;

/// A prompt: its text and what it means.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Prompt {
    /// The canonical prompt text.
    pub text: String,
    /// The parsed meaning.
    pub spec: Spec,
}

impl Prompt {
    /// The prompt for a spec (its canonical text).
    pub fn from_spec(spec: Spec) -> Self {
        Self { text: spec.to_string(), spec }
    }

    /// Parses prompt text.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        Ok(Self { text: text.to_string(), spec: parse(text)? })
    }

    /// The prompt's task.
    pub fn task(&self) -> Task {
        self.spec.task()
    }

    /// The prompt's family.
    pub fn family(&self) -> Family {
        self.spec.family()
    }
}

/// One line of a prompt file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptRecord {
    /// The prompt text.
    pub prompt: String,
    /// Its task.
    pub task: Task,
    /// Its family (GenEval category for composition).
    pub family: Family,
}

/// A shipped prompt set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Prompts for RL training (GRPO teachers, OPD student).
    Train,
    /// Prompts for evaluation.
    #[default]
    Test,
}

impl Split {
    /// Both splits.
    pub const ALL: [Split; 2] = [Split::Train, Split::Test];

    /// The split's name in recipes (`split = "train"`) and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }

    /// The generator seed.
    pub fn seed(self) -> u64 {
        match self {
            Split::Train => 0x5EED_7241,
            Split::Test => 0x5EED_7E57,
        }
    }

    /// Prompts per task.
    pub fn per_task(self) -> usize {
        match self {
            Split::Train => TRAIN_PROMPTS_PER_TASK,
            Split::Test => TEST_PROMPTS_PER_TASK,
        }
    }

    /// File name under `assets/world/`.
    pub fn file_name(self) -> &'static str {
        match self {
            Split::Train => "prompts_train.jsonl",
            Split::Test => "prompts_test.jsonl",
        }
    }

    /// The shipped file's contents, compiled in.
    pub fn shipped_jsonl(self) -> &'static str {
        match self {
            Split::Train => include_str!("../../assets/world/prompts_train.jsonl"),
            Split::Test => include_str!("../../assets/world/prompts_test.jsonl"),
        }
    }
}

/// Errors reading or writing prompt files.
#[derive(Debug, Error)]
pub enum PromptFileError {
    /// The file could not be read or written.
    #[error("prompt file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line is not a valid JSON prompt record.
    #[error("prompt file {file}, line {line}: {source}")]
    Json {
        /// The file (or source name).
        file: String,
        /// 1-based line number.
        line: usize,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// A line's prompt is not in the grammar.
    #[error("prompt file {file}, line {line}: {source}")]
    Prompt {
        /// The file (or source name).
        file: String,
        /// 1-based line number.
        line: usize,
        /// The parse error.
        source: ParseError,
    },
    /// A line's declared task or family disagrees with its prompt.
    #[error("prompt file {file}, line {line}: {prompt:?} is {parsed}, but the line says {declared}")]
    Mismatch {
        /// The file (or source name).
        file: String,
        /// 1-based line number.
        line: usize,
        /// The prompt text.
        prompt: String,
        /// `task/family` declared on the line.
        declared: String,
        /// `task/family` of the parsed prompt.
        parsed: String,
    },
}

/// Draws a spec of the given family.
pub fn sample_spec<R: RngCore + ?Sized>(family: Family, rng: &mut R) -> Spec {
    let shape = |rng: &mut R| *pick(rng, &Shape::ALL);
    let colour = |rng: &mut R| *pick(rng, &Colour::ALL);
    let two_shapes = |rng: &mut R| {
        let a = *pick(rng, &Shape::ALL);
        let others: Vec<Shape> = Shape::ALL.into_iter().filter(|&s| s != a).collect();
        (a, *pick(rng, &others))
    };
    let two_colours = |rng: &mut R| {
        let a = *pick(rng, &Colour::ALL);
        let others: Vec<Colour> = Colour::ALL.into_iter().filter(|&c| c != a).collect();
        (a, *pick(rng, &others))
    };
    let composition = |first, second| Spec::Composition(CompositionSpec { first, second });
    match family {
        Family::SingleObject => composition(ObjectSpec::a(shape(rng)), None),
        Family::TwoObject => {
            let (a, b) = two_shapes(rng);
            composition(ObjectSpec::a(a), Some((Link::And, ObjectSpec::a(b))))
        }
        Family::Counting => {
            let number = Some(int_in(rng, 1, 4) as u8);
            composition(ObjectSpec { number, colour: None, shape: shape(rng) }, None)
        }
        Family::Colors => {
            let first = ObjectSpec { number: None, colour: Some(colour(rng)), shape: shape(rng) };
            composition(first, None)
        }
        Family::ColorAttr => {
            let (a, b) = two_shapes(rng);
            let (ca, cb) = two_colours(rng);
            let first = ObjectSpec { number: None, colour: Some(ca), shape: a };
            composition(first, Some((Link::And, ObjectSpec { number: None, colour: Some(cb), shape: b })))
        }
        Family::Position => {
            let (a, b) = two_shapes(rng);
            let relation = *pick(rng, &Relation::ALL);
            let (ca, cb) = if chance(rng, 0.5) {
                let (ca, cb) = two_colours(rng);
                (Some(ca), Some(cb))
            } else {
                (None, None)
            };
            let first = ObjectSpec { number: None, colour: ca, shape: a };
            let second = ObjectSpec { number: None, colour: cb, shape: b };
            composition(first, Some((Link::Relation(relation), second)))
        }
        Family::Text => {
            let template = *pick(rng, &TextTemplate::ALL);
            // Drawn as the world's first prompt sets were (1 to 4 characters, uniform), then cut
            // to the first MAX_TEXT_LEN: the random stream, and so every other prompt of a split,
            // stays what it was before text was drawn at scale 2 (lengths 1 / 2: 1/4, 3/4).
            let len = int_in(rng, 1, DRAWN_TEXT_LEN) as usize;
            let alphabet: Vec<char> = ALPHABET.chars().collect();
            let drawn: Vec<char> = (0..len).map(|_| *pick(rng, &alphabet)).collect();
            let text = drawn[..len.min(MAX_TEXT_LEN)].iter().collect();
            Spec::Text(TextSpec { template, text })
        }
        Family::Preference => {
            let style = loop {
                let warmth = match below(rng, 3) {
                    0 => None,
                    1 => Some(Warmth::Warm),
                    _ => Some(Warmth::Cool),
                };
                let lighting = match below(rng, 3) {
                    0 => None,
                    1 => Some(Lighting::Bright),
                    _ => Some(Lighting::Dark),
                };
                let style = Style { warmth, lighting, centered: chance(rng, 0.5), soft_background: chance(rng, 0.5) };
                if style != Style::default() {
                    break style;
                }
            };
            let colour = chance(rng, 0.5).then(|| *pick(rng, style_colours(style.warmth)));
            let subject = ObjectSpec { number: None, colour, shape: shape(rng) };
            Spec::Preference(PreferenceSpec { style, subject })
        }
        Family::Quality => {
            if below(rng, 8) == 0 {
                Spec::Quality(QualitySpec::AnImage)
            } else {
                let template = *pick(rng, &QualityTemplate::ALL);
                let colour = chance(rng, 0.5).then(|| colour(rng));
                let subject = ObjectSpec { number: None, colour, shape: shape(rng) };
                Spec::Quality(QualitySpec::Described { template, subject })
            }
        }
    }
}

/// Draws a family of `task`, uniform among the task's families.
pub fn sample_family<R: RngCore + ?Sized>(task: Task, rng: &mut R) -> Family {
    match task {
        Task::Composition => *pick(rng, &Family::COMPOSITION),
        Task::Text => Family::Text,
        Task::Preference => Family::Preference,
        Task::Quality => Family::Quality,
    }
}

/// Draws a family of a uniformly chosen task.
pub fn sample_any_family<R: RngCore + ?Sized>(rng: &mut R) -> Family {
    let task = *pick(rng, &Task::ALL);
    sample_family(task, rng)
}

/// Draws a prompt of `task`, its family uniform among the task's families.
pub fn sample_prompt<R: RngCore + ?Sized>(task: Task, rng: &mut R) -> Prompt {
    let family = sample_family(task, rng);
    Prompt::from_spec(sample_spec(family, rng))
}

/// Draws a prompt of a uniformly chosen task.
pub fn sample_any_prompt<R: RngCore + ?Sized>(rng: &mut R) -> Prompt {
    let family = sample_any_family(rng);
    Prompt::from_spec(sample_spec(family, rng))
}

/// Draws a prompt of `family`, redrawn (up to 100 times) while its text is in `held_out`;
/// families too small to avoid `held_out` keep a held-out prompt.
pub fn sample_prompt_avoiding<R: RngCore + ?Sized>(family: Family, held_out: &HashSet<String>, rng: &mut R) -> Prompt {
    let mut prompt = Prompt::from_spec(sample_spec(family, rng));
    for _ in 0..100 {
        if !held_out.contains(&prompt.text) {
            break;
        }
        prompt = Prompt::from_spec(sample_spec(family, rng));
    }
    prompt
}

fn families(task: Task) -> &'static [Family] {
    match task {
        Task::Composition => &Family::COMPOSITION,
        Task::Text => &[Family::Text],
        Task::Preference => &[Family::Preference],
        Task::Quality => &[Family::Quality],
    }
}

/// Generates a split: tasks in [`Task::ALL`] order, [`Split::per_task`] prompts each,
/// composition cycling through its families. Training prompts avoid test prompts (up to 100
/// redraws each; families too small to avoid them share prompts).
pub fn prompt_set(split: Split) -> Vec<Prompt> {
    let held_out: HashSet<String> = match split {
        Split::Train => prompt_set(Split::Test).into_iter().map(|p| p.text).collect(),
        Split::Test => HashSet::new(),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(split.seed());
    let mut out = Vec::with_capacity(split.per_task() * Task::ALL.len());
    for task in Task::ALL {
        let fams = families(task);
        for i in 0..split.per_task() {
            out.push(sample_prompt_avoiding(fams[i % fams.len()], &held_out, &mut rng));
        }
    }
    out
}

/// Prompts as JSON lines (`{"prompt":…,"task":…,"family":…}`), one per line.
pub fn to_jsonl(prompts: &[Prompt]) -> String {
    let mut out = String::new();
    for p in prompts {
        let record = PromptRecord { prompt: p.text.clone(), task: p.task(), family: p.family() };
        out.push_str(&serde_json::to_string(&record).expect("prompt records serialise"));
        out.push('\n');
    }
    out
}

/// Parses JSON-lines prompts, checking each prompt against the grammar and its declared task
/// and family. `source` names the file in errors. Blank lines are skipped.
pub fn parse_jsonl(source: &str, text: &str) -> Result<Vec<Prompt>, PromptFileError> {
    let mut out = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (file, line_no) = (source.to_string(), index + 1);
        let record: PromptRecord = serde_json::from_str(line).map_err(|e| PromptFileError::Json {
            file: file.clone(),
            line: line_no,
            source: e,
        })?;
        let prompt = Prompt::parse(&record.prompt).map_err(|e| PromptFileError::Prompt {
            file: file.clone(),
            line: line_no,
            source: e,
        })?;
        if prompt.task() != record.task || prompt.family() != record.family {
            return Err(PromptFileError::Mismatch {
                file,
                line: line_no,
                prompt: record.prompt,
                declared: format!("{}/{}", record.task, record.family),
                parsed: format!("{}/{}", prompt.task(), prompt.family()),
            });
        }
        out.push(prompt);
    }
    Ok(out)
}

/// Reads a JSON-lines prompt file (see [`parse_jsonl`]).
pub fn read_prompt_file(path: impl AsRef<Path>) -> Result<Vec<Prompt>, PromptFileError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| PromptFileError::Io { path: path.to_owned(), source })?;
    parse_jsonl(&path.display().to_string(), &text)
}

/// The shipped prompts of a split (from the compiled-in file).
pub fn shipped_prompts(split: Split) -> Vec<Prompt> {
    parse_jsonl(split.file_name(), split.shipped_jsonl()).expect("shipped prompt files are valid (unit-tested)")
}

/// Writes both splits into `dir` (normally `assets/world/`), creating it if needed.
pub fn write_prompt_sets(dir: impl AsRef<Path>) -> Result<(), PromptFileError> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|source| PromptFileError::Io { path: dir.to_owned(), source })?;
    for split in Split::ALL {
        let path = dir.join(split.file_name());
        std::fs::write(&path, to_jsonl(&prompt_set(split)))
            .map_err(|source| PromptFileError::Io { path: path.clone(), source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::grammar::{tokenize, vocabulary};
    use std::collections::HashMap;

    /// `assets/world/` of the crate this file belongs to (works from any crate that includes
    /// the module by path, and from the crate root where cargo runs tests).
    fn assets_dir() -> PathBuf {
        let source = Path::new(file!());
        source
            .parent()
            .and_then(Path::parent)
            .and_then(Path::parent)
            .expect("src/world/prompts.rs")
            .join("assets/world")
    }

    #[test]
    fn shipped_files_match_the_generator_byte_for_byte() {
        for split in Split::ALL {
            let generated = to_jsonl(&prompt_set(split));
            let shipped = split.shipped_jsonl();
            if let Some((n, (g, s))) = generated.lines().zip(shipped.lines()).enumerate().find(|(_, (g, s))| g != s) {
                panic!(
                    "{} line {} differs:\n  generated {g}\n  shipped   {s}\nregenerate with \
                     `cargo test --release regenerate_shipped_prompt_files -- --ignored`",
                    split.file_name(),
                    n + 1
                );
            }
            assert_eq!(generated.len(), shipped.len(), "{} has a different length", split.file_name());
        }
    }

    #[test]
    #[ignore = "writes assets/world/; run to regenerate the shipped prompt files"]
    fn regenerate_shipped_prompt_files() {
        write_prompt_sets(assets_dir()).unwrap();
    }

    #[test]
    fn shipped_sets_have_the_documented_sizes_and_balance() {
        for split in Split::ALL {
            let prompts = shipped_prompts(split);
            assert_eq!(prompts.len(), 4 * split.per_task());
            let mut by_family: HashMap<Family, usize> = HashMap::new();
            for p in &prompts {
                *by_family.entry(p.family()).or_default() += 1;
            }
            for task in Task::ALL {
                let n: usize = families(task).iter().map(|f| by_family[f]).sum();
                assert_eq!(n, split.per_task(), "{split:?} {task}");
            }
            for family in Family::COMPOSITION {
                let n = by_family[&family];
                assert!(n.abs_diff(split.per_task() / 6) <= 1, "{split:?} {family}: {n}");
            }
        }
        // the standard-error bound the sizes are chosen for
        assert!(0.5 / (TEST_PROMPTS_PER_TASK as f64).sqrt() < 0.02);
    }

    #[test]
    fn train_avoids_test_prompts_where_the_family_allows() {
        let test: HashSet<String> = shipped_prompts(Split::Test).into_iter().map(|p| p.text).collect();
        let train = shipped_prompts(Split::Train);
        for family in [Family::Text, Family::Position, Family::ColorAttr, Family::Preference] {
            let shared = train.iter().filter(|p| p.family() == family && test.contains(&p.text)).count();
            assert_eq!(shared, 0, "{family} shares {shared} prompts with the test set");
        }
    }

    #[test]
    fn every_prompt_round_trips_and_tokenizes_within_the_vocabulary() {
        let vocab: HashSet<&str> = vocabulary().into_iter().collect();
        let mut used: HashSet<String> = HashSet::new();
        for split in Split::ALL {
            for p in shipped_prompts(split) {
                assert_eq!(p.spec.to_string(), p.text);
                for token in tokenize(&p.text) {
                    assert!(vocab.contains(token.as_str()), "{token:?} of {:?}", p.text);
                    used.insert(token);
                }
            }
        }
        let unused: Vec<&&str> = vocab.iter().filter(|w| !used.contains(**w)).collect();
        assert!(unused.is_empty(), "vocabulary words no prompt uses: {unused:?}");
    }

    #[test]
    fn bad_files_name_the_line_at_fault() {
        let good = "{\"prompt\":\"a photo of a circle\",\"task\":\"composition\",\"family\":\"single_object\"}";
        assert_eq!(parse_jsonl("x", good).unwrap().len(), 1);
        let err = parse_jsonl("f.jsonl", &format!("{good}\n{{\"prompt\":1}}")).unwrap_err();
        assert!(matches!(err, PromptFileError::Json { line: 2, .. }), "{err}");
        let bad = "{\"prompt\":\"a photo of a dog\",\"task\":\"composition\",\"family\":\"single_object\"}";
        let err = parse_jsonl("f.jsonl", bad).unwrap_err();
        assert!(err.to_string().starts_with("prompt file f.jsonl, line 1: prompt \"a photo of a dog\""), "{err}");
        let wrong = "{\"prompt\":\"a photo of a circle\",\"task\":\"text\",\"family\":\"single_object\"}";
        let err = parse_jsonl("f.jsonl", wrong).unwrap_err();
        assert!(
            err.to_string().contains("is composition/single_object, but the line says text/single_object"),
            "{err}"
        );
        let err = read_prompt_file("/nonexistent/prompts.jsonl").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/prompts.jsonl"), "{err}");
    }
}
