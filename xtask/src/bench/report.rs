//! The bench's results: one [`Row`] per figure, printed as a table or as one
//! JSON object.
//!
//! **API boundary:** the JSON object is versioned (`"v": 1`) because scripts
//! that track the figures over time read it. Every value is a median over
//! the runs; the samples behind it are included.

use std::fmt::Write as _;

use serde_json::json;

use crate::bench::Options;

/// The version of the `--json` object.
const JSON_VERSION: u32 = 1;

/// What a figure measures.
#[derive(Clone, Copy, Debug)]
pub(super) enum Unit {
    Seconds,
    Millis,
    Micros,
    JobsPerSecond,
    /// Mebibytes (memory).
    Mib,
    /// Mebibytes per second (throughput).
    MibPerSecond,
    /// Bytes (memory per item).
    Bytes,
}

impl Unit {
    fn name(self) -> &'static str {
        match self {
            Self::Seconds => "s",
            Self::Millis => "ms",
            Self::Micros => "µs",
            Self::JobsPerSecond => "jobs/s",
            Self::Mib => "MiB",
            Self::MibPerSecond => "MiB/s",
            Self::Bytes => "B",
        }
    }

    fn show(self, v: f64) -> String {
        match self {
            Self::Seconds => format!("{v:.3} s"),
            Self::Millis => format!("{v:.2} ms"),
            Self::Micros => format!("{v:.1} µs"),
            Self::JobsPerSecond => format!("{v:.0} jobs/s"),
            Self::Mib => format!("{v:.1} MiB"),
            Self::MibPerSecond => format!("{v:.0} MiB/s"),
            Self::Bytes => format!("{v:.0} B"),
        }
    }
}

/// What a figure should reach.
#[derive(Clone, Copy, Debug)]
pub(super) enum Target {
    /// crew / baseline at most this.
    RatioAtMost(f64),
    /// The crew value at least this.
    AtLeast(f64),
    /// The crew value below this.
    Below(f64),
    /// Reported for information.
    Info,
}

/// One figure: crew's samples, the baseline's, and the target.
#[derive(Clone, Debug)]
pub(super) struct Row {
    /// Short id (`1`, `2a`, ...), as in the issue.
    pub(super) id: &'static str,
    /// What is measured.
    pub(super) figure: String,
    /// Unit of both values.
    pub(super) unit: Unit,
    /// crew's value in each run.
    pub(super) crew: Vec<f64>,
    /// The baseline's value in each run (one value for a constant).
    pub(super) baseline: Vec<f64>,
    /// What the baseline is.
    pub(super) baseline_is: String,
    /// The goal.
    pub(super) target: Target,
}

impl Row {
    fn crew_median(&self) -> f64 {
        median(&self.crew)
    }

    fn baseline_median(&self) -> Option<f64> {
        (!self.baseline.is_empty()).then(|| median(&self.baseline))
    }

    /// crew / baseline. When both were measured in every run, the median of
    /// the per-run ratios: each pair ran back to back, under much the same
    /// load from the rest of the machine, which a ratio of the two medians
    /// would mix up across runs. Otherwise (a constant baseline), the ratio
    /// of the medians.
    fn ratio(&self) -> Option<f64> {
        if self.crew.len() == self.baseline.len() && self.baseline.iter().all(|b| *b > 0.0) {
            let ratios: Vec<f64> = self.crew.iter().zip(&self.baseline).map(|(c, b)| c / b).collect();
            return (!ratios.is_empty()).then(|| median(&ratios));
        }
        self.baseline_median().filter(|b| *b > 0.0).map(|b| self.crew_median() / b)
    }

    fn target_text(&self) -> String {
        match self.target {
            Target::RatioAtMost(r) => format!("ratio ≤ {r}"),
            Target::AtLeast(v) => format!("≥ {}", self.unit.show(v)),
            Target::Below(v) => format!("< {}", self.unit.show(v)),
            Target::Info => "(info)".to_owned(),
        }
    }

    /// Whether the target is met; `None` for information rows.
    fn pass(&self) -> Option<bool> {
        let v = self.crew_median();
        match self.target {
            Target::RatioAtMost(r) => Some(self.ratio().is_some_and(|x| x <= r)),
            Target::AtLeast(t) => Some(v >= t),
            Target::Below(t) => Some(v < t),
            Target::Info => None,
        }
    }
}

/// The median (the mean of the middle two for an even count); 0 when empty.
pub(super) fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The `p`-th percentile (nearest rank), `p` in 0..=100; 0 when empty.
pub(super) fn percentile(xs: &[f64], p: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// The table, with the baselines spelt out below it.
pub(super) fn table(rows: &[Row], opts: Options) -> String {
    let header = ["", "figure", "crew", "baseline", "ratio", "target", "result"];
    let mut cells: Vec<[String; 7]> = vec![header.map(str::to_owned)];
    for r in rows {
        cells.push([
            r.id.to_owned(),
            r.figure.clone(),
            r.unit.show(r.crew_median()),
            r.baseline_median().map_or_else(|| "-".to_owned(), |b| r.unit.show(b)),
            r.ratio().map_or_else(|| "-".to_owned(), |x| format!("{x:.2}")),
            r.target_text(),
            match r.pass() {
                Some(true) => "PASS".to_owned(),
                Some(false) => "MISS".to_owned(),
                None => "-".to_owned(),
            },
        ]);
    }
    let mut widths = [0usize; 7];
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for (i, row) in cells.iter().enumerate() {
        for (j, (c, w)) in row.iter().zip(widths).enumerate() {
            let pad = " ".repeat(w - c.chars().count());
            // Text columns to the left, numbers to the right.
            if matches!(j, 0 | 1 | 5 | 6) {
                let _ = write!(out, "{c}{pad}  ");
            } else {
                let _ = write!(out, "{pad}{c}  ");
            }
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
        if i == 0 {
            let total = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
            out.push_str(&"-".repeat(total));
            out.push('\n');
        }
    }
    let _ = writeln!(
        out,
        "\nMedians of {} run(s){}; ratio = median of the per-run crew / baseline ratios \
         (crew / baseline for a constant baseline).",
        opts.runs,
        if opts.quick { ", quick sizes" } else { "" }
    );
    out.push_str("Baselines:\n");
    for r in rows {
        let _ = writeln!(out, "  {:<3} {}", r.id, r.baseline_is);
    }
    out
}

/// The `--json` object.
pub(super) fn json(rows: &[Row], opts: Options) -> serde_json::Value {
    let figures: Vec<_> = rows
        .iter()
        .map(|r| {
            json!({
                "id": r.id,
                "figure": r.figure,
                "unit": r.unit.name(),
                "crew": r.crew_median(),
                "baseline": r.baseline_median(),
                "baseline_is": r.baseline_is,
                "ratio": r.ratio(),
                "target": r.target_text(),
                "pass": r.pass(),
                "samples": { "crew": r.crew, "baseline": r.baseline },
            })
        })
        .collect();
    json!({
        "v": JSON_VERSION,
        "runs": opts.runs,
        "quick": opts.quick,
        "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "figures": figures,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_percentiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&xs, 99.0), 99.0);
        assert_eq!(percentile(&xs, 50.0), 50.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
    }

    #[test]
    fn verdicts() {
        let row = |crew: f64, baseline: Vec<f64>, target| Row {
            id: "x",
            figure: "f".into(),
            unit: Unit::Seconds,
            crew: vec![crew],
            baseline,
            baseline_is: "b".into(),
            target,
        };
        assert_eq!(row(1.2, vec![1.0], Target::RatioAtMost(1.3)).pass(), Some(true));
        assert_eq!(row(1.4, vec![1.0], Target::RatioAtMost(1.3)).pass(), Some(false));
        assert_eq!(row(1.0, vec![], Target::RatioAtMost(1.3)).pass(), Some(false));
        // Paired runs: the median of the per-run ratios.
        let mut paired = row(0.0, vec![1.0, 4.0, 10.0], Target::Info);
        paired.crew = vec![2.0, 4.0, 5.0];
        assert_eq!(paired.ratio(), Some(1.0));
        assert_eq!(row(5.0, vec![], Target::AtLeast(5.0)).pass(), Some(true));
        assert_eq!(row(5.0, vec![], Target::Below(5.0)).pass(), Some(false));
        assert_eq!(row(5.0, vec![], Target::Info).pass(), None);
    }
}
