"""Records PyTorch's bilinear resize and adaptive average pooling (values and input gradients)
for core/tests/resample.rs. Run with any PyTorch (2.x) from PyPI:
    python core/tests/data/make_resample.py > core/tests/data/resample.json
Inputs are small deterministic float64 arrays; each case stores the input, the output and the
gradient of sum(output * proj) with respect to the input, with proj = arange-based weights.
"""
import json

import torch
import torch.nn.functional as F


def det(shape, seed):
    n = 1
    for s in shape:
        n *= s
    v = torch.arange(n, dtype=torch.float64)
    return torch.sin(v * 0.7 + seed).reshape(shape)


cases = []
for (h, w, oh, ow) in [(4, 5, 8, 10), (7, 9, 13, 17), (13, 17, 7, 9), (5, 4, 25, 34), (6, 6, 3, 2), (3, 5, 3, 5)]:
    for ac in [False, True]:
        x = det((1, 2, h, w), 1.0).requires_grad_()
        y = F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=ac)
        proj = det(y.shape, 2.0)
        (y * proj).sum().backward()
        cases.append(dict(op="bilinear", align_corners=ac, shape=[1, 2, h, w], out=[oh, ow],
                          x=x.detach().flatten().tolist(), y=y.detach().flatten().tolist(),
                          proj=proj.flatten().tolist(), grad=x.grad.flatten().tolist()))
for (h, w, oh, ow) in [(4, 5, 6, 6), (4, 5, 1, 1), (7, 9, 2, 3), (8, 10, 3, 3), (2, 3, 6, 6)]:
    x = det((1, 2, h, w), 3.0).requires_grad_()
    y = F.adaptive_avg_pool2d(x, (oh, ow))
    proj = det(y.shape, 4.0)
    (y * proj).sum().backward()
    cases.append(dict(op="adaptive_avg_pool2d", shape=[1, 2, h, w], out=[oh, ow],
                      x=x.detach().flatten().tolist(), y=y.detach().flatten().tolist(),
                      proj=proj.flatten().tolist(), grad=x.grad.flatten().tolist()))
print(json.dumps(dict(torch=torch.__version__, cases=cases)))
