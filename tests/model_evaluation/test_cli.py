"""``pneumo train`` / ``pneumo evaluate`` wiring (the model itself is exercised in test_shipped)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from pneumo.cli import build_parser
from pneumo.commands.model import TRAIN_OPTIONS, train_config_kwargs
from tests.paths import REPO


def test_train_options_match_train_config() -> None:
    train = pytest.importorskip("model.train")
    hints = typing.get_type_hints(train.TrainConfig)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(train.TrainConfig) if f.init}
    assert set(TRAIN_OPTIONS) == set(fields)
    for name, (kind, _) in TRAIN_OPTIONS.items():
        assert fields[name] is kind, name


def test_train_passes_only_given_options() -> None:
    args = build_parser().parse_args(
        [
            "train",
            "--epochs",
            "3",
            "--lr",
            "0.01",
            "--no-resume",
            "--blocks",
            "1,1,1,1",
            "--out-dir",
            "w",
        ]
    )
    assert train_config_kwargs(args) == {
        "epochs": 3,
        "lr": 0.01,
        "resume": False,
        "blocks": "1,1,1,1",
        "out_dir": Path("w"),
    }
    train = pytest.importorskip("model.train")
    config = train.TrainConfig(**train_config_kwargs(args))
    assert config.epochs == 3 and config.resume is False
    assert config.patience == train.TrainConfig().patience  # untouched default


def test_train_rejects_bad_values() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--epochs", "many"])


def _pneumo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pneumo.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_evaluate_bad_data_path_is_a_clear_error(tmp_path: Path) -> None:
    proc = _pneumo("evaluate", "--data", str(tmp_path / "nowhere"))
    assert proc.returncode == 2
    assert "neither a folder" in proc.stderr
    assert "Traceback" not in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = _pneumo("evaluate", "--data", str(tmp_path / "empty"))
    assert proc.returncode == 2 and "NORMAL" in proc.stderr


def test_evaluate_missing_model_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "NORMAL").mkdir()
    (tmp_path / "NORMAL" / "x.png").write_bytes(b"x")
    proc = _pneumo("evaluate", "--data", str(tmp_path), "--model", str(tmp_path / "no.pt"))
    assert proc.returncode == 2
    assert "model file not found" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_train_then_evaluate_a_tiny_model(tmp_path: Path, small_tree: Path, kermany: Path) -> None:
    """`pneumo train` forwards its options to model.train and the result is evaluable."""
    pytest.importorskip("model.train")
    out, work = tmp_path / "weights", tmp_path / "work"
    proc = _pneumo(
        "train",
        "--recipe",
        "quick",
        "--data",
        str(kermany),
        "--max-minutes",
        "0",
        "--limit",
        "12",
        "--epochs",
        "1",
        "--width",
        "8",
        "--blocks",
        "1,1,1,1",
        "--out-dir",
        str(out),
        "--work-dir",
        str(work),
        "--name",
        "tiny",
        "--version",
        "0.0.1",
        "--threads",
        "1",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    weights = out / "tiny-0.0.1.pt"
    assert proc.stdout.strip().endswith(str(weights)) and weights.is_file()
    assert (work / "last.pt").is_file()  # the checkpoint a rerun resumes from

    proc = _pneumo(
        "evaluate",
        "--data",
        str(small_tree),
        "--model",
        str(weights),
        "--format",
        "json",
        "--bootstrap",
        "20",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads(proc.stdout)
    assert payload["model_version"] == "0.0.1" and payload["n_total"] == 15
