//! The figure kinds, drawn on any plotters backend (PNG and SVG share code).

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Colours that stay distinct in print and for common colour blindness (Tableau 10).
pub const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

pub const GREY: RGBColor = RGBColor(127, 127, 127);

/// Pixel size of every figure.
pub const SIZE: (u32, u32) = (960, 600);

const FONT: &str = "sans-serif";

/// One line of a per-layer plot, with an optional interval band.
pub struct Curve {
    pub label: String,
    pub color: RGBColor,
    pub dashed: bool,
    pub points: Vec<LayerPoint>,
}

/// A value at a layer, with an optional interval.
pub struct LayerPoint {
    pub layer: f64,
    pub value: f64,
    pub interval: Option<(f64, f64)>,
}

/// One coloured group of a scatter plot.
pub struct PointGroup {
    pub label: String,
    pub color: RGBColor,
    pub filled: bool,
    pub points: Vec<(f64, f64)>,
}

/// A value with an interval, for one category.
pub struct Interval {
    pub label: String,
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
}

pub enum Figure {
    /// Lines over layers (AUROC by layer) or another x (a steering sweep), with a
    /// reference line at `reference`. Integer x values get integer ticks.
    Layers {
        title: String,
        x_label: String,
        y_label: String,
        y_range: (f64, f64),
        reference: Option<f64>,
        curves: Vec<Curve>,
    },
    /// A matrix of values with row and column names, printed in the cells;
    /// `scale` = (value drawn white, value drawn full blue); beyond white towards red.
    Heatmap {
        title: String,
        scale: (f64, f64),
        row_label: String,
        col_label: String,
        rows: Vec<String>,
        cols: Vec<String>,
        values: Vec<Vec<Option<f64>>>,
    },
    Scatter {
        title: String,
        x_label: String,
        y_label: String,
        groups: Vec<PointGroup>,
    },
    /// Points with vertical interval bars per category, and a zero line.
    Intervals {
        title: String,
        y_label: String,
        items: Vec<Interval>,
    },
}

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
    if integer || lo >= hi {
        // Layer axes start at 0 and span at least one unit.
        (lo, hi) = (lo.min(0.0), hi.max(lo.min(0.0) + 1.0));
    }
    let pad = if integer { 0.5 } else { (hi - lo) * 0.04 };
    let (x0, x1) = (lo - pad, hi + pad);
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT, 26))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .x_label_formatter(&|v| {
            if integer {
                format!("{}", v.round() as i64)
            } else {
                format!("{v:.2}")
            }
        })
        .y_desc(y_label)
        .axis_desc_style((FONT, 20))
        .label_style((FONT, 16))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    if let Some(r) = reference {
        chart.draw_series(LineSeries::new([(x0, r), (x1, r)], GREY.stroke_width(1)))?;
    }
    for c in curves {
        let band: Vec<(f64, f64, f64)> = c
            .points
            .iter()
            .filter_map(|p| p.interval.map(|(lo, hi)| (p.layer, lo, hi)))
            .collect();
        if band.len() > 1 {
            let mut outline: Vec<(f64, f64)> = band.iter().map(|&(x, _, hi)| (x, hi)).collect();
            outline.extend(band.iter().rev().map(|&(x, lo, _)| (x, lo)));
            chart.draw_series(std::iter::once(Polygon::new(outline, c.color.mix(0.18))))?;
        }
        let line: Vec<(f64, f64)> = c.points.iter().map(|p| (p.layer, p.value)).collect();
        let style = c.color.stroke_width(3);
        let color = c.color;
        if c.dashed {
            chart
                .draw_series(DashedLineSeries::new(line.clone(), 8, 6, style))?
                .label(c.label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 24, y)], color.stroke_width(3))
                });
        } else {
            chart
                .draw_series(LineSeries::new(line.clone(), style))?
                .label(c.label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 24, y)], color.stroke_width(3))
                });
            chart.draw_series(line.iter().map(|&p| Circle::new(p, 3, c.color.filled())))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(GREY)
        .label_font((FONT, 17))
        .draw()
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
    let (w, h) = root.dim_in_pixel();
    let (w, h) = (w as i32, h as i32);
    root.draw(&Text::new(
        title.to_string(),
        (w / 2, 18),
        TextStyle::from((FONT, 26).into_font()).pos(Pos::new(HPos::Center, VPos::Top)),
    ))?;
    let (left, top, right, bottom) = (190, 80, 40, 110);
    let cell_w = (w - left - right) / cols.len().max(1) as i32;
    let cell_h = (h - top - bottom) / rows.len().max(1) as i32;
    let centered = |size: i32| {
        TextStyle::from((FONT, size).into_font()).pos(Pos::new(HPos::Center, VPos::Center))
    };
    // Numbers and row names shrink with the cells (a 30-layer heatmap has short rows).
    let value_font = 22.min(cell_h * 7 / 10).min(cell_w / 3);
    let row_font = 18.min(cell_h * 9 / 10);
    for (i, row) in values.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            let (x, y) = (left + j as i32 * cell_w, top + i as i32 * cell_h);
            let t = v.map(|v| heat_position(v, scale));
            let fill = t.map_or(RGBColor(235, 235, 235), heat_color);
            root.draw(&Rectangle::new(
                [(x, y), (x + cell_w, y + cell_h)],
                fill.filled(),
            ))?;
            root.draw(&Rectangle::new(
                [(x, y), (x + cell_w, y + cell_h)],
                WHITE.stroke_width(2),
            ))?;
            let text = v.map_or("n/a".to_string(), |v| format!("{v:.2}"));
            let ink = if t.is_some_and(|t| !(-0.5..=0.7).contains(&t)) {
                WHITE
            } else {
                BLACK
            };
            root.draw(&Text::new(
                text,
                (x + cell_w / 2, y + cell_h / 2),
                centered(value_font).color(&ink),
            ))?;
        }
    }
    for (j, c) in cols.iter().enumerate() {
        root.draw(&Text::new(
            c.clone(),
            (
                left + j as i32 * cell_w + cell_w / 2,
                top + rows.len() as i32 * cell_h + 22,
            ),
            centered(18),
        ))?;
    }
    for (i, r) in rows.iter().enumerate() {
        root.draw(&Text::new(
            r.clone(),
            (left - 70, top + i as i32 * cell_h + cell_h / 2),
            centered(row_font),
        ))?;
    }
    root.draw(&Text::new(
        col_label.to_string(),
        (left + (w - left - right) / 2, h - 45),
        centered(20),
    ))?;
    root.draw(&Text::new(
        row_label.to_string(),
        (22, top + (h - top - bottom) / 2),
        centered(20).transform(FontTransform::Rotate270),
    ))?;
    Ok(())
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
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT, 26))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .axis_desc_style((FONT, 20))
        .label_style((FONT, 16))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for g in groups {
        let style = if g.filled {
            g.color.mix(0.7).filled()
        } else {
            g.color.mix(0.9).stroke_width(1)
        };
        chart
            .draw_series(g.points.iter().map(|&p| Circle::new(p, 4, style)))?
            .label(g.label.as_str())
            .legend(move |(x, y)| Circle::new((x + 10, y), 5, style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(GREY)
        .label_font((FONT, 16))
        .draw()
}

fn draw_intervals<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    y_label: &str,
    items: &[Interval],
) -> DrawResult<DB> {
    let (y0, y1) = padded_range(
        items
            .iter()
            .flat_map(|i| [i.lo, i.hi, i.value])
            .chain([0.0]),
    );
    let n = items.len() as i32;
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT, 26))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(90)
        .build_cartesian_2d((0..n).into_segmented(), y0..y1)?;
    chart
        .configure_mesh()
        .y_desc(y_label)
        .axis_desc_style((FONT, 20))
        .label_style((FONT, 17))
        .light_line_style(WHITE.mix(0.0))
        .disable_x_mesh()
        .x_labels(items.len() + 1)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => items
                .get(*i as usize)
                .map_or(String::new(), |it| it.label.clone()),
            SegmentValue::Last => String::new(),
        })
        .draw()?;
    chart.draw_series(LineSeries::new(
        [(SegmentValue::Exact(0), 0.0), (SegmentValue::Last, 0.0)],
        GREY.stroke_width(1),
    ))?;
    for (i, it) in items.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let x = SegmentValue::CenterOf(i as i32);
        chart.draw_series(std::iter::once(ErrorBar::new_vertical(
            x.clone(),
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
