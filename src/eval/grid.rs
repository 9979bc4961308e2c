//! Captioned sample grids a person can read: each tile is a sample enlarged to the grid's cell
//! size, and beneath it, on white, its prompt (upper-cased, word-wrapped to the tile width) and
//! its verdict on a line of its own: `PASS` in green, `FAIL` in red, a score in grey.
//!
//! Text is drawn with the world's 5 x 7 bitmap font ([`Font::builtin`], A-Z and 0-9) at an
//! integer scale, with the punctuation prompts use taken from a caption-only font
//! (`assets/font/caption5x7.txt`, same format); the world font itself is the OCR reader's
//! template set and stays as it is. Characters neither font has are drawn as a small box.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use image::{Rgb, RgbImage};

use crate::eval::{EvalError, TaskResult, sanitize};
use crate::world::Task;
use crate::world::font::{Font, GLYPH_HEIGHT, GLYPH_PITCH, GLYPH_WIDTH, Glyph};

const CAPTION_SOURCE: &str = include_str!("../../assets/font/caption5x7.txt");

/// Background of the caption area.
pub const PAPER: Rgb<u8> = Rgb([255, 255, 255]);
/// Ink of the prompt text.
pub const TEXT_INK: Rgb<u8> = Rgb([0, 0, 0]);
/// Ink of a `pass` verdict.
pub const PASS_INK: Rgb<u8> = Rgb([0, 150, 0]);
/// Ink of a `fail` verdict.
pub const FAIL_INK: Rgb<u8> = Rgb([210, 0, 0]);
/// Ink of any other verdict (a score).
pub const SCORE_INK: Rgb<u8> = Rgb([90, 90, 90]);
/// The lines between tiles (and the background of empty grid cells), as in
/// [`crate::world::image::rgb_grid`].
pub const SEPARATOR: Rgb<u8> = Rgb([128, 128, 128]);

/// Samples per task grid, as in [`crate::eval::write_grids`].
pub const GRID_TILES: usize = 32;
/// Tiles per grid row, as in [`crate::eval::write_grids`].
pub const GRID_COLUMNS: usize = 8;

/// The text under one tile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caption {
    /// The prompt (drawn upper-cased and word-wrapped).
    pub text: String,
    /// `pass`, `fail` or a score such as `0.734`, drawn on its own line.
    pub verdict: String,
}

impl Caption {
    pub fn new(text: impl Into<String>, verdict: impl Into<String>) -> Self {
        Self { text: text.into(), verdict: verdict.into() }
    }

    /// The colour the verdict is drawn in: green for `pass`, red for `fail` (any case), grey
    /// otherwise.
    pub fn verdict_ink(&self) -> Rgb<u8> {
        let v = self.verdict.trim();
        if v.eq_ignore_ascii_case("pass") {
            PASS_INK
        } else if v.eq_ignore_ascii_case("fail") {
            FAIL_INK
        } else {
            SCORE_INK
        }
    }
}

/// The caption of an evaluated image: composition is judged pass (metric 1) or fail (0); the
/// other tasks show their metric with three decimals.
pub fn task_caption(task: Task, prompt: &str, metric: f64) -> Caption {
    let verdict = match task {
        Task::Composition => if metric >= 0.5 { "pass" } else { "fail" }.to_string(),
        _ => format!("{metric:.3}"),
    };
    Caption::new(prompt, verdict)
}

/// The caption-only punctuation font (`assets/font/caption5x7.txt`), parsed once.
pub fn caption_font() -> &'static Font {
    static FONT: OnceLock<Font> = OnceLock::new();
    FONT.get_or_init(|| Font::parse(CAPTION_SOURCE).expect("the shipped caption font parses (unit-tested)"))
}

/// The glyph drawn for a character the fonts lack: a small box.
pub fn missing_glyph() -> &'static Glyph {
    static BOX: OnceLock<Glyph> = OnceLock::new();
    BOX.get_or_init(|| {
        let mut ink = [false; GLYPH_WIDTH * GLYPH_HEIGHT];
        for y in 1..6 {
            for x in 1..4 {
                ink[y * GLYPH_WIDTH + x] = y == 1 || y == 5 || x == 1 || x == 3;
            }
        }
        Glyph { ch: '\u{fffd}', ink }
    })
}

/// The glyph a caption draws for `ch` (already upper-cased): the world font's, else the caption
/// font's, else [`missing_glyph`]; `None` for white space.
pub fn caption_glyph(ch: char) -> Option<&'static Glyph> {
    if ch.is_whitespace() {
        return None;
    }
    Some(Font::builtin().glyph(ch).or_else(|| caption_font().glyph(ch)).unwrap_or_else(|| missing_glyph()))
}

/// Draws `text` upper-cased with its top-left corner at `(x, y)`, each font pixel a
/// `scale` x `scale` square, one glyph every `GLYPH_PITCH * scale` pixels; pixels outside the
/// image are clipped.
pub fn draw_text(image: &mut RgbImage, text: &str, x: i64, y: i64, scale: u32, ink: Rgb<u8>) {
    let s = scale.max(1) as i64;
    let (w, h) = (image.width() as i64, image.height() as i64);
    for (i, ch) in upper(text).chars().enumerate() {
        let Some(glyph) = caption_glyph(ch) else { continue };
        let left = x + i as i64 * GLYPH_PITCH as i64 * s;
        for gy in 0..GLYPH_HEIGHT {
            for gx in 0..GLYPH_WIDTH {
                if !glyph.is_ink(gx, gy) {
                    continue;
                }
                for dy in 0..s {
                    for dx in 0..s {
                        let (px, py) = (left + gx as i64 * s + dx, y + gy as i64 * s + dy);
                        if (0..w).contains(&px) && (0..h).contains(&py) {
                            image.put_pixel(px as u32, py as u32, ink);
                        }
                    }
                }
            }
        }
    }
}

/// Width in pixels of `chars` characters drawn at `scale` (no trailing spacing column).
pub fn text_width(chars: usize, scale: u32) -> u32 {
    ((chars * GLYPH_PITCH) as u32 * scale).saturating_sub(scale)
}

fn upper(text: &str) -> String {
    text.chars().flat_map(char::to_uppercase).collect()
}

/// Splits `text` (upper-cased) into lines of at most `max_chars` characters, breaking at white
/// space; a word longer than a line is cut into line-long pieces. Empty text has no lines.
pub fn wrap(text: &str, max_chars: usize) -> Vec<String> {
    let max_chars = max_chars.max(1);
    let mut lines = Vec::new();
    let mut line = String::new();
    let mut len = 0;
    for word in upper(text).split_whitespace() {
        let chars: Vec<char> = word.chars().collect();
        if len > 0 && len + 1 + chars.len() <= max_chars {
            line.push(' ');
            line.extend(&chars);
            len += 1 + chars.len();
            continue;
        }
        if len > 0 {
            lines.push(std::mem::take(&mut line));
        }
        let mut pieces = chars.chunks(max_chars).peekable();
        while let Some(piece) = pieces.next() {
            line = piece.iter().collect();
            len = piece.len();
            if pieces.peek().is_some() {
                lines.push(std::mem::take(&mut line));
            }
        }
    }
    if len > 0 {
        lines.push(line);
    }
    lines
}

/// The text scale for tiles of `cell` pixels: 1 below 96 px, 2 up to 383 px (legible under
/// the 128-pixel tiles of world samples), 3 above.
pub fn caption_scale(cell: u32) -> u32 {
    match cell {
        0..96 => 1,
        96..384 => 2,
        _ => 3,
    }
}

/// Where everything of a captioned grid lies. Tiles are `cell` wide and `tile_height` tall
/// (image on top, caption area below), separated and framed by 1-pixel [`SEPARATOR`] lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GridLayout {
    pub columns: usize,
    pub rows: usize,
    /// Side of each tile's (square) image area.
    pub cell: u32,
    /// Text scale ([`caption_scale`]).
    pub scale: u32,
    /// Padding of the caption area on every side, in pixels.
    pub margin: u32,
    /// Distance between the tops of consecutive text lines.
    pub line_height: u32,
    /// Characters per caption line.
    pub chars_per_line: usize,
    /// Text lines of the caption area (the most any tile needs).
    pub lines: usize,
    /// Extra space between the prompt and the verdict lines (0 when no tile has a verdict).
    pub verdict_gap: u32,
    /// Height of the caption area (0 when no tile has a caption).
    pub caption_height: u32,
}

impl GridLayout {
    /// The layout of `tiles` tiles captioned by `captions` (tile `i` by `captions[i]`; missing
    /// captions are empty), `columns` per row, images `cell` pixels a side.
    pub fn new(tiles: usize, captions: &[Caption], columns: usize, cell: u32) -> Self {
        let columns = columns.max(1);
        let rows = tiles.div_ceil(columns).max(1);
        let scale = caption_scale(cell);
        let margin = 2 * scale;
        let pitch = GLYPH_PITCH as u32 * scale;
        let chars_per_line = ((cell.saturating_sub(2 * margin) + scale) / pitch).max(1) as usize;
        let line_height = (GLYPH_HEIGHT as u32 + 2) * scale;
        let captions = &captions[..tiles.min(captions.len())];
        let lines = captions.iter().map(|c| wrap(&c.text, chars_per_line).len() + wrap(&c.verdict, chars_per_line).len()).max().unwrap_or(0);
        let verdict_gap = if captions.iter().any(|c| !wrap(&c.verdict, chars_per_line).is_empty()) { 3 * scale } else { 0 };
        let caption_height = if lines == 0 { 0 } else { 2 * margin + lines as u32 * line_height - 2 * scale + verdict_gap };
        Self { columns, rows, cell, scale, margin, line_height, chars_per_line, lines, verdict_gap, caption_height }
    }

    /// Height of a tile: image and caption area.
    pub fn tile_height(&self) -> u32 {
        self.cell + self.caption_height
    }

    /// Size of the whole grid.
    pub fn size(&self) -> (u32, u32) {
        (self.columns as u32 * (self.cell + 1) + 1, self.rows as u32 * (self.tile_height() + 1) + 1)
    }

    /// Top-left corner of tile `i` (its image area).
    pub fn tile_origin(&self, i: usize) -> (u32, u32) {
        ((i % self.columns) as u32 * (self.cell + 1) + 1, (i / self.columns) as u32 * (self.tile_height() + 1) + 1)
    }

    /// Tile `i`'s image area: `(x, y, width, height)`.
    pub fn image_rect(&self, i: usize) -> (u32, u32, u32, u32) {
        let (x, y) = self.tile_origin(i);
        (x, y, self.cell, self.cell)
    }

    /// Tile `i`'s caption area: `(x, y, width, height)`.
    pub fn caption_rect(&self, i: usize) -> (u32, u32, u32, u32) {
        let (x, y) = self.tile_origin(i);
        (x, y + self.cell, self.cell, self.caption_height)
    }
}

/// `image` at `cell` x `cell` pixels: enlarged by nearest neighbour (pixel `(x, y)` is source
/// pixel `(x * w / cell, y * h / cell)`, so integer factors repeat each pixel exactly), shrunk
/// with a triangle filter, as [`crate::world::image::rgb_grid`] does.
pub fn fit_to_cell(image: &RgbImage, cell: u32) -> RgbImage {
    let (w, h) = image.dimensions();
    if w == 0 || h == 0 {
        return RgbImage::from_pixel(cell, cell, PAPER);
    }
    if (w, h) == (cell, cell) {
        return image.clone();
    }
    if w <= cell && h <= cell {
        let src = |v: u32, n: u32| ((v as u64 * n as u64) / cell as u64) as u32;
        return RgbImage::from_fn(cell, cell, |x, y| *image.get_pixel(src(x, w), src(y, h)));
    }
    image::imageops::resize(image, cell, cell, image::imageops::FilterType::Triangle)
}

/// Tiles `images`, `columns` per row, each enlarged (or shrunk) to `cell` pixels a side
/// ([`fit_to_cell`]) with its caption beneath it (`captions[i]` under `images[i]`; missing
/// captions are empty, extra ones ignored); the layout is [`GridLayout::new`]'s.
pub fn captioned_grid(images: &[RgbImage], captions: &[Caption], columns: usize, cell: u32) -> RgbImage {
    let layout = GridLayout::new(images.len(), captions, columns, cell);
    let (width, height) = layout.size();
    let mut grid = RgbImage::from_pixel(width, height, SEPARATOR);
    for (i, img) in images.iter().enumerate() {
        let (x, y) = layout.tile_origin(i);
        image::imageops::replace(&mut grid, &fit_to_cell(img, cell), x as i64, y as i64);
        let (cx, cy, cw, ch) = layout.caption_rect(i);
        if ch == 0 {
            continue;
        }
        image::imageops::replace(&mut grid, &RgbImage::from_pixel(cw, ch, PAPER), cx as i64, cy as i64);
        let Some(caption) = captions.get(i) else { continue };
        let (left, top) = ((cx + layout.margin) as i64, (cy + layout.margin) as i64);
        for (l, line) in wrap(&caption.text, layout.chars_per_line).iter().enumerate() {
            draw_text(&mut grid, line, left, top + (l as u32 * layout.line_height) as i64, layout.scale, TEXT_INK);
        }
        // the verdict lines sit at the bottom of the caption area, a little apart from the
        // prompt, so a row's verdicts align
        let verdict = wrap(&caption.verdict, layout.chars_per_line);
        let first = layout.lines - verdict.len();
        for (l, line) in verdict.iter().enumerate() {
            let y = top + ((first + l) as u32 * layout.line_height + layout.verdict_gap) as i64;
            draw_text(&mut grid, line, left, y, layout.scale, caption.verdict_ink());
        }
    }
    grid
}

/// The grid cell of samples `side` pixels a side, as in [`crate::eval::write_grids`]: world
/// images enlarged 4x, large ones shown at most 256 pixels.
pub fn grid_cell(side: u32) -> u32 {
    if side <= 64 { side * 4 } else { side.min(256) }
}

/// The captions of a task result's first `n` samples ([`task_caption`]).
pub fn task_captions(result: &TaskResult, n: usize) -> Vec<Caption> {
    (0..n)
        .map(|i| {
            let prompt = result.prompts.get(i).map_or("", String::as_str);
            match result.metrics.get(i) {
                Some(&metric) => task_caption(result.task, prompt, metric),
                None => Caption::new(prompt, ""),
            }
        })
        .collect()
}

/// The captioned grid of a task's first 32 samples, 8 per row, with the cell size of
/// [`crate::eval::write_grids`]'s bare grid ([`grid_cell`]).
pub fn captioned_task_grid(result: &TaskResult) -> RgbImage {
    let n = result.images.len().min(GRID_TILES);
    let side = result.images.first().map_or(32, |i| i.width().max(i.height()));
    captioned_grid(&result.images[..n], &task_captions(result, n), GRID_COLUMNS, grid_cell(side))
}

/// File name of the captioned grid of `model`'s `task` samples: `captioned_<model>_<task>.png`
/// (the bare grid's is `grid_<model>_<task>.png`).
pub fn captioned_grid_name(model: &str, task: Task) -> String {
    format!("captioned_{}_{}.png", sanitize(model), task.name())
}

/// Writes the captioned grid of each task of `results` into `dir` (beside
/// [`crate::eval::write_grids`]'s bare grids) through temporary files; returns the paths.
pub fn write_captioned_grids(dir: &Path, model: &str, results: &[TaskResult]) -> Result<Vec<PathBuf>, EvalError> {
    std::fs::create_dir_all(dir).map_err(|e| EvalError::Output { path: dir.to_path_buf(), message: e.to_string() })?;
    results
        .iter()
        .map(|r| {
            let png = dir.join(captioned_grid_name(model, r.task));
            crate::io::write_png_atomic(&png, &captioned_task_grid(r))
                .map_err(|e| EvalError::Output { path: png.clone(), message: e.to_string() })?;
            Ok(png)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::font::ALPHABET;

    #[test]
    fn caption_font_parses_and_only_adds_punctuation() {
        let font = caption_font();
        for ch in "\"',.-:;+/()=?!%&_*#<>[]@$|~\\".chars() {
            assert!(font.glyph(ch).is_some(), "caption font lacks {ch:?}");
        }
        for g in font.glyphs() {
            assert!(!ALPHABET.contains(g.ch), "{:?} would shadow the world font", g.ch);
            assert!(g.ink.iter().any(|&p| p), "glyph {:?} is empty", g.ch);
        }
        // every character of every shipped prompt has a real glyph (no boxes)
        for split in crate::world::prompts::Split::ALL {
            for p in crate::world::prompts::shipped_prompts(split) {
                for ch in upper(&p.text).chars().filter(|c| !c.is_whitespace()) {
                    assert_ne!(caption_glyph(ch), Some(missing_glyph()), "{ch:?} in {:?}", p.text);
                }
            }
        }
        assert_eq!(caption_glyph('\u{263a}'), Some(missing_glyph()));
        assert_eq!(caption_glyph(' '), None);
    }

    #[test]
    fn wrap_breaks_at_spaces_and_cuts_long_words() {
        assert_eq!(wrap("a photo of two circles", 10), ["A PHOTO OF", "TWO", "CIRCLES"]);
        assert_eq!(wrap("abcdefghijklmnop x", 5), ["ABCDE", "FGHIJ", "KLMNO", "P X"]);
        assert!(wrap("   ", 4).is_empty());
        assert_eq!(wrap("0.734", 10), ["0.734"]);
    }
}
