"""densepred: dense prediction (object detection, semantic segmentation) in Rust on candle.

numpy in, numpy out. Computation releases the GIL. Errors raise ``FileNotFoundError`` (a named
file or folder is missing), ``ValueError`` (bad arguments, config keys, file contents) or
``RuntimeError`` (a failure inside the computation), with a message naming the file, record and
field at fault.

Configs are densepred TOML files (mmdetection / mmsegmentation keys, ``_base_`` inheritance).
``overrides`` take a dict ``{"train_cfg.max_iters": 5}`` or a list of ``"key=value"`` strings,
as ``--set`` on the command line.
"""

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

PathLike = Union[str, "os.PathLike[str]"]
Image = Union[PathLike, npt.NDArray[np.uint8]]
Overrides = Optional[Union[Dict[str, Any], Sequence[str]]]

class Detector:
    """An object detector (RetinaNet, ATSS) built from a config.

    Args:
        config: config file (TOML).
        checkpoint: weights (``.safetensors`` from ``densepred train``, or an mmdetection
            ``.pth``); ``None``: freshly initialised weights, as the config builds them.
        device: ``"cpu"``.
        overrides: config overrides.
        strict: load the checkpoint strictly (as mmengine loads ``--checkpoint``): a missing
            key, an unexpected key or a shape mismatch raises; ``False`` loads what matches and
            logs a warning about the rest.

    Raises:
        FileNotFoundError: the config or the checkpoint is missing.
        ValueError: an unknown or invalid config key; a segmentor config; a checkpoint that
            does not match the model (strict) or matches no parameter of it.
    """

    def __init__(
        self,
        config: PathLike,
        checkpoint: Optional[PathLike] = None,
        device: str = "cpu",
        overrides: Overrides = None,
        strict: bool = True,
    ) -> None: ...
    @property
    def classes(self) -> List[str]:
        """Class names, indexed by label."""
    def predict(self, image: Image) -> Dict[str, Any]:
        """Detections in one image.

        Args:
            image: a JPEG/PNG path, or an ``(H, W, 3)`` uint8 RGB array.

        Returns:
            ``boxes`` ``(N, 4)`` float32, xyxy in pixels of the original image;
            ``scores`` ``(N,)`` float32 in [0, 1], sorted by the test_cfg's selection;
            ``labels`` ``(N,)`` int64, 0-based indices into ``classes``;
            ``class_names`` a list of N str (the class of each detection);
            with a mask head (Mask R-CNN) also ``masks`` ``(N, H, W)`` bool, each instance's
            mask in the original image.

        Raises:
            FileNotFoundError: a missing image file.
            ValueError: an array that is not ``(H, W, 3)`` uint8; an unreadable image.
            TypeError: neither a path nor an array.
        """
    def predict_batch(self, images: Sequence[Image]) -> List[Dict[str, Any]]:
        """``predict`` on several images, run as one padded batch; one dict per image."""

class Segmentor:
    """A semantic segmentor (UperNet, Semantic FPN) built from a config.

    Args and raises as ``Detector`` (a detector config raises ``ValueError``).
    """

    def __init__(
        self,
        config: PathLike,
        checkpoint: Optional[PathLike] = None,
        device: str = "cpu",
        overrides: Overrides = None,
        strict: bool = True,
    ) -> None: ...
    @property
    def classes(self) -> List[str]:
        """Class names, indexed by label."""
    @property
    def reduce_zero_label(self) -> bool:
        """The test dataset's ``reduce_zero_label``: its label PNGs store class ``l`` as ``l + 1``."""
    def predict(self, image: Image) -> npt.NDArray[np.int32]:
        """The ``(H, W)`` int32 label map (0-based class indices, original image size) of an image
        (a path or an ``(H, W, 3)`` uint8 RGB array), by the config's whole or slide inference."""
    def predict_batch(self, images: Sequence[Image]) -> List[npt.NDArray[np.int32]]:
        """``predict`` on several images, run as one padded batch."""

class Backbone:
    """A backbone alone (SMT), as ``densepred features`` runs it.

    Args:
        config: a TOML file with a ``[backbone]`` (or ``[model.backbone]``) table.
        weights: safetensors or ``.pth`` with the official key names (``backbone.`` prefix and
            the detection wrapper's ``attn.dw_conv`` accepted); loaded strictly.
        device: ``"cpu"``.

    Raises:
        FileNotFoundError: missing config or weights.
        ValueError: an invalid ``[backbone]`` table; weights that do not match the model
            (missing / unexpected keys, shape mismatches listed).
    """

    def __init__(
        self, config: PathLike, weights: Optional[PathLike] = None, device: str = "cpu"
    ) -> None: ...
    @property
    def out_shapes(self) -> List[Tuple[int, int]]:
        """``(channels, stride)`` of each of the four stage outputs."""
    def state_dict_shapes(self) -> List[Tuple[str, List[int]]]:
        """Parameter names (official state-dict keys) and shapes."""
    def forward(self, x: npt.NDArray[np.float32]) -> List[npt.NDArray[np.float32]]:
        """The four stage maps ``(B, C_i, H/s_i, W/s_i)`` float32, s = 4, 8, 16, 32, in eval mode.

        Args:
            x: ``(B, 3, H, W)`` float32, normalised pixels.

        Raises:
            ValueError: wrong shape or dtype.
            TypeError: not a numpy array.
        """

def train(
    config: PathLike,
    work_dir: Optional[PathLike] = None,
    resume: bool = False,
    overrides: Overrides = None,
    load_from: Optional[PathLike] = None,
    progress: bool = True,
    device: Optional[str] = None,
) -> Dict[str, Any]:
    """Trains the config's model as ``densepred train`` does (same logs, progress bars,
    checkpoints, ``metrics.jsonl`` and curves in the work dir; default work dir: the config's
    ``work_dir``, else ``work_dirs/<config name>``). ``device``: ``"cpu"``, ``"cuda"`` or
    ``"cuda:N"`` (default: the config's ``device`` key, else the CPU).

    Ctrl-C stops after the iteration in flight and raises ``KeyboardInterrupt``; the checkpoints
    written so far stay intact (``resume=True`` continues).

    Returns:
        ``work_dir`` (str), ``iters`` (int, done in total), ``last_checkpoint`` (str or None),
        ``metrics`` (the last validation metrics, mmdetection / mmsegmentation keys, or None).
    """

def test(
    config: PathLike,
    checkpoint: PathLike,
    overrides: Overrides = None,
    progress: bool = True,
    strict: bool = True,
    device: Optional[str] = None,
) -> Dict[str, Any]:
    """Evaluates ``checkpoint`` on the config's test split, as ``densepred test`` (``strict`` and
    ``device`` as for ``Detector`` / ``train``).

    Returns:
        detectors: the 12 COCO stats ``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl``,
        ``AR1``, ``AR10``, ``AR100``, ``ARs``, ``ARm``, ``ARl`` (fractions, -1 where undefined),
        each prefixed ``bbox_`` / ``segm_`` for detectors with masks;
        segmentors: ``mIoU``, ``mAcc``, ``aAcc`` (fractions) and per-class ``IoU`` / ``Acc`` lists
        (None for classes absent from the ground truth).
    """

def evaluate_coco(
    gt_json: PathLike,
    results: Union[PathLike, Sequence[Dict[str, Any]]],
    iou_type: str = "bbox",
) -> Dict[str, float]:
    """COCO evaluation with pycocotools' numbers.

    Args:
        gt_json: COCO instances JSON.
        results: a results JSON path, or a list of dicts ``{image_id, category_id, bbox |
            segmentation, score}`` (bbox xywh in pixels; numpy numbers accepted).
        iou_type: ``"bbox"`` or ``"segm"``.

    Returns:
        the 12 stats ``AP`` … ``ARl`` (fractions, -1 where undefined), as ``densepred eval coco
        --json-out``.

    Raises:
        FileNotFoundError: missing files. ValueError: malformed records (the message names the
        record and field), unknown image or category ids, a bad ``iou_type``.
    """

def evaluate_segmentation(
    gt_dir: PathLike,
    pred_dir: PathLike,
    num_classes: int,
    reduce_zero_label: bool = False,
) -> Dict[str, Any]:
    """mmsegmentation's ``IoUMetric`` over 8-bit PNG label maps paired by file stem (255 =
    ignore; ``reduce_zero_label``: value v is class v - 1 and 0 is ignored, in both folders).

    Returns:
        ``mIoU``, ``mAcc``, ``aAcc`` (fractions) and per-class ``IoU`` / ``Acc`` lists (None for
        classes absent from the ground truth).
    """
