"""Analysis frames, figures, notebooks and the report command.

Unit tests build a small experiment folder by hand (CSV files, a SQLite Optuna study, checkpoints holding
class counts); no Ray, no data. The end-to-end tests run one small real search on synthetic CIFAR-10, then
execute every notebook headless and the report command on it, and look inside what they produced."""
from __future__ import annotations

import html
import json
import math
import os
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import plotly.io as pio
import pytest
import torch
import yaml

from ltsearch import analysis
from ltsearch.__main__ import main

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "analysis").glob("*.ipynb"))
OLD_HOME = "/old/place/exp"  # where the hand-made experiment was "written"; it now lives in tmp_path
COUNTS = [50, 30, 18, 10, 6]
GROUP_VALUES = ("many", "medium", "head", "middle", "tail")

# trial id, stage-1 WD, NBN, tau, epochs, status, stop reason, val acc, test acc,
# test acc of (many, medium, head, middle, tail)
ASHA = "stopped early by ASHA at epoch"
TRIALS = [
    ("1234e567", 1e-2, True, 1.0, 5, "TERMINATED", "completed", 40.0, 38.0, (60, 20, 65, 30, 10)),
    ("aaaa0001", 1e-4, False, 0.5, 5, "TERMINATED", "completed", 30.0, 29.0, (55, 5, 60, 20, 2)),
    ("aaaa0002", 5e-5, False, 1.5, 1, "TERMINATED", f"{ASHA} 1", 20.0, 19.0, (40, 0, 40, 5, 0)),
    ("aaaa0003", 3e-3, True, 0.2, 3, "TERMINATED", f"{ASHA} 3", 35.0, 34.0, (50, 25, 50, 30, 15)),
    ("aaaa0004", 2e-2, True, 1.8, 0, "ERROR", "RuntimeError: boom", None, None, (None,) * 5),
]


def _state(stages: dict[int, list[float]]) -> dict:
    """A trainer checkpoint with per-class test accuracies per stage (None: a class without test images)."""
    norms = [1.0 + c / 10 for c in range(5)]
    best = {stage: {"metrics": {"stage": stage, "epoch": 3 * stage, "test_per_class_acc": acc,
                                "val_per_class_acc": acc, "classifier_norms": norms}, "model": {}}
            for stage, acc in stages.items()}
    return {"best": best, "config": {}, "class_counts": COUNTS, "class_names": [f"c{c}" for c in range(5)]}


def _write_experiment(exp: Path) -> Path:
    exp.mkdir()
    space = {"stage1.weight_decay": {"loguniform": [1e-5, 1e-1], "uniform": None, "choice": None},
             "model.nbn": {"choice": [False, True]},
             "posthoc.tau": {"uniform": [0.0, 2.0]}}
    (exp / "space.yaml").write_text(yaml.safe_dump({
        "base": {"stage1": {"epochs": 3}, "stage2": {"epochs": 2}}, "space": space,
        "search": {"metric": "val_acc", "direction": "max"}}, sort_keys=False))
    rows, history = [], []
    for i, (trial_id, wd, nbn, tau, epochs, status, stop, val, test, groups) in enumerate(TRIALS):
        checkpoint = f"{OLD_HOME}/search/{trial_id}/checkpoint_000004" if epochs else None
        row = {"trial_id": trial_id, "stage1.weight_decay": wd, "model.nbn": nbn, "posthoc.tau": tau,
               "final_val_acc": val, "final_test_acc": test, "final_test_acc_few": None,
               "final_tau_test_acc": None if test is None else test + tau,
               **{f"final_test_acc_{g}": v for g, v in zip(GROUP_VALUES, groups, strict=True)},
               "checkpoint": checkpoint, "epochs": epochs, "objective": val, "status": status,
               "stop_reason": stop}
        rows.append(row)
        for epoch in range(1, epochs + 1):
            history.append({"trial_id": trial_id, "epoch": epoch, "val_acc": val - 2 * (epochs - epoch),
                            "timestamp": 1000 + 7 * i + 10 * epoch, "time_total_s": 10.0 * epoch})
    pd.DataFrame(rows).to_csv(exp / "results.csv", index=False)
    pd.DataFrame(history).to_csv(exp / "history.csv", index=False)
    (exp / "summary.json").write_text(json.dumps({"experiment": OLD_HOME, "best": {"trial_id": "1234e567"},
                                                  "wall_time_s": 90.0}))
    (exp / "best_config.yaml").write_text(yaml.safe_dump({"stage1": {"weight_decay": 1e-2}}))
    per_class = {"1234e567": {1: [90.0, 70.0, 40.0, 10.0, None], 2: [80.0, 70.0, 50.0, 30.0, None]},
                 "aaaa0001": {1: [95.0, 60.0, 20.0, 0.0, None], 2: [90.0, 60.0, 30.0, 5.0, None]}}
    for trial_id, stages in per_class.items():
        folder = exp / "search" / trial_id / "checkpoint_000004"
        folder.mkdir(parents=True)
        torch.save(_state(stages), folder / "state.pt")
    return exp


def _write_study(exp: Path, values: list[float]) -> None:
    import optuna

    distributions = {"stage1.weight_decay": optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True),
                     "posthoc.tau": optuna.distributions.FloatDistribution(0.0, 2.0)}
    study = optuna.create_study(storage=f"sqlite:///{exp / 'optuna.db'}", study_name="search",
                                direction="maximize")
    rng = np.random.default_rng(0)
    for value in values:
        study.add_trial(optuna.trial.create_trial(
            params={"stage1.weight_decay": float(10 ** rng.uniform(-5, -1)),
                    "posthoc.tau": float(rng.uniform(0, 2))},
            distributions=distributions, value=value))


@pytest.fixture
def handmade(tmp_path) -> Path:
    return _write_experiment(tmp_path / "exp")


def test_load_experiment_reads_space_ids_and_outcomes(handmade):
    exp = analysis.load_experiment(handmade)
    assert exp.space["stage1.weight_decay"] == {"kind": "loguniform", "args": [1e-5, 1e-1]}
    assert exp.space["model.nbn"]["kind"] == "choice" and exp.stage1_epochs == 3
    assert exp.best_trial == "1234e567" and exp.results["trial_id"].iloc[0] == "1234e567"  # not 1.234e+570
    assert exp.results.set_index("trial_id")["outcome"].to_dict() == {
        "1234e567": "best by validation", "aaaa0001": "completed", "aaaa0002": "stopped early (ASHA)",
        "aaaa0003": "stopped early (ASHA)", "aaaa0004": "error"}


def test_accuracy_frame_is_tidy_and_skips_absent_groups(handmade):
    frame = analysis.accuracy_frame(analysis.load_experiment(handmade))
    assert set(frame["group"]) == {"overall", *GROUP_VALUES}  # few-shot is absent, the error trial too
    assert len(frame) == 4 * 6 and frame["accuracy"].notna().all()
    best = frame[frame["trial_id"] == "1234e567"].set_index("group")["accuracy"]
    assert best["overall"] == 38.0 and best["tail"] == 10.0
    assert {"stage1.weight_decay", "model.nbn", "posthoc.tau", "outcome"} <= set(frame.columns)


def test_stopped_trial_without_last_epoch_test_figures_shows_its_best_epochs(handmade):
    """Lazy test evaluation (`trainer.test_every: best`): aaaa0003, stopped by ASHA at an epoch that did not
    improve validation, has no final test figures, only those of its best-by-validation epoch. Frames and
    figures show those and say so; a diverged trial (no final validation either) stays out; nothing is 0."""
    results = pd.read_csv(handmade / "results.csv", dtype={"trial_id": str})
    finals = [c for c in results if c.startswith(("final_test_acc", "final_tau_test_acc"))]
    for column in finals:
        results["best_" + column.removeprefix("final_")] = results[column] - 1.0
    results.loc[results["trial_id"] == "aaaa0003", finals] = np.nan
    results.loc[results["trial_id"] == "aaaa0002", [*finals, "final_val_acc", "objective"]] = np.nan  # diverged
    results.to_csv(handmade / "results.csv", index=False)
    exp = analysis.load_experiment(handmade)

    frame = analysis.accuracy_frame(exp)
    stopped = frame[frame["trial_id"] == "aaaa0003"].set_index("group")
    assert stopped.at["overall", "accuracy"] == 33.0 and stopped.at["tail", "accuracy"] == 14.0
    assert set(stopped["accuracy_at"]) == {"best-by-validation epoch"}
    assert set(frame[frame["trial_id"] == "1234e567"]["accuracy_at"]) == {"last epoch"}
    assert "aaaa0002" not in set(frame["trial_id"]) and frame["accuracy"].notna().all()
    assert "few" not in set(frame["group"])  # absent from the dataset: absent at both epochs

    top = analysis.top_trials(exp).set_index("trial_id")
    assert top.at["aaaa0003", "final_test_acc"] == 33.0
    assert top.at["aaaa0003", "accuracy_at"] == "best-by-validation epoch" and pd.isna(top.at["aaaa0002", "final_test_acc"])
    pareto = analysis.pareto_frame(exp).set_index("trial_id")
    assert pareto.at["aaaa0003", "tail_accuracy"] == 14.0 and "aaaa0002" not in pareto.index

    fig = analysis.accuracy_figure(exp, "stage1.weight_decay")
    drawn = [(y, c[1]) for t in fig.data for y, c in zip(t.y, t.customdata) if c[0] == "aaaa0003"]
    assert (33.0, "best-by-validation epoch") in drawn and all(y != 0 for y, _ in drawn)
    assert not any(c[0] == "aaaa0002" for t in fig.data for c in t.customdata)
    parallel = analysis.parallel_coordinates_figure(exp).data[0]
    test_axis = next(d for d in parallel.dimensions if d.label == "test accuracy (%)")
    assert 33.0 in list(test_axis.values) and not np.isnan(np.asarray(test_axis.values, dtype=float)).any()


def test_accuracy_figure_log_axis_panels_and_nbn_colour(handmade):
    exp = analysis.load_experiment(handmade)
    figures = analysis.accuracy_figures(exp)
    assert list(figures) == ["accuracy_vs_stage1_weight_decay", "accuracy_vs_model_nbn",
                             "accuracy_vs_posthoc_tau"]
    fig = figures["accuracy_vs_stage1_weight_decay"]
    assert fig.layout.title.text.startswith("Test accuracy vs stage-1 weight decay")
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis.range == pytest.approx((-5.16, -0.84))
    assert "1e-4" in fig.layout.xaxis.ticktext
    panels = [a.text for a in fig.layout.annotations]
    assert "few-shot (<20)" not in panels
    assert {"all classes", "many-shot (>100 train images)", "tail third"} <= set(panels)
    assert any("stage-1 weight decay (log axis)" in text for text in panels)  # the shared x title
    names = {t.name for t in fig.data}
    assert {"NBN on, best by validation", "NBN off, completed", "NBN on, stopped early (ASHA)"} <= names
    assert fig.layout.yaxis.title.text == "test accuracy (%)" and fig.layout.font.size >= 12
    tau = figures["accuracy_vs_posthoc_tau"]
    assert tau.layout.xaxis.type != "log" and tau.layout.xaxis.range == pytest.approx((-0.08, 2.08))
    # against tau: the tau-normalised classifier's accuracy (the plain one does not depend on tau)
    assert tau.layout.title.text.startswith("Test accuracy (tau-normalised classifier) vs tau")
    assert tau.layout.yaxis.title.text == "test accuracy, tau-normalised (%)"
    points = {(x, y) for t in tau.data for x, y in zip(t.x, t.y)}
    assert points == {(t[3], t[8] + t[3]) for t in TRIALS if t[8] is not None}
    nbn = figures["accuracy_vs_model_nbn"]  # categorical axis, no NBN colour on the NBN figure itself
    assert {x for t in nbn.data for x in t.x} == {"True", "False"}
    assert {t.name for t in nbn.data} <= set(analysis.OUTCOME_SYMBOLS)


def test_per_class_frame_baseline_stages_and_moved_folder(handmade):
    exp = analysis.load_experiment(handmade)
    # aaaa0002 has the smallest WD but stopped before the end of stage 1: not a fair baseline
    assert analysis.naive_baseline_trial(exp) == "aaaa0001"
    frame = analysis.per_class_frame(exp)  # checkpoints found although results.csv names OLD_HOME
    assert list(dict.fromkeys(frame["model"])) == ["naive baseline (smallest stage-1 WD, 1.0e-04): stage 1",
                                                   "best trial: stage 1", "best trial: after stage 2"]
    after = frame[frame["model"] == "best trial: after stage 2"]
    assert after["class_size"].tolist() == COUNTS and after["stage"].eq(2).all()
    assert after["accuracy"].tolist()[:4] == [80.0, 70.0, 50.0, 30.0]
    assert math.isnan(after["accuracy"].iloc[4])  # a class without test images: missing, not 0
    figures = analysis.per_class_figures(exp)
    accuracy, norms = figures["per_class_accuracy"], figures["classifier_norms"]
    assert accuracy.layout.xaxis.type == "log"
    assert accuracy.layout.xaxis.title.text.startswith("training images")
    assert accuracy.layout.yaxis.title.text == "per-class test accuracy (%)"
    assert [t.name for t in norms.data] == list(dict.fromkeys(frame["model"]))
    assert list(norms.data[0].x) == sorted(COUNTS)


def test_progress_and_survival_frames(handmade):
    exp = analysis.load_experiment(handmade)
    progress = analysis.progress_frame(exp)
    assert len(progress) == 5 + 5 + 1 + 3 and progress["cumulative_epochs"].tolist() == list(range(1, 15))
    assert progress["wall_time_s"].is_monotonic_increasing and progress["wall_time_s"].iloc[0] == 10
    assert progress["best_so_far"].is_monotonic_increasing and progress["best_so_far"].iloc[-1] == 40.0
    fig = analysis.progress_figure(exp)
    assert fig.layout.xaxis2.title.text == "wall-clock time since the search started (s)"
    assert fig.layout.yaxis.title.text == "validation accuracy (%)"
    survival = analysis.survival_frame(exp)
    assert survival["trials"].tolist() == [4, 3, 3, 2, 2]
    assert analysis.survival_figure(exp).data[0].y.tolist() == [4, 3, 3, 2, 2]


def test_pareto_front_uses_head_and_tail_when_few_is_absent(handmade):
    exp = analysis.load_experiment(handmade)
    frame = analysis.pareto_frame(exp)
    assert set(frame["head_group"]) == {"head"} and set(frame["tail_group"]) == {"tail"}
    assert set(frame.loc[frame["on_front"], "trial_id"]) == {"1234e567", "aaaa0003"}
    fig = analysis.pareto_figure(exp)
    assert fig.layout.xaxis.title.text == "test head third accuracy (%)"
    assert "Pareto front" in {t.name for t in fig.data}


def test_top_trials_and_parallel_coordinates(handmade):
    exp = analysis.load_experiment(handmade)
    table = analysis.top_trials(exp, n=3)
    assert table["trial_id"].tolist() == ["1234e567", "aaaa0003", "aaaa0001"]
    assert "final_test_acc_tail" in table  # no few-shot group: the tail third is the tail column
    fig = analysis.parallel_coordinates_figure(exp)
    labels = [d.label for d in fig.data[0].dimensions]
    assert labels == ["stage-1 weight decay (log)", "normalized BN", "tau", "validation accuracy (%)",
                      "test accuracy (%)"]
    assert fig.data[0].dimensions[0].range == pytest.approx((-5, -1))


def _write_methods_search(exp: Path) -> Path:
    """A staged search over methods_c10lt.yaml's space, written by hand. Stage 1 sampled ce, balanced_softmax and
    ldam (never logit_adjusted), LDAM once without DRW (drw_epoch None) and once with it (9, read back as 9.0);
    stage 2 built on the balanced_softmax and LDAM-DRW parents and sampled MaxNorm off (None) and 0.0 under
    retrain; under lws MaxNorm is not sampled."""
    exp.mkdir()
    (exp / "space.yaml").write_text((REPO / "search_spaces/methods_c10lt.yaml").read_text())
    stage1 = [("s1a", "ce", None), ("s1b", "balanced_softmax", None), ("s1c", "ldam", None), ("s1d", "ldam", 9),
              ("s1e", "balanced_softmax", None)]
    rows = [{"phase": "stage1", "trial_id": t, "stage1.loss": loss, "stage1.drw_epoch": drw,
             "model.classifier": "cosine" if loss == "ldam" else None, "stage1.weight_decay": 1e-3,
             "stage1.logit_adjust_tau": None, "stage1.ldam_max_margin": 0.5 if loss == "ldam" else None,
             "final_val_acc": 40.0 + i, "final_test_acc": 39.0 + i, "epochs": 12, "objective": 40.0 + i,
             "status": "TERMINATED", "stop_reason": "completed", "checkpoint": f"/x/{t}"}
            for i, (t, loss, drw) in enumerate(stage1)]
    parents = {"s1b": rows[1], "s1d": rows[3]}
    stage1_keys = [k for k in rows[0] if k.startswith(("stage1.", "model."))]  # the stage-1 keys
    stage2 = [("s1b", "retrain", None), ("s1d", "retrain", 0.0), ("s1d", "lws", None), ("s1b", "retrain", 0.0)]
    for j, (parent, mode, thresh) in enumerate(stage2):
        rows.append({"phase": "stage2", "trial_id": f"stage2_{j:05d}", "stage1_trial": parent,
                     **{k: v for k, v in parents[parent].items() if k in stage1_keys},
                     "stage2.mode": mode, "stage2.sampler": "instance", "stage2.loss": "ce",
                     "stage2.weight_decay": 1e-3, "stage2.lr": 0.05, "stage2.maxnorm_thresh": thresh,
                     "final_val_acc": 50.0 + j, "final_test_acc": 49.0 + j, "epochs": 10, "objective": 50.0 + j,
                     "status": "TERMINATED", "stop_reason": "completed"})
    pd.DataFrame(rows).to_csv(exp / "results.csv", index=False)
    pd.DataFrame([{"trial_id": "s1a", "epoch": 1, "val_acc": 40.0, "timestamp": 1.0, "time_total_s": 1.0}]).to_csv(
        exp / "history.csv", index=False)
    (exp / "summary.json").write_text(json.dumps({"best": {"trial_id": "stage2_00003"}}))
    return exp


def test_a_choice_axis_shows_exactly_the_sampled_values(tmp_path):
    """Bug: a searched choice's axis listed the space file's options, not what was sampled: the stage1.loss
    panel showed logit_adjusted, never sampled; the parallel coordinates spread the stage-2 trials' stage1.loss
    codes (balanced_softmax and ldam, 1 and 3) over all four labels, so logit_adjusted sat between them and ce
    fell outside; a sampled None (DRW or MaxNorm off) and 9 read back as 9.0 matched no option and were left out
    or drawn at the first label. Each axis now holds the values its rows sampled, in the space file's order."""
    exp = analysis.load_experiment(_write_methods_search(tmp_path / "methods"))
    expected = {"stage1.loss": ["ce", "balanced_softmax", "ldam"], "stage1.drw_epoch": ["None", "9"],
                "stage2.maxnorm_thresh": ["None", "0.0"], "stage2.mode": ["retrain", "lws"],
                "model.classifier": ["cosine"]}
    for key, categories in expected.items():
        fig = analysis.accuracy_figure(exp, key)
        assert list(fig.layout.xaxis.categoryarray) == categories, key
        assert {x for t in fig.data for x in t.x} == set(categories), key
    drw = analysis.accuracy_figure(exp, "stage1.drw_epoch")
    drawn = {(c[0], x) for t in drw.data for c, x in zip(t.customdata, t.x)}
    assert drawn == {("s1c", "None"), ("s1d", "9")}  # the LDAM trials; the others never sampled DRW

    dimensions = {d.label: d for d in analysis.parallel_coordinates_figure(exp).data[0].dimensions}
    # the stage-2 trials: their parents' losses and DRW; MaxNorm where retrain sampled it, lws did not
    axes = {"stage1.loss": ["balanced_softmax", "ldam"], "stage1.drw_epoch": ["9", "not sampled"],
            "MaxNorm threshold": ["None", "0.0", "not sampled"]}
    for label, categories in axes.items():
        dim = dimensions[label]
        assert list(dim.ticktext) == categories and list(dim.tickvals) == list(range(len(categories))), label
        values = np.asarray(dim.values, dtype=float)
        assert not np.isnan(values).any() and set(values) <= set(dim.tickvals), label
        assert dim.range[0] < 0 and dim.range[1] > len(categories) - 1, label  # every tick on the axis
    codes = dict(zip(exp.final_rows()["trial_id"], dimensions["MaxNorm threshold"].values))
    assert codes == {"stage2_00000": 0, "stage2_00001": 1, "stage2_00002": 2, "stage2_00003": 1}


def test_importances_need_enough_trials(handmade):
    exp = analysis.load_experiment(handmade)
    assert analysis.importance_frame(exp)["note"].str.contains("no optuna.db").all()
    _write_study(handmade, [30.0])
    frame = analysis.importance_frame(exp)
    assert frame["parameter"].isna().all() and frame["note"].iloc[0].startswith("search: 1 trial(s)")
    assert "Not evaluated" in analysis.importance_figure(exp).layout.annotations[0].text


def test_importances_of_a_study(tmp_path):
    exp = _write_experiment(tmp_path / "exp")
    _write_study(exp, [30.0, 35.0, 20.0, 40.0, 25.0, 33.0, 28.0, 38.0, 22.0, 31.0, 36.0])
    frame = analysis.importance_frame(analysis.load_experiment(exp))
    assert set(frame["parameter"]) == {"stage1.weight_decay", "posthoc.tau"} and frame["note"].isna().all()
    assert frame["importance"].sum() == pytest.approx(1.0)


def test_report_without_chromium_says_how_to_get_pngs(handmade, monkeypatch, capsys):
    def no_browser(*args, **kwargs):
        raise RuntimeError("\n\nKaleido requires Google Chrome to be installed.\n")

    monkeypatch.setattr(pio, "write_images", no_browser)
    assert main(["report", str(handmade)]) == 0
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if line.startswith("PNGs skipped")]
    assert len(skipped) == 1 and "apt-get install -y chromium" in skipped[0]
    page = (handmade / "report.html").read_text()
    assert page.count("* plotly.js v") == 1  # plotly.js embedded once
    assert "Top trials by the search objective" in page and "1234e567" in page
    assert "weight_decay: 0.01" in page  # the best config
    assert not list((handmade / "figures").glob("*.png"))


class _TableContainers(HTMLParser):
    """The inline styles of the elements around each `table.trials` of a page, innermost first."""

    def __init__(self):
        super().__init__()
        self.open: list[tuple[str, str]] = []
        self.found: list[list[str]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and "trials" in (attrs.get("class") or "").split():
            self.found.append([style for _, style in reversed(self.open)])
        self.open.append((tag, (attrs.get("style") or "").replace(" ", "")))

    def handle_endtag(self, tag):
        while self.open and self.open.pop()[0] != tag:
            pass


def test_report_top_trials_table_scrolls_sideways(handmade, capsys):
    """The table is wider than the page at 1400 px: it scrolls in its own box instead of being cut off."""
    assert main(["report", str(handmade), "--no-png"]) == 0
    parser = _TableContainers()
    parser.feed((handmade / "report.html").read_text())
    assert len(parser.found) == 1
    assert any("overflow-x:auto" in style for style in parser.found[0])


# validation noise and a confirmation phase, added to the hand-made experiment as the search writes them
VAL_IMAGES = {"overall": 50, "many": 20, "medium": 30, "few": 0, "head": 20, "middle": 10, "tail": 20}
INTERVALS = {"1234e567": (27.6, 53.8, True), "aaaa0001": (19.1, 43.6, True), "aaaa0002": (11.2, 33.0, False),
             "aaaa0003": (23.3, 48.7, True)}
# per confirmed configuration: seeds' validation accuracies; aaaa0003 (35 in the search) beats the search's
# pick 1234e567 (40 in the search) on the mean over two fresh seeds
CONFIRM = {"1234e567": [30.0, 32.0], "aaaa0003": [36.0, 38.0]}


def _add_confirmation(exp: Path) -> Path:
    results = pd.read_csv(exp / "results.csv", dtype={"trial_id": str})
    for column, i in (("objective_lo", 0), ("objective_hi", 1), ("tied_with_best", 2)):
        results[column] = results["trial_id"].map(lambda t, i=i: INTERVALS.get(t, (None,) * 3)[i])
    results.insert(0, "phase", "search")
    confirm, runs = [], []
    for rank, (trial_id, values) in enumerate(sorted(CONFIRM.items(), key=lambda kv: -sum(kv[1])), start=1):
        source = results.set_index("trial_id").loc[trial_id]
        confirm.append({"phase": "confirm", "trial_id": f"confirm_{trial_id}", "confirmed_trial": trial_id,
                        "confirm_rank": rank, "stage1.weight_decay": source["stage1.weight_decay"],
                        "seeds": "1 2", "runs": 2, "runs_ok": 2, "mean_objective": np.mean(values),
                        "std_objective": np.std(values, ddof=1), "mean_test_acc": np.mean(values) - 1,
                        "search_objective": source["objective"], "status": "TERMINATED",
                        "stop_reason": "confirmed over 2 seeds"})
        runs += [{"trial_id": f"c{trial_id}{seed}", "confirmed_trial": trial_id, "seed": seed, "objective": v,
                  "final_val_acc": v, "status": "TERMINATED"} for seed, v in zip((1, 2), values)]
    pd.concat([results, pd.DataFrame(confirm)]).to_csv(exp / "results.csv", index=False)
    pd.DataFrame(runs).to_csv(exp / "confirm.csv", index=False)
    history = pd.read_csv(exp / "history.csv", dtype={"trial_id": str})
    extra = pd.DataFrame({"trial_id": "c1234e5671", "epoch": [1], "val_acc": [99.0], "timestamp": [5000],
                          "time_total_s": [10.0]})
    pd.concat([history.assign(phase="search"), extra.assign(phase="confirm")]).to_csv(exp / "history.csv",
                                                                                        index=False)
    summary = json.loads((exp / "summary.json").read_text())
    summary.update(best={"trial_id": "aaaa0003"}, validation={"images": VAL_IMAGES, "per_class": 5},
                   confirm={"seeds": [1, 2], "search_pick": "1234e567", "confirmed_pick": "aaaa0003"})
    (exp / "summary.json").write_text(json.dumps(summary))
    return exp


@pytest.fixture
def confirmed(handmade) -> Path:
    return _add_confirmation(handmade)


def test_confirmation_rows_leave_the_trials_table(confirmed):
    exp = analysis.load_experiment(confirmed)
    assert "phase" not in exp.results and "phase" not in exp.history  # a joint search, as before
    assert len(exp.results) == len(TRIALS) and not any(c.startswith("mean_") for c in exp.results)
    assert exp.history["val_acc"].max() < 99  # confirmation epochs are no search progress
    assert exp.confirmation["confirmed_trial"].tolist() == ["aaaa0003", "1234e567"]
    assert len(exp.confirm_runs) == 4 and set(exp.confirm_runs["confirmed_trial"]) == {"aaaa0003", "1234e567"}
    assert exp.best_trial == "aaaa0003" and exp.search_pick == "1234e567"
    assert exp.results.set_index("trial_id").at["aaaa0003", "outcome"] == "best by validation"
    assert analysis.survival_frame(exp)["trials"].tolist() == [4, 3, 3, 2, 2]  # unchanged by confirmation
    assert len(analysis.accuracy_frame(exp)) == 4 * 6


def test_selection_frame_and_figure_show_intervals_ties_and_both_picks(confirmed):
    exp = analysis.load_experiment(confirmed)
    frame = analysis.selection_frame(exp)
    assert frame["trial_id"].tolist() == ["1234e567", "aaaa0003", "aaaa0001", "aaaa0002"]
    assert frame["tied_with_best"].tolist() == [True, True, True, False]
    assert (frame["lo"].iat[0], frame["hi"].iat[0]) == (27.6, 53.8)
    assert frame.loc[frame["search_pick"], "trial_id"].tolist() == ["1234e567"]
    assert frame.loc[frame["chosen"], "trial_id"].tolist() == ["aaaa0003"]
    confirm = analysis.confirmation_frame(exp)
    assert confirm["confirmed_trial"].tolist() == ["aaaa0003"] * 2 + ["1234e567"] * 2
    assert confirm["mean_objective"].tolist()[:2] == [37.0, 37.0]
    assert confirm["chosen"].tolist()[:2] == [True, True]
    fig = analysis.selection_figure(exp)
    names = [t.name for t in fig.data]
    assert names[:2] == ["search run: tied with the best", "search run: resolved: worse than the best"]
    assert {"re-trained with a fresh seed", "mean ± std over the fresh seeds"} <= set(names)
    assert names[-1] == "chosen (best mean over seeds)" and list(fig.data[-1].x) == [2]
    assert list(fig.layout.xaxis.ticktext) == ["#1 1234e567", "#2 aaaa0003", "#3 aaaa0001", "#4 aaaa0002"]
    tied = fig.data[0]
    assert list(tied.error_y.array) == pytest.approx([13.8, 13.7, 13.6])  # 53.8 - 40, 48.7 - 35, 43.6 - 30
    assert "50 validation images" in fig.layout.title.text


def test_validation_accuracy_figure_and_progress_carry_the_interval(confirmed):
    exp = analysis.load_experiment(confirmed)
    frame = analysis.accuracy_frame(exp, "val")
    # 40 % of 50 images (20 correct): centre (0.4 + 0.038416)/1.076832 = 0.407143, half
    # 1.96 * sqrt(0.24/50 + 3.8416/10000) / 1.076832 = 1.96 * 0.0719828 / 1.076832 = 0.131020: [27.6, 53.8]
    best = frame[frame["trial_id"] == "1234e567"].iloc[0]
    assert (best["accuracy_lo"], best["accuracy_hi"]) == pytest.approx((27.61, 53.82), abs=0.02)
    fig = analysis.accuracy_figure(exp, "stage1.weight_decay", "val")
    assert fig.layout.title.text.startswith("Validation accuracy with 95% intervals vs stage-1 weight decay")
    assert all(t.error_y.array is not None for t in fig.data)
    assert analysis.accuracy_figure(exp, "stage1.weight_decay").data[0].error_y.array is None  # test: no bars
    progress = analysis.progress_frame(exp)
    assert (progress["best_so_far_lo"] < progress["best_so_far"]).all()
    assert "95% interval of the best (validation set)" in {t.name for t in analysis.progress_figure(exp).data}


def test_report_marks_ties_and_shows_the_search_pick_against_the_confirmed_one(confirmed, capsys):
    assert main(["report", str(confirmed), "--no-png"]) == 0
    page = (confirmed / "report.html").read_text()
    assert "95% interval" in page and "<td>27.6-53.8</td>" in page and "<td>tied</td>" in page
    assert "Validation set: 50 images (5 per class)" in page and "3 of 4 trials are statistically tied" in page
    assert "Confirmation: the top 2 re-trained with fresh seeds [1, 2]" in page
    assert "trial aaaa0003 has the best mean, not the search&#x27;s pick 1234e567" in page
    assert 'id="selection-section"' in page
    assert "Best configuration (trial aaaa0003, the best mean over fresh seeds)" in page


def test_report_repeats_the_searchs_validation_note(confirmed, capsys):
    summary = json.loads((confirmed / "summary.json").read_text())
    summary["validation"]["note"] = "validation has 50 images: ... needs about 1,018 validation images"
    (confirmed / "summary.json").write_text(json.dumps(summary))
    assert main(["report", str(confirmed), "--no-png"]) == 0
    page = (confirmed / "report.html").read_text()
    assert "<p>Validation has 50 images: ... needs about 1,018 validation images. Ties are marked" in page


def test_report_of_an_experiment_from_before_intervals(handmade, capsys):
    """Folders written before validation noise was recorded still report (without intervals)."""
    assert main(["report", str(handmade), "--no-png"]) == 0
    frame = analysis.selection_frame(analysis.load_experiment(handmade))
    assert frame["lo"].isna().all() and frame["tied_with_best"].isna().all()


def test_report_of_a_folder_that_is_no_experiment(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no results.csv" in capsys.readouterr().err


@pytest.mark.parametrize("results", [
    ("trial_id,stage1.weight_decay,epochs,objective,status,stop_reason\n"
     "aaaa0001,0.01,0,,ERROR,RuntimeError: boom\naaaa0002,0.001,0,,ERROR,RuntimeError: boom\n"),
    "\n",  # what the search writes when no trial ran (an empty table)
], ids=["every-trial-failed", "no-trial"])
def test_report_of_an_experiment_without_a_successful_trial(tmp_path, capsys, results):
    exp = tmp_path / "failed"
    exp.mkdir()
    (exp / "space.yaml").write_text(yaml.safe_dump({
        "base": {"stage1": {"epochs": 3}}, "space": {"stage1.weight_decay": {"loguniform": [1e-5, 1e-1]}},
        "search": {"metric": "val_acc", "direction": "max"}}))
    (exp / "results.csv").write_text(results)
    (exp / "history.csv").write_text("\n")
    (exp / "summary.json").write_text(json.dumps({"experiment": str(exp), "num_trials": 2}))
    assert main(["report", str(exp), "--no-png"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and str(exp) in err and "no successful trial" in err
    assert not (exp / "report.html").exists()


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def real_search(cifar10_root, tmp_path_factory):
    """A small joint search (stage-1 WD, NBN, MaxNorm, tau) on a long-tailed synthetic CIFAR-10, on a
    local Ray started here and shut down at the end of the module."""
    import ray

    from ltsearch.search import run_search
    from ltsearch.space import load_search_space
    from tests.test_search import write_space

    tmp = tmp_path_factory.mktemp("analysis_search")
    path = write_space(tmp / "s.yaml", cifar10_root, stage1_epochs=3, stage2_epochs=1, space={
        "stage1.weight_decay": {"loguniform": [1e-4, 1e-1]},
        "model.nbn": {"choice": [False, True]},
        "stage2.maxnorm_thresh": {"uniform": [0.0, 1.0]},
        "posthoc.tau": {"uniform": [0.0, 2.0]},
    }, search={"num_samples": 4, "scheduler": {"grace_period": 1, "reduction_factor": 2},
               "sampler": {"type": "random", "seed": 1}, "max_concurrent": 2,
               # tau changes only the tau_* metrics: a second objective lets it be searched (a key that can
               # change no objective is refused); val_acc stays the objective that ranks the trials
               "metric": ["val_acc", "tau_val_acc"]})
    spec = yaml.safe_load(path.read_text())
    spec["base"]["data"]["n_max"] = 50  # class sizes 50 ... 5: a real long tail (60 images per class on disk)
    path.write_text(yaml.safe_dump(spec))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield run_search(load_search_space(path), storage=tmp / "runs", name="analysis").path
    finally:
        ray.shutdown()


def _plotly_outputs(notebook) -> list[dict]:
    mime = "application/vnd.plotly.v1+json"
    return [output["data"][mime] for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.outputs if mime in output.get("data", {})]


@pytest.fixture(scope="module")
def executed_notebooks(real_search) -> dict[str, dict]:
    from nbclient import NotebookClient

    executed = {}
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        client = NotebookClient(notebook, kernel_name="python3", timeout=180,
                                resources={"metadata": {"path": str(path.parent)}})
        client.execute(env={**os.environ, "LTSEARCH_EXPERIMENT": str(real_search)})
        executed[path.stem] = notebook
    return executed


def test_notebooks_are_clean_and_complete():
    assert {p.name for p in NOTEBOOKS} >= {"accuracy_vs_regularization.ipynb", "per_class.ipynb",
                                          "search_progress.ipynb"}
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        code = [c for c in notebook.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs"
        assert "LTSEARCH_EXPERIMENT" in code[0].source


@pytest.mark.e2e
def test_accuracy_notebook_plots_every_searched_parameter(executed_notebooks, real_search):
    figures = _plotly_outputs(executed_notebooks["accuracy_vs_regularization"])
    titles = [f["layout"]["title"]["text"] for f in figures]
    for name in ("stage-1 weight decay", "normalized BN", "MaxNorm threshold"):
        assert any(t.startswith(f"Test accuracy vs {name} (") for t in titles), (name, titles)
    assert any(t.startswith("Test accuracy (tau-normalised classifier) vs tau (") for t in titles), titles
    wd = next(f for f in figures if "stage-1 weight decay" in f["layout"]["title"]["text"])
    assert wd["layout"]["xaxis"]["type"] == "log"
    names = {trace.get("name") for trace in wd["data"]}
    assert any(n.endswith("best by validation") for n in names) and {n.split(",")[0] for n in names} <= {
        "NBN on", "NBN off"}
    assert any("Pareto" in t for t in titles)


@pytest.mark.e2e
def test_per_class_notebook_compares_best_and_baseline(executed_notebooks, real_search):
    figures = _plotly_outputs(executed_notebooks["per_class"])
    accuracy, norms = figures
    assert accuracy["layout"]["title"]["text"].startswith("Per-class test accuracy against class size")
    assert norms["layout"]["title"]["text"].startswith("Per-class classifier weight norms")
    names = [trace["name"] for trace in accuracy["data"]]
    assert names[-2:] == ["best trial: stage 1", "best trial: after stage 2"]
    exp = analysis.load_experiment(real_search)
    baseline = analysis.naive_baseline_trial(exp)
    assert (baseline not in (None, exp.best_trial)) == any(n.startswith("naive baseline") for n in names)
    sizes = sorted(accuracy["data"][-1]["x"])  # class sizes from load_data: a long tail
    assert sizes[0] < sizes[-1] and accuracy["layout"]["xaxis"]["type"] == "log"


@pytest.mark.e2e
def test_search_progress_notebook(executed_notebooks):
    titles = [f["layout"]["title"]["text"] for f in _plotly_outputs(executed_notebooks["search_progress"])]
    for start in ("Search progress: best validation accuracy so far", "ASHA rung survival",
                  "All trials: sampled values and objective", "Parameter importances"):
        assert any(t.startswith(start) for t in titles), (start, titles)


@pytest.mark.e2e
def test_report_command_on_a_real_search(real_search, capsys):
    assert main(["report", str(real_search)]) == 0
    out = capsys.readouterr().out
    page = (real_search / "report.html").read_text()
    exp = analysis.load_experiment(real_search)
    figures = analysis.all_figures(exp)
    assert len(figures) == 4 + 2 + 6
    for name, fig in figures.items():
        assert f'id="{name}-section"' in page
        assert html.escape(fig.layout.title.text) in page
    assert page.count("* plotly.js v") == 1 and "Top trials by the search objective" in page
    assert exp.best_trial in page and "weight_decay:" in page
    pngs = sorted(p.stem for p in (real_search / "figures").glob("*.png"))
    assert pngs == sorted(figures) or "PNGs skipped" in out



def test_report_names_the_tie_rule_its_results_used():
    from ltsearch.analysis.report import _tie_rule

    assert _tie_rule(pd.DataFrame({"objective": [1.0]})).startswith("Newcombe")  # results from before tie_test
    assert _tie_rule(pd.DataFrame({"tie_test": ["newcombe", None]})).startswith("Newcombe")
    assert _tie_rule(pd.DataFrame({"tie_test": ["mcnemar", "newcombe"]})).startswith("McNemar's exact test")


def test_report_counts_ties_by_the_paired_rule_next_to_the_unpaired_one(confirmed, capsys):
    results = pd.read_csv(confirmed / "results.csv", dtype={"trial_id": str})
    scored = (results["phase"] == "search") & results["objective"].notna()
    results.loc[scored, "tie_test"] = "mcnemar"
    results.loc[scored, "tied_unpaired"] = True  # the unpaired interval ties all 4; McNemar separates one
    results.to_csv(confirmed / "results.csv", index=False)
    assert main(["report", str(confirmed), "--no-png"]) == 0
    page = (confirmed / "report.html").read_text()
    assert ("3 of 4 trials are statistically tied with it (McNemar&#x27;s exact test" in page
            and "; 4 by the unpaired interval; marked in the table)" in page)
    assert "<th>tied with best</th>" in page and "<th>tied, unpaired rule</th>" in page
    exp = analysis.load_experiment(confirmed)
    top = analysis.top_trials(exp)
    assert top.columns.get_loc("tied_unpaired") == top.columns.get_loc("tied_with_best") + 1
