//! Points with interval bars per category and a zero line: upright when the
//! category names fit side by side, otherwise a forest plot.

use plotters::coord::Shift;
use plotters::prelude::*;

use super::{chart_in, draw_label, padded_range, x_ticks, DrawResult, Ticked};
use crate::plot::data::{Interval, GREY, PALETTE};
use crate::plot::layout::{
    self, IntervalLayout, Orientation, Ticks, DESC_SIZE, FONT, MARGIN, TICK_SIZE,
};

/// Colour per item: one palette colour per group of ordinary rows, black for summaries.
fn group_colors(items: &[Interval]) -> Vec<RGBColor> {
    let mut groups: Vec<&str> = Vec::new();
    items
        .iter()
        .map(|it| {
            if it.summary {
                return BLACK;
            }
            let k = groups
                .iter()
                .position(|g| *g == it.group)
                .unwrap_or_else(|| {
                    groups.push(&it.group);
                    groups.len() - 1
                });
            PALETTE[k % PALETTE.len()]
        })
        .collect()
}

pub(super) fn draw_intervals<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    value_label: &str,
    items: &[Interval],
) -> DrawResult<DB> {
    let l = layout::intervals(title, items, root.dim_in_pixel());
    let (v0, v1) = padded_range(
        items
            .iter()
            .flat_map(|i| [i.lo, i.hi, i.value])
            .chain([0.0]),
    );
    let colors = group_colors(items);
    match l.orientation {
        Orientation::Vertical => draw_upright(root, &l, value_label, items, &colors, (v0, v1)),
        Orientation::Horizontal => draw_forest(root, &l, value_label, items, &colors, (v0, v1)),
    }?;
    for label in l.labels.iter().flatten() {
        draw_label(root, label, &BLACK)?;
    }
    draw_label(root, &l.title, &BLACK)
}

/// Categories along x, values up the y axis.
fn draw_upright<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    l: &IntervalLayout,
    value_label: &str,
    items: &[Interval],
    colors: &[RGBColor],
    (v0, v1): (f64, f64),
) -> DrawResult<DB> {
    let plot = l.plot;
    let ticks = Ticks::new(v0, v1, 11);
    let pw = plot.width() as f64;
    let mut chart = chart_in(
        root,
        plot,
        (
            l.value_area,
            root.dim_in_pixel().1 as i32 - plot.y1 - MARGIN,
        ),
        (0.0..pw).ticked(Vec::new()),
        (v0..v1).ticked(ticks.values.clone()),
    )?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(value_label)
        .y_label_formatter(&|v| ticks.format(*v))
        .axis_desc_style((FONT, DESC_SIZE))
        .label_style((FONT, TICK_SIZE))
        .bold_line_style(BLACK.mix(0.12))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    chart.draw_series(LineSeries::new(
        [(0.0, 0.0), (pw, 0.0)],
        GREY.stroke_width(1),
    ))?;
    for &s in &l.separators {
        let x = (s - plot.x0) as f64;
        chart.draw_series(DashedLineSeries::new([(x, v0), (x, v1)], 5, 5, GREY.into()))?;
    }
    for ((it, &c), color) in items.iter().zip(&l.centers).zip(colors) {
        let x = (c - plot.x0) as f64;
        chart.draw_series(std::iter::once(ErrorBar::new_vertical(
            x,
            it.lo,
            it.value,
            it.hi,
            color.stroke_width(3),
            16,
        )))?;
        chart.draw_series(std::iter::once(Circle::new(
            (x, it.value),
            6,
            color.filled(),
        )))?;
    }
    Ok(())
}

/// Categories down the y axis, values along x (a forest plot).
fn draw_forest<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    l: &IntervalLayout,
    value_label: &str,
    items: &[Interval],
    colors: &[RGBColor],
    (v0, v1): (f64, f64),
) -> DrawResult<DB> {
    let plot = l.plot;
    let ticks = x_ticks(v0, v1, plot.width(), false);
    let ph = plot.height() as f64;
    let y = |c: i32| (plot.y1 - c) as f64;
    let mut chart = chart_in(
        root,
        plot,
        (plot.x0 - MARGIN, l.value_area),
        (v0..v1).ticked(ticks.values.clone()),
        (0.0..ph).ticked(Vec::new()),
    )?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc(value_label)
        .x_label_formatter(&|v| ticks.format(*v))
        .axis_desc_style((FONT, DESC_SIZE))
        .label_style((FONT, TICK_SIZE))
        .bold_line_style(BLACK.mix(0.12))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    chart.draw_series(LineSeries::new(
        [(0.0, 0.0), (0.0, ph)],
        GREY.stroke_width(1),
    ))?;
    for &s in &l.separators {
        chart.draw_series(DashedLineSeries::new(
            [(v0, y(s)), (v1, y(s))],
            5,
            5,
            GREY.into(),
        ))?;
    }
    let bar_h = ((ph / items.len().max(1) as f64) * 0.5).clamp(4.0, 12.0) as u32;
    let dot = (bar_h as i32 / 2).clamp(3, 6);
    for ((it, &c), color) in items.iter().zip(&l.centers).zip(colors) {
        chart.draw_series(std::iter::once(ErrorBar::new_horizontal(
            y(c),
            it.lo,
            it.value,
            it.hi,
            color.stroke_width(3),
            bar_h,
        )))?;
        chart.draw_series(std::iter::once(Circle::new(
            (it.value, y(c)),
            dot,
            color.filled(),
        )))?;
    }
    Ok(())
}
