"""Golden tie-breaking cases of torch.topk(largest=False) on CPU, for heads/src/task/topk.rs.

Run: python make_topk_ties.py  (PyTorch CPU wheel; writes topk_ties.json beside this script).
Values are small integers so that many ties sit at the k-th position; sizes cover both of
PyTorch's paths (partial_sort when k*64 <= n, nth_element otherwise).
"""
import json, pathlib, torch

g = torch.Generator().manual_seed(0)
cases = []
for n, k, hi in [(5, 3, 2), (20, 9, 4), (64, 9, 5), (320, 9, 30), (575, 9, 40), (576, 9, 40),
                 (2000, 9, 50), (6400, 9, 100), (100, 100, 3), (1000, 17, 7), (37, 9, 2)]:
    for rep in range(3):
        v = torch.randint(0, hi, (n,), generator=g).float().sqrt()
        idx = torch.topk(v, k, largest=False).indices.sort().values
        cases.append({"values": v.tolist(), "k": k, "indices": idx.tolist()})
meta = {"torch": torch.__version__, "cases": cases}
pathlib.Path(__file__).with_name("topk_ties.json").write_text(json.dumps(meta))
