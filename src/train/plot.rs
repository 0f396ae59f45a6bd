//! `curves.png`: training and evaluation loss, and the main evaluation metric, per epoch.

use std::path::Path;

use plotters::prelude::*;

use crate::train::metrics::Metrics;
use crate::{Error, Result};

/// A named, coloured line.
type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSansMono.ttf");

pub(crate) fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The font is embedded, so registration cannot fail on a valid build.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn series(rows: &[Metrics], key: &str) -> Vec<(f64, f64)> {
    rows.iter()
        .filter_map(|r| Some((*r.get("epoch")?, *r.get(key)?)))
        .filter(|(_, v)| v.is_finite())
        .collect()
}

/// Draws the loss curves (left) and the first available quality metric (right).
pub fn draw(path: &Path, rows: &[Metrics], title: &str) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    register_font();
    let err = |e: &dyn std::fmt::Display| Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    };
    let root = BitMapBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(title, ("sans-serif", 18))
        .map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(500);
    let max_epoch = rows
        .iter()
        .filter_map(|r| r.get("epoch").copied())
        .fold(1.0, f64::max);

    let panel = |area: &DrawingArea<BitMapBackend, _>,
                 caption: &str,
                 keys: &[(&str, RGBColor)]|
     -> Result<()> {
        let data: Vec<Series> = keys
            .iter()
            .map(|(k, c)| (*k, *c, series(rows, k)))
            .filter(|(_, _, s)| !s.is_empty())
            .collect();
        if data.is_empty() {
            return Ok(());
        }
        let (lo, hi) = data
            .iter()
            .flat_map(|(_, _, s)| s.iter().map(|p| p.1))
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                (a.min(v), b.max(v))
            });
        let pad = ((hi - lo) * 0.05).max(1e-6);
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 15))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..max_epoch, (lo - pad)..(hi + pad))
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(|e| err(&e))?;
        for (k, c, s) in data {
            chart
                .draw_series(LineSeries::new(s, c.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(k)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(|e| err(&e))?;
        Ok(())
    };
    panel(&left, "loss", &[("train_loss", BLUE), ("eval_loss", RED)])?;
    let quality: Vec<(&str, RGBColor)> = ["eval_accuracy", "eval_f1", "eval_mae"]
        .into_iter()
        .zip([GREEN, MAGENTA, CYAN])
        .collect();
    panel(&right, "eval metrics", &quality)?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
