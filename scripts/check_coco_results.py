"""Check that `densepred test --out RESULTS --json-out METRICS` round-trips through pycocotools.

Usage (pycocotools from PyPI in any virtual environment):
    python scripts/check_coco_results.py GT_JSON RESULTS_JSON METRICS_JSON

Loads the COCO results that `densepred test --out` wrote (original-image xywh boxes, original
category ids), evaluates them with pycocotools' COCOeval (bbox), and compares the 12 summary
statistics with the ones `densepred test --json-out` wrote. Exits 1 on any difference > 1e-9.
"""
import contextlib
import io
import json
import sys

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

KEYS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def main() -> int:
    gt_path, res_path, metrics_path = sys.argv[1:4]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_path)
        dt = gt.loadRes(res_path)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ours = json.load(open(metrics_path))
    bad = 0
    for key, ref in zip(KEYS, ev.stats):
        diff = abs(float(ref) - ours[key])
        bad += diff > 1e-9
        print(f"{key:6s} pycocotools {float(ref):.6f} densepred {ours[key]:.6f} diff {diff:.1e}")
    print("OK" if bad == 0 else f"{bad} statistics differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
