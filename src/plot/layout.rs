//! Pixel layout of a figure's text, measured with the bundled font: titles that
//! fit, tick values formatted for their step, category axes whose labels never
//! run into each other, heatmaps with a colour bar, and legends placed where they
//! cover no data. The drawing code in [`super::figures`] draws what these
//! functions compute, so tests can check the boxes instead of pixels.

use plotters::style::IntoFont;

use super::data::Interval;

/// The family every figure draws with (the bundled DejaVu Sans).
pub const FONT: &str = "sans-serif";

/// Title font size, shrunk (to at most [`TITLE_MIN`]) when a title is wider than the figure.
pub const TITLE_SIZE: i32 = 26;
const TITLE_MIN: i32 = 15;
/// Axis description and tick label sizes.
pub const DESC_SIZE: i32 = 20;
pub const TICK_SIZE: i32 = 16;
/// The smallest text a category axis shrinks to before it labels only every k-th row.
const MIN_LABEL: i32 = 10;
/// Space kept clear between two labels, in pixels.
pub const GAP: i32 = 3;
/// Outer margin of every figure.
pub const MARGIN: i32 = 16;

/// A box in pixels, `x0 <= x < x1`, `y0 <= y < y1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rect {
    pub x0: i32,
    pub y0: i32,
    pub x1: i32,
    pub y1: i32,
}

impl Rect {
    pub fn new(x0: i32, y0: i32, x1: i32, y1: i32) -> Rect {
        Rect { x0, y0, x1, y1 }
    }

    /// A box of `(w, h)` with its centre at `(x, y)`.
    pub fn centered((x, y): (i32, i32), (w, h): (i32, i32)) -> Rect {
        Rect::new(x - w / 2, y - h / 2, x - w / 2 + w, y - h / 2 + h)
    }

    pub fn width(&self) -> i32 {
        self.x1 - self.x0
    }

    pub fn height(&self) -> i32 {
        self.y1 - self.y0
    }

    pub fn center(&self) -> (i32, i32) {
        ((self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2)
    }

    /// Whether the two boxes share any pixel.
    pub fn overlaps(&self, other: &Rect) -> bool {
        self.x0 < other.x1 && other.x0 < self.x1 && self.y0 < other.y1 && other.y0 < self.y1
    }

    /// Whether `other` lies entirely inside this box.
    pub fn contains(&self, other: &Rect) -> bool {
        self.x0 <= other.x0 && other.x1 <= self.x1 && self.y0 <= other.y0 && other.y1 <= self.y1
    }

    /// Grown by `d` pixels on every side.
    pub fn inflate(&self, d: i32) -> Rect {
        Rect::new(self.x0 - d, self.y0 - d, self.x1 + d, self.y1 + d)
    }
}

/// A piece of text and the box it is drawn in (its centre is the anchor).
#[derive(Clone, Debug, PartialEq)]
pub struct Label {
    pub text: String,
    pub size: i32,
    pub rect: Rect,
}

impl Label {
    /// `text` at `size`, centred on `at`.
    pub fn centered(text: &str, size: i32, at: (i32, i32)) -> Label {
        Label {
            text: text.to_string(),
            size,
            rect: Rect::centered(at, text_size(text, size)),
        }
    }

    /// `text` at `size`, its right edge at `x`, centred vertically on `y`.
    pub fn right_aligned(text: &str, size: i32, (x, y): (i32, i32)) -> Label {
        let (w, h) = text_size(text, size);
        Label {
            text: text.to_string(),
            size,
            rect: Rect::new(x - w, y - h / 2, x, y - h / 2 + h),
        }
    }

    /// `text` at `size`, its left edge at `x`, centred vertically on `y`.
    pub fn left_aligned(text: &str, size: i32, (x, y): (i32, i32)) -> Label {
        let (w, h) = text_size(text, size);
        Label {
            text: text.to_string(),
            size,
            rect: Rect::new(x, y - h / 2, x + w, y - h / 2 + h),
        }
    }
}

/// Width and height in pixels of `text` in the bundled font at `size` pixels:
/// the sum of the glyph advances (with kerning) by the height of the em box.
pub fn text_size(text: &str, size: i32) -> (i32, i32) {
    super::register_font();
    let font = (FONT, size).into_font();
    let w = font
        .box_size(text)
        .map(|(w, _)| w as i32)
        // Only without the font (which is bundled): an average advance.
        .unwrap_or_else(|_| text.chars().count() as i32 * size * 6 / 10);
    (w, size)
}

pub fn text_width(text: &str, size: i32) -> i32 {
    text_size(text, size).0
}

/// The largest size up to `size` (down to `min`) at which `text` is at most `width` wide.
pub fn fit_size(text: &str, width: i32, size: i32, min: i32) -> i32 {
    (min..=size)
        .rev()
        .find(|&s| text_width(text, s) <= width)
        .unwrap_or(min)
}

/// The title, centred at the top of a figure `size` wide, shrunk to fit.
pub fn title(text: &str, (w, _): (u32, u32)) -> Label {
    let size = fit_size(text, w as i32 - 2 * MARGIN, TITLE_SIZE, TITLE_MIN);
    Label::centered(text, size, (w as i32 / 2, MARGIN / 2 + size / 2 + 2))
}

/// Tick values at a round step (1, 2 or 5 times a power of ten) inside `[lo, hi]`,
/// at most `max_n` of them, and how many decimals that step needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Ticks {
    pub values: Vec<f64>,
    pub decimals: usize,
}

impl Ticks {
    pub fn new(lo: f64, hi: f64, max_n: usize) -> Ticks {
        let span = hi - lo;
        if !(span.is_finite() && span > 0.0) {
            return Ticks {
                values: vec![lo],
                decimals: 2,
            };
        }
        let raw = span / max_n.max(2).saturating_sub(1) as f64;
        let mut exp = raw.log10().floor() as i32;
        let mult = 'search: loop {
            for m in [1.0, 2.0, 5.0] {
                if m * 10f64.powi(exp) >= raw * (1.0 - 1e-9) {
                    break 'search m;
                }
            }
            exp += 1;
        };
        let step = mult * 10f64.powi(exp);
        let first = (lo / step - 1e-9).ceil() as i64;
        let last = (hi / step + 1e-9).floor() as i64;
        let values = (first..=last)
            .map(|k| {
                let v = k as f64 * step;
                if v.abs() < step * 1e-9 {
                    0.0
                } else {
                    v
                }
            })
            .collect();
        Ticks {
            values,
            decimals: (-exp).max(0) as usize,
        }
    }

    /// Integer ticks (a step of at least 1), for layers and other counts.
    pub fn integers(lo: f64, hi: f64, max_n: usize) -> Ticks {
        let t = Ticks::new(lo, hi, max_n);
        if t.decimals == 0 {
            return t;
        }
        Ticks {
            values: (lo.ceil() as i64..=hi.floor() as i64)
                .map(|v| v as f64)
                .collect(),
            decimals: 0,
        }
    }

    pub fn format(&self, v: f64) -> String {
        format_tick(v, self.decimals)
    }
}

/// `v` with `decimals` decimals, without a `-0`.
pub fn format_tick(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    if s.starts_with('-') && s[1..].chars().all(|c| c == '0' || c == '.') {
        s[1..].to_string()
    } else {
        s
    }
}

/// How the categories of an interval figure run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Orientation {
    /// Categories along the x axis, values up the y axis (few, short labels).
    Vertical,
    /// Categories down the y axis, values along the x axis (a forest plot).
    Horizontal,
}

/// Where an interval figure's parts go.
#[derive(Clone, Debug)]
pub struct IntervalLayout {
    pub orientation: Orientation,
    pub title: Label,
    /// The plotting area.
    pub plot: Rect,
    /// Per item (in the items' order): its centre along the category axis, in
    /// pixels (x for vertical, y for horizontal).
    pub centers: Vec<i32>,
    /// Per item: its category label, `None` where there was no room for it.
    pub labels: Vec<Option<Label>>,
    /// Pixel positions along the category axis of lines that set summary rows apart.
    pub separators: Vec<i32>,
    /// Room left of the plot for the value axis ticks and description (vertical)
    /// or below it (horizontal).
    pub value_area: i32,
}

impl IntervalLayout {
    /// Every text box of the figure: the title and the category labels drawn.
    pub fn text_boxes(&self) -> Vec<&Label> {
        std::iter::once(&self.title)
            .chain(self.labels.iter().flatten())
            .collect()
    }
}

/// Category slots: the items in order, a half-slot gap between groups and a
/// full slot (with a separator) before each run of summary rows.
fn slots(items: &[Interval]) -> (Vec<f64>, Vec<f64>, f64) {
    let mut at = 0.0;
    let mut centers = Vec::new();
    let mut separators = Vec::new();
    for (i, it) in items.iter().enumerate() {
        if let Some(prev) = i.checked_sub(1).map(|p| &items[p]) {
            if it.summary != prev.summary || (it.summary && prev.group != it.group) {
                separators.push(at + 0.5);
                at += 1.0;
            } else if it.group != prev.group {
                at += 0.5;
            }
        }
        centers.push(at + 0.5);
        at += 1.0;
    }
    (centers, separators, at)
}

/// Lays out an interval figure of `items` (already in display order): upright
/// when every category label fits its column, otherwise a forest plot with the
/// categories down the y axis, shrinking the labels and, past the smallest
/// readable size, labelling only every k-th row.
pub fn intervals(title_text: &str, items: &[Interval], size: (u32, u32)) -> IntervalLayout {
    let (w, h) = (size.0 as i32, size.1 as i32);
    let title = title(title_text, size);
    let top = title.rect.y1 + 14;
    let (slot_at, seps, extent) = slots(items);
    let extent = extent.max(1.0);

    // Upright: values on the y axis (ticks and description need ~100 px).
    let value_w = 100;
    let plot = Rect::new(MARGIN + value_w, top, w - MARGIN - 8, h - MARGIN - 40);
    let pitch = plot.width() as f64 / extent;
    let label_size = 16;
    let upright_fits = items.iter().enumerate().all(|(i, it)| {
        let room = if i + 1 < items.len() {
            (slot_at[i + 1] - slot_at[i]) * pitch
        } else {
            pitch
        };
        text_width(&it.label, label_size) + GAP <= room as i32
    });
    if upright_fits {
        let px = |c: f64| plot.x0 + (c * pitch).round() as i32;
        let y = plot.y1 + 8 + label_size / 2;
        return IntervalLayout {
            orientation: Orientation::Vertical,
            centers: slot_at.iter().map(|&c| px(c)).collect(),
            labels: items
                .iter()
                .zip(&slot_at)
                .map(|(it, &c)| Some(Label::centered(&it.label, label_size, (px(c), y))))
                .collect(),
            separators: seps.iter().map(|&c| px(c)).collect(),
            title,
            plot,
            value_area: value_w,
        };
    }

    // A forest plot: labels right-aligned left of the plot, values along x.
    let value_h = 62;
    let (y0, y1) = (top, h - MARGIN - value_h);
    let pitch = (y1 - y0) as f64 / extent;
    let label_size = ((pitch * 0.8).floor() as i32).clamp(MIN_LABEL, label_size);
    // Rows closer than one label apart: label every k-th, counting within each group.
    let every = ((label_size + GAP) as f64 / pitch).ceil().max(1.0) as usize;
    let widest = items
        .iter()
        .map(|it| text_width(&it.label, label_size))
        .max()
        .unwrap_or(0)
        .min(w / 2);
    let plot = Rect::new(MARGIN + widest + 12, y0, w - MARGIN - 24, y1);
    let py = |c: f64| y0 + (c * pitch).round() as i32;
    let mut labels = Vec::new();
    let mut last: Option<Rect> = None;
    for (i, (it, &c)) in items.iter().zip(&slot_at).enumerate() {
        let label = Label::right_aligned(&it.label, label_size, (plot.x0 - 10, py(c)));
        let room = last.is_none_or(|r| r.y1 + GAP <= label.rect.y0);
        if room && (every == 1 || i % every == 0) {
            last = Some(label.rect);
            labels.push(Some(label));
        } else {
            labels.push(None);
        }
    }
    IntervalLayout {
        orientation: Orientation::Horizontal,
        centers: slot_at.iter().map(|&c| py(c)).collect(),
        labels,
        separators: seps.iter().map(|&c| py(c)).collect(),
        title,
        plot,
        value_area: value_h,
    }
}

/// Where a heatmap's parts go.
#[derive(Clone, Debug)]
pub struct HeatmapLayout {
    pub title: Label,
    /// The grid of cells.
    pub cells: Rect,
    pub cell_w: i32,
    pub cell_h: i32,
    /// Per row / column: its label, `None` where there was no room for it.
    pub row_labels: Vec<Option<Label>>,
    pub col_labels: Vec<Option<Label>>,
    /// Size of the numbers printed in the cells; `None` when cells are too small.
    pub value_size: Option<i32>,
    /// The colour bar and its tick labels (value, label).
    pub bar: Rect,
    pub bar_ticks: Vec<(f64, Label)>,
    /// The axis descriptions: the row one is drawn rotated.
    pub row_desc: Label,
    pub col_desc: Label,
}

impl HeatmapLayout {
    /// Every upright text box: the title, row, column and colour-bar labels and
    /// the column description (the row description is rotated, left of the rest).
    pub fn text_boxes(&self) -> Vec<&Label> {
        std::iter::once(&self.title)
            .chain(self.row_labels.iter().flatten())
            .chain(self.col_labels.iter().flatten())
            .chain(self.bar_ticks.iter().map(|(_, l)| l))
            .chain(std::iter::once(&self.col_desc))
            .collect()
    }

    /// The value at pixel row `y` of the colour bar.
    pub fn bar_value(&self, y: i32, (lo, hi): (f64, f64)) -> f64 {
        let t = (self.bar.y1 - 1 - y) as f64 / (self.bar.height() - 1).max(1) as f64;
        lo + t * (hi - lo)
    }

    /// The pixel row of the colour bar at `v`.
    pub fn bar_y(&self, v: f64, (lo, hi): (f64, f64)) -> i32 {
        let t = (v - lo) / (hi - lo);
        self.bar.y1 - 1 - (t * (self.bar.height() - 1) as f64).round() as i32
    }
}

/// The value range a heatmap's colour bar spans: full red to full blue.
pub fn heat_range((white, full): (f64, f64)) -> (f64, f64) {
    (white - (full - white), full)
}

/// Lays out a heatmap of `rows` × `cols` with the colour scale `scale`.
pub fn heatmap(
    title_text: &str,
    (row_desc, col_desc): (&str, &str),
    rows: &[String],
    cols: &[String],
    scale: (f64, f64),
    size: (u32, u32),
) -> HeatmapLayout {
    let (w, h) = (size.0 as i32, size.1 as i32);
    let title = title(title_text, size);
    let (n_rows, n_cols) = (rows.len().max(1) as i32, cols.len().max(1) as i32);
    let top = title.rect.y1 + 24;
    let bottom = h - MARGIN - DESC_SIZE - 12 - TICK_SIZE - 14;
    let cell_h = (bottom - top) / n_rows;
    let row_size = (cell_h * 8 / 10).clamp(MIN_LABEL, TICK_SIZE);
    let row_w = rows
        .iter()
        .map(|r| text_width(r, row_size))
        .max()
        .unwrap_or(0)
        .min(w / 3);
    let x0 = MARGIN + DESC_SIZE + 16 + row_w + 10;
    // The colour bar at the right: its ticks, measured.
    let range = heat_range(scale);
    let bar_h = (cell_h * n_rows).max(40);
    let ticks = Ticks::new(range.0, range.1, (bar_h / 50).clamp(2, 9) as usize);
    let tick_w = ticks
        .values
        .iter()
        .map(|&v| text_width(&ticks.format(v), 14))
        .max()
        .unwrap_or(0);
    let bar_x1 = w - MARGIN - tick_w - 10;
    let bar = Rect::new(bar_x1 - 18, top, bar_x1, top + bar_h);
    let cell_w = (bar.x0 - 36 - x0) / n_cols;
    let cells = Rect::new(x0, top, x0 + cell_w * n_cols, top + cell_h * n_rows);
    let mut layout = HeatmapLayout {
        bar_ticks: Vec::new(),
        row_labels: Vec::new(),
        col_labels: Vec::new(),
        value_size: None,
        row_desc: Label::centered(row_desc, DESC_SIZE, (0, 0)),
        col_desc: Label::centered(col_desc, DESC_SIZE, (0, 0)),
        title,
        cells,
        cell_w,
        cell_h,
        bar,
    };
    layout.bar_ticks = ticks
        .values
        .iter()
        .map(|&v| {
            let at = (bar.x1 + 6, layout.bar_y(v, range));
            (v, Label::left_aligned(&ticks.format(v), 14, at))
        })
        .collect();
    // Rows: every k-th when rows are closer than the smallest label.
    let every = ((MIN_LABEL + GAP) as f64 / cell_h.max(1) as f64)
        .ceil()
        .max(1.0) as usize;
    let mut last: Option<Rect> = None;
    for (i, r) in rows.iter().enumerate() {
        let at = (x0 - 8, top + i as i32 * cell_h + cell_h / 2);
        let label = Label::right_aligned(r, row_size, at);
        let room = last.is_none_or(|l| l.y1 + GAP <= label.rect.y0);
        if room && i % every == 0 {
            last = Some(label.rect);
            layout.row_labels.push(Some(label));
        } else {
            layout.row_labels.push(None);
        }
    }
    // Columns: the largest size at which every name fits its column, then every k-th.
    let widest = cols.iter().max_by_key(|c| text_width(c, TICK_SIZE));
    let col_size = widest.map_or(TICK_SIZE, |c| {
        fit_size(c, cell_w - 2 * GAP, TICK_SIZE, MIN_LABEL)
    });
    let y = cells.y1 + 8 + col_size / 2;
    let mut last: Option<Rect> = None;
    for (j, c) in cols.iter().enumerate() {
        let label = Label::centered(c, col_size, (x0 + j as i32 * cell_w + cell_w / 2, y));
        let room = last.is_none_or(|l| l.x1 + GAP <= label.rect.x0);
        if room {
            last = Some(label.rect);
            layout.col_labels.push(Some(label));
        } else {
            layout.col_labels.push(None);
        }
    }
    let size = fit_size("-0.00", cell_w - 6, 22, 8).min(cell_h * 7 / 10);
    layout.value_size = (size >= 8).then_some(size);
    layout.col_desc = Label::centered(
        col_desc,
        DESC_SIZE,
        (
            (cells.x0 + cells.x1) / 2,
            y + col_size / 2 + 12 + DESC_SIZE / 2,
        ),
    );
    layout.row_desc = Label::centered(
        row_desc,
        DESC_SIZE,
        (MARGIN + DESC_SIZE / 2, (cells.y0 + cells.y1) / 2),
    );
    layout
}

/// A corner of the plotting area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Corner {
    UpperRight,
    UpperLeft,
    LowerRight,
    LowerLeft,
    /// Top and bottom middle: often empty between clusters.
    UpperCenter,
    LowerCenter,
}

/// The box of a legend of `size` in `corner` of `plot`, 10 px in.
pub fn corner_box(plot: Rect, (w, h): (i32, i32), corner: Corner) -> Rect {
    let x0 = match corner {
        Corner::UpperRight | Corner::LowerRight => plot.x1 - 10 - w,
        Corner::UpperLeft | Corner::LowerLeft => plot.x0 + 10,
        Corner::UpperCenter | Corner::LowerCenter => (plot.x0 + plot.x1 - w) / 2,
    };
    let y0 = match corner {
        Corner::UpperRight | Corner::UpperLeft | Corner::UpperCenter => plot.y0 + 10,
        _ => plot.y1 - 10 - h,
    };
    Rect::new(x0, y0, x0 + w, y0 + h)
}

/// The first corner (then top or bottom middle) of `plot` where a legend of `size` covers none of the data
/// footprint (boxes in pixels: points, line pieces, bands), or `None` when every
/// corner would cover some.
pub fn free_corner(plot: Rect, size: (i32, i32), footprint: &[Rect]) -> Option<Corner> {
    if size.0 + 20 > plot.width() || size.1 + 20 > plot.height() {
        return None;
    }
    [
        Corner::UpperRight,
        Corner::UpperLeft,
        Corner::LowerRight,
        Corner::LowerLeft,
        Corner::UpperCenter,
        Corner::LowerCenter,
    ]
    .into_iter()
    .find(|&c| {
        let b = corner_box(plot, size, c).inflate(4);
        !footprint.iter().any(|f| f.overlaps(&b))
    })
}

/// Pixel boxes covering the segment from `a` to `b` drawn `width` wide.
pub fn segment_footprint(a: (i32, i32), b: (i32, i32), width: i32, out: &mut Vec<Rect>) {
    let (dx, dy) = ((b.0 - a.0) as f64, (b.1 - a.1) as f64);
    let steps = (dx.abs().max(dy.abs()) / 3.0).ceil().max(1.0) as i32;
    let r = (width / 2).max(1);
    for k in 0..=steps {
        let t = k as f64 / steps as f64;
        let p = (a.0 + (dx * t).round() as i32, a.1 + (dy * t).round() as i32);
        out.push(Rect::new(
            p.0 - r - 1,
            p.1 - r - 1,
            p.0 + r + 2,
            p.1 + r + 2,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_font_measures_text() {
        let (w, h) = text_size("monitoring@no-training-info", 16);
        assert!((150..300).contains(&w), "{w}");
        assert_eq!(h, 16);
        assert!(text_width("iii", 16) < text_width("WWW", 16));
        assert_eq!(text_width("", 16), 0);
    }

    #[test]
    fn legends_go_where_no_data_is() {
        let plot = Rect::new(100, 50, 900, 550);
        let legend = (200, 100);
        // Points along the top: a lower corner.
        let top: Vec<Rect> = (100..900)
            .step_by(5)
            .map(|x| Rect::centered((x, 70), (6, 6)))
            .collect();
        let c = free_corner(plot, legend, &top).unwrap();
        assert_eq!(c, Corner::LowerRight);
        assert!(!top.iter().any(|p| p.overlaps(&corner_box(plot, legend, c))));
        // Data everywhere: no corner, the legend goes outside.
        let everywhere: Vec<Rect> = (100..900)
            .step_by(20)
            .flat_map(|x| {
                (50..550)
                    .step_by(20)
                    .map(move |y| Rect::centered((x, y), (4, 4)))
            })
            .collect();
        assert_eq!(free_corner(plot, legend, &everywhere), None);
        // A line through the middle leaves the upper right.
        let mut line = Vec::new();
        segment_footprint((100, 300), (900, 300), 3, &mut line);
        assert_eq!(free_corner(plot, legend, &line), Some(Corner::UpperRight));
    }

    #[test]
    fn titles_shrink_to_fit() {
        let long = "a very long title ".repeat(8);
        let t = title(&long, (960, 600));
        assert!(t.size < TITLE_SIZE);
        let short = title("Steering", (960, 600));
        assert_eq!(short.size, TITLE_SIZE);
        assert!(short.rect.x0 > 0 && short.rect.x1 < 960);
    }
}
