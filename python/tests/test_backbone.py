"""``densepred.Backbone`` against the official SMT outputs stored in
../shared/fixtures/backbones/smt_small.safetensors (official AFeng-x/SMT code, see its .json)."""

import numpy as np
import pytest
from safetensors.numpy import load_file

import densepred
from conftest import FIXTURES, ROOT

FIXTURE = FIXTURES / "backbones" / "smt_small.safetensors"
CONFIG = ROOT / "tests" / "data" / "smt_small.toml"


def test_backbone_matches_official_smt():
    want = load_file(str(FIXTURE))
    bb = densepred.Backbone(CONFIG, weights=FIXTURE)
    outs = bb.forward(want["__input__"].astype(np.float32))
    assert len(outs) == 4
    assert [s for _, s in bb.out_shapes] == [4, 8, 16, 32]
    for i, got in enumerate(outs):
        ref = want[f"__stage{i + 1}__"]
        assert got.dtype == np.float32
        assert got.shape == ref.shape
        # The backbone issue's gate: 2.5e-5 in f32 (a wrong LayerNorm eps alone moves the
        # outputs by 4e-5).
        err = float(np.abs(got - ref).max())
        assert err <= 2.5e-5, (i, err)


def test_backbone_without_weights_is_deterministic():
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    a = densepred.Backbone(CONFIG).forward(x)
    b = densepred.Backbone(CONFIG).forward(x)
    assert [o.shape for o in a] == [(1, 16, 16, 16), (1, 32, 8, 8), (1, 64, 4, 4), (1, 128, 2, 2)]
    assert len(a) == len(b)
    for p, q in zip(a, b):
        np.testing.assert_array_equal(p, q)


def test_backbone_bad_input(tmp_path):
    bb = densepred.Backbone(CONFIG)
    with pytest.raises(ValueError, match="float32"):
        bb.forward(np.zeros((1, 3, 32, 32), dtype=np.float64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        bb.forward(np.zeros((1, 4, 32, 32), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        bb.forward(np.zeros((3, 32, 32), dtype=np.float32))
    with pytest.raises(TypeError):
        bb.forward([[1.0]])
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        densepred.Backbone(tmp_path / "missing.toml")
    with pytest.raises(FileNotFoundError, match="w.safetensors"):
        densepred.Backbone(CONFIG, weights=tmp_path / "w.safetensors")
    bad = tmp_path / "bad.toml"
    bad.write_text('[backbone]\ntype = "SMT"\nembed_dimz = [1, 2, 3, 4]\n')
    with pytest.raises(ValueError, match="embed_dimz"):
        densepred.Backbone(bad)
