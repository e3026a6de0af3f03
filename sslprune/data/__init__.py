"""Datasets as uint8 tensors in memory. DATASETS maps a name to a reader(root, **options)."""
from __future__ import annotations

from ..errors import UserError
from .cifar import load_cifar10
from .digits import load_digits
from .imagefolder import load_imagefolder
from .tensors import Dataset, Split

DATASETS = {
    "digits": load_digits,          # embedded in scikit-learn: the demo's data
    "cifar10": load_cifar10,        # official python format, downloaded when absent
    "imagefolder": load_imagefolder,  # folder or .tar.gz: train/<class>/*, test|val/<class>/*
}


def load_dataset(cfg, root=None) -> Dataset:
    """Read the dataset named by a config.Data, apply the per-class subsets."""
    if cfg.dataset not in DATASETS:
        raise UserError(f"unknown dataset '{cfg.dataset}'; choose one of: {', '.join(DATASETS)}")
    ds = DATASETS[cfg.dataset](root, image_size=cfg.image_size, train_per_class=cfg.train_per_class,
                               test_per_class=cfg.test_per_class, stream=cfg.stream)
    if cfg.image_size and ds.train.image_shape[-1] != cfg.image_size:
        raise UserError(f"--image-size {cfg.image_size} is only supported for imagefolder data; "
                        f"{cfg.dataset} images are {ds.train.image_shape[-1]} pixels")
    return Dataset(ds.name, ds.train.first_per_class(cfg.train_per_class),
                   ds.test.first_per_class(cfg.test_per_class), ds.classes)


__all__ = ["DATASETS", "Dataset", "Split", "load_dataset"]
