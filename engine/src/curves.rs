//! The loss and learning-rate curves of a run, drawn from its `metrics.jsonl` with plotters.

use crate::runner::EngineError;
use plotters::prelude::*;
use std::path::Path;

/// DejaVu Sans (Bitstream Vera license, see `fonts/DejaVuSans.LICENSE`), embedded so that the
/// axis labels render on machines without system fonts.
static FONT: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Reads the `"mode": "train"` records of `metrics` and draws `loss` (and each `loss_*`) and `lr`
/// against the iteration into `out` (PNG, 1200x500, written atomically). When a run was resumed,
/// the latest record of each iteration wins.
///
/// Errors: unreadable metrics file, no training record, drawing or writing failures.
pub fn plot_curves(metrics: &Path, out: &Path) -> Result<(), EngineError> {
    register_font();
    let err = |reason: String| EngineError::File {
        path: out.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(metrics).map_err(|e| EngineError::File {
        path: metrics.into(),
        reason: e.to_string(),
    })?;
    let mut by_iter: std::collections::BTreeMap<u64, serde_json::Map<String, serde_json::Value>> =
        Default::default();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| EngineError::File {
            path: metrics.into(),
            reason: format!("line {}: {e}", n + 1),
        })?;
        if v["mode"] == "train" {
            if let (Some(it), Some(o)) = (v["iter"].as_u64(), v.as_object()) {
                by_iter.insert(it, o.clone());
            }
        }
    }
    if by_iter.is_empty() {
        return Err(err("no training records to plot".into()));
    }
    let mut names: Vec<String> = by_iter
        .values()
        .flat_map(|o| {
            o.keys()
                .filter(|k| *k == "loss" || k.starts_with("loss_"))
                .cloned()
        })
        .collect();
    names.sort();
    names.dedup();
    let series = |k: &str| -> Vec<(f64, f64)> {
        by_iter
            .iter()
            .filter_map(|(&i, o)| o.get(k).and_then(|v| v.as_f64()).map(|v| (i as f64, v)))
            .collect()
    };
    let x_max = *by_iter.keys().last().expect("non-empty") as f64;
    let x_min = *by_iter.keys().next().expect("non-empty") as f64;
    let x_range = x_min..x_max.max(x_min + 1.0);
    let tmp = out.with_extension("png.tmp.png");
    {
        let root = BitMapBackend::new(&tmp, (1200, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let (left, right) = root.split_horizontally(700);
        let loss_max = names
            .iter()
            .flat_map(|n| series(n))
            .map(|p| p.1)
            .fold(0.0f64, f64::max)
            .max(1e-6);
        let mut chart = ChartBuilder::on(&left)
            .caption("training losses", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x_range.clone(), 0.0..loss_max * 1.05)
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("iteration")
            .y_desc("loss")
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for (i, n) in names.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(series(n), color.stroke_width(2)))
                .map_err(|e| err(e.to_string()))?
                .label(n.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(e.to_string()))?;
        let lr = series("lr");
        let lr_max = lr.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1e-12);
        let mut c2 = ChartBuilder::on(&right)
            .caption("learning rate", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(x_range, 0.0..lr_max * 1.05)
            .map_err(|e| err(e.to_string()))?;
        c2.configure_mesh()
            .x_desc("iteration")
            .y_label_formatter(&|v| format!("{v:.1e}"))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        c2.draw_series(LineSeries::new(lr, BLUE.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| err(e.to_string()))
}
