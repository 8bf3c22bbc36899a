"""Tests of ltsearch.catalog: the names a config is validated against are those of the parts' registries."""
from __future__ import annotations

from ltsearch import catalog, data, images, losses, models


def test_the_catalog_names_what_the_registries_hold():
    assert tuple(models.MODELS) == catalog.MODEL_NAMES
    assert tuple(losses.LOSSES) == catalog.LOSS_NAMES
    assert set(catalog.REWEIGHTABLE) <= set(catalog.LOSS_NAMES)
    assert tuple(data.SAMPLERS) == catalog.SAMPLER_NAMES
    assert tuple(data.DATASETS) == catalog.CIFAR_DATASETS == tuple(catalog.MEAN) == tuple(catalog.STD)
    assert set(catalog.LIST_DATASETS) < set(catalog.IMAGE_DATASETS)


def test_the_parts_hand_out_the_catalog_objects_themselves():
    assert data.DataError is catalog.DataError and images.DataError is catalog.DataError
    assert images.IMAGE_DATASETS is catalog.IMAGE_DATASETS and losses.REWEIGHTABLE is catalog.REWEIGHTABLE
    assert data.normalization is catalog.normalization
