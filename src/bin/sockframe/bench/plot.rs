//! `sockframe bench --plot`: SVG charts of a run, so a person can look instead of read.

use std::path::Path;

use anyhow::{Result, bail};
use plotters::prelude::*;

use super::Outcome;

/// Chart size in pixels.
const SIZE: (u32, u32) = (960, 540);

/// The latency distribution of one round-trip run: latency against percentile, with the
/// percentile axis stretched towards the tail (x = 1 / (1 - q)), as HDR histograms are
/// usually drawn, so p99 and p99.9 are as visible as the median.
pub fn latency(path: &Path, title: &str, o: &Outcome) -> Result<()> {
    let n = o.latency.len();
    if n == 0 {
        bail!("no round trips were recorded; nothing to plot");
    }
    // The last point (q = 1) would be at infinity: put it where 1 / n of the samples are.
    let tail = n as f64;
    let points: Vec<(f64, f64)> = o
        .latency
        .iter_quantiles(10)
        .map(|v| {
            let q = v.quantile_iterated_to().min(1.0 - 1.0 / tail);
            (1.0 / (1.0 - q), v.value_iterated_to() as f64 / 1e3)
        })
        .collect();
    let x_max = points.iter().map(|p| p.0).fold(10.0, f64::max) * 1.5;
    let y_min = (o.latency.min() as f64 / 1e3 * 0.8).max(0.01);
    let y_max = o.latency.max() as f64 / 1e3 * 1.25;

    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((1.0..x_max).log_scale(), (y_min..y_max).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("round trip (µs)")
        .y_labels(12)
        .x_label_formatter(&|x| percentile_label(*x))
        .y_label_formatter(&|y| format!("{y}"))
        .draw()?;
    let label = format!(
        "{} B: p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs, max {:.1} µs ({} round trips)",
        o.size,
        o.us(0.5),
        o.us(0.99),
        o.us(0.999),
        o.latency.max() as f64 / 1e3,
        n
    );
    chart
        .draw_series(LineSeries::new(points, BLUE.stroke_width(2)))?
        .label(label)
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Results by payload size: throughput (MB/s and messages/s), or for round trips the
/// latency (p50, p99) and round trips/s.
pub fn sweep(path: &Path, title: &str, round_trips: bool, outcomes: &[Outcome]) -> Result<()> {
    if outcomes.iter().any(|o| o.size == 0) {
        bail!("cannot plot a sweep with a 0-byte size on a logarithmic axis");
    }
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 18))?;
    let (left, right) = root.split_horizontally(SIZE.0 / 2);
    let sizes = || outcomes.iter().map(|o| o.size as f64);
    if round_trips {
        panel(
            &left,
            "round trip (µs)",
            &[
                ("p50", BLUE, outcomes.iter().map(|o| o.us(0.5)).collect()),
                ("p99", RED, outcomes.iter().map(|o| o.us(0.99)).collect()),
            ],
            sizes,
        )?;
        panel(
            &right,
            "round trips/s",
            &[(
                "round trips/s",
                BLUE,
                outcomes.iter().map(Outcome::rate).collect(),
            )],
            sizes,
        )?;
    } else {
        panel(
            &left,
            "MB/s of payload",
            &[(
                "MB/s",
                BLUE,
                outcomes.iter().map(Outcome::mb_per_s).collect(),
            )],
            sizes,
        )?;
        panel(
            &right,
            "messages/s",
            &[(
                "messages/s",
                BLUE,
                outcomes.iter().map(Outcome::rate).collect(),
            )],
            sizes,
        )?;
    }
    root.present()?;
    Ok(())
}

/// One chart of `series` (name, colour, one value per size) against size.
fn panel<'a, I: Iterator<Item = f64>>(
    area: &DrawingArea<SVGBackend<'a>, plotters::coord::Shift>,
    y_desc: &str,
    series: &[(&str, RGBColor, Vec<f64>)],
    sizes: impl Fn() -> I,
) -> Result<()> {
    let x_min = sizes().fold(f64::MAX, f64::min) / 1.5;
    let x_max = sizes().fold(0.0, f64::max) * 1.5;
    let values = series.iter().flat_map(|s| s.2.iter().copied());
    let lo = values.clone().fold(f64::MAX, f64::min).max(1e-3);
    let hi = values.fold(0.0, f64::max).max(lo * 1.01);
    // The two coordinate types differ, so the drawing is spelled out once for each.
    macro_rules! draw {
        ($y:expr) => {{
            let mut chart = ChartBuilder::on(area)
                .margin(15)
                .x_label_area_size(45)
                .y_label_area_size(70)
                .build_cartesian_2d((x_min..x_max).log_scale(), $y)?;
            chart
                .configure_mesh()
                .x_desc("message size")
                .y_labels(12)
                .y_desc(y_desc)
                .x_label_formatter(&|x| size_label(*x))
                .y_label_formatter(&|y| short(*y))
                .draw()?;
            for (name, colour, ys) in series {
                let points: Vec<(f64, f64)> = sizes().zip(ys.iter().copied()).collect();
                let style = colour.stroke_width(2);
                chart
                    .draw_series(LineSeries::new(points.clone(), style))?
                    .label(*name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
                chart.draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 3, colour.filled())),
                )?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }};
    }
    // Logarithmic only when the values span decades (messages/s over sizes); a linear axis
    // from 0 otherwise, where a logarithmic one would show hardly any labels.
    if hi / lo > 30.0 {
        draw!((lo / 1.5..hi * 1.5).log_scale());
    } else {
        draw!(0.0..hi * 1.15);
    }
    Ok(())
}

/// `x = 1 / (1 - q)` as a percentile: 2 → `50%`, 1000 → `99.9%`.
fn percentile_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 1.0 / x);
    let text = format!("{p:.4}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}%")
}

/// A byte count with a decimal suffix (the logarithmic axis puts its ticks at powers of
/// ten).
fn size_label(x: f64) -> String {
    match x {
        x if x >= 1e6 => format!("{} MB", short(x / 1e6)),
        x if x >= 1e3 => format!("{} kB", short(x / 1e3)),
        x => format!("{} B", short(x)),
    }
}

/// A number in few characters: 1.5 M, 20 k, 3.2.
fn short(x: f64) -> String {
    match x {
        x if x >= 1e6 => format!("{} M", trim(x / 1e6)),
        x if x >= 1e4 => format!("{} k", trim(x / 1e3)),
        x => trim(x),
    }
}

fn trim(x: f64) -> String {
    let text = format!("{x:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(percentile_label(2.0), "50%");
        assert_eq!(percentile_label(1000.0), "99.9%");
        assert_eq!(percentile_label(1.0), "0%");
        assert_eq!(size_label(64.0), "64 B");
        assert_eq!(size_label(1500.0), "1.5 kB");
        assert_eq!(size_label(1e6), "1 MB");
        assert_eq!(short(2_500_000.0), "2.5 M");
    }
}
