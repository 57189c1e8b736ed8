//! The figure kinds, drawn on any plotters backend (PNG and SVG share code).
//! Where text and legends go is computed by [`super::layout`], with the font's
//! own metrics; this module draws what it computed.
//!
//! Over 700 lines on purpose: the four drawers (layers, heatmap, scatter,
//! intervals) share the private frame, tick, marker and legend helpers here,
//! and splitting them would make those helpers part of the module's interface.

use plotters::coord::ranged1d::{AsRangedCoord, DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::data::{Curve, Figure, Interval, Marker, PointGroup, GREY, PALETTE};
use super::layout::{self, Label, Orientation, Rect, Ticks, DESC_SIZE, FONT, MARGIN, TICK_SIZE};

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

impl Figure {
    pub fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        root.fill(&WHITE)?;
        match self {
            Figure::Layers {
                title,
                x_label,
                y_label,
                y_range,
                reference,
                curves,
            } => draw_layers(
                root,
                (title, x_label, y_label),
                *y_range,
                *reference,
                curves,
            ),
            Figure::Heatmap {
                title,
                scale,
                row_label,
                col_label,
                rows,
                cols,
                values,
            } => draw_heatmap(
                root,
                (title, row_label, col_label),
                *scale,
                rows,
                cols,
                values,
            ),
            Figure::Scatter {
                title,
                x_label,
                y_label,
                groups,
            } => draw_scatter(root, title, x_label, y_label, groups),
            Figure::Intervals {
                title,
                y_label,
                items,
            } => draw_intervals(root, title, y_label, items),
        }?;
        root.present()
    }
}

fn draw_label<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    label: &Label,
    color: &RGBColor,
) -> DrawResult<DB> {
    root.draw(&Text::new(
        label.text.clone(),
        label.rect.center(),
        TextStyle::from((FONT, label.size).into_font())
            .pos(Pos::new(HPos::Center, VPos::Center))
            .color(color),
    ))
}

/// A linear axis whose ticks are exactly the given values (plotters' own
/// choice can't be told which decimals to print).
struct Axis {
    inner: RangedCoordf64,
    ticks: Vec<f64>,
}

trait Ticked {
    fn ticked(self, ticks: Vec<f64>) -> Axis;
}

impl Ticked for std::ops::Range<f64> {
    fn ticked(self, ticks: Vec<f64>) -> Axis {
        Axis {
            inner: self.into(),
            ticks,
        }
    }
}

impl Ranged for Axis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.inner.map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.max_num_points() == 0 {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.inner.range()
    }
}

/// Height of the area below a chart for the x ticks and the x description.
const X_AREA: i32 = 56;

/// A chart whose plotting area is exactly `plot`, with `left` pixels of y-axis
/// area left of it and `bottom` pixels of x-axis area below it.
#[allow(clippy::type_complexity)]
fn chart_in<'a, DB: DrawingBackend, X: AsRangedCoord, Y: AsRangedCoord>(
    root: &'a DrawingArea<DB, Shift>,
    plot: Rect,
    (left, bottom): (i32, i32),
    x: X,
    y: Y,
) -> Result<
    ChartContext<'a, DB, Cartesian2d<X::CoordDescType, Y::CoordDescType>>,
    DrawingAreaErrorKind<DB::ErrorType>,
> {
    let (w, h) = root.dim_in_pixel();
    ChartBuilder::on(root)
        .margin_top(plot.y0)
        .margin_right(w as i32 - plot.x1)
        .margin_left(plot.x0 - left)
        .margin_bottom(h as i32 - plot.y1 - bottom)
        .x_label_area_size(bottom)
        .y_label_area_size(left)
        .build_cartesian_2d(x, y)
}

/// The axes of the line and scatter figures: the title and legend frame, y
/// ticks over `[y0, y1]`, x ticks fitted to the plot width (integers when
/// `integer_x`), and the mesh with tick labels formatted for their range.
#[allow(clippy::type_complexity)]
fn xy_chart<'a, DB: DrawingBackend>(
    root: &'a DrawingArea<DB, Shift>,
    (title, x_label, y_label): (&str, &str, &str),
    entries: &[LegendEntry],
    footprint: &dyn Fn(Rect) -> Vec<Rect>,
    (x0, x1, y0, y1): (f64, f64, f64, f64),
    integer_x: bool,
) -> Result<
    (ChartContext<'a, DB, Cartesian2d<Axis, Axis>>, Frame),
    DrawingAreaErrorKind<DB::ErrorType>,
> {
    let y_ticks = Ticks::new(y0, y1, 11);
    let f = frame(
        root.dim_in_pixel(),
        title,
        y_area(&y_ticks),
        legend_size(entries),
        footprint,
    );
    let x_ticks = x_ticks(x0, x1, f.plot.width(), integer_x);
    let mut chart = chart_in(
        root,
        f.plot,
        (f.left, X_AREA),
        (x0..x1).ticked(x_ticks.values.clone()),
        (y0..y1).ticked(y_ticks.values.clone()),
    )?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&|v| x_ticks.format(*v))
        .y_label_formatter(&|v| y_ticks.format(*v))
        .axis_desc_style((FONT, DESC_SIZE))
        .label_style((FONT, TICK_SIZE))
        .bold_line_style(BLACK.mix(0.12))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    Ok((chart, f))
}

/// Width of the y-axis area: the widest tick label, the tick marks and the description.
fn y_area(ticks: &Ticks) -> i32 {
    let widest = ticks
        .values
        .iter()
        .map(|&v| layout::text_width(&ticks.format(v), TICK_SIZE))
        .max()
        .unwrap_or(0);
    DESC_SIZE + 18 + widest + 14
}

/// Ticks for an x axis `width` pixels wide: as many as fit with their labels apart.
fn x_ticks(lo: f64, hi: f64, width: i32, integer: bool) -> Ticks {
    for n in (3..=12).rev() {
        let t = if integer {
            Ticks::integers(lo, hi, n)
        } else {
            Ticks::new(lo, hi, n)
        };
        let widest = t
            .values
            .iter()
            .map(|&v| layout::text_width(&t.format(v), TICK_SIZE))
            .max()
            .unwrap_or(0);
        let step = match t.values.as_slice() {
            [a, b, ..] => ((b - a) / (hi - lo) * width as f64) as i32,
            _ => width,
        };
        if widest + 12 <= step {
            return t;
        }
    }
    Ticks::new(lo, hi, 2)
}

/// Data to pixels in a plotting area, as plotters maps them (to a pixel).
struct Map {
    plot: Rect,
    x: (f64, f64),
    y: (f64, f64),
}

impl Map {
    fn px(&self, (x, y): (f64, f64)) -> (i32, i32) {
        let fx = (x - self.x.0) / (self.x.1 - self.x.0);
        let fy = (y - self.y.0) / (self.y.1 - self.y.0);
        (
            self.plot.x0 + (fx * (self.plot.width() - 1) as f64).round() as i32,
            self.plot.y1 - 1 - (fy * (self.plot.height() - 1) as f64).round() as i32,
        )
    }
}

/// One legend row: the series' own line (solid or dashed, its width), band and marker.
struct LegendEntry {
    label: String,
    color: RGBColor,
    line: Option<(bool, u32)>,
    band: bool,
    marker: Marker,
    /// How the marker is drawn in the figure (filled, outlined, translucent).
    marker_style: ShapeStyle,
}

const LEGEND_FONT: i32 = 16;
const LEGEND_ROW: i32 = 24;
const SWATCH: i32 = 40;

fn legend_size(entries: &[LegendEntry]) -> (i32, i32) {
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

/// The title, the plotting area and the legend's box of a chart.
struct Frame {
    title: Label,
    plot: Rect,
    left: i32,
    legend: Option<Rect>,
}

/// Puts the legend in the first corner of the plotting area where it covers no
/// data (`footprint` gives the data's pixel boxes for a plotting area), or, when
/// every corner would cover some, right of a narrower plotting area.
fn frame(
    size: (u32, u32),
    title: &str,
    left: i32,
    legend: (i32, i32),
    footprint: &dyn Fn(Rect) -> Vec<Rect>,
) -> Frame {
    let (w, h) = (size.0 as i32, size.1 as i32);
    let title = layout::title(title, size);
    let full = Rect::new(
        MARGIN + left,
        title.rect.y1 + 14,
        w - MARGIN - 12,
        h - MARGIN - X_AREA,
    );
    let (legend, plot) = if legend.1 == 0 {
        (None, full)
    } else if let Some(c) = layout::free_corner(full, legend, &footprint(full)) {
        (Some(layout::corner_box(full, legend, c)), full)
    } else {
        let plot = Rect {
            x1: (full.x1 - legend.0 - 20).max(full.x0 + full.width() / 2),
            ..full
        };
        let x0 = plot.x1 + 20;
        (
            Some(Rect::new(x0, plot.y0, x0 + legend.0, plot.y0 + legend.1)),
            plot,
        )
    };
    Frame {
        title,
        plot,
        left,
        legend,
    }
}

fn marker_at<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    marker: Marker,
    (x, y): (i32, i32),
    r: i32,
    style: ShapeStyle,
) -> DrawResult<DB> {
    match marker {
        Marker::None => Ok(()),
        Marker::Circle => root.draw(&Circle::new((x, y), r, style)),
        Marker::Square => root.draw(&Rectangle::new([(x - r, y - r), (x + r, y + r)], style)),
        Marker::Triangle => root.draw(&TriangleMarker::new((x, y), r + 1, style)),
    }
}

/// The style of a curve's markers: squares hollow (a line under them stays visible).
fn curve_marker_style(c: &Curve) -> ShapeStyle {
    if c.marker == Marker::Square {
        c.color.stroke_width(2)
    } else {
        c.color.filled()
    }
}

/// The style of a scatter group's points.
fn point_style(g: &PointGroup) -> ShapeStyle {
    if g.filled {
        g.color.mix(0.7).filled()
    } else {
        g.color.mix(0.9).stroke_width(1)
    }
}

fn draw_legend<DB: DrawingBackend>(
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

fn draw_layers<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    (title, x_label, y_label): (&str, &str, &str),
    (y0, y1): (f64, f64),
    reference: Option<f64>,
    curves: &[Curve],
) -> DrawResult<DB> {
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

fn draw_heatmap<DB: DrawingBackend>(
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
    // The colour bar: one pixel row per value, a frame, ticks with their values.
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

fn padded_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.06).max(1e-6);
    (lo - pad, hi + pad)
}

fn draw_scatter<DB: DrawingBackend>(
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

fn draw_intervals<DB: DrawingBackend>(
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
    let plot = l.plot;
    match l.orientation {
        Orientation::Vertical => {
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
            for ((it, &c), color) in items.iter().zip(&l.centers).zip(&colors) {
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
        }
        Orientation::Horizontal => {
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
            for ((it, &c), color) in items.iter().zip(&l.centers).zip(&colors) {
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
        }
    }
    for label in l.labels.iter().flatten() {
        draw_label(root, label, &BLACK)?;
    }
    draw_label(root, &l.title, &BLACK)
}
