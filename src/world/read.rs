//! The world's text reader: template matching against the built-in font (the stand-in for the
//! OCR model of the paper's OCR reward).
//!
//! 1. The paper is a plane fitted robustly to the luminance (solid, gradient and lightly noisy
//!    backgrounds all are); the ink is the side of the residual, darker or lighter, with more
//!    outlying mass, so dark-on-light and light-on-dark text both read. Ink contrast below
//!    [`MIN_CONTRAST`] reads as empty.
//! 2. Every pixel gets a soft ink value `p = clamp(residual / contrast, 0, 1)`.
//! 3. The text line is the [`TEXT_HEIGHT`]-row band with the most ink (and its neighbours one
//!    row up and down). Along it, cells of [`TEXT_PITCH`] columns are laid at each of the
//!    twelve phases; each cell takes the template (a glyph, or blank) with the least squared
//!    error to `p`, its spacing column counting as paper. The band and phase with the least
//!    total error win.
//! 4. The text is the winning cells' glyphs, skipping blank cells and cells whose best glyph
//!    still misses more than [`MAX_CELL_ERROR`] of its pixels. An image with more than
//!    [`MAX_STRAY_INK`] mean ink outside the line is not text on paper and reads as empty.

use crate::world::font::{Font, Glyph, TEXT_GLYPH_WIDTH, TEXT_HEIGHT, TEXT_PITCH, text_width};
use crate::world::image::{IMAGE_SIZE, Image32, PIXELS};

/// Minimum luminance difference between ink and paper for text to be read.
pub const MIN_CONTRAST: f32 = 0.2;
/// Pixels within this luminance of the fitted paper plane count as paper when refitting it.
pub const PAPER_TOLERANCE: f32 = 0.15;
/// Largest squared error of an accepted glyph, as a fraction of its pixels (7 of its 35 font
/// pixels wholly wrong).
pub const MAX_CELL_ERROR: f32 = 0.2;
/// Largest mean ink value outside the text line for the image to count as text on paper
/// (noise and clutter read as nothing).
pub const MAX_STRAY_INK: f32 = 0.1;

const CELL_PIXELS: usize = TEXT_GLYPH_WIDTH * TEXT_HEIGHT;

/// A glyph as the world draws it ([`Glyph::is_drawn_ink`]), row-major 0/1.
fn scaled(glyph: &Glyph) -> [f32; CELL_PIXELS] {
    std::array::from_fn(|i| {
        let (x, y) = (i % TEXT_GLYPH_WIDTH, i / TEXT_GLYPH_WIDTH);
        f32::from(glyph.is_drawn_ink(x, y))
    })
}

/// The cells of a line: the best glyph of each and its squared error, `None` for blank cells.
type Cells = Vec<Option<(char, f32)>>;

/// Reads the text of an image (an empty string if none is found).
pub fn read_text(image: &Image32) -> String {
    let Some(ink) = ink_map(image) else { return String::new() };
    let rows: Vec<f32> = (0..IMAGE_SIZE).map(|y| ink[y * IMAGE_SIZE..(y + 1) * IMAGE_SIZE].iter().sum()).collect();
    let last_top = IMAGE_SIZE - TEXT_HEIGHT;
    let band = |top: usize| rows[top..top + TEXT_HEIGHT].iter().sum::<f32>();
    let densest = (0..=last_top).max_by(|&a, &b| band(a).total_cmp(&band(b))).expect("the image has rows");
    let templates = templates();
    let mut best: Option<(f32, usize, Cells)> = None;
    for top in densest.saturating_sub(1)..=(densest + 1).min(last_top) {
        for phase in 0..TEXT_PITCH {
            let (error, cells) = read_line(&ink, top, phase, &templates);
            if best.as_ref().is_none_or(|(e, ..)| error < *e) {
                best = Some((error, top, cells));
            }
        }
    }
    let (_, top, cells) = best.expect("at least one band and phase were tried");
    let outside: f32 = (0..IMAGE_SIZE).filter(|y| !(top..top + TEXT_HEIGHT).contains(y)).map(|y| rows[y]).sum();
    if outside / ((IMAGE_SIZE - TEXT_HEIGHT) * IMAGE_SIZE) as f32 > MAX_STRAY_INK {
        return String::new();
    }
    cells
        .into_iter()
        .flatten()
        .filter(|&(_, error)| error <= MAX_CELL_ERROR * CELL_PIXELS as f32)
        .map(|(ch, _)| ch)
        .collect()
}

/// Dense partial credit for rendering `target` (the OCR reward's training value, as GenEval's
/// training reward gives partial credit): the best placement of the target's glyphs on the
/// image's soft ink map (any row, any column), scored by the mean per-glyph template
/// agreement `1 - ||ink_cell - glyph||^2 / cell pixels`, minus the mean ink outside the placed cells
/// (clutter). 1 for a clean render of `target`, 0 for an image without ink or an empty target.
/// Characters are matched case-insensitively; one the font lacks counts as a blank cell.
pub fn text_likeness(image: &Image32, target: &str) -> f32 {
    let glyphs: Vec<[f32; CELL_PIXELS]> = target
        .chars()
        .filter(|c| !c.is_whitespace())
        .map(|c| {
            let upper = c.to_ascii_uppercase();
            Font::builtin().glyph(upper).map_or([0.0; CELL_PIXELS], scaled)
        })
        .collect();
    let Some(ink) = ink_map(image) else { return 0.0 };
    if glyphs.is_empty() {
        return 0.0;
    }
    let width = text_width(glyphs.len());
    if width > IMAGE_SIZE {
        return 0.0;
    }
    let total_ink: f32 = ink.iter().sum();
    let mut best = 0.0f32;
    for top in 0..=IMAGE_SIZE - TEXT_HEIGHT {
        for left in 0..=IMAGE_SIZE - width {
            let mut agreement = 0.0;
            let mut inside = 0.0;
            for (k, glyph) in glyphs.iter().enumerate() {
                let x0 = left + k * TEXT_PITCH;
                let mut error = 0.0;
                for gy in 0..TEXT_HEIGHT {
                    for gx in 0..TEXT_GLYPH_WIDTH {
                        let p = ink[(top + gy) * IMAGE_SIZE + x0 + gx];
                        inside += p;
                        error += (p - glyph[gy * TEXT_GLYPH_WIDTH + gx]).powi(2);
                    }
                }
                agreement += 1.0 - error / CELL_PIXELS as f32;
            }
            let outside = (total_ink - inside).max(0.0) / (PIXELS - glyphs.len() * CELL_PIXELS) as f32;
            best = best.max(agreement / glyphs.len() as f32 - outside);
        }
    }
    best.clamp(0.0, 1.0)
}

/// The soft ink value of every pixel, or `None` for an image without ink.
fn ink_map(image: &Image32) -> Option<Vec<f32>> {
    let lum = image.luminance();
    let paper = paper_plane(&lum);
    let residual: Vec<f32> = lum.iter().zip(&paper).map(|(l, p)| l - p).collect();
    // the side (darker or lighter than the paper) with more outlying mass is ink
    let mass = |sign: f32| residual.iter().map(|r| (sign * r - PAPER_TOLERANCE).max(0.0)).sum::<f32>();
    let sign = if mass(-1.0) >= mass(1.0) { -1.0 } else { 1.0 };
    let strongest = residual.iter().map(|r| sign * r).fold(0.0f32, f32::max);
    let strong: Vec<f32> = residual.iter().map(|r| sign * r).filter(|&r| r > 0.5 * strongest).collect();
    let contrast = strong.iter().sum::<f32>() / strong.len().max(1) as f32;
    if contrast < MIN_CONTRAST {
        return None;
    }
    Some(residual.iter().map(|r| (sign * r / contrast).clamp(0.0, 1.0)).collect())
}

/// Paper luminance at every pixel: a plane `a + b x + c y` fitted by least squares, refitted
/// twice on the pixels within [`PAPER_TOLERANCE`] of the previous fit (so the ink drops out).
/// Solid, gradient and lightly noisy backgrounds are all planes up to the noise.
fn paper_plane(lum: &[f32]) -> Vec<f32> {
    let coords = |i: usize| ((i % IMAGE_SIZE) as f64 - 15.5, (i / IMAGE_SIZE) as f64 - 15.5);
    let mut plane = [lum.iter().map(|&v| f64::from(v)).sum::<f64>() / PIXELS as f64, 0.0, 0.0];
    let eval = |plane: &[f64; 3], i: usize| {
        let (x, y) = coords(i);
        (plane[0] + plane[1] * x + plane[2] * y) as f32
    };
    for round in 0..3 {
        // normal equations of the fit over the kept pixels
        let mut m = [[0f64; 3]; 3];
        let mut v = [0f64; 3];
        for (i, &l) in lum.iter().enumerate() {
            if round > 0 && (l - eval(&plane, i)).abs() > PAPER_TOLERANCE {
                continue;
            }
            let (x, y) = coords(i);
            let basis = [1.0, x, y];
            for r in 0..3 {
                for c in 0..3 {
                    m[r][c] += basis[r] * basis[c];
                }
                v[r] += basis[r] * f64::from(l);
            }
        }
        match solve3(m, v) {
            Some(p) => plane = p,
            None => break,
        }
    }
    (0..PIXELS).map(|i| eval(&plane, i)).collect()
}

/// Solves the 3 x 3 system `m p = v` by Cramer's rule; `None` if it is (nearly) singular.
fn solve3(m: [[f64; 3]; 3], v: [f64; 3]) -> Option<[f64; 3]> {
    let det = |a: [[f64; 3]; 3]| {
        a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1]) - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
            + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0])
    };
    let d = det(m);
    if d.abs() < 1e-9 {
        return None;
    }
    let mut out = [0.0; 3];
    for (k, o) in out.iter_mut().enumerate() {
        let mut a = m;
        for r in 0..3 {
            a[r][k] = v[r];
        }
        *o = det(a) / d;
    }
    Some(out)
}

/// Glyph templates as 0/1 values, plus the blank template (`None`).
fn templates() -> Vec<(Option<char>, [f32; CELL_PIXELS])> {
    let mut out: Vec<(Option<char>, [f32; CELL_PIXELS])> =
        Font::builtin().glyphs().iter().map(|g| (Some(g.ch), scaled(g))).collect();
    out.push((None, [0.0; CELL_PIXELS]));
    out
}

/// Reads the line whose glyph tops are on row `top`, cells starting at columns
/// `phase - TEXT_PITCH + k * TEXT_PITCH`. Returns the total error and, per cell, the best
/// glyph and its error (`None` for blank cells).
fn read_line(ink: &[f32], top: usize, phase: usize, templates: &[(Option<char>, [f32; CELL_PIXELS])]) -> (f32, Cells) {
    let at = |x: i32, y: usize| {
        if (0..IMAGE_SIZE as i32).contains(&x) { ink[y * IMAGE_SIZE + x as usize] } else { 0.0 }
    };
    let mut total = 0.0;
    let mut cells = Vec::new();
    let mut left = phase as i32 - TEXT_PITCH as i32;
    while left < IMAGE_SIZE as i32 {
        let mut cell = [0f32; CELL_PIXELS];
        for gy in 0..TEXT_HEIGHT {
            for gx in 0..TEXT_GLYPH_WIDTH {
                cell[gy * TEXT_GLYPH_WIDTH + gx] = at(left + gx as i32, top + gy);
            }
        }
        let spacing: f32 = (0..TEXT_HEIGHT)
            .map(|gy| (TEXT_GLYPH_WIDTH..TEXT_PITCH).map(|gx| at(left + gx as i32, top + gy).powi(2)).sum::<f32>())
            .sum();
        let (ch, error) = templates
            .iter()
            .map(|(ch, t)| (*ch, t.iter().zip(&cell).map(|(a, b)| (a - b).powi(2)).sum::<f32>()))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .expect("there are templates");
        total += error + spacing;
        cells.push(ch.map(|c| (c, error)));
        left += TEXT_PITCH as i32;
    }
    (total, cells)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::Spec;
    use crate::world::font::ALPHABET;
    use crate::world::random::gaussian;
    use crate::world::render::{Background, PlacedText, Scene, layout};
    use crate::world::prompts::{Split, TEST_PROMPTS_PER_TASK, TRAIN_PROMPTS_PER_TASK, shipped_prompts};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn text_image(text: &str, x: i32, y: i32, background: Background, ink: [f32; 3]) -> Image32 {
        let text = Some(PlacedText { text: text.into(), x, y, ink });
        Scene { background, objects: Vec::new(), text }.draw()
    }

    #[test]
    fn text_likeness_is_one_for_the_target_and_lower_for_anything_else() {
        let paper = Background::Solid([0.9; 3]);
        let right = text_image("A3", 7, 9, paper.clone(), [0.1; 3]);
        assert!((text_likeness(&right, "a3") - 1.0).abs() < 1e-4, "{}", text_likeness(&right, "a3"));
        let wrong = text_image("X7", 7, 9, paper.clone(), [0.1; 3]);
        assert!(text_likeness(&wrong, "a3") < 0.9, "{}", text_likeness(&wrong, "a3"));
        assert_eq!(text_likeness(&text_image("", 0, 0, paper.clone(), [0.1; 3]), "a3"), 0.0, "no ink");
        // erasing glyph pixels one column at a time lowers the credit step by step
        let mut previous = 1.0;
        for columns in 1..=3 {
            let mut damaged = right.clone();
            for x in 7..7 + columns {
                for y in 9..9 + TEXT_HEIGHT {
                    damaged.set(x, y, [0.9; 3]);
                }
            }
            let value = text_likeness(&damaged, "a3");
            assert!(value < previous && value > 0.5, "{columns} columns erased: {value} (before {previous})");
            previous = value;
        }
        // clutter away from the text costs credit
        let mut cluttered = right.clone();
        for x in 0..32 {
            for y in 26..32 {
                cluttered.set(x, y, [0.1; 3]);
            }
        }
        assert!(text_likeness(&cluttered, "a3") < 0.9);
    }

    #[test]
    fn every_glyph_reads_alone_at_every_position() {
        for ch in ALPHABET.chars() {
            for x in [0, 3, 13, 22] {
                for y in [0, 9, 18] {
                    let img = text_image(&ch.to_string(), x, y, Background::Solid([0.9; 3]), [0.1; 3]);
                    assert_eq!(read_text(&img), ch.to_string(), "{ch:?} at ({x}, {y})");
                }
            }
        }
    }

    #[test]
    fn every_glyph_reads_in_context_and_in_both_polarities() {
        // each glyph between every other glyph, light on dark and dark on light
        let chars: Vec<char> = ALPHABET.chars().collect();
        for (i, &c) in chars.iter().enumerate() {
            for (j, &d) in chars.iter().enumerate() {
                // the neighbour on the left or on the right (two characters fit a line)
                let text: String = if (i + j) % 3 == 0 { [c, d].iter().collect() } else { [d, c].iter().collect() };
                let (bg, ink) =
                    if (i + j) % 2 == 0 { ([0.92, 0.9, 0.85], [0.05, 0.05, 0.2]) } else { ([0.1; 3], [0.95; 3]) };
                let x = 2 + ((i * 7 + j) % (32 - 4 - text_width(2))) as i32;
                let img = text_image(&text, x, 9, Background::Solid(bg), ink);
                assert_eq!(read_text(&img), text);
            }
        }
    }

    #[test]
    fn every_shipped_text_prompt_renders_and_reads_exactly() {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let mut checked = 0;
        for split in Split::ALL {
            for prompt in shipped_prompts(split) {
                let Spec::Text(t) = &prompt.spec else { continue };
                for _ in 0..2 {
                    let img = layout(&prompt.spec, &mut rng).draw();
                    assert_eq!(read_text(&img), t.text, "{:?}", prompt.text);
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 2 * (TRAIN_PROMPTS_PER_TASK + TEST_PROMPTS_PER_TASK));
    }

    #[test]
    fn blank_gradient_and_noise_images_read_as_nothing_or_little() {
        assert_eq!(read_text(&Image32::filled([0.5; 3])), "");
        let gradient = Background::Gradient {
            from: [0.1; 3],
            to: [0.9; 3],
            direction: crate::world::render::GradientDirection::Horizontal,
        };
        assert_eq!(read_text(&gradient.draw()), "");
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut total = 0;
        for _ in 0..100 {
            let noise = Image32::from_fn(|_, _| {
                let v = (0.5 + 0.3 * gaussian(&mut rng)).clamp(0.0, 1.0);
                [v, v, v]
            });
            total += read_text(&noise).len();
        }
        assert!(total == 0, "pure noise read as {total} characters over 100 images");
    }

    #[test]
    fn mild_blur_still_reads() {
        // a 3-tap horizontal blur, what a sampler's output looks like at worst in training
        let img = text_image("K7", 4, 10, Background::Solid([0.9; 3]), [0.1; 3]);
        let blurred = Image32::from_fn(|x, y| {
            let at = |x: usize| img.get(x.min(IMAGE_SIZE - 1), y);
            let (l, c, r) = (at(x.saturating_sub(1)), at(x), at(x + 1));
            [0, 1, 2].map(|k| 0.2 * l[k] + 0.6 * c[k] + 0.2 * r[k])
        });
        assert_eq!(read_text(&blurred), "K7");
    }
}
