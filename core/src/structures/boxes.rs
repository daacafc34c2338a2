//! `Boxes`: a set of axis-aligned boxes, `(N, 4)` xyxy in absolute pixels of the image they refer
//! to (no +1 convention: width = x2 − x1), as mmdetection's `HorizontalBoxes`.

use crate::ops::iou::columns;
use candle_core::{Result, Tensor};

/// `(N, 4)` float boxes `(x1, y1, x2, y2)` in absolute pixels.
#[derive(Debug, Clone)]
pub struct Boxes(Tensor);

impl Boxes {
    /// Wraps an `(N, 4)` tensor of xyxy boxes. Errors on any other shape.
    pub fn new(t: Tensor) -> Result<Self> {
        match t.dims() {
            [_, 4] => Ok(Self(t)),
            d => candle_core::bail!("Boxes: expected (N, 4) xyxy, got {d:?}"),
        }
    }

    /// From `(N, 4)` `(x, y, w, h)` (COCO's layout, top-left corner and size).
    pub fn from_xywh(t: &Tensor) -> Result<Self> {
        let [x, y, w, h] = columns(t)?;
        let x2 = (&x + w)?;
        let y2 = (&y + h)?;
        Self::new(Tensor::stack(&[x, y, x2, y2], 1)?)
    }

    /// From `(N, 4)` `(cx, cy, w, h)` (centre and size).
    pub fn from_cxcywh(t: &Tensor) -> Result<Self> {
        let [cx, cy, w, h] = columns(t)?;
        let (hw, hh) = ((w / 2.0)?, (h / 2.0)?);
        Self::new(Tensor::stack(
            &[(&cx - &hw)?, (&cy - &hh)?, (cx + hw)?, (cy + hh)?],
            1,
        )?)
    }

    /// The `(N, 4)` xyxy tensor.
    pub fn tensor(&self) -> &Tensor {
        &self.0
    }

    /// Number of boxes `N`.
    pub fn len(&self) -> usize {
        self.0.dim(0).unwrap_or(0)
    }

    /// Whether there are no boxes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `(N,)` areas `(x2 − x1)(y2 − y1)`.
    pub fn area(&self) -> Result<Tensor> {
        crate::ops::iou::box_area(&self.0)
    }

    /// `(N, 4)` `(x, y, w, h)`.
    pub fn to_xywh(&self) -> Result<Tensor> {
        let [x1, y1, x2, y2] = columns(&self.0)?;
        Tensor::stack(&[x1.clone(), y1.clone(), (x2 - x1)?, (y2 - y1)?], 1)
    }

    /// `(N, 4)` `(cx, cy, w, h)`.
    pub fn to_cxcywh(&self) -> Result<Tensor> {
        let [x1, y1, x2, y2] = columns(&self.0)?;
        Tensor::stack(
            &[
                ((&x1 + &x2)? / 2.0)?,
                ((&y1 + &y2)? / 2.0)?,
                (x2 - x1)?,
                (y2 - y1)?,
            ],
            1,
        )
    }

    /// Clamps x to `[0, width]` and y to `[0, height]` (mmdet's `clip_`, `(H, W)` in pixels).
    pub fn clip(&self, height: f64, width: f64) -> Result<Self> {
        let [x1, y1, x2, y2] = columns(&self.0)?;
        let cx = |t: Tensor| t.clamp(0.0, width);
        let cy = |t: Tensor| t.clamp(0.0, height);
        Self::new(Tensor::stack(&[cx(x1)?, cy(y1)?, cx(x2)?, cy(y2)?], 1)?)
    }

    /// Multiplies x by `sx` and y by `sy` (resizing an image by those factors).
    pub fn scale(&self, sx: f64, sy: f64) -> Result<Self> {
        let f = Tensor::new(&[sx, sy, sx, sy], self.0.device())?.to_dtype(self.0.dtype())?;
        Self::new(self.0.broadcast_mul(&f)?)
    }

    /// Mirrors horizontally in an image `width` pixels wide: `x1' = W − x2`, `x2' = W − x1`
    /// (mmdet's `flip_` with direction `horizontal`).
    pub fn flip_horizontal(&self, width: f64) -> Result<Self> {
        let [x1, y1, x2, y2] = columns(&self.0)?;
        Self::new(Tensor::stack(
            &[x2.affine(-1.0, width)?, y1, x1.affine(-1.0, width)?, y2],
            1,
        )?)
    }

    /// Mirrors vertically in an image `height` pixels high.
    pub fn flip_vertical(&self, height: f64) -> Result<Self> {
        let [x1, y1, x2, y2] = columns(&self.0)?;
        Self::new(Tensor::stack(
            &[x1, y2.affine(-1.0, height)?, x2, y1.affine(-1.0, height)?],
            1,
        )?)
    }
}
