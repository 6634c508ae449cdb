"""The HUST-19 CNNs: shape, cost, ONNX export agreement, pickle-free resumable training."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engines import networks
from engines.backends import OnnxRuntimeBackend
from engines.training import common


def test_paper_shape_and_cost() -> None:
    net = networks.slice_cnn()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    dense = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    pools = [m for m in net.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert [c.out_channels for c in convs] == [64, 64, 32, 32, 16, 16]
    assert [d.out_features for d in dense] == [64, 32, 3]
    assert len(pools) == 3
    assert net(torch.zeros(2, 1, 200, 200)).shape == (2, 3)
    assert networks.patient_cnn()(torch.zeros(1, 10, 200, 200)).shape == (1, 3)
    # the issue quotes about 3.6 GFLOP per slice
    assert 3.5e9 < networks.flops_per_sample(1) < 3.7e9


def test_onnx_export_matches_torch_with_dynamic_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = networks.patient_cnn()
    path = tmp_path / "p.onnx"
    networks.export_onnx(net, path)
    backend = OnnxRuntimeBackend(path)
    assert backend.inputs[0].shape == (-1, 10, 200, 200)
    for n in (1, 3):
        x = np.random.default_rng(n).random((n, 10, 200, 200), dtype=np.float32)
        got = backend.run1(x)
        want = networks.WithSoftmax(net).eval()(torch.from_numpy(x)).detach().numpy()
        assert got.shape == (n, 3)
        np.testing.assert_allclose(got, want, atol=1e-5)
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


def _data(n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return (rng.integers(0, 256, (n, 1, 200, 200), dtype=np.uint8),
            np.arange(n, dtype=np.int64) % 3)


def _run(out: Path | None, epochs: int, resume: bool) -> tuple[torch.nn.Module, common.TrainState]:
    common.seed_everything(7)
    net = networks.slice_cnn()
    opt = torch.optim.Adam(net.parameters(), lr=networks.SLICE_LR)
    state = (common.load_checkpoint(out, net, opt) if out and resume else None) \
        or common.TrainState()
    x, y = _data()
    state = common.train_epochs(net, opt, x, y, epochs=epochs, batch_size=3, seed=7, out=out,
                                state=state, progress=False)
    return net, state


@pytest.mark.slow
def test_resume_gives_the_same_weights_and_checkpoint_has_no_pickle(tmp_path: Path) -> None:
    straight, s_state = _run(None, 2, False)
    ck = tmp_path / "ck"
    _run(ck, 1, False)
    # the checkpoint is plain arrays + JSON: no pickled object anywhere
    with zipfile.ZipFile(ck / common.CHECKPOINT_NPZ) as z:
        assert all(name.endswith(".npy") for name in z.namelist())
    with np.load(ck / common.CHECKPOINT_NPZ, allow_pickle=False) as d:
        assert any(k.startswith("opt/") for k in d.files)
    assert json.loads((ck / common.CHECKPOINT_JSON).read_text())["epoch"] == 1
    resumed, r_state = _run(ck, 2, True)
    assert r_state.epoch == 2
    assert r_state.losses == pytest.approx(s_state.losses, rel=1e-5)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(),
                         strict=True):
        torch.testing.assert_close(a, b, msg=k, rtol=1e-5, atol=1e-6)


def test_augment_keeps_channels_aligned() -> None:
    x = torch.rand(4, 10, 200, 200)
    x[:, :] = x[:, :1]  # identical channels
    y = common.augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    assert float((y - y[:, :1]).abs().max()) == 0.0
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


@pytest.mark.slow
def test_train_slice_cli_tiny_run_exports_and_resumes(tmp_path: Path, shared_data: Path) -> None:
    """`hust19 train slice` on 2 slices per source/label for 1 epoch: ONNX + metadata out;
    a resumed run to epoch 2 continues from the checkpoint instead of starting over."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "agent.cli", "train", "slice", "--data", str(shared_data),
           "--out", str(tmp_path), "--limit", "2", "--batch-size", "4", "--no-progress"]
    first = subprocess.run([*cmd, "--epochs", "1"], capture_output=True, text=True,
                           timeout=300, check=False)
    assert first.returncode == 0, first.stderr
    meta = json.loads((tmp_path / "slice.json").read_text())
    assert meta["classes"] == ["NiCT", "pCT", "nCT"]
    assert meta["training"]["public"] == "none"
    assert meta["training"]["sources"] == "series P002,normal001"
    assert meta["export_check_max_abs_diff"] < 1e-4
    inputs = meta["preprocessing"]["training_inputs"]
    assert inputs["n"] == meta["training"]["n"] == len(inputs["area_fraction"])
    assert meta["training"]["platform"]["libraries"]["torch"] == torch.__version__
    assert OnnxRuntimeBackend(tmp_path / "slice.onnx").inputs[0].shape == (-1, 1, 200, 200)
    second = subprocess.run([*cmd, "--epochs", "2", "--resume"], capture_output=True,
                            text=True, timeout=300, check=False)
    assert second.returncode == 0, second.stderr
    assert "resuming" in second.stderr
    state = json.loads((tmp_path / common.CHECKPOINT_JSON).read_text())
    assert state["epoch"] == 2 and len(state["losses"]) == 2


def test_training_sources_public_slices_only_on_request(shared_data: Path) -> None:
    """The UCSD train split joins the series only with ``public="train"``; no data at all, or
    an unknown choice, is an InputError naming the flag."""
    from engines.training import slice as train_slice
    from schemas.errors import InputError

    series_only = train_slice.training_sources(shared_data, ("P002",))
    assert {s.group for s in series_only} == {"series:P002"}
    with_public = train_slice.training_sources(shared_data, ("P002",), public="train")
    public = [s for s in with_public if s.kind == "png"]
    assert len(public) == 425 and len(with_public) == len(series_only) + 425
    with pytest.raises(InputError, match="--series"):
        train_slice.training_sources(shared_data, ())
    with pytest.raises(InputError, match="public"):
        train_slice.training_sources(shared_data, ("P002",), public="val")


def test_onnxruntime_errors_name_the_model_file() -> None:
    """A wrong input is an EngineError naming the model, also when the path came as a str."""
    from engines import MODELS_DIR
    from schemas.errors import EngineError

    backend = OnnxRuntimeBackend(str(MODELS_DIR / "slice.onnx"))  # type: ignore[arg-type]
    with pytest.raises(EngineError, match=r"slice\.onnx"):
        backend.run({"image": np.zeros((1, 1, 8, 8), np.float32)})


def _slice_set(crops: np.ndarray, area: np.ndarray) -> Any:
    from engines.training.slice import SliceSet

    n = len(crops)
    return SliceSet(np.array([f"s{i}" for i in range(n)]), np.array(["g"] * n), crops,
                    np.zeros(n, np.int64), np.ones(n, bool), area.astype(np.float32))


def test_input_fingerprint_tells_a_changed_preprocessing_from_rounding() -> None:
    """Same crops: no problem. One pixel off by one grey level (a library's rounding): the
    SHA-256 differs but the per-slice numbers stay within tolerance, no problem. A slice 10
    grey levels brighter, or a lung area 0.01 larger: named, with the slice."""
    from engines.training.slice import fingerprint_problems, input_fingerprint

    rng = np.random.default_rng(0)
    crops = rng.integers(0, 200, size=(3, 200, 200), dtype=np.uint8)
    area = np.array([0.1, 0.2, 0.0])
    recorded = json.loads(json.dumps(input_fingerprint(_slice_set(crops, area))))
    assert fingerprint_problems(recorded, _slice_set(crops.copy(), area)) == []
    rounding = crops.copy()
    rounding[0, 0, 0] += 1
    assert input_fingerprint(_slice_set(rounding, area))["crops_sha256"] != \
        recorded["crops_sha256"]
    assert fingerprint_problems(recorded, _slice_set(rounding, area)) == []
    brighter = crops.copy()
    brighter[1] += 10
    problems = fingerprint_problems(recorded, _slice_set(brighter, area))
    assert len(problems) == 1 and "crop_mean" in problems[0] and "s1" in problems[0]
    bigger = area.copy()
    bigger[2] += 0.01
    problems = fingerprint_problems(recorded, _slice_set(rounding, bigger))
    assert len(problems) == 1 and "area_fraction" in problems[0] and "s2" in problems[0]
    assert fingerprint_problems(recorded, _slice_set(crops[:2], area[:2])) == \
        ["2 slices now, 3 when recorded"]
