//! The world's 5 x 7 bitmap font (`assets/font/world5x7.txt`, compiled in).
//!
//! Text is drawn at scale 1 on a fixed pitch of [`GLYPH_PITCH`] pixels (glyph plus one blank
//! column), so the longest string, [`MAX_TEXT_LEN`] characters, is 23 pixels wide and fits a
//! 32-pixel image with margins. The OCR reader ([`crate::world::read`]) matches the same
//! glyphs as templates on the same pitch.

use std::sync::OnceLock;

use thiserror::Error;

use crate::world::image::{IMAGE_SIZE, Image32, Rgb};

/// Glyph width in pixels.
pub const GLYPH_WIDTH: usize = 5;
/// Glyph height in pixels.
pub const GLYPH_HEIGHT: usize = 7;
/// Horizontal distance between the left edges of consecutive glyphs.
pub const GLYPH_PITCH: usize = GLYPH_WIDTH + 1;
/// The characters the font draws, in file order.
pub const ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
/// The longest string the world renders.
pub const MAX_TEXT_LEN: usize = 4;

const BUILTIN_SOURCE: &str = include_str!("../../assets/font/world5x7.txt");

/// Errors parsing a font file.
#[derive(Debug, Error, PartialEq)]
pub enum FontError {
    /// A line of the file breaks the format.
    #[error("font line {line}: {message}")]
    Syntax {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// One glyph: `GLYPH_HEIGHT` rows of `GLYPH_WIDTH` pixels, row-major, `true` for ink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glyph {
    /// The character drawn.
    pub ch: char,
    /// Ink pixels, row-major.
    pub ink: [bool; GLYPH_WIDTH * GLYPH_HEIGHT],
}

impl Glyph {
    /// Whether pixel `(x, y)` of the glyph is ink.
    pub fn is_ink(&self, x: usize, y: usize) -> bool {
        self.ink[y * GLYPH_WIDTH + x]
    }
}

/// A fixed-size bitmap font.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Font {
    glyphs: Vec<Glyph>,
}

impl Font {
    /// Parses the text format of `assets/font/world5x7.txt`: a line `= C` names glyph `C`,
    /// followed by `GLYPH_HEIGHT` rows of `GLYPH_WIDTH` characters (`#` ink, `.` paper);
    /// blank lines and lines starting with `# ` are comments.
    pub fn parse(source: &str) -> Result<Self, FontError> {
        let mut glyphs: Vec<Glyph> = Vec::new();
        let mut current: Option<(char, usize, Vec<bool>)> = None;
        let syntax = |line: usize, message: String| FontError::Syntax { line, message };
        for (index, raw) in source.lines().enumerate() {
            let line = index + 1;
            let text = raw.trim_end();
            if let Some((ch, start, rows)) = &mut current {
                if text.is_empty() || text.starts_with("# ") || text.starts_with('=') {
                    return Err(syntax(
                        line,
                        format!(
                            "glyph {ch:?} (line {start}) has {} rows, needs {GLYPH_HEIGHT}",
                            rows.len() / GLYPH_WIDTH
                        ),
                    ));
                }
                if text.chars().count() != GLYPH_WIDTH {
                    return Err(syntax(line, format!("row {text:?} of glyph {ch:?} is not {GLYPH_WIDTH} wide")));
                }
                for c in text.chars() {
                    match c {
                        '#' => rows.push(true),
                        '.' => rows.push(false),
                        other => return Err(syntax(line, format!("{other:?} in glyph {ch:?}; use '#' or '.'"))),
                    }
                }
                if rows.len() == GLYPH_WIDTH * GLYPH_HEIGHT {
                    let (ch, _, rows) = current.take().expect("a glyph is open");
                    let ink = rows.try_into().expect("row count checked above");
                    glyphs.push(Glyph { ch, ink });
                }
                continue;
            }
            if text.is_empty() || text.starts_with("# ") || text == "#" {
                continue;
            }
            let Some(name) = text.strip_prefix("= ") else {
                return Err(syntax(line, format!("expected `= C` to start a glyph, found {text:?}")));
            };
            let mut chars = name.chars();
            let (Some(ch), None) = (chars.next(), chars.next()) else {
                return Err(syntax(line, format!("glyph name {name:?} is not one character")));
            };
            if glyphs.iter().any(|g| g.ch == ch) {
                return Err(syntax(line, format!("glyph {ch:?} defined twice")));
            }
            current = Some((ch, line, Vec::with_capacity(GLYPH_WIDTH * GLYPH_HEIGHT)));
        }
        if let Some((ch, start, rows)) = current {
            return Err(syntax(
                start,
                format!("glyph {ch:?} ends after {} rows, needs {GLYPH_HEIGHT}", rows.len() / GLYPH_WIDTH),
            ));
        }
        Ok(Self { glyphs })
    }

    /// The shipped font, parsed once.
    pub fn builtin() -> &'static Font {
        static FONT: OnceLock<Font> = OnceLock::new();
        FONT.get_or_init(|| Font::parse(BUILTIN_SOURCE).expect("the shipped font parses (unit-tested)"))
    }

    /// The glyph drawing `ch`, if the font has one.
    pub fn glyph(&self, ch: char) -> Option<&Glyph> {
        self.glyphs.iter().find(|g| g.ch == ch)
    }

    /// All glyphs in file order.
    pub fn glyphs(&self) -> &[Glyph] {
        &self.glyphs
    }

    /// Draws `text` with its top-left corner at `(x, y)`, one glyph every [`GLYPH_PITCH`]
    /// pixels, ink pixels set to `ink`. Pixels outside the image are clipped; characters the
    /// font lacks draw as blank cells.
    pub fn draw(&self, image: &mut Image32, text: &str, x: i32, y: i32, ink: Rgb) {
        for (i, ch) in text.chars().enumerate() {
            let Some(glyph) = self.glyph(ch) else { continue };
            let left = x + (i * GLYPH_PITCH) as i32;
            for gy in 0..GLYPH_HEIGHT {
                for gx in 0..GLYPH_WIDTH {
                    let (px, py) = (left + gx as i32, y + gy as i32);
                    let inside = (0..IMAGE_SIZE as i32).contains(&px) && (0..IMAGE_SIZE as i32).contains(&py);
                    if glyph.is_ink(gx, gy) && inside {
                        image.set(px as usize, py as usize, ink);
                    }
                }
            }
        }
    }
}

/// Width in pixels of a string of `len` characters (no trailing space).
pub fn text_width(len: usize) -> usize {
    (len * GLYPH_PITCH).saturating_sub(1)
}

/// Whether the built-in font can draw `ch`.
pub fn in_alphabet(ch: char) -> bool {
    ALPHABET.contains(ch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_font_has_exactly_the_alphabet_in_order() {
        let chars: String = Font::builtin().glyphs().iter().map(|g| g.ch).collect();
        assert_eq!(chars, ALPHABET);
        assert!(text_width(MAX_TEXT_LEN) + 4 <= IMAGE_SIZE);
    }

    #[test]
    fn glyphs_differ_pairwise_in_at_least_three_pixels() {
        let glyphs = Font::builtin().glyphs();
        for (i, a) in glyphs.iter().enumerate() {
            assert!(a.ink.iter().any(|&p| p), "glyph {:?} is empty", a.ch);
            for b in &glyphs[i + 1..] {
                let d = a.ink.iter().zip(&b.ink).filter(|(p, q)| p != q).count();
                assert!(d >= 3, "{:?} and {:?} differ in {d} pixels", a.ch, b.ch);
            }
        }
    }

    #[test]
    fn malformed_fonts_are_rejected_with_the_line() {
        let short = "= A\n#####\n";
        assert_eq!(
            Font::parse(short),
            Err(FontError::Syntax { line: 1, message: "glyph 'A' ends after 1 rows, needs 7".into() })
        );
        let wide = "= A\n######\n";
        assert!(matches!(Font::parse(wide), Err(FontError::Syntax { line: 2, .. })));
        let stray = "hello\n";
        assert!(matches!(Font::parse(stray), Err(FontError::Syntax { line: 1, .. })));
        let bad = "= A\n##x##\n";
        let err = Font::parse(bad).unwrap_err().to_string();
        assert!(err.contains("'x'"), "{err}");
        let twice = format!("= A\n{}= A\n", "#####\n".repeat(7));
        assert!(Font::parse(&twice).unwrap_err().to_string().contains("defined twice"));
    }

    #[test]
    fn draw_puts_glyph_ink_on_the_pitch_grid() {
        let mut img = Image32::filled([1.0; 3]);
        Font::builtin().draw(&mut img, "LI", 2, 3, [0.0; 3]);
        // 'L' has its vertical stroke in column 0 and its foot on row 6.
        assert_eq!(img.get(2, 3), [0.0; 3]);
        assert_eq!(img.get(6, 9), [0.0; 3]);
        assert_eq!(img.get(6, 3), [1.0; 3]);
        // 'I' starts one pitch later; its stem is column 2 of the glyph.
        assert_eq!(img.get(2 + GLYPH_PITCH + 2, 6), [0.0; 3]);
        // the spacing column stays paper
        assert!((3..10).all(|y| img.get(2 + GLYPH_WIDTH, y) == [1.0; 3]));
    }
}
