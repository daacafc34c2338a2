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

/// Reads an 8-bit single-channel label PNG: grayscale, or palette ("P" mode, as VOC-style label
/// maps are written) read as its indices without the palette, as mmseg reads them (PIL / cv2
/// `IMREAD_UNCHANGED`). Palette images of 1, 2 or 4 bits per pixel are unpacked to one index per
/// byte. Returns the pixels row-major and `(height, width)`.
///
/// Errors: an unreadable or undecodable file, or another colour type or depth (RGB, 16-bit); the
/// message says which (the caller adds the path).
pub fn read_label_png(path: &Path) -> Result<(Vec<u8>, (usize, usize)), String> {
    use png::{BitDepth, ColorType};
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open label map: {e}"))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    // No expansion: palette indices stay indices.
    decoder.set_transformations(png::Transformations::IDENTITY);
    let decode_err = |e: png::DecodingError| format!("cannot decode label map: {e}");
    let mut reader = decoder.read_info().map_err(decode_err)?;
    let (color, depth) = (reader.info().color_type, reader.info().bit_depth);
    let bits = match (color, depth) {
        (ColorType::Grayscale | ColorType::Indexed, BitDepth::Eight) => 8,
        (ColorType::Indexed, BitDepth::One) => 1,
        (ColorType::Indexed, BitDepth::Two) => 2,
        (ColorType::Indexed, BitDepth::Four) => 4,
        _ => {
            return Err(format!(
                "label map must be an 8-bit grayscale or palette PNG, got {color:?} with \
                 {} bits per sample",
                depth as u8
            ))
        }
    };
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| "label map too large to decode".to_string())?;
    let mut buf = vec![0u8; size];
    let frame = reader.next_frame(&mut buf).map_err(decode_err)?;
    let (h, w) = (frame.height as usize, frame.width as usize);
    let stride = frame.line_size;
    let mut out = Vec::with_capacity(h * w);
    for row in buf.chunks(stride).take(h) {
        if bits == 8 {
            out.extend_from_slice(&row[..w]);
        } else {
            let per_byte = 8 / bits;
            let mask = (1u8 << bits) - 1;
            out.extend((0..w).map(|x| {
                let shift = 8 - bits * (x % per_byte + 1);
                (row[x / per_byte] >> shift) & mask
            }));
        }
    }
    if out.len() != h * w {
        return Err(format!(
            "label map: {} pixels decoded of {}x{}",
            out.len(),
            w,
            h
        ));
    }
    Ok((out, (h, w)))
}
