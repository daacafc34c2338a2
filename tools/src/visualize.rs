//! Drawing ground truth and predictions on images: boxes with class names (8x8 bitmap font),
//! alpha-blended instance masks, and label maps in a palette.

use font8x8::UnicodeFonts;
use image::{Rgb, RgbImage};
use ndarray::{Array2, Array3};

/// A deterministic, well-spread colour for class `i` (golden-ratio hue steps).
pub fn palette(i: usize) -> [u8; 3] {
    let hue = (i as f32 * 0.618_034).fract() * 360.0;
    let (r, g, b) = densepred_datasets::transforms::hsv_to_rgb(hue, 0.75, 242.0);
    [r as u8, g as u8, b as u8]
}

/// `(H, W, 3)` f32 image → RGB8. Values in 0–255 are kept; anything else (a normalised image) is
/// min–max stretched for display.
pub fn to_rgb8(img: &Array3<f32>) -> RgbImage {
    let (h, w, _) = img.dim();
    let (lo, hi) = img
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let (off, scale) = if lo >= 0.0 && hi <= 255.0 {
        (0.0, 1.0)
    } else {
        (lo, 255.0 / (hi - lo).max(1e-6))
    };
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let p = |c| ((img[(y as usize, x as usize, c)] - off) * scale).clamp(0.0, 255.0) as u8;
        Rgb([p(0), p(1), p(2)])
    })
}

/// Outline of a box `[x1, y1, x2, y2]`, 2 px wide.
pub fn draw_box(img: &mut RgbImage, b: [f32; 4], color: [u8; 3]) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let (x1, y1, x2, y2) = (
        b[0] as i64,
        b[1] as i64,
        (b[2] as i64).min(w - 1),
        (b[3] as i64).min(h - 1),
    );
    let mut put = |x: i64, y: i64| {
        if x >= 0 && y >= 0 && x < w && y < h {
            img.put_pixel(x as u32, y as u32, Rgb(color));
        }
    };
    for t in 0..2 {
        for x in x1..=x2 {
            put(x, y1 + t);
            put(x, y2 - t);
        }
        for y in y1..=y2 {
            put(x1 + t, y);
            put(x2 - t, y);
        }
    }
}

/// Text with its top-left at `(x, y)` on a filled background of `bg`.
pub fn draw_text(img: &mut RgbImage, x: i64, y: i64, text: &str, bg: [u8; 3]) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let luminance = 0.299 * bg[0] as f32 + 0.587 * bg[1] as f32 + 0.114 * bg[2] as f32;
    let fg = if luminance > 140.0 {
        [0, 0, 0]
    } else {
        [255, 255, 255]
    };
    for (i, ch) in text.chars().enumerate() {
        let glyph = font8x8::BASIC_FONTS
            .get(ch)
            .or_else(|| font8x8::BASIC_FONTS.get('?'))
            .unwrap_or([0; 8]);
        for (gy, row) in glyph.iter().enumerate() {
            for gx in 0..8 {
                let (px, py) = (x + i as i64 * 8 + gx, y + gy as i64);
                if px >= 0 && py >= 0 && px < w && py < h {
                    let on = row & (1 << gx) != 0;
                    img.put_pixel(px as u32, py as u32, Rgb(if on { fg } else { bg }));
                }
            }
        }
    }
}

/// Blends `color` over the pixels where `mask` is set (`alpha` opacity).
pub fn blend_mask(img: &mut RgbImage, mask: &Array2<u8>, color: [u8; 3], alpha: f32) {
    let (mh, mw) = mask.dim();
    for (x, y, p) in img.enumerate_pixels_mut() {
        let (xu, yu) = (x as usize, y as usize);
        if yu < mh && xu < mw && mask[(yu, xu)] > 0 {
            for c in 0..3 {
                p[c] = (p[c] as f32 * (1.0 - alpha) + color[c] as f32 * alpha) as u8;
            }
        }
    }
}

/// Blends a label map in the palette (`ignore` pixels untouched).
pub fn blend_label_map(img: &mut RgbImage, map: &Array2<u8>, ignore: u8, alpha: f32) {
    blend_label_map_with(img, map, ignore, alpha, None)
}

/// [`blend_label_map`] with the dataset's palette (`colors[class]`; classes beyond it, or all
/// classes without one, take [`palette`]).
pub fn blend_label_map_with(
    img: &mut RgbImage,
    map: &Array2<u8>,
    ignore: u8,
    alpha: f32,
    colors: Option<&[[u8; 3]]>,
) {
    let palette = |i: usize| {
        colors
            .and_then(|c| c.get(i).copied())
            .unwrap_or_else(|| palette(i))
    };
    let (mh, mw) = map.dim();
    for (x, y, p) in img.enumerate_pixels_mut() {
        let (xu, yu) = (x as usize, y as usize);
        if yu < mh && xu < mw && map[(yu, xu)] != ignore {
            let c = palette(map[(yu, xu)] as usize);
            for k in 0..3 {
                p[k] = (p[k] as f32 * (1.0 - alpha) + c[k] as f32 * alpha) as u8;
            }
        }
    }
}

/// Saves a PNG atomically (see `densepred_core::io::write_atomic`).
pub fn save_png(img: &RgbImage, path: &std::path::Path) -> anyhow::Result<()> {
    densepred_core::io::write_atomic(path, |tmp| img.save(tmp).map_err(|e| e.to_string()))
        .map_err(anyhow::Error::msg)
}

/// Draws detections (xyxy in this image's pixels) with `class score` captions; detections scoring
/// below `score_thr` are skipped.
pub fn draw_detections(
    img: &mut RgbImage,
    dets: &densepred_core::structures::Detections,
    classes: &[String],
    score_thr: f32,
) {
    // Masks first (alpha 0.5, each instance in its own colour, so that touching instances of one
    // class stay apart), then boxes and labels (class colours) on top.
    if let Some(m) = &dets.masks {
        for i in (0..dets.len().min(m.len())).rev() {
            if dets.scores[i] < score_thr {
                continue;
            }
            if let Ok(a) = Array2::from_shape_vec(m.size, m.masks[i].clone()) {
                blend_mask(img, &a, palette(i), 0.5);
            }
        }
    }
    for i in (0..dets.len()).rev() {
        if dets.scores[i] < score_thr {
            continue;
        }
        let l = dets.labels[i].max(0) as usize;
        let color = palette(l);
        let b = dets.bboxes[i];
        draw_box(img, b, color);
        let name = classes.get(l).map(String::as_str).unwrap_or("?");
        draw_text(
            img,
            b[0] as i64,
            b[1] as i64 - 9,
            &format!("{name} {:.2}", dets.scores[i]),
            color,
        );
    }
}

/// Writes a predicted label map as `dir/labels/<stem>.png` (8-bit, value = class, or class + 1
/// with `reduce_zero_label`: the ADE20K file convention, which `densepred eval seg
/// --reduce-zero-label` reads back) and its colour overlay on the image as
/// `dir/overlays/<stem>.png` (alpha 0.5). Both files are written atomically.
///
/// Errors: unreadable image, unwritable folder.
pub fn write_seg_prediction(
    dir: &std::path::Path,
    img_path: &std::path::Path,
    pred: &Array2<u8>,
    reduce_zero_label: bool,
    colors: Option<&[[u8; 3]]>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let stem = img_path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "image".into());
    let (h, w) = pred.dim();
    let labels_dir = dir.join("labels");
    let overlays_dir = dir.join("overlays");
    for d in [&labels_dir, &overlays_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let off = u8::from(reduce_zero_label);
    let gray = image::GrayImage::from_fn(w as u32, h as u32, |x, y| {
        image::Luma([pred[(y as usize, x as usize)].saturating_add(off)])
    });
    let lp = labels_dir.join(format!("{stem}.png"));
    densepred_core::io::write_atomic(&lp, |tmp| {
        gray.save_with_format(tmp, image::ImageFormat::Png)
            .map_err(|e| e.to_string())
    })
    .map_err(anyhow::Error::msg)?;
    let mut img = image::open(img_path)
        .with_context(|| format!("reading {}", img_path.display()))?
        .to_rgb8();
    blend_label_map_with(&mut img, pred, 255, 0.5, colors);
    save_png(&img, &overlays_dir.join(format!("{stem}.png")))
}
