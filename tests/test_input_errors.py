"""Bad input is refused before Ray starts: exit code 2 and one line naming the file, the key and the
expected form. In-process through run_search.main (fast: Ray is never started)."""
from __future__ import annotations

import pickle

import pytest
import ray
import yaml

import run_search

VALID_SPACE = {"stage1.weight_decay": {"loguniform": [1e-4, 1e-1]}}


def space_file(tmp_path, root, *, base=None, space=None, search=None, text=None):
    path = tmp_path / "space.yaml"
    if text is not None:
        path.write_text(text)
        return path
    doc = {"base": base if base is not None else {
        "data": {"dataset": "cifar10", "root": str(root), "imbalance_factor": 10, "val_per_class": 5},
        "model": {"name": "resnet8"}, "stage1": {"epochs": 1}, "stage2": {"enabled": False}},
        "space": space if space is not None else VALID_SPACE, "search": search or {}}
    path.write_text(yaml.safe_dump(doc))
    return path


def refused(capsys, argv, *expected):
    """Run the entry point; assert exit 2, one stderr line containing every `expected`, Ray never started."""
    assert run_search.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for part in expected:
        assert str(part) in err, (part, err)
    assert not ray.is_initialized()
    return err


def test_missing_file(capsys, tmp_path):
    refused(capsys, [tmp_path / "nope.yaml"], "nope.yaml", "not found")


def test_unreadable_file(capsys, tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    refused(capsys, [tmp_path / "dir.yaml"], "dir.yaml", "cannot read")


def test_yaml_syntax_error_names_the_line(capsys, tmp_path, cifar10_root):
    path = space_file(tmp_path, cifar10_root, text="base:\n  data: {dataset: cifar10\nspace: {}\n")
    refused(capsys, [path], str(path), "line", "YAML syntax error")


def test_python_tags_are_refused_by_the_safe_loader(capsys, tmp_path, cifar10_root):
    path = space_file(tmp_path, cifar10_root, text="base: !!python/object/apply:os.system ['true']\nspace: {}\n")
    refused(capsys, [path], str(path), "YAML syntax error")


@pytest.mark.parametrize(("where", "kwargs", "key"), [
    ("top level", {"text": "base: {}\nspace: {}\nsurprise: 1\n"}, "surprise"),
    ("base section", {"base": {"stage1": {"epochs": 1, "wd": 0.1}}}, "base.stage1.wd"),
    ("search section", {"search": {"scheduler": {"grace": 1}}}, "search.scheduler.grace"),
    ("space entry", {"space": {"stage1.weight_decay": {"loguniform": [1e-4, 1e-1], "log": True}}},
     "space.stage1.weight_decay.log"),
])
def test_unknown_keys_at_every_level(capsys, tmp_path, cifar10_root, where, kwargs, key):
    refused(capsys, [space_file(tmp_path, cifar10_root, **kwargs)], key)


@pytest.mark.parametrize(("kwargs", "key", "expected"), [
    ({"base": {"stage1": {"weight_decay": "lots"}}}, "base.stage1.weight_decay", "number"),
    ({"base": {"stage1": {"epochs": 2.5}}}, "base.stage1.epochs", "integer"),
    ({"space": {"stage1.weight_decay": {"uniform": [0.1, 0.01]}}}, "space.stage1.weight_decay", "low < high"),
    ({"space": {"stage1.weight_decay": {"uniform": [0.1, 0.1]}}}, "space.stage1.weight_decay", "low < high"),
    ({"space": {"stage1.weight_decay": {"loguniform": [0, 0.1]}}}, "space.stage1.weight_decay", "> 0"),
    ({"space": {"model.name": {"choice": []}}}, "space.model.name", "at least one option"),
    ({"space": {"stage1.weight_decay": {"normal": [0, 1]}}}, "space.stage1.weight_decay", "unknown key"),
    ({"space": {"stage1.epochs": {"uniform": [1, 10]}}}, "space.stage1.epochs", "integer"),
    ({"space": {"stage1.nope": {"uniform": [0, 1]}}}, "space.stage1.nope", "not a key"),
    ({"base": {"data": {"dataset": "mnist"}}}, "base.data.dataset", "cifar10"),
    ({"base": {"model": {"name": "vgg"}}}, "base.model.name", "resnet32"),
    ({"base": {"stage2": {"loss": "hinge"}}}, "base.stage2.loss", "cb_softmax_bce"),
    ({"space": {"model.name": {"choice": ["resnet8", "vgg"]}}}, "model.name", "vgg"),
    ({"search": {"metric": "test_acc"}}, "search.metric", "test set"),
])
def test_bad_values_name_key_and_expectation(capsys, tmp_path, cifar10_root, kwargs, key, expected):
    path = space_file(tmp_path, cifar10_root, **kwargs)
    refused(capsys, [path], str(path), key, expected)


def test_missing_dataset_while_downloads_are_off(capsys, tmp_path, cifar10_root):
    base = {"data": {"dataset": "cifar100", "root": str(tmp_path / "empty")}, "stage2": {"enabled": False}}
    refused(capsys, [space_file(tmp_path, cifar10_root, base=base)], "cifar100", str(tmp_path / "empty"))


@pytest.mark.parametrize("damage", ["truncated", "wrong shape"])
def test_corrupted_dataset(capsys, tmp_path, write_cifar_folder, damage):
    folder = write_cifar_folder("cifar10", tmp_path / "data", train_per_class=30, test_per_class=5)
    batch = folder / "data_batch_3"
    if damage == "truncated":
        batch.write_bytes(batch.read_bytes()[:1000])
    else:
        content = pickle.loads(batch.read_bytes(), encoding="bytes")
        content[b"data"] = content[b"data"][:, :100]
        batch.write_bytes(pickle.dumps(content))
    path = space_file(tmp_path, tmp_path / "data")
    refused(capsys, [path], "data_batch_3")


def test_storage_that_cannot_be_written(capsys, tmp_path, cifar10_root):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    refused(capsys, [space_file(tmp_path, cifar10_root), "--storage", blocker], "--storage", str(blocker))


def test_resume_of_a_folder_without_experiment(capsys, tmp_path, cifar10_root):
    (tmp_path / "runs" / "ghost").mkdir(parents=True)
    refused(capsys, [space_file(tmp_path, cifar10_root), "--storage", tmp_path / "runs", "--name", "ghost",
                     "--resume"], "--resume", "ghost", "no ltsearch experiment")


def test_resume_with_a_different_space_file_is_refused(capsys, tmp_path, cifar10_root):
    """Bug: --resume ran whatever file it was given on an experiment started with another one."""
    from ltsearch.space import load_search_space

    exp = tmp_path / "runs" / "exp"
    exp.mkdir(parents=True)
    original = load_search_space(space_file(tmp_path, cifar10_root))
    (exp / "space.yaml").write_text(yaml.safe_dump(original.model_dump(mode="json"), sort_keys=False))
    changed = space_file(tmp_path, cifar10_root, space={"stage1.weight_decay": {"loguniform": [1e-3, 1e-1]}})
    refused(capsys, [changed, "--storage", tmp_path / "runs", "--name", "exp", "--resume"],
            "--resume", "space.stage1.weight_decay.loguniform", "differs")
    refused(capsys, [space_file(tmp_path, cifar10_root), "--storage", tmp_path / "runs", "--name", "exp",
                     "--resume", "--set", "stage1.epochs=2"], "--resume", "base.stage1.epochs")


def test_unreachable_cluster_leaves_no_experiment_folder(capsys, monkeypatch, tmp_path, cifar10_root):
    """A failed connection used to leave runs/NAME/ with only space.yaml: a rerun with the same --name was then
    refused as existing, and --resume had nothing to resume."""
    from ltsearch.search import experiment

    def unreachable(*args, **kwargs):
        raise ConnectionError("Could not find any running Ray instance at 10.9.9.9:6379\nmore detail")

    monkeypatch.setattr(experiment, "connect", unreachable)
    argv = [space_file(tmp_path, cifar10_root), "--storage", tmp_path / "runs", "--name", "exp",
            "--address", "10.9.9.9:6379"]
    refused(capsys, argv, "--address", "10.9.9.9:6379", "Could not find any running Ray instance")
    assert not (tmp_path / "runs" / "exp").exists()


def test_dashboard_line_says_what_its_token_prompt_wants(monkeypatch):
    from ltsearch.search.experiment import dashboard_hint

    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/secrets/ray_token")
    line = dashboard_hint("127.0.0.1:8265")
    assert line.startswith("Ray dashboard: http://127.0.0.1:8265")
    assert "ray get-auth-token" in line and "/secrets/ray_token" in line
