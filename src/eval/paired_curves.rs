//! Paired training curves (`flow-opd compare-curves`). A GRPO or OPD stage draws its prompts and
//! its rollout noise from its seed, not from the policy, so two stages of one run with the same
//! seed, rollout settings and prompt sources see the same prompts with the same noise, iteration
//! by iteration; a stage with `lr = 0` is then the starting model's own curve on them. The
//! difference of two such curves is free of the prompts' difficulty, and its mean has the paired
//! standard error of [`crate::eval::table::paired_mean`] (the statistic `flow-opd compare` gives
//! per image).

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// Keys of a stage's `train` table that decide which prompts and which noise it draws.
const DRAW_KEYS: [&str; 5] = ["seed", "rollout", "partitions", "tasks", "prompt_files"];

/// Two stages' curves of one metrics field, cut to their common length.
#[derive(Debug, Clone, PartialEq)]
pub struct PairedCurves {
    pub key: String,
    pub a: (String, Vec<f64>),
    pub b: (String, Vec<f64>),
    /// Mean of `a - b` over the paired iterations and its paired standard error.
    pub diff: f64,
    pub stderr: f64,
}

/// The values of `key` logged by the training stage `stage` (its output name: `grpo:<stage>`
/// or `opd:<stage>` in `metrics.jsonl`), in order. The error lists the stages and keys there are.
pub fn stage_curve(records: &[Map<String, Value>], stage: &str, key: &str) -> Result<Vec<f64>, String> {
    let ours = |r: &&Map<String, Value>| r.get("stage").and_then(Value::as_str).and_then(|s| s.split_once(':')).is_some_and(|(kind, name)| kind != "eval" && name == stage);
    let rows: Vec<&Map<String, Value>> = records.iter().filter(ours).collect();
    if rows.is_empty() {
        let mut stages: Vec<&str> = records.iter().filter_map(|r| r.get("stage")?.as_str()).filter(|s| !s.starts_with("eval:")).collect();
        stages.dedup();
        return Err(format!("no training stage `{stage}` in the log (its training stages: {})", list(&stages)));
    }
    let values: Vec<f64> = rows.iter().filter_map(|r| r.get(key)?.as_f64()).collect();
    if values.is_empty() {
        let mut keys: Vec<&str> = rows.iter().flat_map(|r| r.keys().map(String::as_str)).filter(|k| !matches!(*k, "stage" | "step")).collect();
        keys.sort_unstable();
        keys.dedup();
        return Err(format!("stage `{stage}` logged no `{key}` (its fields: {})", list(&keys)));
    }
    Ok(values)
}

fn list(items: &[&str]) -> String {
    if items.is_empty() { "none".to_string() } else { items.join(", ") }
}

/// Refuses two stages of a resolved recipe (`runs/<run>/recipe.toml`) whose draws differ: another
/// kind, or another value of a [`DRAW_KEYS`] key. The error names the key and both values.
pub fn check_pairing(recipe: &toml::Table, a: &str, b: &str) -> Result<(), String> {
    let stage = |name: &str| -> Result<(&str, Option<&toml::Value>), String> {
        let stages = recipe.get("stage").and_then(toml::Value::as_array).map(Vec::as_slice).unwrap_or_default();
        let s = stages.iter().find(|s| s.get("output").and_then(toml::Value::as_str) == Some(name)).ok_or_else(|| format!("the recipe has no stage with output `{name}`"))?;
        Ok((s.get("kind").and_then(toml::Value::as_str).unwrap_or("?"), s.get("train")))
    };
    let ((kind_a, train_a), (kind_b, train_b)) = (stage(a)?, stage(b)?);
    if kind_a != kind_b {
        return Err(format!("`{a}` is a {kind_a} stage and `{b}` a {kind_b} stage: their iterations do not pair"));
    }
    for key in DRAW_KEYS {
        let (va, vb) = (train_a.and_then(|t| t.get(key)), train_b.and_then(|t| t.get(key)));
        if va != vb {
            let show = |v: Option<&toml::Value>| v.map_or("(unset)".to_string(), |v| v.to_string());
            return Err(format!("`{a}` and `{b}` draw different prompts or noise: train.{key} is {} vs {}", show(va), show(vb)));
        }
    }
    Ok(())
}

/// Pairs the curves of `key` of stages `a` and `b` in `run` (a run folder, or its
/// `metrics.jsonl`). With a run folder, its resolved `recipe.toml` must show that the two stages
/// draw alike ([`check_pairing`]).
pub fn paired_curves(run: &Path, a: &str, b: &str, key: &str) -> Result<PairedCurves, String> {
    let (metrics, recipe): (PathBuf, Option<PathBuf>) = if run.is_dir() { (run.join("metrics.jsonl"), Some(run.join("recipe.toml"))) } else { (run.to_path_buf(), None) };
    let records = crate::io::metrics::read_metrics(&metrics).map_err(|e| format!("{}: {e}", metrics.display()))?;
    if let Some(path) = recipe.filter(|p| p.exists()) {
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let value: toml::Table = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        check_pairing(&value, a, b).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let at = |stage: &str| stage_curve(&records, stage, key).map_err(|e| format!("{}: {e}", metrics.display()));
    let (mut xa, mut xb) = (at(a)?, at(b)?);
    let n = xa.len().min(xb.len());
    if n < 2 {
        return Err(format!("{}: `{a}` and `{b}` share {n} iteration(s) of `{key}`; a paired error needs 2 or more", metrics.display()));
    }
    xa.truncate(n);
    xb.truncate(n);
    let (diff, stderr) = crate::eval::table::paired_mean(&xa, &xb);
    Ok(PairedCurves { key: key.to_string(), a: (a.to_string(), xa), b: (b.to_string(), xb), diff, stderr })
}

/// Means of `values` over its first, second and last third (iterations `i n / 3 ..`).
pub fn thirds(values: &[f64]) -> [f64; 3] {
    let n = values.len();
    std::array::from_fn(|i| {
        let part = &values[i * n / 3..(i + 1) * n / 3];
        part.iter().sum::<f64>() / part.len().max(1) as f64
    })
}

impl PairedCurves {
    /// The curves and their difference by thirds, and the mean difference with its error.
    pub fn markdown(&self) -> String {
        let n = self.a.1.len();
        let d: Vec<f64> = self.a.1.iter().zip(&self.b.1).map(|(x, y)| x - y).collect();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let row = |name: &str, v: &[f64], sign: bool| {
            let f = |x: f64| if sign { format!("{x:+.4}") } else { format!("{x:.4}") };
            let [t1, t2, t3] = thirds(v);
            format!("| {name} | {} | {} | {} | {} |\n", f(t1), f(t2), f(t3), f(mean(v)))
        };
        let (a, b) = (&self.a.0, &self.b.0);
        let ratio = if self.stderr > 0.0 { format!("{:+.1} se", self.diff / self.stderr) } else { "no spread".to_string() };
        format!(
            "`{}` over {n} paired iterations\n\n| stage | first third | second third | last third | all |\n|---|---|---|---|---|\n{}{}{}\nmean difference {a} - {b}: {:+.4} ± {:.4} (paired standard error; {ratio})\n",
            self.key,
            row(a, &self.a.1, false),
            row(b, &self.b.1, false),
            row(&format!("{a} - {b}"), &d, true),
            self.diff,
            self.stderr,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_dir(seed_b: u64) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut log = crate::io::metrics::MetricsLog::open(&dir.path().join("metrics.jsonl")).unwrap();
        log.log("eval:Base", 0, &[("geneval", 0.5)]).unwrap();
        // a: 0.5 0.6 0.7 0.8 0.6 0.9; b: 0.5 0.5 0.5 0.6 0.6 0.6 (the same policy at iteration 1)
        let (a, b) = ([0.5, 0.6, 0.7, 0.8, 0.6, 0.9], [0.5, 0.5, 0.5, 0.6, 0.6, 0.6, 0.1]);
        for (i, x) in a.iter().enumerate() {
            log.log("grpo:teacher", i + 1, &[("train_composition", *x), ("kl", 0.0)]).unwrap();
        }
        for (i, x) in b.iter().enumerate() {
            log.log("grpo:base", i + 1, &[("train_composition", *x), ("kl", 0.0)]).unwrap();
        }
        let recipe = format!(
            "name = \"t\"\n[[stage]]\nkind = \"grpo\"\noutput = \"teacher\"\n[stage.train]\nseed = 0\noptim = {{ lr = 1e-3 }}\nrollout = {{ prompts = 4 }}\n\
             [[stage]]\nkind = \"grpo\"\noutput = \"base\"\n[stage.train]\nseed = {seed_b}\noptim = {{ lr = 0.0 }}\nrollout = {{ prompts = 4 }}\n"
        );
        std::fs::write(dir.path().join("recipe.toml"), recipe).unwrap();
        dir
    }

    #[test]
    fn paired_curves_follow_the_iteration_differences() {
        let dir = run_dir(0);
        let p = paired_curves(dir.path(), "teacher", "base", "train_composition").unwrap();
        // six shared iterations (b's seventh has no partner); differences 0 .1 .2 .2 0 .3:
        // mean 0.8 / 6, sample variance (sum d^2 - 6 mean^2) / 5 = (0.18 - 0.64 / 6) / 5
        assert_eq!((p.a.1.len(), p.b.1.len()), (6, 6));
        assert!((p.diff - 0.8 / 6.0).abs() < 1e-12, "{}", p.diff);
        let se = ((0.18 - 0.64 / 6.0) / 5.0 / 6.0f64).sqrt();
        assert!((p.stderr - se).abs() < 1e-12, "{} vs {se}", p.stderr);
        // thirds of the difference: (0 + .1) / 2, (.2 + .2) / 2, (0 + .3) / 2
        let t = thirds(&p.a.1.iter().zip(&p.b.1).map(|(x, y)| x - y).collect::<Vec<_>>());
        for (got, want) in t.iter().zip([0.05, 0.2, 0.15]) {
            assert!((got - want).abs() < 1e-12, "{t:?}");
        }
        let md = p.markdown();
        assert!(md.contains("| teacher - base | +0.0500 | +0.2000 | +0.1500 | +0.1333 |"), "{md}");
        assert!(md.contains("over 6 paired iterations") && md.contains("+0.1333 ± 0.0494"), "{md}");
    }

    #[test]
    fn stages_that_draw_differently_are_refused_by_key() {
        let dir = run_dir(7);
        let err = paired_curves(dir.path(), "teacher", "base", "train_composition").unwrap_err();
        assert!(err.contains("recipe.toml") && err.contains("train.seed is 0 vs 7"), "{err}");
        // the metrics file alone carries no recipe: nothing to check, the curves pair as logged
        assert!(paired_curves(&dir.path().join("metrics.jsonl"), "teacher", "base", "train_composition").is_ok());
    }

    #[test]
    fn unknown_stages_and_fields_are_named_with_what_there_is() {
        let dir = run_dir(0);
        let err = paired_curves(&dir.path().join("metrics.jsonl"), "teacher", "nope", "kl").unwrap_err();
        assert!(err.contains("`nope`") && err.contains("grpo:teacher, grpo:base") && !err.contains("eval:"), "{err}");
        let err = paired_curves(&dir.path().join("metrics.jsonl"), "teacher", "base", "reward").unwrap_err();
        assert!(err.contains("no `reward`") && err.contains("kl, train_composition"), "{err}");
        let err = paired_curves(dir.path(), "teacher", "gone", "kl").unwrap_err();
        assert!(err.contains("no stage with output `gone`"), "{err}");
    }
}
