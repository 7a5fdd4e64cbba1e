//! The plot of a run: requests per second at 32 connections, and latency percentiles at one
//! connection, one row of bars per system, on log axes (the systems span four orders of
//! magnitude, from bare hyper to a `wasmtime run` per request).
//!
//! Plotters' SVG backend without its TrueType feature: text goes into the SVG as `<text>` with an
//! estimated width, laid out by whatever displays it, so the build needs no fontconfig/freetype.

use std::error::Error;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One row of bars: a system's name and one value per series (0 or less: no bar).
pub struct Row {
    pub label: String,
    pub values: Vec<f64>,
}

/// A horizontal bar chart: rows top to bottom, one bar per series in each row.
pub struct Chart<'a> {
    pub title: &'a str,
    pub unit: &'a str,
    pub series: &'a [&'a str],
    pub rows: Vec<Row>,
}

const WIDTH: u32 = 1000;
const ROW_HEIGHT: u32 = 34;
const COLORS: [RGBColor; 3] = [
    RGBColor(0xd9, 0x5f, 0x0e),
    RGBColor(0x31, 0x82, 0xbd),
    RGBColor(0x75, 0x6b, 0xb1),
];

/// Renders the charts one above the other into one SVG document.
pub fn render(charts: &[Chart]) -> Result<String, Box<dyn Error>> {
    let heights: Vec<u32> = charts
        .iter()
        .map(|c| 110 + ROW_HEIGHT * c.rows.len().max(1) as u32 * c.series.len().clamp(1, 2) as u32)
        .collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, heights.iter().sum::<u32>().max(1))).into_drawing_area();
        root.fill(&WHITE)?;
        let mut rest = root.clone();
        for (chart, height) in charts.iter().zip(&heights) {
            let (area, below) = rest.split_vertically(*height);
            draw(&area, chart)?;
            rest = below;
        }
        root.present()?;
    }
    Ok(svg)
}

fn draw(area: &DrawingArea<SVGBackend<'_>, Shift>, chart: &Chart) -> Result<(), Box<dyn Error>> {
    let positive = chart
        .rows
        .iter()
        .flat_map(|r| r.values.iter().copied())
        .filter(|v| *v > 0.0);
    let (min, max) = positive.fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if max <= 0.0 {
        area.draw(&Text::new(
            format!("{}: no data in this run", chart.title),
            (20, 30),
            ("sans-serif", 16).into_font(),
        ))?;
        return Ok(());
    }
    // A decade below the smallest value, so that even it gets a visible bar.
    let lo = 10f64.powf((min / 1.5).log10().floor());
    let hi = 10f64.powf((max * 3.0).log10().ceil());
    let n = chart.rows.len();
    let mut plot = ChartBuilder::on(area)
        .caption(chart.title, ("sans-serif", 18).into_font())
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(300)
        .build_cartesian_2d((lo..hi).log_scale(), -0.5f64..(n as f64 - 0.5))?;
    plot.configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_desc(chart.unit)
        .x_label_formatter(&|v| short(*v))
        .label_style(("sans-serif", 12).into_font())
        .draw()?;

    let k = chart.series.len().max(1);
    let thickness = 0.8 / k as f64;
    // Row i is drawn at y = n - 1 - i so the first row is on top.
    let bar = |i: usize, s: usize| {
        let y0 = (n - 1 - i) as f64 + 0.4 - (s + 1) as f64 * thickness;
        (y0 + thickness * 0.08, y0 + thickness * 0.92)
    };
    for (s, name) in chart.series.iter().enumerate() {
        let color = COLORS[s % COLORS.len()];
        let bars = chart
            .rows
            .iter()
            .enumerate()
            .filter(|(_, r)| r.values.get(s).is_some_and(|v| *v > 0.0));
        plot.draw_series(bars.clone().map(|(i, r)| {
            let (y0, y1) = bar(i, s);
            Rectangle::new([(lo, y0), (r.values[s], y1)], color.filled())
        }))?
        .label(*name)
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        let value_style = TextStyle::from(("sans-serif", 11).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
        plot.draw_series(bars.map(|(i, r)| {
            let (y0, y1) = bar(i, s);
            Text::new(
                format!(" {}", short(r.values[s])),
                (r.values[s], (y0 + y1) / 2.0),
                value_style.clone(),
            )
        }))?;
    }
    if k > 1 {
        plot.configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 12).into_font())
            .draw()?;
    }
    let base = area.get_base_pixel();
    let label_style = TextStyle::from(("sans-serif", 13).into_font()).pos(Pos::new(HPos::Right, VPos::Center));
    for (i, row) in chart.rows.iter().enumerate() {
        let (x, y) = plot.backend_coord(&(lo, (n - 1 - i) as f64));
        area.draw(&Text::new(
            row.label.clone(),
            (x - base.0 - 8, y - base.1),
            label_style.clone(),
        ))?;
    }
    Ok(())
}

/// A number in a few characters: 52314 → "52.3k", 0.57 → "0.57".
pub fn short(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.3}M", v / 1e6).replace(".000M", "M")
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3).replace(".0k", "k")
    } else if a >= 1e3 {
        format!("{:.2}k", v / 1e3).replace(".00k", "k")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}").trim_end_matches('0').trim_end_matches('.').to_owned()
    } else if a >= 1.0 {
        format!("{v:.2}").trim_end_matches('0').trim_end_matches('.').to_owned()
    } else if a > 0.0 {
        let digits = (-a.log10()).floor() as usize + 2;
        format!("{v:.digits$}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_owned()
    } else {
        "0".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_numbers() {
        assert_eq!(short(52314.0), "52.3k");
        assert_eq!(short(1000.0), "1k");
        assert_eq!(short(1500.0), "1.50k");
        assert_eq!(short(250.4), "250");
        assert_eq!(short(2.5), "2.5");
        assert_eq!(short(3.877), "3.88");
        assert_eq!(short(12.447), "12.4");
        assert_eq!(short(0.57), "0.57");
        assert_eq!(short(0.0123), "0.012");
        assert_eq!(short(1e7), "10M");
    }
}
