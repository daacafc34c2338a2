"""The torchvision side of `densepred benchmark op roi-align|nms|anchors-assign`.

Same workloads and sizes as the Rust command (inputs drawn the same way, not bit-identical):
  * RoIAlign: 1000 boxes on (2, 256, 200, 336), stride 4, 7x7, sampling 2, aligned; forward, and
    forward + backward;
  * NMS: 10 000 clustered boxes, IoU 0.5;
  * RetinaNet anchors for a 1344x800 padded image (P3-P7, 9 per location) + IoU matrix + Matcher
    (0.5 / 0.4, low-quality matches) against 50 gt boxes.
Median of N timed runs after 3 warm-ups, torch.set_num_threads(THREADS).

Usage: python torchvision_ops.py [--threads 2] [--iters 5]
"""
import argparse
import statistics
import time

import torch
import torchvision
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou, nms, roi_align


def median_ms(fn, iters):
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def random_boxes(n, w, h, clusters, g):
    c = torch.rand(clusters, 3, generator=g) * torch.tensor([w, h, 240.0]) + torch.tensor([0.0, 0.0, 16.0])
    c = c[torch.arange(n) % clusters]
    xy = c[:, :2] + (torch.rand(n, 2, generator=g) * 0.4 - 0.2) * c[:, 2:]
    wh = c[:, 2:] * (torch.rand(n, 2, generator=g) * 0.8 + 0.6)
    b = torch.cat([xy - wh / 2, xy + wh / 2], 1)
    b[:, 0].clamp_(0, w - 2)
    b[:, 1].clamp_(0, h - 2)
    b[:, 2].clamp_(2, w)
    b[:, 3].clamp_(2, h)
    return b


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} threads")

    feat = torch.randn(2, 256, 200, 336, generator=g, requires_grad=True)
    boxes = random_boxes(1000, 1344.0, 800.0, 1000, g)
    rois = torch.cat([(torch.arange(1000) % 2).float()[:, None], boxes], 1)
    up = torch.randn(1000, 256, 7, 7, generator=g)

    def ra_fwd():
        with torch.no_grad():
            roi_align(feat, rois, (7, 7), spatial_scale=0.25, sampling_ratio=2, aligned=True)

    def ra_both():
        feat.grad = None
        y = roi_align(feat, rois, (7, 7), spatial_scale=0.25, sampling_ratio=2, aligned=True)
        (y * up).sum().backward()

    print(f"roi_align forward {median_ms(ra_fwd, a.iters):.2f} ms, forward+backward {median_ms(ra_both, a.iters):.2f} ms")

    b = random_boxes(10_000, 1344.0, 800.0, 2000, g)
    s = torch.rand(10_000, generator=g)
    print(f"nms 10000 boxes {median_ms(lambda: nms(b, s, 0.5), a.iters):.2f} ms ({len(nms(b, s, 0.5))} kept)")

    sizes = tuple((int(32 * 2 ** l), int(32 * 2 ** l * 2 ** (1 / 3)), int(32 * 2 ** l * 2 ** (2 / 3))) for l in range(5))
    gen = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    images = ImageList(torch.zeros(1, 3, 800, 1344), [(800, 1333)])
    feats = [torch.zeros(1, 1, -(-800 // s), -(-1344 // s)) for s in (8, 16, 32, 64, 128)]
    gt = random_boxes(50, 1333.0, 800.0, 50, g)
    matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)

    def anchors_assign():
        anchors = gen(images, feats)[0]
        matcher(box_iou(gt, anchors))

    n = gen(images, feats)[0].shape[0]
    print(f"anchors + Matcher(0.5/0.4, low-quality) vs 50 gts {median_ms(anchors_assign, a.iters):.2f} ms ({n} anchors)")


if __name__ == "__main__":
    main()
