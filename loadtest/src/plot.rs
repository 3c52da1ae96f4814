//! The latency distribution as an SVG: latency against percentile, on a scale that
//! spreads the tail (90%, 99%, 99.9%... are equally spaced).

use hdrhistogram::Histogram;
use plotters::prelude::*;
use std::path::Path;

/// Draws `h` (microseconds) to `path`.
pub fn latency(h: &Histogram<u64>, title: &str, path: &Path) -> anyhow::Result<()> {
    // x = -log10(1 - q): 1 at p90, 2 at p99, 3 at p99.9.
    let points: Vec<(f64, f64)> = (0..=400)
        .map(|i| {
            let x = f64::from(i) / 100.0;
            let q = (1.0 - 10f64.powf(-x)).min(1.0);
            (x, h.value_at_quantile(q) as f64 / 1000.0)
        })
        .collect();
    let top = points.iter().map(|p| p.1).fold(0.0, f64::max).max(0.001) * 1.1;
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..4f64, 0f64..top)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_labels(5)
        .x_label_formatter(&|x| match x.round() as i32 {
            0 => "0%".into(),
            1 => "90%".into(),
            2 => "99%".into(),
            3 => "99.9%".into(),
            _ => "99.99%".into(),
        })
        .draw()?;
    chart.draw_series(LineSeries::new(points, &BLUE))?;
    root.present()?;
    Ok(())
}
