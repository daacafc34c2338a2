//! Semantic-segmentation label maps on disk: the 8-bit PNG reader and mmsegmentation's
//! `reduce_zero_label` convention, shared by the data pipeline and the evaluator.

use std::path::Path;

/// mmsegmentation's `reduce_zero_label` (ADE20K files keep "other" at 0): 0 → 255 (ignored),
/// v → v − 1, 255 stays 255. In place, any layout.
pub fn reduce_zero_label(map: &mut [u8]) {
    for v in map.iter_mut() {
        *v = match *v {
            0 | 255 => 255,
            x => x - 1,
        };
    }
}

/// Reads an 8-bit single-channel (grayscale or palette-index) label PNG: the pixels row-major and
/// `(height, width)`.
///
/// Errors: an unreadable or undecodable file, or an image of another colour type; the message
/// says which (the caller adds the path).
pub fn read_label_png(path: &Path) -> Result<(Vec<u8>, (usize, usize)), String> {
    let img = image::ImageReader::open(path)
        .map_err(|e| format!("cannot open label map: {e}"))?
        .decode()
        .map_err(|e| format!("cannot decode label map: {e}"))?;
    match img {
        image::DynamicImage::ImageLuma8(g) => {
            let dims = (g.height() as usize, g.width() as usize);
            Ok((g.into_raw(), dims))
        }
        other => Err(format!(
            "label map must be 8-bit single-channel, got {:?}",
            other.color()
        )),
    }
}
