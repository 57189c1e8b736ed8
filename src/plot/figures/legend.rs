//! The legend of the line and scatter figures: one row per series, drawn with
//! the series' own line, band and marker.

use plotters::coord::Shift;
use plotters::prelude::*;

use super::{draw_label, marker_at, DrawResult};
use crate::plot::data::{Marker, GREY};
use crate::plot::layout::{self, Label, Rect};

/// One legend row: the series' own line (solid or dashed, its width), band and marker.
pub(super) struct LegendEntry {
    pub(super) label: String,
    pub(super) color: RGBColor,
    pub(super) line: Option<(bool, u32)>,
    pub(super) band: bool,
    pub(super) marker: Marker,
    /// How the marker is drawn in the figure (filled, outlined, translucent).
    pub(super) marker_style: ShapeStyle,
}

const LEGEND_FONT: i32 = 16;
const LEGEND_ROW: i32 = 24;
const SWATCH: i32 = 40;

pub(super) fn legend_size(entries: &[LegendEntry]) -> (i32, i32) {
    if entries.is_empty() {
        return (0, 0);
    }
    let widest = entries
        .iter()
        .map(|e| layout::text_width(&e.label, LEGEND_FONT))
        .max()
        .unwrap_or(0);
    (
        10 + SWATCH + 8 + widest + 10,
        6 + entries.len() as i32 * LEGEND_ROW + 6,
    )
}

pub(super) fn draw_legend<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    rect: Rect,
    entries: &[LegendEntry],
) -> DrawResult<DB> {
    root.draw(&Rectangle::new(
        [(rect.x0, rect.y0), (rect.x1, rect.y1)],
        WHITE.filled(),
    ))?;
    root.draw(&Rectangle::new(
        [(rect.x0, rect.y0), (rect.x1, rect.y1)],
        GREY.stroke_width(1),
    ))?;
    for (i, e) in entries.iter().enumerate() {
        let y = rect.y0 + 6 + i as i32 * LEGEND_ROW + LEGEND_ROW / 2;
        let (s0, s1) = (rect.x0 + 10, rect.x0 + 10 + SWATCH);
        if e.band {
            root.draw(&Rectangle::new(
                [(s0, y - 8), (s1, y + 8)],
                e.color.mix(0.18).filled(),
            ))?;
        }
        if let Some((dashed, width)) = e.line {
            let style = e.color.stroke_width(width);
            if dashed {
                for k in 0..3 {
                    let x = s0 + k * 15;
                    root.draw(&PathElement::new([(x, y), (x + 9, y)], style))?;
                }
            } else {
                root.draw(&PathElement::new([(s0, y), (s1, y)], style))?;
            }
        }
        marker_at(root, e.marker, ((s0 + s1) / 2, y), 4, e.marker_style)?;
        let label = Label::left_aligned(&e.label, LEGEND_FONT, (s1 + 8, y));
        draw_label(root, &label, &BLACK)?;
    }
    Ok(())
}
