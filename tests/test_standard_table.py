"""benchmarks/standard_table.py on a copy of committed standard runs: seeds grouped by folder name, mean and
sample std per row, effects paired by seed."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STANDARD = REPO / "docs" / "standard"


def _table(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "standard_table.py"), str(folder), *args],
                          check=False, capture_output=True, text=True, cwd=REPO)


def _seed_copy(src: str, dest: Path, seed: int, best_test: float) -> None:
    """docs/standard/SRC as seed `seed` with its val-selected test accuracy set to `best_test`."""
    shutil.copytree(STANDARD / src, dest)
    config = yaml.safe_load((dest / "config.yaml").read_text())
    config["trainer"]["seed"] = seed
    (dest / "config.yaml").write_text(yaml.safe_dump(config))
    metrics = json.loads((dest / "metrics.json").read_text())
    metrics["stage1"]["best"]["test_acc"] = best_test
    (dest / "metrics.json").write_text(json.dumps(metrics))


def test_rows_are_means_over_seeds_and_effects_are_paired(tmp_path):
    for row in ("wb_wd5e-3", "wb_wd0"):
        shutil.copytree(STANDARD / row, tmp_path / row)
    _seed_copy("wb_wd5e-3", tmp_path / "wb_wd5e-3_seed1", 1, 66.01)
    _seed_copy("wb_wd0", tmp_path / "wb_wd0_seed1", 1, 61.29)
    _seed_copy("wb_wd0", tmp_path / "wb_wd0_seed2", 2, 60.00)  # no WD 5e-3 partner: counted in its row only

    done = _table(tmp_path, "--csv")
    assert done.returncode == 0, done.stderr
    rows = pd.read_csv(io.StringIO(done.stdout)).set_index("row")
    assert list(rows.columns) == ["n_seeds", "mean", "std", "published"]
    wd = rows.loc["wb_wd5e-3 (val-selected)"]  # seed 0: 68.01, seed 1: 66.01
    assert wd["n_seeds"] == 2 and wd["mean"] == pytest.approx(67.01) and wd["std"] == pytest.approx(1.41, abs=0.01)
    assert wd["published"] == pytest.approx(46.08)
    naive = rows.loc["wb_wd0 (val-selected)"]  # 62.29, 61.29, 60.00
    assert naive["n_seeds"] == 3 and naive["mean"] == pytest.approx(61.19, abs=0.01)
    assert rows.loc["wb_wd0 (final)", "n_seeds"] == 3 and pd.isna(rows.loc["wb_wd0 (final)", "published"])

    text = _table(tmp_path).stdout
    effect = next(line for line in text.splitlines() if line.startswith("| weight decay 5e-3 over 0 (stage 1, val"))
    # seeds 0 and 1: +5.72 and +4.72 -> mean +5.22, std 0.71, t(1) interval 5.22 +- 12.706 * 0.5
    assert "| 0 1 | +5.72, +4.72 | +5.22 ± 0.71 | -1.13 to +11.57 | no |" in effect


def test_a_folder_named_for_another_seed_than_it_was_trained_with_is_refused(tmp_path):
    shutil.copytree(STANDARD / "wb_wd0", tmp_path / "wb_wd0_seed1")  # trained with seed 0
    done = _table(tmp_path)
    assert done.returncode != 0
    assert "wb_wd0_seed1: trained with trainer.seed=0, but its name says seed 1" in done.stderr


def test_every_effect_pairs_rows_the_committed_runs_measure():
    """A mistyped row or rule in EFFECTS would pair nothing: its line would have no seeds."""
    done = _table(STANDARD)
    assert done.returncode == 0, done.stderr
    header, _, *lines = done.stdout.split("\n\n")[1].splitlines()
    assert header.startswith("| effect")
    assert len(lines) >= 9
    for line in lines:
        seeds = line.split("|")[2].split()
        assert "0" in seeds, line
