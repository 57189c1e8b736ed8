//! A scatter plot of coloured point groups.

use plotters::coord::Shift;
use plotters::prelude::*;

use super::legend::{draw_legend, LegendEntry};
use super::{draw_label, padded_range, xy_chart, DrawResult, Map};
use crate::plot::data::{Marker, PointGroup};
use crate::plot::layout::Rect;

/// The style of a scatter group's points.
fn point_style(g: &PointGroup) -> ShapeStyle {
    if g.filled {
        g.color.mix(0.7).filled()
    } else {
        g.color.mix(0.9).stroke_width(1)
    }
}

pub(super) fn draw_scatter<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    groups: &[PointGroup],
) -> DrawResult<DB> {
    let all = || groups.iter().flat_map(|g| g.points.iter());
    let (x0, x1) = padded_range(all().map(|p| p.0));
    let (y0, y1) = padded_range(all().map(|p| p.1));
    let entries: Vec<LegendEntry> = groups
        .iter()
        .map(|g| LegendEntry {
            label: g.label.clone(),
            color: g.color,
            line: None,
            band: false,
            marker: Marker::Circle,
            marker_style: point_style(g),
        })
        .collect();
    let footprint = |plot: Rect| {
        let map = Map {
            plot,
            x: (x0, x1),
            y: (y0, y1),
        };
        all()
            .map(|&p| Rect::centered(map.px(p), (12, 12)))
            .collect()
    };
    let (mut chart, f) = xy_chart(
        root,
        (title, x_label, y_label),
        &entries,
        &footprint,
        (x0, x1, y0, y1),
        false,
    )?;
    for g in groups {
        let style = point_style(g);
        chart.draw_series(g.points.iter().map(|&p| Circle::new(p, 4, style)))?;
    }
    draw_label(root, &f.title, &BLACK)?;
    if let Some(rect) = f.legend {
        draw_legend(root, rect, &entries)?;
    }
    Ok(())
}
