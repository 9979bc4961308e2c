//! The prompt grammar of the synthetic world: [`parse`] from prompt text to its [`Spec`] (the
//! canonical text of a spec is its `Display`), the text encoder's [`tokenize`] and the closed
//! [`vocabulary`].
//!
//! Grammar (words are lower-case; quoted text is upper-case letters and digits):
//!
//! ```text
//! prompt      := composition | text | preference | quality
//! composition := "a photo of" object [ "and" object | relation object ]      (GenEval-like)
//! relation    := "left of" | "right of" | "above" | "below"
//! object      := ("a" | "one" | "two" | "three" | "four") [colour] shape     (plural after 2-4)
//! colour      := "red" | "yellow" | "green" | "cyan" | "blue" | "purple"
//! shape       := "circle" | "square" | "triangle" | "cross"   (+ "s" / "es" plurals)
//! text        := ("a sign that says" | "a poster with the text" | "a label reading") quoted
//! quoted      := '"' 1 to 4 of A-Z 0-9 '"'                                    (OCR-like)
//! preference  := "a" ["warm" | "cool"] ["bright" | "dark"] "painting of" object
//!                [", centered"] [", soft background"]                        (PickScore-like)
//! quality     := "an image" | ("a sharp photo of" | "a clean image of"
//!                | "a high quality picture of") object                        (DeQA-like)
//! ```
//!
//! Rewards only see prompt text, as real rewards do, and recover the spec with [`parse`];
//! `parse(&spec.to_string()) == spec` for every spec the grammar can express.

use thiserror::Error;

use crate::world::font::{ALPHABET, MAX_TEXT_LEN, in_alphabet};
use crate::world::palette::Colour;
use crate::world::shape::Shape;
use crate::world::spec::{
    CompositionSpec, Lighting, Link, NUMBER_WORDS, ObjectSpec, PreferenceSpec, QualitySpec, QualityTemplate, Relation,
    Spec, Style, TextSpec, TextTemplate, Warmth,
};

/// A prompt the grammar does not accept.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("prompt {prompt:?}: {problem}")]
pub struct ParseError {
    /// The prompt as given.
    pub prompt: String,
    /// What is wrong with it.
    pub problem: ParseProblem,
}

/// What makes a prompt unparseable. Word positions are 1-based and count commas and quoted
/// strings as words.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ParseProblem {
    /// A word the grammar does not allow where it stands.
    #[error("expected {expected} at word {position}, found {found:?}")]
    Unexpected {
        /// 1-based word position.
        position: usize,
        /// What the grammar allows there.
        expected: &'static str,
        /// The word found.
        found: String,
    },
    /// The prompt ends too early.
    #[error("expected {expected} at word {position}, found the end of the prompt")]
    Truncated {
        /// 1-based word position.
        position: usize,
        /// What the grammar needs there.
        expected: &'static str,
    },
    /// A double quote opens text that never closes.
    #[error("a double quote opens text that is never closed")]
    UnterminatedQuote,
    /// Quoted text of a length the world does not render.
    #[error("quoted text {text:?} has {len} characters, the world renders 1 to {MAX_TEXT_LEN}")]
    TextLength {
        /// The quoted text.
        text: String,
        /// Its length in characters.
        len: usize,
    },
    /// A quoted character the font cannot draw.
    #[error("character {ch:?} of quoted text {text:?} is not in the font alphabet {ALPHABET}")]
    TextCharacter {
        /// The quoted text.
        text: String,
        /// The offending character.
        ch: char,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Lexeme {
    Word(String),
    Comma,
    Quoted(String),
}

impl Lexeme {
    fn describe(&self) -> String {
        match self {
            Lexeme::Word(w) => w.clone(),
            Lexeme::Comma => ",".to_string(),
            Lexeme::Quoted(q) => format!("\"{q}\""),
        }
    }
}

/// Splits text into lower-cased words, commas and quoted strings (kept as written). With
/// `lenient`, an unterminated quote runs to the end of the text instead of failing.
fn lex(text: &str, lenient: bool) -> Result<Vec<Lexeme>, ParseProblem> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut chars = text.chars();
    let flush = |word: &mut String, out: &mut Vec<Lexeme>| {
        if !word.is_empty() {
            out.push(Lexeme::Word(std::mem::take(word).to_lowercase()));
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                flush(&mut word, &mut out);
                let mut quoted = String::new();
                let mut closed = false;
                for q in chars.by_ref() {
                    if q == '"' {
                        closed = true;
                        break;
                    }
                    quoted.push(q);
                }
                if !closed && !lenient {
                    return Err(ParseProblem::UnterminatedQuote);
                }
                out.push(Lexeme::Quoted(quoted));
            }
            ',' => {
                flush(&mut word, &mut out);
                out.push(Lexeme::Comma);
            }
            c if c.is_whitespace() => flush(&mut word, &mut out),
            c => word.push(c),
        }
    }
    flush(&mut word, &mut out);
    Ok(out)
}

/// Splits a prompt into the word-level text encoder's tokens: lower-cased words, `,`, `"`,
/// and one token per character of quoted text (upper-cased), so `a sign that says "A7"`
/// becomes `a sign that says " A 7 "`. Never fails; words outside [`vocabulary`] are
/// passed through for the encoder to map to its unknown token.
pub fn tokenize(text: &str) -> Vec<String> {
    let lexemes = lex(text, true).expect("lenient lexing does not fail");
    let mut tokens = Vec::new();
    for lexeme in lexemes {
        match lexeme {
            Lexeme::Word(w) => tokens.push(w),
            Lexeme::Comma => tokens.push(",".to_string()),
            Lexeme::Quoted(q) => {
                tokens.push("\"".to_string());
                tokens.extend(q.chars().filter(|c| !c.is_whitespace()).map(|c| c.to_uppercase().collect()));
                tokens.push("\"".to_string());
            }
        }
    }
    tokens
}

/// Every token [`tokenize`] produces for prompts of the grammar, sorted and without
/// duplicates: grammar words, `,`, `"` and the characters of [`ALPHABET`].
pub fn vocabulary() -> Vec<&'static str> {
    const WORDS: &[&str] = &[
        // composition
        "a",
        "photo",
        "of",
        "and",
        "left",
        "right",
        "above",
        "below",
        // text
        "sign",
        "that",
        "says",
        "poster",
        "with",
        "the",
        "text",
        "label",
        "reading",
        "\"",
        // preference
        "warm",
        "cool",
        "bright",
        "dark",
        "painting",
        "centered",
        "soft",
        "background",
        ",",
        // quality
        "an",
        "image",
        "sharp",
        "clean",
        "high",
        "quality",
        "picture",
    ];
    let mut vocab: Vec<&'static str> = WORDS.to_vec();
    vocab.extend(NUMBER_WORDS);
    vocab.extend(Colour::ALL.map(Colour::word));
    vocab.extend(Shape::ALL.map(Shape::word));
    vocab.extend(Shape::ALL.map(Shape::plural));
    vocab.extend((0..ALPHABET.len()).map(|i| &ALPHABET[i..i + 1]));
    vocab.sort_unstable();
    vocab.dedup();
    vocab
}

struct Cursor<'a> {
    lexemes: &'a [Lexeme],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn peek_word(&self) -> Option<&'a str> {
        match self.lexemes.get(self.pos) {
            Some(Lexeme::Word(w)) => Some(w),
            _ => None,
        }
    }

    fn unexpected(&self, expected: &'static str) -> ParseProblem {
        match self.lexemes.get(self.pos) {
            Some(l) => ParseProblem::Unexpected { position: self.pos + 1, expected, found: l.describe() },
            None => ParseProblem::Truncated { position: self.pos + 1, expected },
        }
    }

    fn word(&mut self, expected: &'static str) -> Result<&'a str, ParseProblem> {
        let w = self.peek_word().ok_or_else(|| self.unexpected(expected))?;
        self.pos += 1;
        Ok(w)
    }

    fn expect(&mut self, word: &'static str) -> Result<(), ParseProblem> {
        if self.peek_word() == Some(word) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.unexpected(word))
        }
    }

    fn eat_word(&mut self, word: &str) -> bool {
        let found = self.peek_word() == Some(word);
        self.pos += usize::from(found);
        found
    }

    fn eat_comma_then(&mut self, word: &str) -> bool {
        let matches = self.lexemes.get(self.pos) == Some(&Lexeme::Comma)
            && matches!(self.lexemes.get(self.pos + 1), Some(Lexeme::Word(w)) if w == word);
        self.pos += 2 * usize::from(matches);
        matches
    }

    fn quoted(&mut self) -> Result<String, ParseProblem> {
        let Some(Lexeme::Quoted(q)) = self.lexemes.get(self.pos) else {
            return Err(self.unexpected("text in double quotes"));
        };
        self.pos += 1;
        let text = q.to_uppercase();
        let len = text.chars().count();
        if !(1..=MAX_TEXT_LEN).contains(&len) {
            return Err(ParseProblem::TextLength { text, len });
        }
        if let Some(ch) = text.chars().find(|&c| !in_alphabet(c)) {
            return Err(ParseProblem::TextCharacter { text, ch });
        }
        Ok(text)
    }

    fn finish(&self, expected: &'static str) -> Result<(), ParseProblem> {
        if self.pos == self.lexemes.len() { Ok(()) } else { Err(self.unexpected(expected)) }
    }

    fn object(&mut self) -> Result<ObjectSpec, ParseProblem> {
        let number = match self.word("`a` or a number word (one to four)")? {
            "a" => None,
            w => match NUMBER_WORDS.iter().position(|n| *n == w) {
                Some(i) => Some(i as u8 + 1),
                None => {
                    self.pos -= 1;
                    return Err(self.unexpected("`a` or a number word (one to four)"));
                }
            },
        };
        let mut noun = self.word("a colour or a shape")?;
        let colour = Colour::from_word(noun);
        if colour.is_some() {
            noun = self.word("a shape")?;
        }
        let many = number.unwrap_or(1) > 1;
        match Shape::from_word(noun) {
            Some((shape, plural)) if plural == many => Ok(ObjectSpec { number, colour, shape }),
            _ => {
                self.pos -= 1;
                let expected = match (many, colour.is_some()) {
                    (true, _) => "a plural shape (circles, squares, triangles, crosses)",
                    (false, true) => "a shape (circle, square, triangle, cross)",
                    (false, false) => "a colour or a shape (circle, square, triangle, cross)",
                };
                Err(self.unexpected(expected))
            }
        }
    }

    fn composition(&mut self) -> Result<Spec, ParseProblem> {
        let first = self.object()?;
        let link = match self.peek_word() {
            None if self.pos == self.lexemes.len() => None,
            Some("and") => Some(Link::And),
            Some("left") => Some(Link::Relation(Relation::LeftOf)),
            Some("right") => Some(Link::Relation(Relation::RightOf)),
            Some("above") => Some(Link::Relation(Relation::Above)),
            Some("below") => Some(Link::Relation(Relation::Below)),
            _ => return Err(self.unexpected("`and`, a relation or the end of the prompt")),
        };
        let second = match link {
            None => None,
            Some(link) => {
                self.pos += 1;
                if matches!(link, Link::Relation(Relation::LeftOf | Relation::RightOf)) {
                    self.expect("of")?;
                }
                Some((link, self.object()?))
            }
        };
        self.finish("the end of the prompt")?;
        Ok(Spec::Composition(CompositionSpec { first, second }))
    }

    fn text(&mut self, template: TextTemplate) -> Result<Spec, ParseProblem> {
        let text = self.quoted()?;
        self.finish("the end of the prompt")?;
        Ok(Spec::Text(TextSpec { template, text }))
    }

    fn preference(&mut self) -> Result<Spec, ParseProblem> {
        let warmth = if self.eat_word("warm") {
            Some(Warmth::Warm)
        } else if self.eat_word("cool") {
            Some(Warmth::Cool)
        } else {
            None
        };
        let lighting = if self.eat_word("bright") {
            Some(Lighting::Bright)
        } else if self.eat_word("dark") {
            Some(Lighting::Dark)
        } else {
            None
        };
        self.expect("painting")?;
        self.expect("of")?;
        let subject = self.object()?;
        let centered = self.eat_comma_then("centered");
        let soft_background = self.eat_comma_then("soft");
        if soft_background {
            self.expect("background")?;
        }
        self.finish("`, centered`, `, soft background` or the end of the prompt")?;
        let style = Style { warmth, lighting, centered, soft_background };
        Ok(Spec::Preference(PreferenceSpec { style, subject }))
    }

    fn quality(&mut self, template: QualityTemplate) -> Result<Spec, ParseProblem> {
        let subject = self.object()?;
        self.finish("the end of the prompt")?;
        Ok(Spec::Quality(QualitySpec::Described { template, subject }))
    }

    fn prompt(&mut self) -> Result<Spec, ParseProblem> {
        const OPENING: &str = "a prompt opening (photo, sign, poster, label, sharp, clean, high, \
                               painting or a style word)";
        match self.word("`a` or `an`")? {
            "an" => {
                self.expect("image")?;
                self.finish("the end of the prompt")?;
                return Ok(Spec::Quality(QualitySpec::AnImage));
            }
            "a" => {}
            _ => {
                self.pos -= 1;
                return Err(self.unexpected("`a` or `an`"));
            }
        }
        match self.peek_word() {
            Some("photo") => {
                self.pos += 1;
                self.expect("of")?;
                self.composition()
            }
            Some("sign") => {
                self.pos += 1;
                self.expect("that")?;
                self.expect("says")?;
                self.text(TextTemplate::Sign)
            }
            Some("poster") => {
                self.pos += 1;
                self.expect("with")?;
                self.expect("the")?;
                self.expect("text")?;
                self.text(TextTemplate::Poster)
            }
            Some("label") => {
                self.pos += 1;
                self.expect("reading")?;
                self.text(TextTemplate::Label)
            }
            Some("sharp") => {
                self.pos += 1;
                self.expect("photo")?;
                self.expect("of")?;
                self.quality(QualityTemplate::SharpPhoto)
            }
            Some("clean") => {
                self.pos += 1;
                self.expect("image")?;
                self.expect("of")?;
                self.quality(QualityTemplate::CleanImage)
            }
            Some("high") => {
                self.pos += 1;
                self.expect("quality")?;
                self.expect("picture")?;
                self.expect("of")?;
                self.quality(QualityTemplate::HighQualityPicture)
            }
            Some("warm" | "cool" | "bright" | "dark" | "painting") => self.preference(),
            _ => Err(self.unexpected(OPENING)),
        }
    }
}

/// Parses prompt text into its [`Spec`]. Words are matched case-insensitively and any
/// whitespace separates them; quoted text is upper-cased.
pub fn parse(text: &str) -> Result<Spec, ParseError> {
    let fail = |problem| ParseError { prompt: text.to_string(), problem };
    let lexemes = lex(text, false).map_err(fail)?;
    Cursor { lexemes: &lexemes, pos: 0 }.prompt().map_err(fail)
}

/// The text between the first pair of double quotes, if the prompt has one (the OCR
/// reward's target before normalisation).
pub fn quoted_text(prompt: &str) -> Option<&str> {
    let start = prompt.find('"')? + 1;
    let len = prompt[start..].find('"')?;
    Some(&prompt[start..start + len])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::spec::{Family, Task};

    fn round_trip(text: &str) -> Spec {
        let spec = parse(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(spec.to_string(), text, "canonical text of {spec:?}");
        spec
    }

    #[test]
    fn composition_prompts_parse_to_their_geneval_family() {
        let cases = [
            ("a photo of a circle", Family::SingleObject),
            ("a photo of a circle and a square", Family::TwoObject),
            ("a photo of three triangles", Family::Counting),
            ("a photo of one cross", Family::Counting),
            ("a photo of a red circle", Family::Colors),
            ("a photo of a red circle and a blue square", Family::ColorAttr),
            ("a photo of a red circle left of a green triangle", Family::Position),
            ("a photo of a cross above a square", Family::Position),
        ];
        for (text, family) in cases {
            let spec = round_trip(text);
            assert_eq!(spec.family(), family, "{text}");
            assert_eq!(spec.task(), Task::Composition);
        }
        let Spec::Composition(c) = round_trip("a photo of two yellow squares right of a purple cross") else {
            panic!("not a composition prompt");
        };
        assert_eq!(c.first, ObjectSpec { number: Some(2), colour: Some(Colour::Yellow), shape: Shape::Square });
        assert_eq!(c.relation(), Some(Relation::RightOf));
        assert_eq!(c.objects()[1], ObjectSpec { number: None, colour: Some(Colour::Purple), shape: Shape::Cross });
    }

    #[test]
    fn other_tasks_round_trip() {
        let spec = round_trip("a sign that says \"A7\"");
        assert_eq!(spec, Spec::Text(TextSpec { template: TextTemplate::Sign, text: "A7".into() }));
        round_trip("a poster with the text \"Q\"");
        round_trip("a label reading \"9Z\"");
        let spec = round_trip("a warm dark painting of a red circle, centered, soft background");
        let Spec::Preference(p) = spec else { panic!("not preference") };
        assert_eq!(p.style.warmth, Some(Warmth::Warm));
        assert_eq!(p.style.lighting, Some(Lighting::Dark));
        assert!(p.style.centered && p.style.soft_background);
        round_trip("a painting of a cross, soft background");
        round_trip("a cool painting of a square");
        assert_eq!(round_trip("an image"), Spec::Quality(QualitySpec::AnImage));
        assert_eq!(round_trip("a high quality picture of a blue triangle").task(), Task::Quality);
        round_trip("a sharp photo of two circles");
        round_trip("a clean image of a square");
    }

    #[test]
    fn parsing_normalises_case_and_spacing() {
        let spec = parse("  A Photo of  a RED circle ").unwrap();
        assert_eq!(spec.to_string(), "a photo of a red circle");
        assert_eq!(parse("a sign that says \"ab\"").unwrap().to_string(), "a sign that says \"AB\"");
    }

    #[test]
    fn bad_prompts_name_the_word_at_fault() {
        let err = parse("a photo of a dog").unwrap_err();
        assert_eq!(
            err.problem,
            ParseProblem::Unexpected {
                position: 5,
                expected: "a colour or a shape (circle, square, triangle, cross)",
                found: "dog".into()
            }
        );
        assert!(err.to_string().contains("\"a photo of a dog\""), "{err}");
        let err = parse("a photo of two circle").unwrap_err();
        assert!(matches!(err.problem, ParseProblem::Unexpected { position: 5, found, .. } if found == "circle"));
        let err = parse("a photo of five circles").unwrap_err();
        assert!(matches!(err.problem, ParseProblem::Unexpected { position: 4, found, .. } if found == "five"));
        let err = parse("a photo of a red").unwrap_err();
        assert_eq!(err.problem, ParseProblem::Truncated { position: 6, expected: "a shape" });
        let err = parse("a photo of a circle near a square").unwrap_err();
        assert!(matches!(err.problem, ParseProblem::Unexpected { position: 6, .. }));
        let err = parse("a sign that says \"ABC\"").unwrap_err();
        assert_eq!(err.problem, ParseProblem::TextLength { text: "ABC".into(), len: 3 });
        let err = parse("a sign that says \"A-\"").unwrap_err();
        assert_eq!(err.problem, ParseProblem::TextCharacter { text: "A-".into(), ch: '-' });
        let err = parse("a sign that says \"AB").unwrap_err();
        assert_eq!(err.problem, ParseProblem::UnterminatedQuote);
        let err = parse("a painting of a circle, blurry").unwrap_err();
        assert!(matches!(err.problem, ParseProblem::Unexpected { position: 6, .. }));
        let err = parse("the circle").unwrap_err();
        assert!(matches!(err.problem, ParseProblem::Unexpected { position: 1, .. }));
        assert!(matches!(parse("").unwrap_err().problem, ParseProblem::Truncated { position: 1, .. }));
    }

    #[test]
    fn tokenize_splits_quoted_text_into_characters() {
        assert_eq!(tokenize("A sign that says \"ab7\""), ["a", "sign", "that", "says", "\"", "A", "B", "7", "\""]);
        assert_eq!(
            tokenize("a warm painting of a circle, centered"),
            ["a", "warm", "painting", "of", "a", "circle", ",", "centered"]
        );
        assert_eq!(tokenize("say \"x"), ["say", "\"", "X", "\""]);
    }

    #[test]
    fn vocabulary_is_sorted_unique_and_covers_the_alphabet() {
        let vocab = vocabulary();
        assert!(vocab.windows(2).all(|w| w[0] < w[1]));
        for ch in ALPHABET.chars() {
            assert!(vocab.contains(&ch.to_string().as_str()), "{ch}");
        }
        for word in ["crosses", "four", "purple", "\"", ",", "background"] {
            assert!(vocab.contains(&word), "{word}");
        }
    }

    #[test]
    fn quoted_text_takes_the_first_pair() {
        assert_eq!(quoted_text("a sign that says \"AB\" and \"CD\""), Some("AB"));
        assert_eq!(quoted_text("no quotes"), None);
        assert_eq!(quoted_text("one \" quote"), None);
    }
}
