"""SMT-T timed with the official model code (AFeng-x/SMT `models/smt.py`), for the "official
code" rows of BENCHMARKS.md.

The official file is read from the path given with --smt-file (it is not part of densepred; get
it from the official repository). Imports that the model classes do not use (torchvision's
transforms, ptflops, thop, timm's data helpers) are replaced by empty stand-ins before the file
runs, so only torch and timm are needed; the model classes and factories run unmodified.

    python benchmarks/official_smt.py --smt-file SMT/models/smt.py forward --size 224 --iters 10
        # smt_t() classifier (head included), batch 1, eval, no_grad: what
        # `densepred benchmark backbone configs/backbones/smt-t_in1k.toml --shape 224x224` times
    python benchmarks/official_smt.py --smt-file SMT/models/smt.py train --size 224 --iters 20
        # smt_t() stages, batch 2, train mode: forward + backward of the sum of the four stage
        # outputs' means (the official stage modules, called in the order of its
        # forward_features), what `densepred benchmark backbone configs/backbones/smt-t.toml
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
    spec = importlib.util.spec_from_file_location("official_smt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stage_outputs(model, x):
    """The four stage outputs `(B, C_i, H_i, W_i)`: the official modules in forward_features'
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
    p.add_argument("--smt-file", required=True, help="the official models/smt.py")
    p.add_argument("mode", choices=["forward", "train"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--batch", type=int, default=None)
    a = p.parse_args()
    official = load_official(a.smt_file)
    torch.manual_seed(0)
    model = official.smt_t()
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
            loss = sum(o.mean() for o in stage_outputs(model, x))
            loss.backward()

    med, best = timed(step, a.iters)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"official SMT-T {a.mode} {a.size}x{a.size} batch {x.shape[0]}: median {med:.1f} ms over "
        f"{a.iters} iterations (min {best:.1f}), peak RSS {peak:.0f} MiB, {n} parameters, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


if __name__ == "__main__":
    main()
