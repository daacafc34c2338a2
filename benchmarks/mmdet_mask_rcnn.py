"""mmdetection 3.3's Mask R-CNN with the official SMT-T backbone, timed on the workload of
`densepred benchmark train|infer configs/mask_rcnn/mask_rcnn_smt-t_fpn_mini-coco.toml`, for the
Mask R-CNN rows of BENCHMARKS.md.

    python benchmarks/mmdet_mask_rcnn.py --smt SMT/models/smt.py train --size 640 --iters 3
        # batch 2: loss (RPN + RoI head with mask targets), backward, AdamW step
    python benchmarks/mmdet_mask_rcnn.py --smt SMT/models/smt.py infer --size 640 --iters 3
        # batch 1, eval, no_grad: proposals, boxes, masks pasted into the image

Needs torch, torchvision, timm, mmengine 0.10.7, mmcv-lite 2.1.0 and mmdet 3.3.0 (all from PyPI).
mmcv-lite has no compiled ops, so the two kernels Mask R-CNN calls are served by torchvision's
(`mmcv._ext.nms` by `torchvision.ops.nms`, `roi_align_forward` / `roi_align_backward` by
torchvision's RoIAlign, aligned, average pooling); every other part is mmdetection's own code
(anchors, assigners, samplers, mask targets, losses, `_do_paste_mask`). The network is
`configs/_base_/models/mask_rcnn_smt-s_fpn.toml` with the SMT-T backbone of the official
`models/smt.py` (read from --smt; its four stage outputs feed the FPN), 80 classes; the parameter
count is printed so it can be checked against `densepred analyze params`.

The inputs match the Rust benchmark: random N(0, 1) images of SIZE x SIZE, and in training 8 fixed
GT boxes per image (the same formula), each filled as its mask. Prints the median and minimum
time per iteration after 3 warm-ups, and the peak RSS. Runs on 2 threads; `PT_THREADS=N` sets
another count.
"""

import argparse
import os
import resource
import sys
import types

import torch
import torchvision

torch.set_num_threads(int(os.environ.get("PT_THREADS", "2")))


def install_ext_shim():
    """A stand-in `mmcv._ext` whose NMS and RoIAlign run torchvision's kernels; any other op
    raises when called (Mask R-CNN calls none)."""

    class Ext(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)

            def missing(*a, **k):
                raise NotImplementedError(f"mmcv._ext.{name} is not available (mmcv-lite)")

            return missing

    ext = Ext("mmcv._ext")

    def nms(boxes, scores, iou_threshold, offset=0):
        assert offset == 0, "torchvision's NMS has no +1 offset"
        return torchvision.ops.nms(boxes, scores, float(iou_threshold))

    def roi_align_forward(inp, rois, out, argmax_y, argmax_x, aligned_height, aligned_width,
                          spatial_scale, sampling_ratio, pool_mode, aligned):
        assert pool_mode == 1, "average pooling only"
        out.copy_(torchvision.ops.roi_align(inp, rois, (aligned_height, aligned_width),
                                            spatial_scale, sampling_ratio, aligned))

    def roi_align_backward(grad_out, rois, argmax_y, argmax_x, grad_in, aligned_height,
                           aligned_width, spatial_scale, sampling_ratio, pool_mode, aligned):
        b, c, h, w = grad_in.shape
        grad_in.copy_(torch.ops.torchvision._roi_align_backward(
            grad_out, rois, spatial_scale, aligned_height, aligned_width, b, c, h, w,
            sampling_ratio, aligned))

    ext.nms = nms
    ext.roi_align_forward = roi_align_forward
    ext.roi_align_backward = roi_align_backward
    sys.modules["mmcv._ext"] = ext


def model_cfg(num_classes=80):
    """mmdetection's Mask R-CNN config of configs/_base_/models/mask_rcnn_smt-s_fpn.toml, with
    the backbone registered below."""
    assign = lambda pos, neg, mn: dict(type="MaxIoUAssigner", pos_iou_thr=pos, neg_iou_thr=neg,  # noqa: E731
                                       min_pos_iou=mn, match_low_quality=True, ignore_iof_thr=-1)
    extractor = lambda s: dict(type="SingleRoIExtractor", out_channels=256,  # noqa: E731
                               roi_layer=dict(type="RoIAlign", output_size=s, sampling_ratio=0),
                               featmap_strides=[4, 8, 16, 32])
    return dict(
        type="MaskRCNN",
        data_preprocessor=dict(type="DetDataPreprocessor", mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=True,
                               pad_size_divisor=32, pad_mask=True),
        backbone=dict(type="OfficialSMTT"),
        neck=dict(type="FPN", in_channels=[64, 128, 256, 512], out_channels=256, num_outs=5),
        rpn_head=dict(
            type="RPNHead", in_channels=256, feat_channels=256,
            anchor_generator=dict(type="AnchorGenerator", scales=[8], ratios=[0.5, 1.0, 2.0],
                                  strides=[4, 8, 16, 32, 64]),
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4,
                            target_stds=[1.0] * 4),
            loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
            loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
        roi_head=dict(
            type="StandardRoIHead",
            bbox_roi_extractor=extractor(7),
            bbox_head=dict(
                type="Shared2FCBBoxHead", in_channels=256, fc_out_channels=1024,
                roi_feat_size=7, num_classes=num_classes,
                bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4,
                                target_stds=[0.1, 0.1, 0.2, 0.2]),
                reg_class_agnostic=False,
                loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
            mask_roi_extractor=extractor(14),
            mask_head=dict(type="FCNMaskHead", num_convs=4, in_channels=256,
                           conv_out_channels=256, num_classes=num_classes,
                           loss_mask=dict(type="CrossEntropyLoss", use_mask=True,
                                          loss_weight=1.0))),
        train_cfg=dict(
            rpn=dict(assigner=assign(0.7, 0.3, 0.3),
                     sampler=dict(type="RandomSampler", num=256, pos_fraction=0.5,
                                  neg_pos_ub=-1, add_gt_as_proposals=False),
                     allowed_border=-1, pos_weight=-1, debug=False),
            rpn_proposal=dict(nms_pre=2000, max_per_img=1000,
                              nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
            rcnn=dict(assigner=assign(0.5, 0.5, 0.5),
                      sampler=dict(type="RandomSampler", num=512, pos_fraction=0.25,
                                   neg_pos_ub=-1, add_gt_as_proposals=True),
                      mask_size=28, pos_weight=-1, debug=False)),
        test_cfg=dict(
            rpn=dict(nms_pre=1000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7),
                     min_bbox_size=0),
            rcnn=dict(score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=100,
                      mask_thr_binary=0.5)))


def register_backbone(smt_file):
    """Registers `OfficialSMTT`: the official SMT-T, returning its four stage outputs."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from official_backbone import load_official, smt_stages  # our helper beside this file
    from mmdet.registry import MODELS

    official = load_official(smt_file)

    @MODELS.register_module()
    class OfficialSMTT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.smt = official.smt_t()
            self.smt.head = torch.nn.Identity()  # the classifier is not part of a detector

        def forward(self, x):
            return tuple(smt_stages(self.smt, x))

        def init_weights(self):
            pass


def gt_sample(h, w, with_gt):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    s = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                                    batch_input_shape=(h, w), scale_factor=(1.0, 1.0)))
    if with_gt:
        boxes = []
        for i in range(8):
            f = i / 8.0
            boxes.append([w * f * 0.5, h * f * 0.4, w * (0.3 + f * 0.6), h * (0.35 + f * 0.6)])
        b = torch.tensor(boxes, dtype=torch.float32)
        ys = torch.arange(h, dtype=torch.float32)[:, None] + 0.5
        xs = torch.arange(w, dtype=torch.float32)[None, :] + 0.5
        masks = [((xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)).numpy().astype("uint8")
                 for x1, y1, x2, y2 in boxes]
        import numpy as np

        s.gt_instances = InstanceData(bboxes=b, labels=torch.arange(8),
                                      masks=BitmapMasks(np.stack(masks), h, w))
    return s


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--smt", required=True, help="the official models/smt.py")
    p.add_argument("mode", choices=["train", "infer"])
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--iters", type=int, default=3)
    a = p.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from official_backbone import timed  # our helper beside this file

    install_ext_shim()
    import mmdet
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    register_backbone(a.smt)
    torch.manual_seed(0)
    from mmengine.config import ConfigDict

    model = MODELS.build(ConfigDict(model_cfg()))
    n = sum(t.numel() for t in model.parameters())
    s = a.size
    if a.mode == "train":
        model.train()
        x = torch.randn(2, 3, s, s)
        samples = [gt_sample(s, s, True) for _ in range(2)]
        opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.05)

        def step():
            opt.zero_grad(set_to_none=True)
            losses = model.loss(x, samples)
            total, _ = model.parse_losses(losses)
            total.backward()
            opt.step()
    else:
        model.eval()
        x = torch.randn(1, 3, s, s)
        samples = [gt_sample(s, s, False)]

        def step():
            with torch.no_grad():
                model.predict(x, samples)

    med, best = timed(step, a.iters)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"mmdet {mmdet.__version__} Mask R-CNN official SMT-T {a.mode} {s}x{s} batch "
        f"{x.shape[0]}: median {med:.1f} ms over {a.iters} iterations (min {best:.1f}), peak RSS "
        f"{peak:.0f} MiB, {n} parameters, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


if __name__ == "__main__":
    main()
