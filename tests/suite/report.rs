//! Captioned sample grids (`flow_opd::eval::grid`) and the run report (`flow_opd::eval::report`).

use std::path::Path;

use flow_opd::eval::grid::{
    Caption, FAIL_INK, GridLayout, PAPER, PASS_INK, SCORE_INK, SEPARATOR, TEXT_INK, captioned_grid, captioned_grid_name,
    captioned_task_grid, task_caption, text_width, wrap, write_captioned_grids,
};
use flow_opd::eval::report::{ReportError, render_report, write_report};
use flow_opd::eval::{EvalRow, ResultsTable, StdErrors, TaskResult};
use flow_opd::world::Task;
use flow_opd::world::font::{Font, GLYPH_HEIGHT, GLYPH_PITCH, GLYPH_WIDTH};
use image::{Rgb, RgbImage};

/// A 32 x 32 image of muted colours (never white, black, the verdict inks or the separator),
/// different for each `seed`.
fn sample(seed: u32) -> RgbImage {
    RgbImage::from_fn(32, 32, |x, y| {
        let v = (x * 7 + y * 13 + seed * 31) % 97;
        Rgb([60 + v as u8, 40 + ((v * 3) % 90) as u8, 100 + ((v * 5) % 80) as u8])
    })
}

const LONG: &str = "a cool dark painting of a blue square, centered, soft background, supercalifragilisticexpialidocious";

/// Every pixel of the grid outside the tiles' image and caption areas is separator grey.
fn assert_separators_untouched(grid: &RgbImage, layout: &GridLayout, tiles: usize) {
    let inside = |x: u32, y: u32| {
        (0..tiles).any(|i| {
            let (ix, iy, _, _) = layout.image_rect(i);
            x >= ix && x < ix + layout.cell && y >= iy && y < iy + layout.tile_height()
        })
    };
    for (x, y, p) in grid.enumerate_pixels() {
        if !inside(x, y) {
            assert_eq!(*p, SEPARATOR, "pixel ({x}, {y}) outside every tile");
        }
    }
}

/// The non-paper pixels of `rect` with their coordinates.
fn ink_in(grid: &RgbImage, (x0, y0, w, h): (u32, u32, u32, u32)) -> Vec<(u32, u32, Rgb<u8>)> {
    let mut out = Vec::new();
    for y in y0..y0 + h {
        for x in x0..x0 + w {
            let p = *grid.get_pixel(x, y);
            if p != PAPER {
                out.push((x, y, p));
            }
        }
    }
    out
}

#[test]
fn image_area_is_the_exact_nearest_neighbour_upscale() {
    let images: Vec<RgbImage> = (0..11).map(sample).collect();
    let captions: Vec<Caption> = (0..11).map(|i| Caption::new(LONG, if i % 2 == 0 { "pass" } else { "0.250" })).collect();
    let grid = captioned_grid(&images, &captions, 4, 128);
    let layout = GridLayout::new(images.len(), &captions, 4, 128);
    assert_eq!(grid.dimensions(), layout.size());
    assert_eq!(layout.size(), (4 * 129 + 1, 3 * (128 + layout.caption_height + 1) + 1));
    for (i, img) in images.iter().enumerate() {
        let (x0, y0, w, h) = layout.image_rect(i);
        assert_eq!((w, h), (128, 128));
        for y in 0..128 {
            for x in 0..128 {
                assert_eq!(grid.get_pixel(x0 + x, y0 + y), img.get_pixel(x / 4, y / 4), "tile {i} pixel ({x}, {y})");
            }
        }
    }
    // the last row's empty cells stay grey, like the separators
    assert_separators_untouched(&grid, &layout, images.len());
}

#[test]
fn caption_ink_lies_only_below_the_image_area() {
    let images: Vec<RgbImage> = (0..6).map(sample).collect();
    let captions: Vec<Caption> = (0..6).map(|i| Caption::new(format!("a photo of {i} circles, \"AB\""), "fail")).collect();
    let grid = captioned_grid(&images, &captions, 3, 128);
    let layout = GridLayout::new(6, &captions, 3, 128);
    assert!(layout.caption_height > 0);
    // the same images without any caption: the image areas are identical, pixel for pixel
    let bare = captioned_grid(&images, &[], 3, 128);
    let bare_layout = GridLayout::new(6, &[], 3, 128);
    assert_eq!(bare_layout.caption_height, 0);
    for i in 0..6 {
        let (x, y, w, h) = layout.image_rect(i);
        let (bx, by, _, _) = bare_layout.image_rect(i);
        for dy in 0..h {
            for dx in 0..w {
                assert_eq!(grid.get_pixel(x + dx, y + dy), bare.get_pixel(bx + dx, by + dy));
            }
        }
        // the caption area starts right under the image and holds ink of the text colours only
        let rect = layout.caption_rect(i);
        assert_eq!(rect.1, y + h);
        let ink = ink_in(&grid, rect);
        assert!(ink.len() > 100, "tile {i} has {} ink pixels", ink.len());
        assert!(ink.iter().all(|(_, _, p)| *p == TEXT_INK || *p == FAIL_INK), "tile {i}");
        // nothing within the padding
        assert!(ink.iter().all(|&(x, y, _)| x >= rect.0 + layout.margin && y >= rect.1 + layout.margin), "tile {i}");
    }
    assert_separators_untouched(&grid, &layout, 6);
}

#[test]
fn wrapped_captions_never_exceed_the_tile_width() {
    for cell in [32, 64, 128, 256] {
        let images: Vec<RgbImage> = (0..4).map(sample).collect();
        let captions = vec![Caption::new(LONG, "0.123"); 4];
        let grid = captioned_grid(&images, &captions, 2, cell);
        let layout = GridLayout::new(4, &captions, 2, cell);
        assert!(text_width(layout.chars_per_line, layout.scale) <= cell - 2 * layout.margin, "cell {cell}");
        // one more character per line would not fit
        assert!(text_width(layout.chars_per_line + 1, layout.scale) > cell - 2 * layout.margin, "cell {cell}");
        let lines = wrap(LONG, layout.chars_per_line);
        assert!(lines.iter().all(|l| l.chars().count() <= layout.chars_per_line), "{lines:?}");
        // no word is lost: the lines hold the prompt's characters in order
        let joined: String = lines.concat().chars().filter(|c| !c.is_whitespace()).collect();
        let expected: String = LONG.to_uppercase().chars().filter(|c| !c.is_whitespace()).collect();
        assert_eq!(joined, expected);
        assert_eq!(layout.lines, lines.len() + wrap("0.123", layout.chars_per_line).len());
        for i in 0..4 {
            let (x0, _, w, _) = layout.caption_rect(i);
            for (x, y, _) in ink_in(&grid, layout.caption_rect(i)) {
                assert!(x >= x0 + layout.margin && x < x0 + w - layout.margin, "cell {cell} tile {i}: ink at ({x}, {y})");
            }
        }
        assert_separators_untouched(&grid, &layout, 4);
    }
    // 128-pixel tiles of world samples get 2x text
    assert_eq!(GridLayout::new(1, &[Caption::new("a", "")], 8, 128).scale, 2);
}

#[test]
fn pass_is_green_fail_is_red_and_scores_are_grey() {
    assert!(PASS_INK[1] as u32 > PASS_INK[0] as u32 + 80 && PASS_INK[1] as u32 > PASS_INK[2] as u32 + 80);
    assert!(FAIL_INK[0] as u32 > FAIL_INK[1] as u32 + 80 && FAIL_INK[0] as u32 > FAIL_INK[2] as u32 + 80);
    assert!(SCORE_INK[0] == SCORE_INK[1] && SCORE_INK[1] == SCORE_INK[2]);
    let images: Vec<RgbImage> = (0..3).map(sample).collect();
    let captions = vec![Caption::new("a photo of a cross", "pass"), Caption::new("a photo of a cross", "fail"), Caption::new("a photo of a cross", "0.734")];
    let grid = captioned_grid(&images, &captions, 3, 128);
    let layout = GridLayout::new(3, &captions, 3, 128);
    for (i, verdict_ink) in [PASS_INK, FAIL_INK, SCORE_INK].into_iter().enumerate() {
        let (x, y, w, h) = layout.caption_rect(i);
        // the verdict is the caption's last line, at the bottom; the prompt lines above it are black
        let verdict_top = y + h - layout.margin - GLYPH_HEIGHT as u32 * layout.scale;
        assert!(layout.verdict_gap > 0);
        let verdict = ink_in(&grid, (x, verdict_top, w, y + h - verdict_top));
        let prompt = ink_in(&grid, (x, y, w, verdict_top - y));
        assert!(verdict.len() > 50 && verdict.iter().all(|(_, _, p)| *p == verdict_ink), "tile {i}");
        assert!(prompt.len() > 50 && prompt.iter().all(|(_, _, p)| *p == TEXT_INK), "tile {i}");
    }
}

#[test]
fn text_is_drawn_with_the_world_font_at_integer_scale() {
    let captions = vec![Caption::new("ab,", "")];
    let grid = captioned_grid(&[sample(0)], &captions, 1, 128);
    let layout = GridLayout::new(1, &captions, 1, 128);
    let (x, y, _, _) = layout.caption_rect(0);
    let (left, top, s) = (x + layout.margin, y + layout.margin, layout.scale);
    assert_eq!(s, 2);
    // lower-case letters are drawn as the world font's capitals, every font pixel an s x s block
    for (k, ch) in ['A', 'B'].into_iter().enumerate() {
        let glyph = Font::builtin().glyph(ch).unwrap();
        for gy in 0..GLYPH_HEIGHT as u32 {
            for gx in 0..GLYPH_WIDTH as u32 {
                let want = if glyph.is_ink(gx as usize, gy as usize) { TEXT_INK } else { PAPER };
                for (dx, dy) in [(0, 0), (s - 1, 0), (0, s - 1), (s - 1, s - 1)] {
                    let px = left + (k as u32 * GLYPH_PITCH as u32 + gx) * s + dx;
                    assert_eq!(*grid.get_pixel(px, top + gy * s + dy), want, "{ch} ({gx}, {gy})");
                }
            }
        }
    }
    // the comma (caption font) has ink in its cell; a character no font has draws a box
    let comma = (left + 2 * GLYPH_PITCH as u32 * s, top, GLYPH_WIDTH as u32 * s, GLYPH_HEIGHT as u32 * s);
    assert!(!ink_in(&grid, comma).is_empty());
    let boxed = captioned_grid(&[sample(0)], &[Caption::new("\u{263a}", "")], 1, 128);
    let (bx, by, _, _) = layout.caption_rect(0);
    assert!(!ink_in(&boxed, (bx + layout.margin, by + layout.margin, GLYPH_WIDTH as u32 * s, GLYPH_HEIGHT as u32 * s)).is_empty());
}

fn task_result(task: Task, n: usize, side: u32) -> TaskResult {
    TaskResult {
        task,
        metrics: (0..n).map(|i| if task == Task::Composition { (i % 2) as f64 } else { i as f64 / 7.0 }).collect(),
        images: (0..n as u32).map(|i| image::imageops::resize(&sample(i), side, side, image::imageops::FilterType::Nearest)).collect(),
        prompts: (0..n).map(|i| format!("a photo of {i} squares")).collect(),
        categories: Vec::new(),
    }
}

#[test]
fn task_captions_judge_composition_and_score_the_rest() {
    assert_eq!(task_caption(Task::Composition, "p", 1.0), Caption::new("p", "pass"));
    assert_eq!(task_caption(Task::Composition, "p", 0.0), Caption::new("p", "fail"));
    assert_eq!(task_caption(Task::Text, "p", 0.73449).verdict, "0.734");
    assert_eq!(task_caption(Task::Preference, "p", 23.5).verdict, "23.500");
    assert_eq!(Caption::new("", "PASS").verdict_ink(), PASS_INK);
    // the task grid: the first 32 samples, 8 per row, world images at 4x
    let result = task_result(Task::Composition, 40, 32);
    let grid = captioned_task_grid(&result);
    let captions: Vec<Caption> = (0..32).map(|i| task_caption(Task::Composition, &result.prompts[i], result.metrics[i])).collect();
    let layout = GridLayout::new(32, &captions, 8, 128);
    assert_eq!(grid.dimensions(), layout.size());
    assert_eq!(grid.width(), 8 * 129 + 1);
    assert_eq!(grid, captioned_grid(&result.images[..32], &captions, 8, 128));
    // large images are shown at 256 pixels
    let large = captioned_task_grid(&task_result(Task::Quality, 3, 512));
    assert_eq!(large.width(), 8 * 257 + 1);
}

/// A run folder as the recipes leave it: a results table written by the project's own writer,
/// captioned and bare grids, curves.
fn run_folder(dir: &Path) -> ResultsTable {
    let mut table = ResultsTable::default();
    let se = StdErrors::new(Some(0.04), Some(0.01), Some(0.26), Some(0.1));
    table.upsert(EvalRow { stderr: Some(se), ..EvalRow::new("Base", Some(0.5), Some(0.25), Some(20.0), Some(3.0), 12.0) });
    table.upsert(EvalRow { source: Some("models/results.json".into()), ..EvalRow::new("GRPO teacher: GenEval", Some(0.6), Some(0.2), Some(21.0), Some(3.1), 1.0) });
    table.upsert(EvalRow::new("x<script>alert(1)</script> & co", Some(0.1), None, None, None, 1.0));
    table.write(dir).unwrap();
    let grids = dir.join("grids");
    let results = [task_result(Task::Composition, 5, 32), task_result(Task::Text, 5, 32)];
    write_captioned_grids(&grids, "Base", &results).unwrap();
    write_captioned_grids(&grids, "GRPO teacher: GenEval", &results[..1]).unwrap();
    // a bare grid with a captioned twin (left out) and one without (shown as it is)
    sample(0).save(grids.join("grid_Base_composition.png")).unwrap();
    sample(1).save(grids.join("grid_Old_model_quality.png")).unwrap();
    std::fs::create_dir_all(dir.join("stage two")).unwrap();
    sample(2).save(dir.join("stage two").join(captioned_grid_name("Base", Task::Preference))).unwrap();
    sample(3).save(dir.join("curves.png")).unwrap();
    table
}

#[test]
fn report_shows_every_row_and_grid_with_relative_paths() {
    let dir = tempfile::tempdir().unwrap();
    let table = run_folder(dir.path());
    let path = write_report(dir.path()).unwrap();
    assert_eq!(path, dir.path().join("report.html"));
    let html = std::fs::read_to_string(&path).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"));
    // every row, by its name (escaped), with standard errors and the Avg as in results.md
    for row in &table.rows {
        let escaped = row.model.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
        assert!(html.contains(&format!("<td class=\"model\">{escaped}")), "row {:?} missing", row.model);
    }
    assert!(!html.contains("<script>") && html.contains("x&lt;script&gt;alert(1)&lt;/script&gt; &amp; co"));
    assert!(html.contains("0.500 <span class=\"se\">± 0.040</span>"), "{html}");
    assert!(html.contains("20.00 <span class=\"se\">± 0.26</span>"));
    assert!(html.contains("0.5298 <span class=\"se\">± 0.0117</span>"));
    assert!(html.contains("GRPO teacher: GenEval †") && html.contains("† imported from <code>models/results.json</code>"));
    assert_eq!(html.matches("<tr>").count(), 1 + table.rows.len());
    // every captioned grid, by its path relative to the run folder, grouped under its model
    let captioned = [
        "grids/captioned_Base_composition.png",
        "grids/captioned_Base_text.png",
        "grids/captioned_GRPO_teacher__GenEval_composition.png",
        "stage%20two/captioned_Base_preference.png",
    ];
    for src in captioned {
        assert!(html.contains(&format!("<img src=\"{src}\"")), "{src} missing");
    }
    assert_eq!(html.matches("<img src=\"grids/captioned_").count(), 3);
    assert!(html.contains("<img src=\"grids/grid_Old_model_quality.png\"") && !html.contains("grid_Base_composition.png"));
    assert!(html.contains("<img src=\"curves.png\""));
    let base = html.find("<h3>Base</h3>").expect("Base group");
    let teacher = html.find("<h3>GRPO teacher: GenEval</h3>").expect("teacher group, under the table's spelling");
    assert!(base < teacher && html[base..teacher].contains("captioned_Base_text.png"));
    // nothing absolute or external
    let root = dir.path().to_str().unwrap();
    assert!(!html.contains(root) && !html.contains("src=\"/") && !html.contains("href=\"/"));
    assert!(!html.contains("file:") && !html.contains("http:") && !html.contains("https:") && !html.contains("<script"));
    // written through a temporary file that is gone
    let leftovers: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.contains("report")).collect();
    assert_eq!(leftovers, ["report.html"]);
    assert_eq!(render_report(dir.path()).unwrap(), html);
}

#[test]
fn a_run_without_results_gets_a_page_that_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let html = std::fs::read_to_string(write_report(dir.path()).unwrap()).unwrap();
    assert!(html.contains("No results.json") && html.contains("No sample grids"));
    assert!(!html.contains("<table"));
    std::fs::write(dir.path().join("results.json"), "{ not json").unwrap();
    let html = render_report(dir.path()).unwrap();
    assert!(html.contains("results.json could not be read"));
    // a folder that is not there is an error naming it
    let missing = dir.path().join("no such run");
    let err = write_report(&missing).unwrap_err();
    assert!(matches!(err, ReportError::NotAFolder { .. }) && err.to_string().contains("no such run"), "{err}");
}
