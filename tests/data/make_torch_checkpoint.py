"""Writes a safetensors file as a PyTorch `torch.save` checkpoint, without PyTorch.

Usage: python3 make_torch_checkpoint.py IN.safetensors OUT.pth [--key model] [--prefix backbone.]

The output is the zip layout `torch.save` produces (archive/data.pkl, archive/data/<n>,
archive/version) with the pickle opcodes a real state dict uses: an OrderedDict of tensors rebuilt
by torch._utils._rebuild_tensor_v2 from persistent storages. Tensors whose names start with `__`
(fixture extras) are left out. Used to test densepred's `.pth` reader on real fixture weights.
"""
import collections
import io
import json
import pickle
import struct
import sys
import types
import zipfile

torch = types.ModuleType("torch")
torch_utils = types.ModuleType("torch._utils")


def _rebuild_tensor_v2(*args):  # pragma: no cover - only its name is pickled
    raise RuntimeError("stub")


_rebuild_tensor_v2.__module__ = "torch._utils"
torch_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
STORAGES = {"F32": "FloatStorage", "I64": "LongStorage", "F64": "DoubleStorage"}
for name in STORAGES.values():
    cls = type(name, (), {"__module__": "torch"})
    setattr(torch, name, cls)
torch._utils = torch_utils
sys.modules["torch"] = torch
sys.modules["torch._utils"] = torch_utils


class Storage:
    def __init__(self, key, dtype, numel):
        self.key, self.dtype, self.numel = key, dtype, numel


class Tensor:
    def __init__(self, storage, shape):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.insert(0, acc)
            acc *= d
        return (_rebuild_tensor_v2, (self.storage, 0, tuple(self.shape), tuple(stride), False, collections.OrderedDict()))


class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", getattr(torch, STORAGES[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


def main():
    args = sys.argv[1:]
    src, dst = args[0], args[1]
    key = args[args.index("--key") + 1] if "--key" in args else None
    prefix = args[args.index("--prefix") + 1] if "--prefix" in args else ""
    raw = open(src, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    state = collections.OrderedDict()
    blobs = []
    for name, info in sorted(header.items()):
        if name == "__metadata__" or name.startswith("__"):
            continue
        a, b = info["data_offsets"]
        numel = 1
        for d in info["shape"]:
            numel *= d
        storage = Storage(str(len(blobs)), info["dtype"], numel)
        blobs.append(body[a:b])
        state[prefix + name] = Tensor(storage, info["shape"])
    obj = {key: state, "epoch": 300} if key else state
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        for i, blob in enumerate(blobs):
            z.writestr(f"archive/data/{i}", blob)
        z.writestr("archive/version", "3\n")


if __name__ == "__main__":
    main()
