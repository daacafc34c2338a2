"""``Detector`` / ``Segmentor`` on the mini configs and assets/ images, ``train`` → ``test`` →
load round trips on tiny configs, Ctrl-C during ``train``, and the exceptions bad input raises."""

import json
import os
import signal
import struct
import threading
import time

import numpy as np
import pytest
from PIL import Image

import densepred
from conftest import ROOT

RETINA_MINI = "configs/retinanet/retinanet_smt-t_fpn_mini-coco.toml"
UPER_MINI = "configs/upernet/upernet_smt-t_mini-ade.toml"
RETINA_TINY = "tests/configs/retinanet_tiny_overfit.toml"
MASK_RCNN_MINI = "configs/mask_rcnn/mask_rcnn_smt-t_fpn_mini-coco.toml"
UPER_TINY = "tests/configs/upernet_tiny_overfit.toml"
COCO_IMG = ROOT / "assets/mini_coco/images/000000000009.jpg"
ADE_IMG = ROOT / "assets/mini_ade/images/validation/000000000724.jpg"
# Two training iterations, no validation, a checkpoint at the end.
SHORT = {"train_cfg.max_iters": 2, "train_cfg.val_interval": 0,
         "default_hooks.checkpoint.interval": 2, "default_hooks.checkpoint.by_epoch": False}


# Fresh or barely trained heads score below the 0.05 test threshold; keep every candidate so
# the checks below see real boxes.
ALL_SCORES = {"model.test_cfg.score_thr": 0.0}


@pytest.fixture(scope="module")
def detector():
    return densepred.Detector(RETINA_MINI, overrides=ALL_SCORES)


@pytest.fixture(scope="module")
def segmentor():
    return densepred.Segmentor(UPER_MINI)


def check_detections(d, classes, hw):
    assert set(d) == {"boxes", "scores", "labels", "class_names"}
    n = len(d["scores"])
    assert d["boxes"].dtype == np.float32 and d["boxes"].shape == (n, 4)
    assert d["scores"].dtype == np.float32 and d["scores"].shape == (n,)
    assert d["labels"].dtype == np.int64 and d["labels"].shape == (n,)
    assert n <= 100  # test_cfg.max_per_img
    assert np.all((d["scores"] >= 0) & (d["scores"] <= 1))
    assert np.all((d["labels"] >= 0) & (d["labels"] < len(classes)))
    assert d["class_names"] == [classes[i] for i in d["labels"]]
    h, w = hw
    b = d["boxes"]
    # xyxy in original-image pixels, clipped to the image.
    assert np.all(b[:, 2] >= b[:, 0]) and np.all(b[:, 3] >= b[:, 1])
    assert np.all(b[:, [0, 2]] >= 0) and np.all(b[:, [0, 2]] <= w + 1e-3)
    assert np.all(b[:, [1, 3]] >= 0) and np.all(b[:, [1, 3]] <= h + 1e-3)
    return n


def test_version():
    assert isinstance(densepred.__version__, str) and densepred.__version__.count(".") == 2


def test_detector_predicts_on_assets(detector):
    classes = detector.classes
    assert len(classes) == 80 and classes[0] == "person"
    img = np.asarray(Image.open(COCO_IMG).convert("RGB"))
    d = detector.predict(COCO_IMG)
    assert check_detections(d, classes, img.shape[:2]) == 100
    d2 = detector.predict(str(COCO_IMG))
    np.testing.assert_array_equal(d["boxes"], d2["boxes"])


def test_mask_rcnn_returns_masks_in_the_original_frame():
    # Fresh weights, every candidate kept: Mask R-CNN adds an (N, H, W) bool "masks" entry.
    det = densepred.Detector(MASK_RCNN_MINI, overrides={"model.test_cfg.rcnn.score_thr": 0.0})
    img = np.asarray(Image.open(COCO_IMG).convert("RGB"))
    d = det.predict(COCO_IMG)
    masks = d.pop("masks")
    n = check_detections(d, det.classes, img.shape[:2])
    assert n > 0
    assert masks.dtype == np.bool_ and masks.shape == (n, *img.shape[:2])


def test_detector_array_equals_png_path(detector, tmp_path):
    # A PNG decodes to the same pixels in PIL and in densepred (JPEG decoders may differ).
    img = np.asarray(Image.open(COCO_IMG).convert("RGB"))
    png = tmp_path / "img.png"
    Image.fromarray(img).save(png)
    a = detector.predict(img)
    b = detector.predict(png)
    for k in ["boxes", "scores", "labels"]:
        np.testing.assert_array_equal(a[k], b[k])
    batch = detector.predict_batch([img, png, COCO_IMG])
    assert len(batch) == 3
    for d in batch:
        check_detections(d, detector.classes, img.shape[:2])


def test_segmentor_predicts_on_assets(segmentor):
    assert len(segmentor.classes) == 133
    assert segmentor.reduce_zero_label
    img = np.asarray(Image.open(ADE_IMG).convert("RGB"))
    m = segmentor.predict(ADE_IMG)
    assert m.dtype == np.int32 and m.shape == img.shape[:2]
    assert m.min() >= 0 and m.max() < 133
    small = img[: img.shape[0] // 2, : img.shape[1] // 3]
    maps = segmentor.predict_batch([small, ADE_IMG])
    assert [x.shape for x in maps] == [small.shape[:2], img.shape[:2]]
    assert all(x.dtype == np.int32 for x in maps)


def test_detector_train_test_load_round_trip(tmp_path):
    out = densepred.train(RETINA_TINY, work_dir=tmp_path, overrides=SHORT, progress=False)
    assert out["iters"] == 2
    ck = out["last_checkpoint"]
    assert ck is not None and os.path.exists(ck)
    assert os.path.exists(tmp_path / "metrics.jsonl")
    metrics = densepred.test(RETINA_TINY, ck, progress=False)
    assert sorted(metrics) == sorted(["AP", "AP50", "AP75", "APs", "APm", "APl",
                                      "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"])
    assert all(-1 <= v <= 1 for v in metrics.values())
    det = densepred.Detector(RETINA_TINY, checkpoint=ck, overrides=ALL_SCORES)
    fresh = densepred.Detector(RETINA_TINY, overrides=ALL_SCORES)
    a, b = det.predict(COCO_IMG), det.predict(COCO_IMG)
    np.testing.assert_array_equal(a["scores"], b["scores"])
    assert check_detections(a, det.classes, np.asarray(Image.open(COCO_IMG)).shape[:2]) > 0
    # Two AdamW steps moved the weights: the scores differ from the initialisation's.
    c = fresh.predict(COCO_IMG)
    assert a["scores"].shape != c["scores"].shape or not np.array_equal(a["scores"], c["scores"])


def drop_last_tensor(src, dst):
    """Writes the safetensors file ``src`` without its last tensor; returns that tensor's name."""
    raw = open(src, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    name = max(header, key=lambda k: header[k]["data_offsets"][1])
    header.pop(name)
    end = max(v["data_offsets"][1] for v in header.values())
    if meta is not None:
        header["__metadata__"] = meta
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + raw[8 + n:8 + n + end])
    return name


def test_checkpoints_load_strictly_unless_asked_not_to(tmp_path):
    out = densepred.train(RETINA_TINY, work_dir=tmp_path, overrides=SHORT, progress=False)
    bad = tmp_path / "bad.safetensors"
    gone = drop_last_tensor(out["last_checkpoint"], bad)
    with pytest.raises(ValueError, match="missing keys \\(1\\): " + gone.replace(".", "\\.")):
        densepred.Detector(RETINA_TINY, checkpoint=bad)
    with pytest.raises(ValueError, match="bad.safetensors"):
        densepred.test(RETINA_TINY, bad, progress=False)
    assert densepred.Detector(RETINA_TINY, checkpoint=bad, strict=False).classes


def test_segmentor_train_test_load_round_trip(tmp_path):
    out = densepred.train(UPER_TINY, work_dir=tmp_path, overrides=SHORT, progress=False)
    ck = out["last_checkpoint"]
    assert out["iters"] == 2 and ck is not None
    metrics = densepred.test(UPER_TINY, ck, progress=False)
    for k in ["mIoU", "mAcc", "aAcc"]:
        assert 0 <= metrics[k] <= 1
    assert len(metrics["IoU"]) == 133
    seg = densepred.Segmentor(UPER_TINY, checkpoint=ck)
    m = seg.predict(ADE_IMG)
    assert m.dtype == np.int32 and m.shape == np.asarray(Image.open(ADE_IMG)).shape[:2]


def test_ctrl_c_stops_training_cleanly(tmp_path):
    long = dict(SHORT, **{"train_cfg.max_iters": 100000, "default_hooks.checkpoint.interval": 1})
    timer = threading.Timer(3.0, lambda: os.kill(os.getpid(), signal.SIGINT))
    start = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            densepred.train(RETINA_TINY, work_dir=tmp_path, overrides=long, progress=False)
    finally:
        timer.cancel()
    # Stopped after the iteration in flight, not at the end of 100000.
    assert time.monotonic() - start < 120
    # The checkpoints written before the interrupt are complete.
    last = (tmp_path / "last_checkpoint").read_text().strip()
    assert (tmp_path / f"{last}.safetensors").exists()
    assert densepred.Detector(RETINA_TINY, checkpoint=tmp_path / f"{last}.safetensors")


def test_bad_input_raises(detector, segmentor, tmp_path):
    img = np.zeros((32, 48, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        detector.predict(img.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        detector.predict(np.zeros((32, 48, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        segmentor.predict(np.zeros((32, 48), dtype=np.uint8))
    with pytest.raises(FileNotFoundError, match="nothere.jpg"):
        detector.predict(tmp_path / "nothere.jpg")
    with pytest.raises(TypeError):
        detector.predict(42)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="corrupt.jpg"):
        detector.predict(corrupt)
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        densepred.Detector(tmp_path / "missing.toml")
    with pytest.raises(FileNotFoundError, match="ck.safetensors"):
        densepred.Detector(RETINA_MINI, checkpoint=tmp_path / "ck.safetensors")
    bad = tmp_path / "bad.toml"
    bad.write_text(f'_base_ = ["{ROOT / RETINA_MINI}"]\n[model.bbox_head]\nnum_classez = 3\n')
    with pytest.raises(ValueError, match="num_classez"):
        densepred.Detector(bad)
    with pytest.raises(ValueError, match="feat_channelz"):
        densepred.Detector(RETINA_MINI, overrides={"model.bbox_head.feat_channelz": 3})
    with pytest.raises(ValueError, match="Segmentor"):
        densepred.Detector(UPER_MINI)
    with pytest.raises(ValueError, match="Detector"):
        densepred.Segmentor(RETINA_MINI)
    with pytest.raises(ValueError, match="cuda"):
        densepred.Detector(RETINA_MINI, device="cuda")
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        densepred.train(tmp_path / "nope.toml")
    with pytest.raises(TypeError, match="overrides"):
        densepred.train(RETINA_TINY, overrides=5)


def test_predict_releases_the_gil(segmentor):
    # While one thread runs inference, this thread keeps executing Python: a call that held the
    # GIL would leave the counter at (nearly) zero until it returned.
    img = np.asarray(Image.open(ADE_IMG).convert("RGB"))
    worker = threading.Thread(target=lambda: segmentor.predict_batch([img] * 4))
    count = 0
    worker.start()
    while worker.is_alive():
        count += 1
    worker.join()
    assert count > 10_000, count
