"""PyTorch side of the UperNet-SMT-T training / inference benchmark (BENCHMARKS.md, issue 6).

A plain-PyTorch build of the same network as
`configs/upernet/upernet_smt-t_512x512_160k_ade20k.toml` — SMT-T backbone (Shi et al. 2023, the
layer structure of the official models/smt.py), mmseg's UPerHead (PPM 1/2/3/6, 512 channels) and
FCN auxiliary head on stage 3, 150 classes, cross-entropy on logits resized to the crop, AdamW —
written for this measurement (no mmseg / mmcv install). The script checks that its parameter count
equals densepred's / mmsegmentation's (41,301,164) before timing.

    python benchmarks/pytorch_upernet_smt.py train --iters 3   # batch 2, 512x512
    python benchmarks/pytorch_upernet_smt.py infer --iters 3   # batch 1, 512x512
    python benchmarks/pytorch_upernet_smt.py backbone --size 224 --iters 10
        # SMT-T alone, batch 2, train mode: forward + backward of the sum of the stage means
        # (what `densepred benchmark backbone configs/backbones/smt-t.toml --train` times)

Prints the median time per iteration and the process's peak RSS (VmHWM). Runs on 2 threads
(the machine kind BENCHMARKS.md compares on); `PT_THREADS=N` sets another count.
"""

import argparse
import os
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_num_threads(int(os.environ.get("PT_THREADS", "2")))


class CaAttention(nn.Module):
    """SMT's scale-aware modulation (multi-head mixed convolution + scale-aware aggregation)."""

    def __init__(self, dim, heads, expand=2):
        super().__init__()
        self.heads = heads
        self.v = nn.Linear(dim, dim)
        self.s = nn.Linear(dim, dim)
        g = dim // heads
        self.convs = nn.ModuleList(
            nn.Conv2d(g, g, 3 + 2 * i, padding=1 + i, groups=g) for i in range(heads)
        )
        self.proj0 = nn.Conv2d(dim, dim * expand, 1, groups=g)
        self.bn = nn.BatchNorm2d(dim * expand)
        self.proj1 = nn.Conv2d(dim * expand, dim, 1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, h, w):
        b, n, c = x.shape
        v = self.v(x)
        s = self.s(x).reshape(b, h, w, self.heads, c // self.heads).permute(3, 0, 4, 1, 2)
        # Head i's channel j goes to output channel j * heads + i.
        parts = [conv(s[i]).unsqueeze(2) for i, conv in enumerate(self.convs)]
        s = torch.cat(parts, 2).reshape(b, c, h, w)
        s = self.proj1(F.gelu(self.bn(self.proj0(s)))).reshape(b, c, n).transpose(1, 2)
        return self.proj(s * v)


class SaAttention(nn.Module):
    """Multi-head self-attention with a depthwise 3x3 conv on the values."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.local = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, h, w):
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(x).reshape(b, n, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
        y = (a @ v).transpose(1, 2).reshape(b, n, c)
        vl = v.transpose(1, 2).reshape(b, n, c).transpose(1, 2).reshape(b, c, h, w)
        y = y + self.local(vl).reshape(b, c, n).transpose(1, 2)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, dim, ca_heads, sa_heads, mlp_ratio, use_ca):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = CaAttention(dim, ca_heads) if use_ca else SaAttention(dim, sa_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hid = dim * mlp_ratio
        self.fc1 = nn.Linear(dim, hid)
        self.dw = nn.Conv2d(hid, hid, 3, padding=1, groups=hid)
        self.fc2 = nn.Linear(hid, dim)

    def forward(self, x, h, w):
        x = x + self.attn(self.norm1(x), h, w)
        y = self.fc1(self.norm2(x))
        b, n, c = y.shape
        d = self.dw(y.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
        return x + self.fc2(F.gelu(y + d))


class SmtT(nn.Module):
    def __init__(self):
        super().__init__()
        dims, depths, mlp = [64, 128, 256, 512], [2, 2, 8, 1], [4, 4, 4, 2]
        ca_heads, sa_heads = [4, 4, 4, -1], [-1, -1, 8, 16]
        self.embeds = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.norms = nn.ModuleList()
        for i in range(4):
            if i == 0:
                emb = nn.Sequential(
                    nn.Conv2d(3, dims[0], 3, 2, 1, bias=False), nn.BatchNorm2d(dims[0]),
                    nn.ReLU(True), nn.Conv2d(dims[0], dims[0], 2, 2),
                )
            else:
                emb = nn.Conv2d(dims[i - 1], dims[i], 3, 2, 1)
            self.embeds.append(nn.ModuleList([emb, nn.LayerNorm(dims[i])]))
            use_ca = lambda j: (i != 3) and not (i == 2 and j % 2 == 1)
            self.stages.append(nn.ModuleList(
                Block(dims[i], ca_heads[i], sa_heads[i], mlp[i], use_ca(j)) for j in range(depths[i])
            ))
            self.norms.append(nn.LayerNorm(dims[i], eps=1e-6))

    def forward(self, x):
        outs = []
        for (conv, ln), blocks, norm in zip(self.embeds, self.stages, self.norms):
            x = conv(x)
            b, c, h, w = x.shape
            x = ln(x.flatten(2).transpose(1, 2))
            for blk in blocks:
                x = blk(x, h, w)
            x = norm(x).reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
            outs.append(x)
        return outs


def cbr(i, o, k):
    return nn.Sequential(nn.Conv2d(i, o, k, padding=k // 2, bias=False), nn.BatchNorm2d(o), nn.ReLU(True))


class UperHead(nn.Module):
    def __init__(self, ins=(64, 128, 256, 512), ch=512, k=150, scales=(1, 2, 3, 6)):
        super().__init__()
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), cbr(ins[-1], ch, 1)) for s in scales)
        self.bottleneck = cbr(ins[-1] + len(scales) * ch, ch, 3)
        self.lat = nn.ModuleList(cbr(c, ch, 1) for c in ins[:-1])
        self.fpn = nn.ModuleList(cbr(ch, ch, 3) for _ in ins[:-1])
        self.fpn_bottleneck = cbr(len(ins) * ch, ch, 3)
        self.cls = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(ch, k, 1))

    def forward(self, xs):
        top = xs[-1]
        pp = [top] + [F.interpolate(m(top), top.shape[2:], mode="bilinear", align_corners=False) for m in self.ppm]
        lats = [l(x) for l, x in zip(self.lat, xs)] + [self.bottleneck(torch.cat(pp, 1))]
        for i in range(len(lats) - 1, 0, -1):
            lats[i - 1] = lats[i - 1] + F.interpolate(lats[i], lats[i - 1].shape[2:], mode="bilinear", align_corners=False)
        outs = [f(l) for f, l in zip(self.fpn, lats)] + [lats[-1]]
        outs = [outs[0]] + [F.interpolate(o, outs[0].shape[2:], mode="bilinear", align_corners=False) for o in outs[1:]]
        return self.cls(self.fpn_bottleneck(torch.cat(outs, 1)))


class UperNetSmtT(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = SmtT()
        self.decode = UperHead()
        self.aux = nn.Sequential(cbr(256, 256, 3), nn.Dropout2d(0.1), nn.Conv2d(256, 150, 1))

    def loss(self, x, y):
        f = self.backbone(x)
        size = x.shape[2:]
        up = lambda t: F.interpolate(t, size, mode="bilinear", align_corners=False)
        main = F.cross_entropy(up(self.decode(f)), y, ignore_index=255)
        aux = F.cross_entropy(up(self.aux(f[2])), y, ignore_index=255)
        return main + 0.4 * aux

    def predict(self, x):
        logits = F.interpolate(self.decode(self.backbone(x)), x.shape[2:], mode="bilinear", align_corners=False)
        return logits.argmax(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["train", "infer", "backbone"])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--size", type=int, default=512)
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.mode == "backbone":
        return backbone(a)
    m = UperNetSmtT()
    n = sum(p.numel() for p in m.parameters())
    assert n == 41_301_164, f"{n} parameters, expected densepred's / mmseg's 41,301,164"
    b = 2 if a.mode == "train" else 1
    x = torch.randn(b, 3, a.size, a.size)
    y = torch.randint(0, 150, (b, a.size, a.size))
    y[:, :4] = 255
    if a.mode == "train":
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01)

        def step():
            opt.zero_grad(set_to_none=True)
            m.loss(x, y).backward()
            opt.step()
    else:
        m.eval()

        def step():
            with torch.no_grad():
                m.predict(x)

    step()
    times = []
    for _ in range(a.iters):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{a.mode} {a.size}x{a.size} batch {b}: median {statistics.median(times) * 1e3:.1f} ms "
          f"(min {min(times) * 1e3:.1f}), peak RSS {peak:.0f} MiB, {n} parameters, torch {torch.__version__}")


def backbone(a):
    m = SmtT().train()
    n = sum(p.numel() for p in m.parameters())
    assert n == 10_993_536, f"{n} parameters, expected densepred's SMT-T without head, 10,993,536"
    x = torch.randn(2, 3, a.size, a.size)

    def step():
        m.zero_grad(set_to_none=True)
        sum(o.mean() for o in m(x)).backward()

    for _ in range(3):
        step()
    times = []
    for _ in range(a.iters):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"backbone forward+backward {a.size}x{a.size} batch 2: median {statistics.median(times) * 1e3:.1f} ms "
          f"(min {min(times) * 1e3:.1f}), peak RSS {peak:.0f} MiB, {n} parameters, torch {torch.__version__}")


if __name__ == "__main__":
    main()
