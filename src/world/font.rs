//! The world's 5 x 7 bitmap font (`assets/font/world5x7.txt`, compiled in).
//!
//! The world draws text at [`TEXT_SCALE`] (each font pixel a 2 x 2 block, so a glyph is 10 x 14
//! pixels) on a fixed pitch of [`TEXT_PITCH`] pixels (glyph plus a blank column), so the
//! longest string, [`MAX_TEXT_LEN`] characters, is 22 pixels wide and fits a 32-pixel image
//! with margins. The OCR reader ([`crate::world::read`]) matches the same glyphs, scaled the
//! same way, as templates on the same pitch.
//!
//! Why scale 2: at scale 1 a glyph's strokes are one pixel wide, finer than the world codec's
//! 2 x 2 latent pixels and the transformer's 4 x 4-pixel patches, and no base pre-trained on
//! the CPU (nor a GPU base with five times the images) drew legible glyphs
//! (docs/experiments/world_calibration.md).

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
pub const MAX_TEXT_LEN: usize = 2;
/// Side in image pixels of one font pixel when the world draws text.
pub const TEXT_SCALE: usize = 2;
/// Width in image pixels of a glyph as the world draws it.
pub const TEXT_GLYPH_WIDTH: usize = GLYPH_WIDTH * TEXT_SCALE;
/// Height in image pixels of a line of text as the world draws it.
pub const TEXT_HEIGHT: usize = GLYPH_HEIGHT * TEXT_SCALE;
/// Horizontal distance in image pixels between the left edges of consecutive drawn glyphs.
pub const TEXT_PITCH: usize = GLYPH_PITCH * TEXT_SCALE;

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

    /// Whether pixel `(x, y)` of the glyph as the world draws it ([`TEXT_GLYPH_WIDTH`] x
    /// [`TEXT_HEIGHT`], each font pixel a [`TEXT_SCALE`] x [`TEXT_SCALE`] block) is ink.
    pub fn is_drawn_ink(&self, x: usize, y: usize) -> bool {
        self.is_ink(x / TEXT_SCALE, y / TEXT_SCALE)
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

    /// Draws `text` as the world does, with its top-left corner at `(x, y)`: each font pixel a
    /// [`TEXT_SCALE`] x [`TEXT_SCALE`] block, one glyph every [`TEXT_PITCH`] pixels, ink pixels
    /// set to `ink`. Pixels outside the image are clipped; characters the font lacks draw as
    /// blank cells.
    pub fn draw(&self, image: &mut Image32, text: &str, x: i32, y: i32, ink: Rgb) {
        for (i, ch) in text.chars().enumerate() {
            let Some(glyph) = self.glyph(ch) else { continue };
            let left = x + (i * TEXT_PITCH) as i32;
            for py in y..y + (TEXT_HEIGHT as i32) {
                for px in left..left + TEXT_GLYPH_WIDTH as i32 {
                    let inside = (0..IMAGE_SIZE as i32).contains(&px) && (0..IMAGE_SIZE as i32).contains(&py);
                    if inside && glyph.is_drawn_ink((px - left) as usize, (py - y) as usize) {
                        image.set(px as usize, py as usize, ink);
                    }
                }
            }
        }
    }
}

/// Width in image pixels of a string of `len` characters as the world draws it (no trailing
/// space).
pub fn text_width(len: usize) -> usize {
    (len * TEXT_PITCH).saturating_sub(TEXT_SCALE)
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
        // 'L' has its vertical stroke in font column 0 and its foot on font row 6; each font
        // pixel is a 2 x 2 block of image pixels.
        for (x, y) in [(2, 3), (3, 4), (2, 15), (10, 16), (11, 16)] {
            assert_eq!(img.get(x, y), [0.0; 3], "({x}, {y})");
        }
        assert_eq!(img.get(10, 3), [1.0; 3]);
        assert_eq!(img.get(4, 3), [1.0; 3]);
        // 'I' starts one pitch (12 pixels) later; its stem is font column 2 (image columns 4-5).
        assert_eq!(img.get(2 + TEXT_PITCH + 4, 9), [0.0; 3]);
        assert_eq!(img.get(2 + TEXT_PITCH + 5, 9), [0.0; 3]);
        // the spacing columns stay paper
        assert!((3..17).all(|y| img.get(2 + TEXT_GLYPH_WIDTH, y) == [1.0; 3] && img.get(3 + TEXT_GLYPH_WIDTH, y) == [1.0; 3]));
        // nothing is drawn below the line
        assert!((0..IMAGE_SIZE).all(|x| img.get(x, 3 + TEXT_HEIGHT) == [1.0; 3]));
    }
}
