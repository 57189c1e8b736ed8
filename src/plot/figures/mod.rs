//! Drawing the figure kinds ([`super::data`]) on any plotters backend (PNG and
//! SVG share code). Where text and legends go is computed by
//! [`super::layout`], with the font's own metrics; these modules draw what it
//! computed. This file holds the dispatch and what the drawers share: the
//! chart frame, axes, ticks and markers; one file per figure kind draws it.

mod heatmap;
mod intervals;
mod layers;
mod legend;
mod scatter;

use plotters::coord::ranged1d::{AsRangedCoord, DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::data::{Figure, Marker};
use super::layout::{self, Label, Rect, Ticks, DESC_SIZE, FONT, MARGIN, TICK_SIZE};
use legend::{legend_size, LegendEntry};

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
            } => layers::draw_layers(
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
            } => heatmap::draw_heatmap(
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
            } => scatter::draw_scatter(root, title, x_label, y_label, groups),
            Figure::Intervals {
                title,
                y_label,
                items,
            } => intervals::draw_intervals(root, title, y_label, items),
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
