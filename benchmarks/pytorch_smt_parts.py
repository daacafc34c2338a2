"""PyTorch side of the SMT piece-by-piece timings (backbones/examples/smt_ffn_step.rs and
smt_attn_step.rs): forward + backward of one sub-block, batch 2, 2 threads, median of 20 steps
after 5 untimed.

    python benchmarks/pytorch_smt_parts.py ffn C HW RATIO
    python benchmarks/pytorch_smt_parts.py sam|msa C HW HEADS

The modules are those of pytorch_upernet_smt.py (the official SMT layer structure).
"""
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import pytorch_upernet_smt as P  # noqa: E402

torch.set_num_threads(2)


class Ffn(nn.Module):
    def __init__(self, c, hw, r):
        super().__init__()
        self.hw = hw
        self.ln = nn.LayerNorm(c, eps=1e-6)
        self.fc1 = nn.Linear(c, c * r)
        self.dw = nn.Conv2d(c * r, c * r, 3, 1, 1, groups=c * r)
        self.fc2 = nn.Linear(c * r, c)

    def forward(self, x):
        h = self.fc1(self.ln(x))
        b, n, c = h.shape
        m = self.dw(h.transpose(1, 2).reshape(b, c, self.hw, self.hw)).flatten(2).transpose(1, 2)
        return x + self.fc2(F.gelu(h + m))


class AttnBlock(nn.Module):
    def __init__(self, kind, c, hw, heads):
        super().__init__()
        self.hw = hw
        self.ln = nn.LayerNorm(c, eps=1e-6)
        self.attn = P.CaAttention(c, heads) if kind == "sam" else P.SaAttention(c, heads)

    def forward(self, x):
        return x + self.attn(self.ln(x), self.hw, self.hw)


def main():
    kind = sys.argv[1]
    c, hw, third = (int(v) for v in sys.argv[2:5])
    m = Ffn(c, hw, third) if kind == "ffn" else AttnBlock(kind, c, hw, third)
    x = torch.randn(2, hw * hw, c, requires_grad=True)
    ts = []
    for i in range(25):
        t = time.perf_counter()
        m(x).mean().backward()
        if i >= 5:
            ts.append((time.perf_counter() - t) * 1e3)
    ts.sort()
    print(f"torch {kind} {c} {hw} {third}: median {ts[len(ts) // 2]:.2f} ms")


if __name__ == "__main__":
    main()
