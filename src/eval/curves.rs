//! Training curves from a run's `metrics.jsonl`, drawn as one PNG (the paper's Fig. 1 style):
//! one panel per training stage with the per-task train metric against iterations (smoothed,
//! on the Avg scale: PickScore / 26, DeQA / 5), the held-out probes (`eval_<task>`) as
//! markers when a stage logged them, and a loss panel for stages that report losses.

use std::path::Path;

use plotters::prelude::*;
use serde_json::{Map, Value};

use crate::world::Task;

/// One line of a panel.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    /// `(iteration, value)`, in the order logged.
    pub points: Vec<(f64, f64)>,
    /// Drawn as markers (probes) instead of a line.
    pub markers: bool,
}

/// One chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    pub title: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

/// The factor that puts a task's metric on the Avg scale (docs/reference.md section 6).
pub fn avg_scale(task: Task) -> f64 {
    match task {
        Task::Preference => 1.0 / 26.0,
        Task::Quality => 1.0 / 5.0,
        Task::Composition | Task::Text => 1.0,
    }
}

/// Trailing moving average over `window` points (the first points average what exists).
pub fn smooth(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let window = window.max(1);
    (0..points.len())
        .map(|i| {
            let from = (i + 1).saturating_sub(window);
            let slice = &points[from..=i];
            (points[i].0, slice.iter().map(|p| p.1).sum::<f64>() / slice.len() as f64)
        })
        .collect()
}

fn task_of_field<'a>(field: &'a str, prefix: &str) -> Option<(Task, &'a str)> {
    let name = field.strip_prefix(prefix)?;
    Task::from_name(name).map(|t| (t, name))
}

/// The panels of a run: per training stage (labels `grpo:..`, `opd:..`, `sft:..`,
/// `pretrain:..`, in order of first appearance) the train metrics and probes, then its losses.
pub fn training_panels(records: &[Map<String, Value>]) -> Vec<Panel> {
    let mut stages: Vec<String> = Vec::new();
    for r in records {
        if let Some(stage) = r.get("stage").and_then(Value::as_str)
            && !stage.starts_with("eval:")
            && !stages.iter().any(|s| s == stage)
        {
            stages.push(stage.to_string());
        }
    }
    let mut panels = Vec::new();
    for stage in stages {
        let rows: Vec<&Map<String, Value>> =
            records.iter().filter(|r| r.get("stage").and_then(Value::as_str) == Some(stage.as_str())).collect();
        let mut fields: Vec<String> = Vec::new();
        for r in &rows {
            for k in r.keys() {
                if !fields.contains(k) {
                    fields.push(k.clone());
                }
            }
        }
        let points = |field: &str, scale: f64| -> Vec<(f64, f64)> {
            rows.iter()
                .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(field)?.as_f64()? * scale)))
                .collect()
        };
        let window = (rows.len() / 10).max(1);
        let mut metrics = Vec::new();
        for field in &fields {
            if let Some((task, name)) = task_of_field(field, "train_") {
                metrics.push(Series { name: format!("train {name}"), points: smooth(&points(field, avg_scale(task)), window), markers: false });
            }
            if let Some((task, name)) = task_of_field(field, "eval_") {
                metrics.push(Series { name: format!("eval {name}"), points: points(field, avg_scale(task)), markers: true });
            }
        }
        if fields.iter().any(|f| f == "reward") {
            metrics.push(Series { name: "reward".into(), points: smooth(&points("reward", 1.0), window), markers: false });
        }
        if !metrics.is_empty() {
            panels.push(Panel {
                title: format!("{stage}: metrics (smoothed over {window})"),
                y_label: "metric (PickScore/26, DeQA/5)".into(),
                series: metrics,
            });
        }
        let losses: Vec<Series> = ["loss", "loss_opd", "loss_mar", "kl"]
            .into_iter()
            .filter(|f| fields.iter().any(|k| k == f))
            .map(|f| Series { name: f.to_string(), points: smooth(&points(f, 1.0), window), markers: false })
            .collect();
        if !losses.is_empty() {
            panels.push(Panel { title: format!("{stage}: losses (smoothed over {window})"), y_label: "loss".into(), series: losses });
        }
    }
    panels
}

/// Errors of drawing curves.
#[derive(Debug, thiserror::Error)]
pub enum CurvesError {
    #[error("{path}: {message}")]
    Draw { path: String, message: String },
    #[error("{path}: nothing to plot (no training stage logged metrics)")]
    Empty { path: String },
}

const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
const PANEL_WIDTH: u32 = 560;
const PANEL_HEIGHT: u32 = 360;

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The font is compiled in and known to parse (tested); a failure would only lose text.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Draws `panels` in a grid of two columns into an RGB buffer (`width`, `height`, pixels).
pub fn draw_panels(panels: &[Panel]) -> Result<(u32, u32, Vec<u8>), String> {
    register_font();
    let columns = panels.len().clamp(1, 2) as u32;
    let rows = panels.len().div_ceil(2).max(1) as u32;
    let (width, height) = (PANEL_WIDTH * columns, PANEL_HEIGHT * rows);
    let mut buffer = vec![0u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let areas = root.split_evenly((rows as usize, columns as usize));
        for (panel, area) in panels.iter().zip(areas.iter()) {
            draw_panel(panel, area).map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok((width, height, buffer))
}

/// The y-axis range of a panel's values: their range padded by 8 % (at least 2 % of their
/// magnitude). A flat series (span below 1e-9, e.g. the KL of an `lr = 0` run, zero up to
/// rounding) gets a range of at least +-0.05 around it, so the axis labels stay readable.
fn y_axis(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for y in values {
        lo = lo.min(y);
        hi = hi.max(y);
    }
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    let magnitude = hi.abs().max(lo.abs());
    let pad = if hi - lo < 1e-9 { (magnitude * 0.1).max(0.05) } else { ((hi - lo) * 0.08).max(magnitude * 0.02) };
    (lo - pad, hi + pad)
}

fn draw_panel<DB: DrawingBackend>(panel: &Panel, area: &DrawingArea<DB, plotters::coord::Shift>) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let all = || panel.series.iter().flat_map(|s| s.points.iter()).filter(|p| p.1.is_finite());
    let x_max = all().map(|p| p.0).fold(1.0f64, f64::max);
    let (y_lo, y_hi) = y_axis(all().map(|p| p.1));
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(32)
        .y_label_area_size(52)
        .build_cartesian_2d(0.0..x_max, y_lo..y_hi)?;
    chart.configure_mesh().x_desc("iteration").y_desc(panel.y_label.as_str()).label_style(("sans-serif", 12)).draw()?;
    for (i, series) in panel.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points = series.points.iter().copied().filter(|p| p.1.is_finite());
        if series.markers {
            chart
                .draw_series(points.map(|p| Circle::new(p, 4, color.filled())))?
                .label(series.name.as_str())
                .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
        } else {
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(series.name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 12))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// Reads `<run>/metrics.jsonl` and writes `<run>/curves.png` (through a temporary file).
pub fn write_curves(run_dir: &Path) -> Result<std::path::PathBuf, CurvesError> {
    let metrics = run_dir.join("metrics.jsonl");
    let path_string = metrics.display().to_string();
    let records = crate::io::metrics::read_metrics(&metrics)
        .map_err(|e| CurvesError::Draw { path: path_string.clone(), message: e.to_string() })?;
    let panels = training_panels(&records);
    if panels.is_empty() {
        return Err(CurvesError::Empty { path: path_string });
    }
    let out = run_dir.join("curves.png");
    let out_string = out.display().to_string();
    let (width, height, pixels) = draw_panels(&panels).map_err(|message| CurvesError::Draw { path: out_string.clone(), message })?;
    let image = image::RgbImage::from_raw(width, height, pixels).expect("buffer matches its size");
    crate::io::write_png_atomic(&out, &image)
        .map_err(|e| CurvesError::Draw { path: out_string, message: e.to_string() })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_series_get_a_readable_axis_and_small_scales_keep_theirs() {
        // the KL of an lr = 0 run: zero up to rounding
        let (lo, hi) = y_axis([6e-10, 6.1e-10, 5.9e-10].into_iter());
        assert!(lo <= -0.049 && hi >= 0.049, "{lo} {hi}");
        let (lo, hi) = y_axis([2.0, 2.0].into_iter());
        assert!((lo - 1.8).abs() < 1e-12 && (hi - 2.2).abs() < 1e-12, "{lo} {hi}");
        // a real curve of KL 1e-4 .. 1e-3 keeps its own scale: padded by 8 % of its span
        let (lo, hi) = y_axis([1e-4, 5e-4, 1e-3].into_iter());
        assert!((lo - (1e-4 - 0.08 * 9e-4)).abs() < 1e-15 && (hi - (1e-3 + 0.08 * 9e-4)).abs() < 1e-15, "{lo} {hi}");
        // no values: the unit range, padded
        let (lo, hi) = y_axis(std::iter::empty());
        assert!(lo < 0.0 && hi > 1.0);
    }

    fn record(stage: &str, step: usize, fields: &[(&str, f64)]) -> Map<String, Value> {
        let mut map = Map::new();
        map.insert("stage".into(), stage.into());
        map.insert("step".into(), step.into());
        for (k, v) in fields {
            map.insert((*k).into(), (*v).into());
        }
        map
    }

    #[test]
    fn moving_average_matches_hand_values() {
        let points = [(1.0, 1.0), (2.0, 3.0), (3.0, 5.0), (4.0, 7.0)];
        assert_eq!(smooth(&points, 2), vec![(1.0, 1.0), (2.0, 2.0), (3.0, 4.0), (4.0, 6.0)]);
        assert_eq!(smooth(&points, 1), points.to_vec());
    }

    #[test]
    fn panels_put_metrics_on_the_avg_scale_per_stage() {
        let records = vec![
            record("grpo:a", 1, &[("reward", 0.5), ("train_preference", 20.8), ("kl", 0.1)]),
            record("eval:Base", 0, &[("geneval", 0.3)]),
            record("opd:s", 1, &[("loss", 2.0), ("train_quality", 3.0), ("eval_quality", 4.0)]),
        ];
        let panels = training_panels(&records);
        let titles: Vec<&str> = panels.iter().map(|p| p.title.as_str()).collect();
        assert_eq!(titles.len(), 4, "{titles:?}");
        assert!(titles[0].starts_with("grpo:a: metrics") && titles[1].starts_with("grpo:a: losses"));
        assert!(titles[2].starts_with("opd:s: metrics") && titles[3].starts_with("opd:s: losses"));
        let pick = &panels[0].series[0];
        assert_eq!(pick.name, "train preference");
        assert!((pick.points[0].1 - 0.8).abs() < 1e-12, "PickScore / 26");
        let probe = panels[2].series.iter().find(|s| s.markers).unwrap();
        assert!((probe.points[0].1 - 0.8).abs() < 1e-12, "DeQA / 5");
    }

    #[test]
    fn curves_png_is_drawn_with_text_and_lines() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = crate::io::metrics::MetricsLog::open(&dir.path().join("metrics.jsonl")).unwrap();
        for step in 1..=20 {
            let x = step as f64;
            log.log("grpo:t", step, &[("reward", x / 20.0), ("train_composition", x / 25.0), ("kl", 1e-4 * x)]).unwrap();
        }
        let path = write_curves(dir.path()).unwrap();
        let image = image::open(&path).unwrap().to_rgb8();
        assert_eq!(image.dimensions(), (2 * PANEL_WIDTH, PANEL_HEIGHT));
        let coloured = image.pixels().filter(|p| p.0.iter().max().unwrap() - p.0.iter().min().unwrap() > 60).count();
        let dark = image.pixels().filter(|p| p.0.iter().all(|&c| c < 80)).count();
        assert!(coloured > 200, "the series lines are drawn in colour ({coloured} px)");
        assert!(dark > 500, "axes, ticks and captions are drawn ({dark} px)");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().contains(".tmp")).collect();
        assert!(leftovers.is_empty(), "no temporary file is left behind");
    }

    #[test]
    fn a_run_without_training_stages_has_nothing_to_plot() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = crate::io::metrics::MetricsLog::open(&dir.path().join("metrics.jsonl")).unwrap();
        log.log("eval:Base", 0, &[("geneval", 0.1)]).unwrap();
        let err = write_curves(dir.path()).unwrap_err().to_string();
        assert!(err.contains("metrics.jsonl") && err.contains("nothing to plot"), "{err}");
    }
}
