"""Evaluators against the peer libraries: ``evaluate_coco`` against pycocotools run here on the
same files, ``evaluate_segmentation`` against mmsegmentation's ``IoUMetric`` numbers stored in
the fixture (../shared/fixtures/eval/README.md)."""

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

import densepred
from conftest import FIXTURES

KEYS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
COCO = FIXTURES / "eval" / "coco"
# (case folder, iou types its dets.json carries)
CASES = [("bbox", "bbox"), ("edge_bbox", "bbox"), ("segm", "segm"), ("edge_segm", "segm"),
         ("edge_segm", "bbox")]


def pycocotools_stats(gt, dets, iou_type):
    from pycocotools.coco import COCO as PyCOCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        g = PyCOCO(str(gt))
        d = g.loadRes(str(dets))
        e = COCOeval(g, d, iou_type)
        e.evaluate()
        e.accumulate()
        e.summarize()
    return dict(zip(KEYS, e.stats.tolist()))


@pytest.mark.parametrize("case,iou_type", CASES)
def test_evaluate_coco_equals_pycocotools(case, iou_type):
    gt, dets = COCO / case / "gt.json", COCO / case / "dets.json"
    if not dets.exists():
        pytest.skip(f"{case} has no dets.json")
    want = pycocotools_stats(gt, dets, iou_type)
    got = densepred.evaluate_coco(str(gt), str(dets), iou_type=iou_type)
    assert sorted(got) == sorted(KEYS)
    for k in KEYS:
        # pycocotools and densepred both compute in f64; 1e-6 is the bound.
        assert abs(got[k] - want[k]) <= 1e-6, (k, got[k], want[k])


def test_evaluate_coco_accepts_records_and_pathlike():
    gt, dets = COCO / "bbox" / "gt.json", COCO / "bbox" / "dets.json"
    records = json.loads(dets.read_text())
    # numpy numbers inside the records are accepted like plain floats.
    for r in records[:5]:
        r["score"] = np.float32(r["score"])
        r["bbox"] = np.asarray(r["bbox"], dtype=np.float64)
    from_records = densepred.evaluate_coco(gt, records)
    from_file = densepred.evaluate_coco(gt, dets)
    want = pycocotools_stats(gt, dets, "bbox")
    for k in KEYS:
        assert abs(from_file[k] - want[k]) <= 1e-6
        # float32 scores may reorder ties only within 1e-7 of each other; none do here.
        assert abs(from_records[k] - want[k]) <= 1e-6


def test_evaluate_coco_errors(tmp_path):
    gt = COCO / "bbox" / "gt.json"
    with pytest.raises(FileNotFoundError, match="missing.json"):
        densepred.evaluate_coco(gt, str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        densepred.evaluate_coco(tmp_path / "nope.json", [])
    with pytest.raises(ValueError, match="iou_type"):
        densepred.evaluate_coco(gt, [], iou_type="keypoints")
    bad = [{"image_id": 987654321, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]
    with pytest.raises(ValueError, match="image_id"):
        densepred.evaluate_coco(gt, bad)
    with pytest.raises(TypeError):
        densepred.evaluate_coco(gt, 3.5)


def write_ade_like(tmp_path):
    """The fixture's maps as PNG folders: raw ADE20K labels (0 = other) and predictions stored
    in the same convention (class c as c + 1)."""
    t = load_file(str(FIXTURES / "eval" / "semseg" / "ade_like.safetensors"))
    n = len([k for k in t if k.startswith("raw_label_")])
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    for i in range(n):
        Image.fromarray(t[f"raw_label_{i}"].astype(np.uint8)).save(gt_dir / f"img_{i}.png")
        pred = t[f"pred_label_{i}"].astype(np.int64) + 1
        Image.fromarray(pred.astype(np.uint8)).save(pred_dir / f"img_{i}.png")
    return gt_dir, pred_dir


def test_evaluate_segmentation_equals_mmseg(tmp_path):
    expected = json.loads((FIXTURES / "eval" / "semseg" / "expected.json").read_text())
    gt_dir, pred_dir = write_ade_like(tmp_path)
    got = densepred.evaluate_segmentation(gt_dir, pred_dir, expected["num_classes"],
                                          reduce_zero_label=True)
    want = expected["f64"]
    for k in ["aAcc", "mIoU", "mAcc"]:
        # Areas are integer counts and the ratios are taken in f64 on both sides.
        assert abs(got[k] - want[k]) <= 1e-9, (k, got[k], want[k])
    assert len(got["IoU"]) == expected["num_classes"] == len(want["IoU"])
    for c, (g, w) in enumerate(zip(got["IoU"], want["IoU"])):
        if w is None:
            assert g is None, c
        else:
            assert abs(g - w) <= 1e-9, c


def test_evaluate_segmentation_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="gt_dir"):
        densepred.evaluate_segmentation(tmp_path / "none", tmp_path, 10)
    with pytest.raises(ValueError, match="num_classes"):
        densepred.evaluate_segmentation(tmp_path, tmp_path, 0)
