"""Backbones timed with their official model code, for the "official code" rows of
BENCHMARKS.md: SMT (AFeng-x/SMT `models/smt.py`) and Conv2Former (HVision-NKU/Conv2Former
`models/conv2former.py`).

The official file is read from the path given with --file (it is not part of densepred; get it
from the official repository). Imports that the model classes do not use (torchvision's
transforms, ptflops, thop, timm's data helpers) are replaced by empty stand-ins before the file
runs, so only torch and timm are needed; the model classes and factories run unmodified.

    python benchmarks/official_backbone.py --arch smt_t --file SMT/models/smt.py forward --size 224
        # the classifier (head included), batch 1, eval, no_grad: what
        # `densepred benchmark backbone configs/backbones/smt-t_in1k.toml --shape 224x224` times
    python benchmarks/official_backbone.py --arch conv2former_n --file C2F/models/conv2former.py \
        train --size 224 --iters 20
        # the four stages, batch 2, train mode: forward + backward of the sum of the four stage
        # outputs' means (the official stage modules, called in the order of its
        # forward_features), what `densepred benchmark backbone configs/backbones/conv2former-n.toml
        # --batch 2 --train` times

Prints the median and the minimum time per iteration (3 warm-ups first) and the peak RSS. Runs
on 2 threads; `PT_THREADS=N` sets another count.
"""

import argparse
import importlib.util
import os
import resource
import statistics
import sys
import time
import types

import torch

torch.set_num_threads(int(os.environ.get("PT_THREADS", "2")))


def stub(name, **attrs):
    """An empty module `name` (with `attrs`) unless the real one imports."""
    try:
        module = importlib.import_module(name)
        if all(hasattr(module, a) for a in attrs):
            return
    except Exception:
        module = types.ModuleType(name)
        sys.modules[name] = module
    for k, v in attrs.items():
        if not hasattr(module, k):
            setattr(module, k, v)


def load_official(path):
    unused = lambda *a, **k: None  # noqa: E731
    stub("ptflops", get_model_complexity_info=unused)
    stub("thop", profile=unused)
    stub("torchvision")
    stub("torchvision.transforms")
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    stub("timm.data.transforms", _pil_interp=unused)
    stub("timm.data", create_transform=unused)
    spec = importlib.util.spec_from_file_location("official_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # timm's register_model looks the module up there
    spec.loader.exec_module(module)
    return module


def smt_stages(model, x):
    """SMT's four stage outputs `(B, C_i, H_i, W_i)`: the official modules in forward_features'
    order, keeping each stage's output instead of pooling the last one."""
    b = x.shape[0]
    outs = []
    for i in range(model.num_stages):
        x, h, w = getattr(model, f"patch_embed{i + 1}")(x)
        for blk in getattr(model, f"block{i + 1}"):
            x = blk(x, h, w)
        x = getattr(model, f"norm{i + 1}")(x)
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
        outs.append(x)
    return outs


def conv2former_stages(model, x):
    """Conv2Former's four stage outputs: `downsample_layers[i]` then `stages[i]`, as its
    forward_features, keeping each stage's output."""
    outs = []
    for i in range(4):
        x = model.stages[i](model.downsample_layers[i](x))
        outs.append(x)
    return outs


ARCHS = {
    "smt_t": ("smt_t", smt_stages),
    "conv2former_n": ("conv2former_n", conv2former_stages),
    "conv2former_t": ("conv2former_t", conv2former_stages),
}


def timed(step, iters):
    for _ in range(3):
        step()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), min(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", choices=sorted(ARCHS), default="smt_t")
    p.add_argument("--file", required=True, help="the official model file")
    p.add_argument("mode", choices=["forward", "train"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--batch", type=int, default=None)
    a = p.parse_args()
    official = load_official(a.file)
    factory, stages = ARCHS[a.arch]
    torch.manual_seed(0)
    model = getattr(official, factory)()
    n = sum(t.numel() for t in model.parameters())
    if a.mode == "forward":
        model.eval()
        x = torch.randn(a.batch or 1, 3, a.size, a.size)

        def step():
            with torch.no_grad():
                model(x)
    else:
        model.train()
        x = torch.randn(a.batch or 2, 3, a.size, a.size)

        def step():
            model.zero_grad(set_to_none=True)
            loss = sum(o.mean() for o in stages(model, x))
            loss.backward()

    med, best = timed(step, a.iters)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"official {a.arch} {a.mode} {a.size}x{a.size} batch {x.shape[0]}: median {med:.1f} ms over "
        f"{a.iters} iterations (min {best:.1f}), peak RSS {peak:.0f} MiB, {n} parameters, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


if __name__ == "__main__":
    main()
