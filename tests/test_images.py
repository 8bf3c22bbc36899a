"""Tests of ltsearch.images (list files, image folders, the memory and stream pipelines) and of the image-dataset
keys of the data config, on small JPEG and PNG files each test writes itself; nothing touches the network.
End-to-end runs (marked e2e) train through `python -m ltsearch train` and `run_search.py`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ltsearch.__main__ import main
from ltsearch.build import load_data, pipeline, split_loader
from ltsearch.config import ConfigError, ExperimentConfig, load_config, validate_config, with_overrides
from ltsearch.data import DataError, TensorLoader
from ltsearch.images import (
    IMAGE_DATASETS,
    ImageFiles,
    StreamLoader,
    decode_all,
    eval_transform,
    read_list,
)

from .test_train import checkpoint_after

REPO = Path(__file__).resolve().parents[1]
MAKE_LISTS = REPO.parent / "shared" / "data" / "make_cifar10_lists.py"
COUNTS = [24, 12, 6, 3]  # training images per class of the small list dataset


def write_image(path: Path, colour: int, size=(20, 24), seed: int = 0) -> None:
    """A noisy image around a per-class grey level (so classes are learnable); JPEG or PNG by suffix."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(colour, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_lists(root: Path, counts=COUNTS, per_eval: int = 3, size=(20, 24), prefix="ds") -> Path:
    """An image root with nested class folders and list files ds_{train,val,test}.txt next to it (in the
    classifier-balancing format, paths relative to the root). Returns the root."""
    images = root / "images"
    for split, per_class in (("train", counts), ("val", [per_eval] * len(counts)),
                             ("test", [per_eval] * len(counts))):
        lines = []
        for c, n in enumerate(per_class):
            for i in range(n):
                rel = f"{split}/n{c:03d}/part{i % 2}/{i}.jpg"
                write_image(images / rel, 40 + 50 * c, size, seed=hash((split, c, i)) % 2**32)
                lines.append(f"{rel} {c}")
        (root / f"{prefix}_{split}.txt").write_text("\n".join(lines) + "\n")
    return images


def write_folder(root: Path, counts, splits=("train",), size=(20, 24), per_eval: int = 3) -> Path:
    """root/train/<class>/.../*.jpg (class folders named so that sorted order is class order)."""
    for split in splits:
        for c, n in enumerate(counts if split == "train" else [per_eval] * len(counts)):
            for i in range(n):
                write_image(root / split / f"c{c}" / ("deep" if i % 3 else "") / f"{i:03d}.jpg", 40 + 50 * c,
                            size, seed=hash((split, c, i)) % 2**32)
    return root


def list_config(images: Path, **data) -> ExperimentConfig:
    raw = {"dataset": "image_list", "root": str(images), "train_list": "../ds_train.txt",
           "val_list": "../ds_val.txt", "test_list": "../ds_test.txt", "image_size": 16, "workers": 0, **data}
    return ExperimentConfig.model_validate({
        "data": raw, "model": {"name": "resnet8"},
        "stage1": {"epochs": 2, "batch_size": 8, "lr": 0.05}, "stage2": {"epochs": 1, "batch_size": 8},
        "trainer": {"eval_batch_size": 16, "num_threads": 1}})


@pytest.fixture(scope="module")
def lists(tmp_path_factory) -> Path:
    return write_lists(tmp_path_factory.mktemp("lists"))


# ---------------------------------------------------------------- list files

def test_read_list_takes_paths_relative_to_the_root_and_records_lines(tmp_path):
    (tmp_path / "l.txt").write_text("a/x 1.jpg 2\n\n  b/y.jpg   0  \nc.jpg 1\n")
    files, labels = read_list(tmp_path, "l.txt", "train_list")
    assert labels.tolist() == [2, 0, 1]
    assert files.paths.tolist() == [str(tmp_path / "a/x 1.jpg"), str(tmp_path / "b/y.jpg"), str(tmp_path / "c.jpg")]
    assert files.lines.tolist() == [1, 3, 4]
    assert files.where(1) == f"{tmp_path / 'l.txt'} line 3: {tmp_path / 'b/y.jpg'}"


def test_load_list_dataset(lists):
    data = load_data(list_config(lists, pipeline="stream"))
    assert data.class_counts == COUNTS and data.num_classes == 4
    assert data.class_names == ["n000", "n001", "n002", "n003"]  # the folder all of a class's images are under
    assert isinstance(data.train_x, ImageFiles) and len(data.val_y) == len(data.test_y) == 12
    assert data.test_y.tolist() == [c for c in range(4) for _ in range(3)]


@pytest.mark.parametrize("text, expected", [
    ("a.jpg\n", "line 1: expected 'relative/path.jpg label', got 'a.jpg'"),
    ("a.jpg 0\nb.jpg cat\n", "line 2: label 'cat' is not a class index"),
    ("a.jpg -1\n", "line 1: label '-1' is not a class index"),
    ("a.jpg 1.5\n", "line 1: label '1.5' is not a class index"),
    ("\n\n", "lists no image"),
])
def test_bad_train_list_is_one_line_naming_the_file(tmp_path, text, expected):
    (tmp_path / "ds_train.txt").write_text(text)
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError) as err:
        load_data(list_config(tmp_path / "images", val_list=None, test_list=None))
    message = str(err.value)
    assert expected in message and str(tmp_path / "ds_train.txt") in message and "\n" not in message


def test_missing_list_names_the_key_and_the_path(lists):
    with pytest.raises(DataError, match=r"data\.test_list: .*nope\.txt: file not found"):
        load_data(list_config(lists, test_list="nope.txt"))


def test_label_out_of_range_names_the_list_and_line(lists, tmp_path):
    bad = tmp_path / "val.txt"
    bad.write_text("val/n000/part0/0.jpg 0\nval/n001/part1/1.jpg 7\n")
    with pytest.raises(DataError, match=rf"{bad} line 2: label 7 is not a class of the train list .*\(labels 0\.\.3\)"):
        load_data(list_config(lists, val_list=str(bad)))


def test_a_class_without_training_images_is_refused(lists, tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("train/n000/part0/0.jpg 0\ntrain/n002/part0/0.jpg 2\n")
    with pytest.raises(DataError, match="class 1 has no image"):
        load_data(list_config(lists, train_list=str(train), val_list=None, val_per_class=0))


def test_missing_image_is_found_before_training_with_its_list_line(lists, tmp_path):
    train = tmp_path / "train.txt"
    lines = (lists.parent / "ds_train.txt").read_text().splitlines()
    lines.insert(5, "train/n000/part0/missing.jpg 0")
    train.write_text("\n".join(lines))
    for chosen in ("memory", "stream"):
        with pytest.raises(DataError) as err:
            load_data(list_config(lists, train_list=str(train), pipeline=chosen))
        assert str(err.value) == f"{train} line 6: {lists / 'train/n000/part0/missing.jpg'}: file not found"


@pytest.fixture
def corrupt(tmp_path, lists):
    """A train list whose 3rd line is a truncated JPEG."""
    good = (lists / "train/n000/part0/0.jpg").read_bytes()
    (tmp_path / "images/bad").mkdir(parents=True)
    (tmp_path / "images/bad/broken.jpg").write_bytes(good[:len(good) // 2])
    for i in range(4):
        write_image(tmp_path / f"images/ok/{i}.jpg", 100)
    lines = ["ok/0.jpg 0", "ok/1.jpg 1", "bad/broken.jpg 0", "ok/2.jpg 0", "ok/3.jpg 1"]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_fails_at_first_read_naming_file_and_line(corrupt, workers):
    config = ExperimentConfig.model_validate({"data": {
        "dataset": "image_list", "root": str(corrupt / "images"), "train_list": "../train.txt", "val_per_class": 0,
        "image_size": 16, "pipeline": "stream", "workers": workers}})
    data = load_data(config)  # paths exist: nothing is decoded yet
    loader = split_loader(config, data, "train", 2, train=False)
    with pytest.raises(DataError) as err:
        list(loader)
    message = str(err.value)
    assert message.startswith(f"{corrupt / 'train.txt'} line 3: {corrupt / 'images/bad/broken.jpg'}: "
                              "cannot read the image (")
    assert "\n" not in message
    with pytest.raises(DataError, match="line 3: .*broken.jpg: cannot read the image"):
        load_data(with_overrides(config, {"data.pipeline": "memory"}))


# ---------------------------------------------------------------- presets and config keys

@pytest.mark.parametrize("dataset", ["imagenet_lt", "places_lt", "inat2018"])
def test_presets_fill_in_only_the_standard_list_names(dataset, tmp_path):
    data = ExperimentConfig.model_validate({"data": {"dataset": dataset, "root": str(tmp_path)}}).data
    spec = IMAGE_DATASETS[dataset]
    assert (data.train_list, data.val_list, data.test_list) == (spec.train_list, spec.val_list, spec.test_list)
    assert data.image_size == 224 and data.imbalance_factor == 1.0
    given = ExperimentConfig.model_validate(
        {"data": {"dataset": dataset, "root": str(tmp_path), "test_list": "/lists/mine.txt"}}).data
    assert given.test_list == "/lists/mine.txt" and given.train_list == spec.train_list


def test_preset_names():
    assert [IMAGE_DATASETS["imagenet_lt"].train_list, IMAGE_DATASETS["places_lt"].test_list] == [
        "ImageNet_LT_train.txt", "Places_LT_test.txt"]
    inat = IMAGE_DATASETS["inat2018"]
    assert (inat.train_list, inat.val_list, inat.test_list) == ("iNaturalist18_train.txt", None, "iNaturalist18_val.txt")


def test_preset_reads_its_lists_from_the_root(tmp_path):
    images = write_lists(tmp_path, prefix="ImageNet_LT")
    for split in ("train", "val", "test"):  # the preset's names, next to the images
        (images / f"ImageNet_LT_{split}.txt").write_text((tmp_path / f"ImageNet_LT_{split}.txt").read_text())
    data = load_data(ExperimentConfig.model_validate({"data": {"dataset": "imagenet_lt", "root": str(images)}}))
    assert data.class_counts == COUNTS and len(data.val_y) == 12 and isinstance(data.train_x, ImageFiles)


def test_without_a_val_list_a_balanced_validation_set_comes_from_train(lists):
    config = list_config(lists, val_list=None, val_per_class=2, pipeline="stream")
    data = load_data(config)
    assert data.class_counts == [n - 2 for n in COUNTS] and data.val_y.bincount().tolist() == [2] * 4
    assert not set(data.train_x.paths) & set(data.val_x.paths)
    assert set(data.train_x.paths) | set(data.val_x.paths) == set(read_list(lists, "../ds_train.txt", "")[0].paths)
    with pytest.raises(DataError, match=r"data\.val_per_class: .*ds_train\.txt: class 3 has 3 images"):
        load_data(with_overrides(config, {"data.val_per_class": 3}))


@pytest.mark.parametrize("data, key", [
    ({"dataset": "image_list", "root": "/x"}, "data.train_list: Value error, dataset image_list needs train_list"),
    ({"dataset": "image_folder"}, "data.root: dataset image_folder needs root"),
    ({"dataset": "cifar10", "image_size": 64}, "data.image_size: cifar10 images are 32 px"),
    ({"dataset": "cifar10", "train_list": "a.txt"}, "data.train_list: list files are for"),
    ({"dataset": "cifar100", "pipeline": "stream"}, "data.pipeline: cifar100 is read from its pickles"),
    ({"dataset": "imagenet_lt", "root": "/x", "imbalance_factor": 10}, "data.imbalance_factor: a list dataset"),
    ({"dataset": "places_lt", "root": "/x", "n_max": 100}, "data.n_max: a list dataset"),
    ({"dataset": "inat2018", "root": "/x", "download": True}, "data.download: only CIFAR can be downloaded"),
    ({"dataset": "image_folder", "root": "/x", "image_size": 4}, "data.image_size:"),
    ({"dataset": "image_folder", "root": "/x", "workers": -1}, "data.workers:"),
])
def test_bad_image_dataset_keys_are_refused_naming_the_key(tmp_path, data, key):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": data}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert key.replace(" Value error,", "") in str(err.value) and "\n" not in str(err.value)


def test_image_root_is_made_absolute_and_round_trips(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = validate_config({"data": {"dataset": "image_folder", "root": "data/imgs", "imbalance_factor": 10}}, "c")
    assert config.data.root == str(tmp_path / "data/imgs") and config.data.imbalance_factor == 10
    assert with_overrides(config, {}) == config  # a trial re-validates the dumped config to the same values
    folder = validate_config({"data": {"dataset": "image_folder", "root": "x"}}, "c").data
    assert folder.imbalance_factor == 1.0  # a folder is used as it is unless asked
    cifar = validate_config({"data": {"dataset": "cifar10", "root": "rel"}}, "c").data
    assert cifar.root == "rel" and cifar.imbalance_factor == 100.0 and cifar.image_size is None


def test_pipeline_auto_holds_small_images_in_memory(lists):
    assert pipeline(list_config(lists, image_size=64)) == "memory"
    assert pipeline(list_config(lists, image_size=65)) == "stream"
    assert pipeline(list_config(lists, image_size=16, pipeline="stream")) == "stream"
    memory = load_data(list_config(lists))
    assert memory.train_x.dtype == torch.uint8 and memory.train_x.shape == (sum(COUNTS), 3, 16, 16)
    assert isinstance(split_loader(list_config(lists), memory, "train", 4, train=True), TensorLoader)


# ---------------------------------------------------------------- image folders

def test_image_folder_subsamples_a_long_tail_and_holds_out_unused_images(tmp_path):
    root = write_folder(tmp_path, [20, 20, 20])
    config = validate_config({"data": {"dataset": "image_folder", "root": str(root), "imbalance_factor": 4,
                                       "val_per_class": 3, "image_size": 16, "workers": 0}}, "c")
    data = load_data(config)
    assert data.class_counts == [17, 10, 5] and data.class_names == ["c0", "c1", "c2"]  # 20*4^(-i/2), head gives 3
    assert data.val_y.bincount().tolist() == [3, 3, 3] and len(data.test_y) == 0
    memory = load_data(with_overrides(config, {"data.pipeline": "memory"}))
    assert memory.train_x.shape == (32, 3, 16, 16) and memory.val_x.shape == (9, 3, 16, 16)


def test_image_folder_uses_val_and_test_folders_and_nested_images(tmp_path):
    root = write_folder(tmp_path, [9, 6, 3], splits=("train", "val", "test"), per_eval=4)
    config = validate_config({"data": {"dataset": "image_folder", "root": str(root), "image_size": 16,
                                       "pipeline": "stream"}}, "c")
    data = load_data(config)
    assert data.class_counts == [9, 6, 3]  # as it is: nested files included, nothing held out
    assert data.val_y.tolist() == data.test_y.tolist() == [c for c in range(3) for _ in range(4)]
    assert all(str(root / "val") in p for p in data.val_x.paths)


def test_image_folder_errors(tmp_path):
    def load(root):
        return load_data(validate_config({"data": {"dataset": "image_folder", "root": str(root)}}, "c"))

    with pytest.raises(DataError, match=r"data\.root: .*/train: folder not found"):
        load(tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class folder"):
        load(tmp_path)
    write_folder(tmp_path, [3, 3])
    (tmp_path / "train/c2").mkdir()
    with pytest.raises(DataError, match="Found no valid file for the classes c2"):
        load(tmp_path)
    (tmp_path / "train/c2").rmdir()
    write_image(tmp_path / "val/zebra/0.jpg", 0)
    with pytest.raises(DataError, match=r"val/zebra: class 'zebra' has no folder under .*train"):
        load(tmp_path)


# ---------------------------------------------------------------- decoding and the stream loader

def test_eval_transform_resizes_by_256_224_and_centre_crops():
    image = Image.new("RGB", (60, 40))
    assert eval_transform(28)(image).shape == (3, 28, 28) and eval_transform(28)(image).dtype == torch.uint8
    resize = eval_transform(224).transforms[0]
    assert resize.size == [256]


def test_decode_all_resizes_the_short_side_and_normalisation_is_exact(tmp_path):
    write_image(tmp_path / "a.png", 0, size=(40, 30))
    Image.new("RGB", (16, 16), (128, 128, 128)).save(tmp_path / "grey.png")
    files = ImageFiles(np.array([str(tmp_path / "a.png"), str(tmp_path / "grey.png")]), "test")
    x = decode_all(files, 16)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.uint8 and (x[1] == 128).all()
    mean, std = IMAGE_DATASETS["image_list"].mean, IMAGE_DATASETS["image_list"].std
    loader = StreamLoader(files, torch.tensor([0, 1]), 2, mean, std, train=False, image_size=16)
    batch, _ = next(iter(loader))
    expected = (128 / 255 - torch.tensor(mean)) / torch.tensor(std)
    assert torch.allclose(batch[1], expected.view(3, 1, 1).expand(3, 16, 16), atol=1e-6)


def _stream(lists, labels=None, **kw):
    files, y = read_list(lists, "../ds_train.txt", "train_list")
    mean, std = IMAGE_DATASETS["image_list"].mean, IMAGE_DATASETS["image_list"].std
    kw.setdefault("train", True)
    return StreamLoader(files, y if labels is None else labels, 5, mean, std, image_size=12, **kw)


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    batches = list(loader)
    assert len(batches) == len(loader)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def test_stream_epoch_is_reproducible_from_seed_and_epoch_whatever_the_workers(lists):
    n = sum(COUNTS)
    index = torch.arange(n)  # labels that reveal the order
    x, y = _epoch(_stream(lists, index, seed=3), 2)
    x2, y2 = _epoch(_stream(lists, index, seed=3, workers=1), 2)  # fresh loader (a resume), in a worker
    assert torch.equal(y, torch.randperm(n, generator=torch.Generator().manual_seed(3 * 100003 + 2)))
    assert torch.equal(y, y2) and torch.equal(x, x2)
    x3, y3 = _epoch(_stream(lists, index, seed=3), 3)
    assert not torch.equal(y, y3) and sorted(y3.tolist()) == list(range(n))
    same_images = _epoch(_stream(lists, index, seed=3, sampler="instance"), 2)[0]
    assert torch.equal(same_images, x)
    first = [x[y == i][0] for i in range(3)]
    other_epoch = [x3[y3 == i][0] for i in range(3)]
    assert not all(torch.equal(a, b) for a, b in zip(first, other_epoch))  # a new augmentation each epoch


def test_stream_shards_like_the_tensor_loader(lists):
    labels = read_list(lists, "../ds_train.txt", "train_list")[1]
    images = torch.zeros(len(labels), 3, 4, 4, dtype=torch.uint8)
    for sampler in ("instance", "class_balanced"):
        for train in (True, False):
            for rank in range(2):
                kw = {"train": train, "sampler": sampler, "seed": 1, "rank": rank, "world_size": 2}
                stream = _stream(lists, torch.arange(len(labels)), **kw)
                tensor = TensorLoader(images, torch.arange(len(labels)), 5, (0, 0, 0), (1, 1, 1), **kw)
                if sampler == "class_balanced":  # draw from the class labels, compare the drawn indices
                    stream.cpu_labels = tensor.cpu_labels = labels
                assert len(stream) == len(tensor)
                assert torch.equal(_epoch(stream, 4)[1], _epoch(tensor, 4)[1])


def test_stream_training_batches_are_augmented_crops_of_image_size(lists):
    index = torch.arange(sum(COUNTS))
    x, y = _epoch(_stream(lists, index, color_jitter=0.4), 0)
    plain, order = _epoch(_stream(lists, index, train=False), 0)
    assert x.shape == plain.shape == (sum(COUNTS), 3, 12, 12) and x.dtype == torch.float32
    assert torch.equal(order, index)  # evaluation reads the list in order
    x = x[torch.argsort(y)]
    assert all(not torch.equal(a, b) for a, b in zip(x, plain))


def test_stream_does_not_touch_the_global_generator(lists):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _epoch(_stream(lists), 0)
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------- training on image datasets

@pytest.mark.parametrize("chosen", ["memory", "stream"])
def test_training_resumes_mid_stage_to_the_uninterrupted_run(lists, tmp_path, chosen):
    from ltsearch.train import train

    config = list_config(lists, pipeline=chosen, workers=1, val_list=None, val_per_class=1)
    full = train(config)
    resumed = train(config, resume_from=checkpoint_after(config, 1, tmp_path / "ckpt"))
    drop = ("epoch_time_s",)
    assert [{k: v for k, v in h.items() if k not in drop} for h in resumed["history"]] == [
        {k: v for k, v in h.items() if k not in drop} for h in full["history"]]
    assert full["class_counts"] == [n - 1 for n in COUNTS] and full["stage2"]["final"]["test_acc"] is not None


@pytest.mark.parametrize("chosen", ["memory", "stream"])
def test_staged_mode_caches_features_of_an_image_dataset(lists, tmp_path, chosen):
    """Staged mode's stage 2 reads features of the stage-1 checkpoint through the dataset's own loader: the
    streamed pipeline too (its images are files, not a tensor), one row per image of each split."""
    from ltsearch.features import cache_features, fit_classifier
    from ltsearch.train import train

    config = with_overrides(list_config(lists, pipeline=chosen), {"stage2.enabled": False})
    train(config, out_dir=tmp_path / "run")
    cache = cache_features(config, str(tmp_path / "run" / "checkpoint"), views=2)
    data = load_data(config)
    assert [len(y) for _, y in cache["train_views"]] == [len(data.train_y)] * 2
    assert len(cache["val"][1]) == len(data.val_y) and len(cache["test"][1]) == len(data.test_y)
    assert not torch.equal(cache["train_views"][0][0], cache["train_views"][1][0])  # two augmented views
    fitted = fit_classifier(cache, with_overrides(config, {"stage2.enabled": True}))
    assert fitted["epoch"] == 1 and 0.0 <= fitted["test_acc"] <= 100.0


# ---------------------------------------------------------------- end to end

def _metrics_have_classes_and_groups(metrics: dict, num_classes: int) -> None:
    best = metrics["stage1"]["best"]
    assert len(best["val_per_class_acc"]) == len(best["test_per_class_acc"]) == num_classes
    for key in ("val_acc", "test_acc", "val_acc_many", "test_acc_head", "test_acc_tail", "tau_val_acc"):
        assert key in best


@pytest.mark.e2e
def test_train_command_on_a_list_dataset_and_a_nested_image_folder(tmp_path):
    images = write_lists(tmp_path / "lists", counts=[60, 30, 15, 8], size=(36, 28))
    folder = write_folder(tmp_path / "folder", [40, 40, 40, 40], splits=("train", "test"), size=(40, 40))
    configs = {
        "list_stream": list_config(images, pipeline="stream", image_size=24, workers=1),
        "list_memory": list_config(images, image_size=32),
        "folder": validate_config({**list_config(images).model_dump(), "data": {
            "dataset": "image_folder", "root": str(folder), "imbalance_factor": 10, "val_per_class": 4,
            "image_size": 32, "pipeline": "stream", "workers": 1}}, "c"),
    }
    for name, config in configs.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config.model_dump()))
        assert main(["train", str(path), "--out", str(tmp_path / name), "--set", "stage1.epochs=1"]) == 0
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        _metrics_have_classes_and_groups(metrics, 4)
        assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    folder_metrics = json.loads((tmp_path / "folder" / "metrics.json").read_text())
    assert folder_metrics["class_counts"] == [36, 18, 8, 4]  # 40 * 10^(-i/3), the head gave 4 to val
    assert json.loads((tmp_path / "list_memory" / "metrics.json").read_text())["class_counts"] == [60, 30, 15, 8]


@pytest.mark.e2e
def test_search_on_a_list_dataset_and_an_image_folder(local_ray, tmp_path, capsys):
    import pandas as pd

    import run_search

    images = write_lists(tmp_path / "lists", counts=[40, 20, 10, 5], size=(20, 20))
    folder = write_folder(tmp_path / "folder", [30, 30, 30], splits=("train", "test"), size=(24, 24))
    bases = {
        "lists": {"dataset": "image_list", "root": str(images), "train_list": "../ds_train.txt",
                  "val_list": "../ds_val.txt", "test_list": "../ds_test.txt", "image_size": 16,
                  "pipeline": "stream", "workers": 0},
        "folder": {"dataset": "image_folder", "root": str(folder), "imbalance_factor": 5, "val_per_class": 3,
                   "image_size": 20, "workers": 0},
    }
    ranks = {"lists": 2, "folder": 1}  # the streamed list dataset in a two-rank DDP trial: a shard per rank
    for name, data in bases.items():
        space = tmp_path / f"{name}.yaml"
        space.write_text(yaml.safe_dump({
            "base": {"data": data, "model": {"name": "resnet8"}, "stage1": {"epochs": 1, "batch_size": 16},
                     "stage2": {"enabled": False}, "trainer": {"eval_batch_size": 32}},
            "space": {"stage1.weight_decay": {"loguniform": [1e-4, 1e-2]}},
            "search": {"num_samples": 1, "scheduler": {"enabled": False},
                       "resources": {"num_workers": ranks[name], "cpus_per_worker": 1}}}))
        assert run_search.main([str(space), "--storage", str(tmp_path / "runs"), "--name", name]) == 0
        rows = pd.read_csv(tmp_path / "runs" / name / "results.csv")
        assert len(rows) == 1 and rows["stop_reason"].iloc[0] == "completed", rows.to_dict("records")
        assert rows["final_val_acc"].notna().all() and rows["final_test_acc"].notna().all()
        assert (pd.read_csv(tmp_path / "runs" / name / "history.csv")["world_size"] == ranks[name]).all()
    assert "best trial" in capsys.readouterr().out


@pytest.mark.e2e
def test_train_on_the_real_cifar10_jpeg_lists(tmp_path):
    if not MAKE_LISTS.is_file():
        pytest.skip(f"no {MAKE_LISTS}")
    subprocess.run([sys.executable, str(MAKE_LISTS), str(tmp_path), "--only-lt"], check=True, capture_output=True)
    config = validate_config({
        "data": {"dataset": "image_list", "root": str(tmp_path / "images"), "train_list": "../CIFAR10_LT_train.txt",
                 "val_list": "../CIFAR10_LT_val.txt", "test_list": "../CIFAR10_LT_test.txt", "image_size": 32,
                 "workers": 2},
        "model": {"name": "resnet8"}, "stage1": {"epochs": 1, "batch_size": 128, "lr": 0.1},
        "stage2": {"enabled": False}, "trainer": {"eval_batch_size": 512, "num_threads": 2}}, "c")
    data = load_data(config)  # the memory pipeline: 22,586 JPEGs decoded into uint8 tensors
    assert data.train_x.shape == (len(data.train_y), 3, 32, 32)
    assert data.class_counts[0] == 4980 and len(data.val_y) == 200 and len(data.test_y) == 10_000
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config.model_dump()))
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    _metrics_have_classes_and_groups(metrics, 10)
    assert metrics["stage1"]["best"]["test_acc"] > 15  # one epoch of a real long tail beats chance (10 %)
