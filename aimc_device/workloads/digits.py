"""scikit-learn's handwritten digits (ships with the package; no download), split and shaped.

1797 images of 8x8 pixels (values 0-16), 10 balanced classes. The split is stratified and fixed
by a seed; inputs are standardised with the mean and standard deviation of the training pixels
(one scalar pair, so that images keep their spatial structure).

References
----------
.. [1] E. Alpaydin and C. Kaynak, "Optical Recognition of Handwritten Digits", UCI Machine
   Learning Repository (1998); shipped as ``sklearn.datasets.load_digits``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ._base import Workload

__all__ = ["DigitsWorkload", "load_digits_split", "as_images", "as_rows", "as_patches"]


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.data.astype(np.float32)
    y = d.target.astype(np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def load_digits_split(seed: int = 0, test_fraction: float = 0.25,
                      n_train: int | None = None) -> tuple[np.ndarray, np.ndarray,
                                                           np.ndarray, np.ndarray]:
    """Stratified train/test split of the digits, standardised on the training pixels.

    Parameters
    ----------
    seed : int
        Seed of the split (and of the subsample when ``n_train`` is given).
    test_fraction : float
        Fraction of the 1797 images held out for testing.
    n_train : int, optional
        Keep only this many training images (stratified subsample), e.g. for a quick trial.

    Returns
    -------
    x_train, y_train, x_test, y_test : ndarray
        Inputs ``float32 (n, 64)`` (standardised) and labels ``int64 (n,)``.
    """
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x, y = _raw_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y,
                                              random_state=int(seed))
    if n_train is not None and n_train < len(y_tr):
        x_tr, _, y_tr, _ = train_test_split(x_tr, y_tr, train_size=int(n_train), stratify=y_tr,
                                            random_state=int(seed) + 1)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    x_tr = ((x_tr - mean) / std).astype(np.float32)
    x_te = ((x_te - mean) / std).astype(np.float32)
    return x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64)


def as_images(x: np.ndarray) -> np.ndarray:
    """``(n, 64)`` -> ``(n, 1, 8, 8)`` images (channel first)."""
    return np.ascontiguousarray(x.reshape(-1, 1, 8, 8))


def as_rows(x: np.ndarray, pixels: int = 8) -> np.ndarray:
    """``(n, 64)`` -> ``(n, 64 / pixels, pixels)``: a sequence of pixel runs in raster order.

    Parameters
    ----------
    x : ndarray, shape (n, 64)
        Flattened 8x8 images.
    pixels : int
        Pixels per time step; must divide 64. 8 (default): the 8 rows; 4: 16 half rows;
        1: the 64 pixels one by one.

    Returns
    -------
    ndarray, shape (n, 64 // pixels, pixels)
    """
    if pixels < 1 or 64 % pixels:
        raise ValueError(f"pixels per time step must divide 64, got {pixels}")
    return np.ascontiguousarray(x.reshape(-1, 64 // pixels, pixels))


def as_patches(x: np.ndarray, patch: int = 2) -> np.ndarray:
    """``(n, 64)`` -> ``(n, (8/patch)**2, patch**2)``: non-overlapping patches in raster order.

    Parameters
    ----------
    x : ndarray, shape (n, 64)
        Flattened 8x8 images.
    patch : int
        Patch side in pixels; must divide 8.

    Returns
    -------
    ndarray, shape (n, (8 // patch) ** 2, patch ** 2)
    """
    if 8 % patch:
        raise ValueError(f"patch must divide 8, got {patch}")
    k = 8 // patch
    p = x.reshape(-1, k, patch, k, patch).transpose(0, 1, 3, 2, 4)
    return np.ascontiguousarray(p.reshape(-1, k * k, patch * patch))


def to_datasets(x_tr, y_tr, x_te, y_te, shape) -> tuple[TensorDataset, TensorDataset]:
    """Wrap a split as TensorDatasets after reshaping the inputs with ``shape``."""
    return (TensorDataset(torch.from_numpy(shape(x_tr)), torch.from_numpy(y_tr)),
            TensorDataset(torch.from_numpy(shape(x_te)), torch.from_numpy(y_te)))


@dataclass
class DigitsWorkload(Workload):
    """A workload on the digits; subclasses set :attr:`input_shape` and the model.

    Parameters
    ----------
    n_train : int, optional
        Subsample the training split (stratified), e.g. for a quick trial.
    test_fraction : float
        Held-out fraction of the 1797 images.
    """

    #: Maps flattened images ``(n, 64)`` to the model's input layout.
    input_shape: ClassVar[Callable[[np.ndarray], np.ndarray]] = staticmethod(as_images)

    n_train: int | None = None
    test_fraction: float = 0.25

    def shape_inputs(self, x: np.ndarray) -> np.ndarray:
        """Flattened images ``(n, 64)`` in the model's input layout (default
        :attr:`input_shape`; a subclass whose layout has options overrides this)."""
        return type(self).input_shape(x)

    def _make_data(self, seed):
        split = load_digits_split(seed, self.test_fraction, self.n_train)
        return to_datasets(*split, self.shape_inputs)
