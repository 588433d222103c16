//! One result table: a column per target, a row per figure (median over
//! rounds), and under each figure that has a better direction its ratio to
//! the scenario's baseline (`×direct`) and to the best peer. Rendered for
//! the terminal, serialized into the JSON, and charted (first row).

use std::fmt::Write;

use serde::Serialize;

use crate::scenario::Scenario;
use crate::target::Target;

/// Which way a figure is better; ratios are shown only for figures that have one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) enum Better {
    Higher,
    Lower,
    /// Context (CPU breakdown, counts): no ratios.
    Neither,
}

/// How the rounds of one target combine into a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Agg {
    /// Median, with the spread.
    Median,
    /// The total over rounds (failure counts: one is one too many).
    Sum,
    /// The largest (thread counts).
    Max,
}

/// Reads one of a cell's ratios.
type Ratio = fn(&Cell) -> Option<f64>;

#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Cell {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    /// Ratio of the median to the baseline target's (`×direct`).
    pub(crate) x_baseline: Option<f64>,
    /// Ratio of the median to the best peer's for this figure.
    pub(crate) x_best_peer: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    pub(crate) label: String,
    pub(crate) better: Better,
    /// One per column of the table.
    pub(crate) cells: Vec<Option<Cell>>,
    #[serde(skip)]
    prec: usize,
    #[serde(skip)]
    spread: bool,
}

impl Row {
    /// A row from each column's values over rounds.
    pub(crate) fn new(label: &str, better: Better, agg: Agg, prec: usize, values: Vec<Vec<f64>>) -> Row {
        let cells = values.into_iter().map(|v| combine(v, agg)).collect();
        Row { label: label.to_owned(), better, cells, prec, spread: false }
    }

    /// Shows `[min–max]` under the medians (the scenario's main figure).
    pub(crate) fn with_spread(mut self) -> Row {
        self.spread = true;
        self
    }
}

fn combine(mut v: Vec<f64>, agg: Agg) -> Option<Cell> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let value = match agg {
        Agg::Median if n % 2 == 1 => v[n / 2],
        Agg::Median => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        Agg::Sum => v.iter().sum(),
        Agg::Max => v[n - 1],
    };
    Some(Cell { median: value, min: v[0], max: v[n - 1], x_baseline: None, x_best_peer: None })
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Table {
    pub(crate) scenario: Scenario,
    pub(crate) title: String,
    pub(crate) targets: Vec<Target>,
    pub(crate) rows: Vec<Row>,
}

impl Table {
    /// Fills in every row's ratios (to the scenario's baseline and best peer).
    pub(crate) fn with_ratios(mut self) -> Table {
        let col = |t: Target| self.targets.iter().position(|x| *x == t);
        let base = self.scenario.baseline().and_then(col);
        let peers: Vec<usize> = self.scenario.peers().iter().filter_map(|t| col(*t)).collect();
        for row in self.rows.iter_mut().filter(|r| r.better != Better::Neither) {
            let median = |i: Option<usize>| i.and_then(|i| row.cells[i].map(|c| c.median));
            let best = peers.iter().filter_map(|p| median(Some(*p))).reduce(|a, b| match row.better {
                Better::Lower => a.min(b),
                _ => a.max(b),
            });
            let base = median(base);
            for cell in row.cells.iter_mut().flatten() {
                cell.x_baseline = base.filter(|b| *b > 0.0).map(|b| cell.median / b);
                cell.x_best_peer = best.filter(|b| *b > 0.0).map(|b| cell.median / b);
            }
        }
        self
    }

    /// A row of each target's median of `of` less the baseline's (latency added over direct).
    pub(crate) fn added_row(&self, of: &str, label: &str) -> Option<Row> {
        let row = self.rows.iter().find(|r| r.label == of)?;
        let base = self.scenario.baseline().and_then(|b| self.targets.iter().position(|t| *t == b))?;
        let base = row.cells[base]?.median;
        let values = row
            .cells
            .iter()
            .zip(&self.targets)
            .map(|(c, t)| match c {
                Some(c) if Some(*t) != self.scenario.baseline() => vec![c.median - base],
                _ => Vec::new(),
            })
            .collect();
        Some(Row::new(label, Better::Neither, Agg::Median, row.prec, values))
    }

    pub(crate) fn render(&self) -> String {
        let mut lines: Vec<Vec<String>> = Vec::new();
        for row in &self.rows {
            let fmt = |f: &dyn Fn(&Cell) -> Option<String>| {
                row.cells.iter().map(|c| c.as_ref().and_then(f).unwrap_or_else(|| "-".into())).collect::<Vec<_>>()
            };
            let arrow = match row.better {
                Better::Higher => " ↑",
                Better::Lower => " ↓",
                Better::Neither => "",
            };
            let prec = row.prec;
            lines.push(line(format!("{}{arrow}", row.label), fmt(&|c| Some(format!("{:.prec$}", c.median)))));
            if row.spread {
                let spread = fmt(&|c| Some(format!("{:.prec$}–{:.prec$}", c.min, c.max)));
                lines.push(line("  [min–max]".into(), spread));
            }
            let name = self.scenario.baseline().map_or("baseline", Target::name);
            let ratios: [(String, Ratio); 2] =
                [(format!("  ×{name}"), |c| c.x_baseline), ("  ×best peer".into(), |c| c.x_best_peer)];
            for (label, ratio) in ratios {
                // A ratio row nobody has (the baseline has no proxy CPU) is left out.
                if row.cells.iter().flatten().any(|c| ratio(c).is_some()) {
                    lines.push(line(label, fmt(&|c| ratio(c).map(|x| format!("{x:.2}")))));
                }
            }
        }
        let mut header = vec![String::new()];
        header.extend(self.targets.iter().map(|t| t.label().to_owned()));
        lines.insert(0, header);
        let width = |i: usize| lines.iter().filter_map(|l| l.get(i)).map(|s| s.chars().count()).max().unwrap_or(0);
        let widths: Vec<usize> = (0..=self.targets.len()).map(width).collect();
        let mut o = format!("\n{}\n", self.title);
        for l in &lines {
            let _ = write!(o, "{:<w$}", l[0], w = widths[0]);
            for (s, w) in l.iter().zip(&widths).skip(1) {
                let _ = write!(o, "  {s:>w$}");
            }
            o.push('\n');
        }
        o
    }
}

fn line(label: String, cells: Vec<String>) -> Vec<String> {
    std::iter::once(label).chain(cells).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_to_baseline_and_best_peer() {
        let targets = vec![Target::Direct, Target::SluiceUring, Target::Haproxy, Target::Nginx];
        let values = vec![vec![10.0], vec![6.0], vec![4.0], vec![5.0]];
        let rows = vec![
            Row::new("conn/s", Better::Higher, Agg::Median, 0, values.clone()),
            Row::new("p99 µs", Better::Lower, Agg::Median, 0, values),
        ];
        let t = Table { scenario: Scenario::Short, title: String::new(), targets, rows }.with_ratios();
        let sluice = |r: usize| t.rows[r].cells[1].map(|c| (c.x_baseline, c.x_best_peer));
        assert_eq!(sluice(0), Some((Some(0.6), Some(6.0 / 5.0))));
        assert_eq!(sluice(1), Some((Some(0.6), Some(6.0 / 4.0))));
    }

    #[test]
    fn sums_and_medians() {
        let c = combine(vec![3.0, 1.0, 2.0, 10.0], Agg::Median).map(|c| (c.median, c.min, c.max));
        assert_eq!(c, Some((2.5, 1.0, 10.0)));
        assert_eq!(combine(vec![1.0, 2.0], Agg::Sum).map(|c| c.median), Some(3.0));
        assert!(combine(Vec::new(), Agg::Max).is_none());
    }
}
