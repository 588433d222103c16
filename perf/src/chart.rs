//! One SVG bar chart per scenario (plotters, SVG backend only): the main
//! figure's median per target, with whiskers from the lowest to the highest
//! round, the median written above each bar.

use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::table::{Cell, Table};
use crate::target::Target;

const SIZE: (u32, u32) = (960, 520);
const BASELINE: RGBColor = RGBColor(150, 150, 150);
const SLUICE: RGBColor = RGBColor(31, 119, 180);
const PEER: RGBColor = RGBColor(255, 127, 14);

/// Direct (and the bare relays) in grey, sluice in blue, the other proxies in orange.
fn color(t: Target) -> RGBColor {
    match t {
        Target::Direct | Target::DnsDirect | Target::DnsRelay | Target::TcpRelay => BASELINE,
        Target::SluiceUring | Target::SluiceEpoll | Target::SluiceDns => SLUICE,
        Target::Haproxy | Target::Nginx | Target::Dnsdist => PEER,
    }
}

/// Writes the chart of `table`'s first row to `path` (nothing when no target has a value).
pub(crate) fn write(table: &Table, path: &Path) -> Result<()> {
    let Some(row) = table.rows.first() else { return Ok(()) };
    let bars: Vec<(usize, Target, Cell)> =
        table.targets.iter().zip(&row.cells).enumerate().filter_map(|(i, (t, c))| Some((i, *t, (*c)?))).collect();
    if bars.is_empty() {
        return Ok(());
    }
    let top = bars.iter().map(|(_, _, c)| c.max).fold(0.0, f64::max).max(f64::MIN_POSITIVE) * 1.15;
    let labels: Vec<&str> = table.targets.iter().map(|t| t.label()).collect();
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    // An integer range counts its end too: 0..=n-1 is n segments (at least two:
    // a range of one value has no width).
    let last = labels.len().max(2) - 1;
    let mut chart = ChartBuilder::on(&root)
        .caption(table.scenario.title(), ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(36)
        .y_label_area_size(72)
        .build_cartesian_2d((0..last).into_segmented(), 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(labels.len())
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i).copied().unwrap_or_default().to_owned(),
            _ => String::new(),
        })
        .y_label_formatter(&|v| if top >= 10.0 { format!("{v:.0}") } else { format!("{v:.2}") })
        .y_desc(format!("{} (median; whiskers: min–max over rounds)", row.label))
        .label_style(("sans-serif", 14))
        .draw()?;
    chart.draw_series(bars.iter().map(|(i, t, c)| {
        let mut bar = Rectangle::new(
            [(SegmentValue::Exact(*i), 0.0), (SegmentValue::Exact(i + 1), c.median)],
            color(*t).filled(),
        );
        bar.set_margin(0, 0, 24, 24);
        bar
    }))?;
    // ErrorBar also rings the median; with one round there is no spread to show.
    chart.draw_series(bars.iter().filter(|(_, _, c)| c.max > c.min).map(|(i, _, c)| {
        ErrorBar::new_vertical(SegmentValue::CenterOf(*i), c.min, c.median, c.max, BLACK.stroke_width(2), 16)
    }))?;
    let above = ("sans-serif", 14).into_font().into_text_style(&root).pos(Pos::new(HPos::Center, VPos::Bottom));
    chart.draw_series(bars.iter().map(|(i, _, c)| {
        let prec = if c.median >= 100.0 { 0 } else { 2 };
        Text::new(format!("{:.prec$}", c.median), (SegmentValue::CenterOf(*i), c.max + top * 0.02), above.clone())
    }))?;
    root.present()?;
    Ok(())
}
