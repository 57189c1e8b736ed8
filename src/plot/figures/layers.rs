//! Lines over layers (or another x), with interval bands and a reference line.

use plotters::coord::Shift;
use plotters::prelude::*;

use super::legend::{draw_legend, LegendEntry};
use super::{draw_label, marker_at, xy_chart, DrawResult, Map};
use crate::plot::data::{Curve, Marker, GREY};
use crate::plot::layout::{self, Rect};

/// The style of a curve's markers: squares hollow (a line under them stays visible).
fn curve_marker_style(c: &Curve) -> ShapeStyle {
    if c.marker == Marker::Square {
        c.color.stroke_width(2)
    } else {
        c.color.filled()
    }
}

/// The interval band of a curve, if it has one over more than one point.
fn band(c: &Curve) -> Vec<(f64, f64, f64)> {
    let band: Vec<(f64, f64, f64)> = c
        .points
        .iter()
        .filter_map(|p| p.interval.map(|(lo, hi)| (p.layer, lo, hi)))
        .collect();
    if band.len() > 1 {
        band
    } else {
        Vec::new()
    }
}

/// Pixel boxes covered by the curves (lines, markers and bands) in `plot`.
fn curves_footprint(curves: &[Curve], x: (f64, f64), y: (f64, f64), plot: Rect) -> Vec<Rect> {
    let map = Map { plot, x, y };
    let mut out = Vec::new();
    for c in curves {
        let pts: Vec<(i32, i32)> = c
            .points
            .iter()
            .map(|p| map.px((p.layer, p.value)))
            .collect();
        for pair in pts.windows(2) {
            layout::segment_footprint(pair[0], pair[1], c.width as i32 + 4, &mut out);
        }
        out.extend(pts.iter().map(|&p| Rect::centered(p, (12, 12))));
        for pair in band(c).windows(2) {
            let ((xa, la, ha), (xb, lb, hb)) = (pair[0], pair[1]);
            let (pa, pb) = (map.px((xa, 0.0)).0, map.px((xb, 0.0)).0);
            for px in (pa..=pb).step_by(3) {
                let t = if pb > pa {
                    (px - pa) as f64 / (pb - pa) as f64
                } else {
                    0.0
                };
                let top = map.px((xa, ha + (hb - ha) * t)).1;
                let bottom = map.px((xa, la + (lb - la) * t)).1;
                out.push(Rect::new(px - 2, top - 1, px + 3, bottom + 2));
            }
        }
    }
    out
}

/// The padded x range of the curves, and whether every x is an integer (a layer).
fn x_range(curves: &[Curve]) -> (f64, f64, bool) {
    let xs = || curves.iter().flat_map(|c| c.points.iter().map(|p| p.layer));
    let integer = xs().all(|x| x.fract() == 0.0);
    let (mut lo, mut hi) = (
        xs().fold(f64::INFINITY, f64::min),
        xs().fold(f64::NEG_INFINITY, f64::max),
    );
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if integer || lo >= hi {
        // Layer axes start at 0 and span at least one unit.
        (lo, hi) = (lo.min(0.0), hi.max(lo.min(0.0) + 1.0));
    }
    let pad = if integer { 0.5 } else { (hi - lo) * 0.04 };
    let (x0, x1) = (lo - pad, hi + pad);
    (x0, x1, integer)
}

pub(super) fn draw_layers<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    (title, x_label, y_label): (&str, &str, &str),
    (y0, y1): (f64, f64),
    reference: Option<f64>,
    curves: &[Curve],
) -> DrawResult<DB> {
    let (x0, x1, integer) = x_range(curves);
    let entries: Vec<LegendEntry> = curves
        .iter()
        .map(|c| LegendEntry {
            label: c.label.clone(),
            color: c.color,
            line: Some((c.dashed, c.width)),
            band: !band(c).is_empty(),
            marker: c.marker,
            marker_style: curve_marker_style(c),
        })
        .collect();
    let footprint = |plot: Rect| curves_footprint(curves, (x0, x1), (y0, y1), plot);
    let (mut chart, f) = xy_chart(
        root,
        (title, x_label, y_label),
        &entries,
        &footprint,
        (x0, x1, y0, y1),
        integer,
    )?;
    if let Some(r) = reference {
        chart.draw_series(LineSeries::new([(x0, r), (x1, r)], GREY.stroke_width(1)))?;
    }
    // Bands under every line; then the lines, the first curve last (on top).
    for c in curves.iter().rev() {
        let band = band(c);
        if !band.is_empty() {
            let mut outline: Vec<(f64, f64)> = band.iter().map(|&(x, _, hi)| (x, hi)).collect();
            outline.extend(band.iter().rev().map(|&(x, lo, _)| (x, lo)));
            chart.draw_series(std::iter::once(Polygon::new(outline, c.color.mix(0.18))))?;
        }
    }
    for c in curves.iter().rev() {
        let line: Vec<(f64, f64)> = c.points.iter().map(|p| (p.layer, p.value)).collect();
        let style = c.color.stroke_width(c.width);
        if c.dashed {
            chart.draw_series(DashedLineSeries::new(line.clone(), 8, 6, style))?;
        } else {
            chart.draw_series(LineSeries::new(line.clone(), style))?;
        }
        for p in &line {
            marker_at(
                root,
                c.marker,
                chart.backend_coord(p),
                4,
                curve_marker_style(c),
            )?;
        }
    }
    draw_label(root, &f.title, &BLACK)?;
    if let Some(rect) = f.legend {
        draw_legend(root, rect, &entries)?;
    }
    Ok(())
}
