//! What a prompt means: the four tasks, prompt families and the structured [`Spec`] of a
//! prompt. A spec's `Display` is its canonical prompt text; [`crate::world::grammar::parse`]
//! reads text back into a spec.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::world::palette::Colour;
use crate::world::shape::Shape;

/// The four task families of the paper, mirrored in the world.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Object presence, counts, colours and positions (GenEval).
    Composition,
    /// Rendering a quoted string legibly (OCR).
    Text,
    /// Human-preference-like style (PickScore).
    Preference,
    /// Image quality: sharpness and cleanliness (DeQA).
    Quality,
}

impl Task {
    /// Every task, in file order.
    pub const ALL: [Task; 4] = [Task::Composition, Task::Text, Task::Preference, Task::Quality];

    /// The snake-case name used in prompt files and recipes.
    pub fn name(self) -> &'static str {
        match self {
            Task::Composition => "composition",
            Task::Text => "text",
            Task::Preference => "preference",
            Task::Quality => "quality",
        }
    }

    /// The task a name denotes.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A prompt family: the six GenEval categories for composition, one family for each other
/// task. Evaluation reports composition per family, as GenEval does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// `a photo of a circle`
    SingleObject,
    /// `a photo of a circle and a square`
    TwoObject,
    /// `a photo of three triangles`
    Counting,
    /// `a photo of a red circle`
    Colors,
    /// `a photo of a red circle and a blue square`
    ColorAttr,
    /// `a photo of a circle left of a square`
    Position,
    /// `a sign that says "A7"`
    Text,
    /// `a warm painting of a circle, centered`
    Preference,
    /// `a sharp photo of a square`
    Quality,
}

impl Family {
    /// The GenEval categories, in GenEval's order.
    pub const COMPOSITION: [Family; 6] = [
        Family::SingleObject,
        Family::TwoObject,
        Family::Counting,
        Family::Colors,
        Family::Position,
        Family::ColorAttr,
    ];

    /// The task the family belongs to.
    pub fn task(self) -> Task {
        match self {
            Family::Text => Task::Text,
            Family::Preference => Task::Preference,
            Family::Quality => Task::Quality,
            _ => Task::Composition,
        }
    }

    /// The snake-case name used in prompt files (GenEval's tags for composition).
    pub fn name(self) -> &'static str {
        match self {
            Family::SingleObject => "single_object",
            Family::TwoObject => "two_object",
            Family::Counting => "counting",
            Family::Colors => "colors",
            Family::ColorAttr => "color_attr",
            Family::Position => "position",
            Family::Text => "text",
            Family::Preference => "preference",
            Family::Quality => "quality",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A spatial relation between the first and the second object of a composition prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Relation {
    /// `left of`: the first object's centre is left of the second's.
    LeftOf,
    /// `right of`
    RightOf,
    /// `above`: the first object's centre is higher than the second's.
    Above,
    /// `below`
    Below,
}

impl Relation {
    /// Every relation.
    pub const ALL: [Relation; 4] = [Relation::LeftOf, Relation::RightOf, Relation::Above, Relation::Below];

    /// The prompt words.
    pub fn phrase(self) -> &'static str {
        match self {
            Relation::LeftOf => "left of",
            Relation::RightOf => "right of",
            Relation::Above => "above",
            Relation::Below => "below",
        }
    }

    /// The relation with its operands exchanged (`A left of B` is `B right of A`).
    pub fn converse(self) -> Self {
        match self {
            Relation::LeftOf => Relation::RightOf,
            Relation::RightOf => Relation::LeftOf,
            Relation::Above => Relation::Below,
            Relation::Below => Relation::Above,
        }
    }
}

/// An object phrase: `a red circle`, `three triangles`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ObjectSpec {
    /// An explicit number word (1 to 4; the count must then be exact), or `None` for the
    /// article `a` (at least one).
    pub number: Option<u8>,
    /// The colour, when the prompt names one.
    pub colour: Option<Colour>,
    /// The shape.
    pub shape: Shape,
}

/// Number words, indexed by value - 1.
pub const NUMBER_WORDS: [&str; 4] = ["one", "two", "three", "four"];

impl ObjectSpec {
    /// `a {shape}`: one object, any colour.
    pub fn a(shape: Shape) -> Self {
        Self { number: None, colour: None, shape }
    }

    /// How many objects the phrase asks for.
    pub fn count(&self) -> usize {
        usize::from(self.number.unwrap_or(1))
    }

    /// Whether the count is exact (a number word) rather than "at least one" (`a`).
    pub fn exact_count(&self) -> bool {
        self.number.is_some()
    }
}

impl fmt::Display for ObjectSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.number {
            None => f.write_str("a ")?,
            Some(n) => write!(f, "{} ", NUMBER_WORDS.get(usize::from(n).wrapping_sub(1)).copied().unwrap_or("?"))?,
        }
        if let Some(c) = self.colour {
            write!(f, "{} ", c.word())?;
        }
        f.write_str(if self.count() > 1 { self.shape.plural() } else { self.shape.word() })
    }
}

/// How the second object of a composition prompt joins the first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Link {
    /// `and`: both present, anywhere.
    And,
    /// A spatial relation from the first object to the second.
    Relation(Relation),
}

/// A composition prompt: `a photo of {first} [and | {relation}] [{second}]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CompositionSpec {
    /// The first object phrase.
    pub first: ObjectSpec,
    /// The optional second object phrase and how it joins the first.
    pub second: Option<(Link, ObjectSpec)>,
}

impl CompositionSpec {
    /// The object phrases in prompt order.
    pub fn objects(&self) -> Vec<ObjectSpec> {
        std::iter::once(self.first).chain(self.second.map(|(_, o)| o)).collect()
    }

    /// The spatial relation, if the prompt has one.
    pub fn relation(&self) -> Option<Relation> {
        match self.second {
            Some((Link::Relation(r), _)) => Some(r),
            _ => None,
        }
    }
}

/// The wording of a text-rendering prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TextTemplate {
    /// `a sign that says "…"`
    Sign,
    /// `a poster with the text "…"`
    Poster,
    /// `a label reading "…"`
    Label,
}

impl TextTemplate {
    /// Every template.
    pub const ALL: [TextTemplate; 3] = [TextTemplate::Sign, TextTemplate::Poster, TextTemplate::Label];

    /// The words before the quoted text.
    pub fn lead(self) -> &'static str {
        match self {
            TextTemplate::Sign => "a sign that says",
            TextTemplate::Poster => "a poster with the text",
            TextTemplate::Label => "a label reading",
        }
    }
}

/// A text-rendering prompt.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TextSpec {
    /// The wording around the string.
    pub template: TextTemplate,
    /// The string to render: 1 to [`MAX_TEXT_LEN`](crate::world::font::MAX_TEXT_LEN) characters
    /// of [`ALPHABET`](crate::world::font::ALPHABET).
    pub text: String,
}

/// Palette temperature asked for by a preference prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Warmth {
    /// `warm`: reds and yellows on a warm-tinted background.
    Warm,
    /// `cool`: cyans and blues on a cool-tinted background.
    Cool,
}

impl Warmth {
    /// The prompt word.
    pub fn word(self) -> &'static str {
        match self {
            Warmth::Warm => "warm",
            Warmth::Cool => "cool",
        }
    }

    /// The opposite temperature.
    pub fn flipped(self) -> Self {
        match self {
            Warmth::Warm => Warmth::Cool,
            Warmth::Cool => Warmth::Warm,
        }
    }
}

/// Background brightness asked for by a preference prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lighting {
    /// `bright`: a light background.
    Bright,
    /// `dark`: a dark background.
    Dark,
}

impl Lighting {
    /// The prompt word.
    pub fn word(self) -> &'static str {
        match self {
            Lighting::Bright => "bright",
            Lighting::Dark => "dark",
        }
    }

    /// The opposite brightness.
    pub fn flipped(self) -> Self {
        match self {
            Lighting::Bright => Lighting::Dark,
            Lighting::Dark => Lighting::Bright,
        }
    }
}

/// The style words of a preference prompt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Style {
    /// `warm` / `cool`.
    pub warmth: Option<Warmth>,
    /// `bright` / `dark`.
    pub lighting: Option<Lighting>,
    /// `, centered`: the subject sits at the image centre.
    pub centered: bool,
    /// `, soft background`: a smooth, low-contrast background.
    pub soft_background: bool,
}

/// A preference prompt: a styled painting of one subject.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PreferenceSpec {
    /// The style words.
    pub style: Style,
    /// The subject.
    pub subject: ObjectSpec,
}

/// The wording of a quality prompt that names a subject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QualityTemplate {
    /// `a sharp photo of …`
    SharpPhoto,
    /// `a clean image of …`
    CleanImage,
    /// `a high quality picture of …`
    HighQualityPicture,
}

impl QualityTemplate {
    /// Every template.
    pub const ALL: [QualityTemplate; 3] =
        [QualityTemplate::SharpPhoto, QualityTemplate::CleanImage, QualityTemplate::HighQualityPicture];

    /// The words before the subject.
    pub fn lead(self) -> &'static str {
        match self {
            QualityTemplate::SharpPhoto => "a sharp photo of",
            QualityTemplate::CleanImage => "a clean image of",
            QualityTemplate::HighQualityPicture => "a high quality picture of",
        }
    }
}

/// A quality prompt: generic, scored on image quality alone.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum QualitySpec {
    /// `an image`
    AnImage,
    /// `a sharp photo of a circle`, …
    Described {
        /// The wording.
        template: QualityTemplate,
        /// The subject.
        subject: ObjectSpec,
    },
}

/// What a prompt means: one variant per task.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Spec {
    /// GenEval-like composition.
    Composition(CompositionSpec),
    /// OCR-like text rendering.
    Text(TextSpec),
    /// PickScore-like preference.
    Preference(PreferenceSpec),
    /// DeQA-like quality.
    Quality(QualitySpec),
}

impl Spec {
    /// The task of the prompt.
    pub fn task(&self) -> Task {
        self.family().task()
    }

    /// The prompt family (the GenEval category for composition prompts).
    pub fn family(&self) -> Family {
        match self {
            Spec::Composition(c) => match c.second {
                None if c.first.number.is_some() => Family::Counting,
                None if c.first.colour.is_some() => Family::Colors,
                None => Family::SingleObject,
                Some((Link::Relation(_), _)) => Family::Position,
                Some((Link::And, second)) if c.first.colour.is_some() || second.colour.is_some() => Family::ColorAttr,
                Some((Link::And, _)) => Family::TwoObject,
            },
            Spec::Text(_) => Family::Text,
            Spec::Preference(_) => Family::Preference,
            Spec::Quality(_) => Family::Quality,
        }
    }

    /// Every object phrase the prompt names, in prompt order (none for text prompts and for
    /// `an image`).
    pub fn objects(&self) -> Vec<ObjectSpec> {
        match self {
            Spec::Composition(c) => c.objects(),
            Spec::Preference(p) => vec![p.subject],
            Spec::Quality(QualitySpec::Described { subject, .. }) => vec![*subject],
            Spec::Text(_) | Spec::Quality(QualitySpec::AnImage) => Vec::new(),
        }
    }
}

impl fmt::Display for Spec {
    /// The canonical prompt text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Spec::Composition(c) => {
                write!(f, "a photo of {}", c.first)?;
                match c.second {
                    None => Ok(()),
                    Some((Link::And, o)) => write!(f, " and {o}"),
                    Some((Link::Relation(r), o)) => write!(f, " {} {o}", r.phrase()),
                }
            }
            Spec::Text(t) => write!(f, "{} \"{}\"", t.template.lead(), t.text),
            Spec::Preference(p) => {
                f.write_str("a ")?;
                if let Some(w) = p.style.warmth {
                    write!(f, "{} ", w.word())?;
                }
                if let Some(l) = p.style.lighting {
                    write!(f, "{} ", l.word())?;
                }
                write!(f, "painting of {}", p.subject)?;
                if p.style.centered {
                    f.write_str(", centered")?;
                }
                if p.style.soft_background {
                    f.write_str(", soft background")?;
                }
                Ok(())
            }
            Spec::Quality(QualitySpec::AnImage) => f.write_str("an image"),
            Spec::Quality(QualitySpec::Described { template, subject }) => {
                write!(f, "{} {subject}", template.lead())
            }
        }
    }
}
