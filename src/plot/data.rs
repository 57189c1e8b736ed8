//! What a figure shows: the figure kinds and their series (curves, points,
//! intervals), the palette and the pixel size. [`super::layout`] places their
//! text and [`super::figures`] draws them; neither is needed to build one.

use plotters::style::RGBColor;

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

/// The mark drawn at each point of a curve or scatter group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Marker {
    None,
    Circle,
    /// Hollow, so a line under it stays visible.
    Square,
    Triangle,
}

/// One line of a per-layer plot, with an optional interval band. Earlier curves
/// are drawn on top of later ones.
pub struct Curve {
    pub label: String,
    pub color: RGBColor,
    pub dashed: bool,
    pub marker: Marker,
    /// Stroke width in pixels.
    pub width: u32,
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
    /// Rows of one group (a cue and its variations) sit together in one colour.
    pub group: String,
    /// Summary rows (`overall`, `benign`) are set apart from the rest, in black.
    pub summary: bool,
}

/// One figure, as data; [`Figure::draw`] (in [`super::figures`]) draws it.
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
    /// Points with interval bars per category, and a zero line: upright when the
    /// category names fit side by side, otherwise a forest plot (categories down
    /// the y axis). Items are drawn in the order given.
    Intervals {
        title: String,
        y_label: String,
        items: Vec<Interval>,
    },
}

/// `c` mixed towards white by `t` (0: unchanged, 1: white), without transparency.
pub fn lighten(c: RGBColor, t: f64) -> RGBColor {
    let mix = |a: u8| (a as f64 + (255.0 - a as f64) * t).round() as u8;
    RGBColor(mix(c.0), mix(c.1), mix(c.2))
}
