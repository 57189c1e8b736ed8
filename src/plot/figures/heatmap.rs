//! A matrix of values with row and column names, and its colour bar.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{draw_label, DrawResult};
use crate::plot::data::GREY;
use crate::plot::layout::{self, HeatmapLayout, Label, DESC_SIZE, FONT};

/// `v` on the heatmap's scale: 0 at the white value, 1 at full blue, negative towards red.
fn heat_position(v: f64, (white, full): (f64, f64)) -> f64 {
    ((v - white) / (full - white)).clamp(-1.0, 1.0)
}

/// White to blue for t in [0, 1]; towards red below 0 (an anti-correlated read-out).
fn heat_color(t: f64) -> RGBColor {
    let mix = |a: u8, b: u8, t: f64| (a as f64 + (b as f64 - a as f64) * t).round() as u8;
    if t >= 0.0 {
        RGBColor(mix(255, 31, t), mix(255, 90, t), mix(255, 160, t))
    } else {
        RGBColor(mix(255, 200, -t), mix(255, 40, -t), mix(255, 40, -t))
    }
}

pub(super) fn draw_heatmap<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    (title, row_label, col_label): (&str, &str, &str),
    scale: (f64, f64),
    rows: &[String],
    cols: &[String],
    values: &[Vec<Option<f64>>],
) -> DrawResult<DB> {
    let l = layout::heatmap(
        title,
        (row_label, col_label),
        rows,
        cols,
        scale,
        root.dim_in_pixel(),
    );
    let (cell_w, cell_h) = (l.cell_w, l.cell_h);
    for (i, row) in values.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            let (x, y) = (
                l.cells.x0 + j as i32 * cell_w,
                l.cells.y0 + i as i32 * cell_h,
            );
            let t = v.map(|v| heat_position(v, scale));
            let fill = t.map_or(RGBColor(235, 235, 235), heat_color);
            let corners = [(x, y), (x + cell_w, y + cell_h)];
            root.draw(&Rectangle::new(corners, fill.filled()))?;
            let line = if cell_h >= 12 { 2 } else { 1 };
            root.draw(&Rectangle::new(corners, WHITE.stroke_width(line)))?;
            if let Some(size) = l.value_size {
                let text = v.map_or("n/a".to_string(), |v| format!("{v:.2}"));
                let ink = if t.is_some_and(|t| !(-0.5..=0.7).contains(&t)) {
                    WHITE
                } else {
                    BLACK
                };
                let label = Label::centered(&text, size, (x + cell_w / 2, y + cell_h / 2));
                draw_label(root, &label, &ink)?;
            }
        }
    }
    for label in l.row_labels.iter().chain(&l.col_labels).flatten() {
        draw_label(root, label, &BLACK)?;
    }
    draw_color_bar(root, &l, scale)?;
    draw_label(root, &l.col_desc, &BLACK)?;
    root.draw(&Text::new(
        l.row_desc.text.clone(),
        l.row_desc.rect.center(),
        TextStyle::from((FONT, DESC_SIZE).into_font())
            .pos(Pos::new(HPos::Center, VPos::Center))
            .transform(FontTransform::Rotate270),
    ))?;
    draw_label(root, &l.title, &BLACK)
}

/// The colour bar: one pixel row per value, a frame, ticks with their values.
fn draw_color_bar<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    l: &HeatmapLayout,
    scale: (f64, f64),
) -> DrawResult<DB> {
    let range = layout::heat_range(scale);
    let bar = l.bar;
    for y in bar.y0..bar.y1 {
        let color = heat_color(heat_position(l.bar_value(y, range), scale));
        root.draw(&Rectangle::new(
            [(bar.x0, y), (bar.x1, y + 1)],
            color.filled(),
        ))?;
    }
    root.draw(&Rectangle::new(
        [(bar.x0, bar.y0), (bar.x1, bar.y1)],
        GREY.stroke_width(1),
    ))?;
    for (v, label) in &l.bar_ticks {
        let y = l.bar_y(*v, range);
        root.draw(&PathElement::new(
            [(bar.x1, y), (bar.x1 + 4, y)],
            BLACK.stroke_width(1),
        ))?;
        draw_label(root, label, &BLACK)?;
    }
    Ok(())
}
