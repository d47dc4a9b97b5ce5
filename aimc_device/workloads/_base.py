"""The workload base class: data, model, floating-point training recipe and evaluation.

Everything here is plain torch + numpy; no other layer of aimc_device is imported (in the
package's layer order pcm, io, fit, crossbar, nn, study, cli, workloads sits beside nn).

Randomness is passed in as seeds. Model initialisation and training draw from torch's global
generator only inside :func:`torch.random.fork_rng`, so the caller's global state is left as it
was; shuffling uses its own :class:`torch.Generator`. Each epoch's randomness is derived from
``(seed, epoch)`` alone, so a run resumed from the checkpoint of epoch ``k`` gives the same
model as one that was never interrupted. Results are bitwise reproducible for the same seed
and thread count; across thread counts torch's float reductions differ in the last bits.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["Workload", "chance_error", "epoch_seed", "scoped_seed"]


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A 63-bit seed for one epoch (and one purpose), derived from the run's seed.

    Parameters
    ----------
    seed : int
        The run's seed (>= 0).
    epoch : int
        Epoch index, counted from 0.
    stream : int, optional
        Purpose of the draws (0: shuffling, 1: dropout and other in-model noise).

    Returns
    -------
    int
        A seed in ``[0, 2**63)``, the same for the same arguments on any machine.
    """
    ss = np.random.SeedSequence([int(seed), int(epoch), int(stream)])
    return int(ss.generate_state(1, dtype=np.uint64)[0]) & 0x7FFF_FFFF_FFFF_FFFF


def _fork_devices(device: torch.device | None) -> list:
    if device is not None and device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


@contextlib.contextmanager
def scoped_seed(seed: int, device: torch.device | None = None):
    """Seed torch's global generator(s) for the enclosed block only.

    The state from before the block is restored afterwards (:func:`torch.random.fork_rng`),
    so no global seeding is left behind.

    Parameters
    ----------
    seed : int
        Seed for the block.
    device : torch.device, optional
        A CUDA device whose generator is also forked and seeded.
    """
    with torch.random.fork_rng(devices=_fork_devices(device)):
        torch.manual_seed(int(seed))
        yield


def chance_error(labels) -> float:
    """Error of the best constant guess: ``1 - max_k p_k`` over the label distribution.

    This is the error of a classifier that learned nothing but the class frequencies
    (0.9 for 10 balanced classes); it is ``err_chance`` in the normalised accuracy
    ``A* = 1 - (err_t - err_FP) / (err_chance - err_FP)`` (docs/model.md section 9).

    Parameters
    ----------
    labels : array_like of int or Tensor or TensorDataset
        Class labels (for a TensorDataset, its last tensor).

    Returns
    -------
    float
        Chance-level error, a fraction in [0, 1).
    """
    if isinstance(labels, TensorDataset):
        labels = labels.tensors[-1]
    if isinstance(labels, torch.Tensor):
        labels = labels.cpu().numpy()
    labels = np.asarray(labels).ravel()
    if labels.size == 0:
        raise ValueError("chance_error needs at least one label, got an empty array")
    _, counts = np.unique(labels, return_counts=True)
    return float(1.0 - counts.max() / labels.size)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@dataclass
class Workload:
    """A network topology with its data set and floating-point training recipe.

    Subclasses set :attr:`name`, :attr:`digital_layers`, implement :meth:`_make_model` and
    :meth:`_make_data`, and choose the recipe defaults (``epochs``, ``lr``, ...).

    Parameters
    ----------
    epochs : int
        Epochs of the floating-point recipe.
    lr : float
        Peak learning rate (cosine-annealed to 0 over the run, per step).
    batch_size : int
        Training mini-batch size.
    weight_decay : float
        Decoupled weight decay (AdamW) or L2 (SGD).
    optimizer : {"adamw", "sgd"}
        Optimiser of the recipe (SGD with Nesterov momentum 0.9).
    seed : int
        Default seed for data split, model initialisation and training.
    quick : bool
        Marks the quick demonstration settings of ``get_workload(name, quick=True)``.

    Attributes
    ----------
    name : str
        Registry name.
    digital_layers : tuple of str
        Names (as in ``model.named_modules()``) of the layers conventionally kept in floating
        point when the rest is mapped onto analog tiles (usually the first and the last).
    """

    name: ClassVar[str] = "base"
    digital_layers: ClassVar[tuple[str, ...]] = ()
    n_classes: ClassVar[int] = 10

    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    seed: int = 0
    quick: bool = False

    _data_cache: dict = dataclasses.field(default_factory=dict, init=False, repr=False,
                                          compare=False)

    # -- to implement -------------------------------------------------------------------------
    def _make_model(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def _make_data(self, seed: int) -> tuple[TensorDataset, TensorDataset]:  # pragma: no cover
        raise NotImplementedError

    # -- model and data -----------------------------------------------------------------------
    def build_model(self, seed: int | None = None) -> nn.Module:
        """A freshly initialised model, the same for the same seed.

        Parameters
        ----------
        seed : int, optional
            Initialisation seed (default: :attr:`seed`). Torch's global generator is seeded
            only for the duration of the call and restored afterwards.

        Returns
        -------
        torch.nn.Module
            The model, on CPU, in training mode.
        """
        with scoped_seed(self.seed if seed is None else seed):
            return self._make_model()

    def load_data(self, seed: int | None = None) -> tuple[TensorDataset, TensorDataset]:
        """The train and test sets, split and standardised by ``seed``.

        Parameters
        ----------
        seed : int, optional
            Seed of the train/test split (default: :attr:`seed`).

        Returns
        -------
        train, test : TensorDataset
            ``(inputs float32, labels int64)`` each; standardisation statistics come from the
            training split only.
        """
        seed = self.seed if seed is None else int(seed)
        if seed not in self._data_cache:
            self._data_cache[seed] = self._make_data(seed)
        return self._data_cache[seed]

    def loaders(self, seed: int | None = None, batch_size: int | None = None,
                shuffle_seed: int | None = None) -> tuple[DataLoader, DataLoader]:
        """Train and test DataLoaders; the training one shuffles with its own generator.

        Parameters
        ----------
        seed : int, optional
            Data split seed (default: :attr:`seed`).
        batch_size : int, optional
            Mini-batch size (default: :attr:`batch_size`).
        shuffle_seed : int, optional
            Seed of the shuffling generator (default: the data seed).

        Returns
        -------
        train_loader, test_loader : DataLoader
        """
        seed = self.seed if seed is None else int(seed)
        train, test = self.load_data(seed)
        gen = torch.Generator().manual_seed(seed if shuffle_seed is None else int(shuffle_seed))
        bs = batch_size or self.batch_size
        return (DataLoader(train, batch_size=bs, shuffle=True, generator=gen),
                DataLoader(test, batch_size=512, shuffle=False))

    @property
    def chance_error(self) -> float:
        """Chance-level test error (best constant guess) of the default split, a fraction."""
        return chance_error(self.load_data()[1])

    # -- training -----------------------------------------------------------------------------
    def task_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training objective: mean cross-entropy of logits against class labels.

        Parameters
        ----------
        outputs : Tensor, shape (batch, n_classes)
            Logits.
        targets : Tensor of int64, shape (batch,)
            Class labels.

        Returns
        -------
        Tensor
            Scalar loss.
        """
        return nn.functional.cross_entropy(outputs, targets)

    def make_optimizer(self, model: nn.Module, epochs: int | None = None,
                       steps_per_epoch: int | None = None, lr: float | None = None):
        """The recipe's optimiser and its per-step cosine learning-rate schedule.

        Parameters
        ----------
        model : torch.nn.Module
            Model whose parameters are trained.
        epochs : int, optional
            Length of the schedule (default: :attr:`epochs`).
        steps_per_epoch : int, optional
            Mini-batches per epoch (default: from the training set and :attr:`batch_size`).
        lr : float, optional
            Peak learning rate (default: :attr:`lr`).

        Returns
        -------
        optimizer : torch.optim.Optimizer
        scheduler : torch.optim.lr_scheduler.LRScheduler
            Stepped once per mini-batch.
        """
        epochs = self.epochs if epochs is None else int(epochs)
        lr = self.lr if lr is None else float(lr)
        if steps_per_epoch is None:
            n = len(self.load_data()[0])
            steps_per_epoch = -(-n // self.batch_size)
        params = [p for p in model.parameters() if p.requires_grad]
        if self.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=self.weight_decay)
        elif self.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True,
                                  weight_decay=self.weight_decay)
        else:
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=max(1, epochs * steps_per_epoch))
        return opt, sched

    def train_fp(self, model: nn.Module, epochs: int | None = None, seed: int | None = None,
                 progress: bool = True, lr: float | None = None, data_seed: int | None = None,
                 start_epoch: int = 0, optimizer_state: dict | None = None,
                 scheduler_state: dict | None = None,
                 on_epoch_end: Callable | None = None) -> nn.Module:
        """Train ``model`` in floating point with the workload's recipe (in place).

        Parameters
        ----------
        model : torch.nn.Module
            Model from :meth:`build_model` (or one converted from it); trained on the device of
            its parameters.
        epochs : int, optional
            Total epochs (default: :attr:`epochs`); the schedule spans them.
        seed : int, optional
            Training seed: shuffling and dropout of epoch ``e`` come from
            :func:`epoch_seed` ``(seed, e)`` (default: :attr:`seed`).
        progress : bool
            Show a tqdm progress bar over epochs.
        lr : float, optional
            Peak learning rate (default: :attr:`lr`).
        data_seed : int, optional
            Train/test split seed (default: :attr:`seed`).
        start_epoch : int
            First epoch to run, for resuming from a checkpoint taken after epoch
            ``start_epoch - 1``; pass the saved ``optimizer_state`` and ``scheduler_state``.
        optimizer_state, scheduler_state : dict, optional
            ``state_dict()`` of the optimiser and scheduler to resume from.
        on_epoch_end : callable, optional
            ``on_epoch_end(epoch, model, optimizer, scheduler, train_loss)`` after each epoch,
            e.g. to write a checkpoint.

        Returns
        -------
        torch.nn.Module
            The same model, trained, in eval mode.
        """
        from tqdm.auto import tqdm

        epochs = self.epochs if epochs is None else int(epochs)
        seed = self.seed if seed is None else int(seed)
        train, _ = self.load_data(data_seed)
        steps = -(-len(train) // self.batch_size)
        opt, sched = self.make_optimizer(model, epochs, steps, lr)
        if optimizer_state is not None:
            opt.load_state_dict(optimizer_state)
        if scheduler_state is not None:
            sched.load_state_dict(scheduler_state)
        device = _model_device(model)
        bar = tqdm(range(start_epoch, epochs), desc=f"{self.name} FP", disable=not progress,
                   initial=start_epoch, total=epochs, leave=False)
        for epoch in bar:
            loss = self.train_epoch(model, opt, sched, epoch, seed, data_seed, device)
            bar.set_postfix(loss=f"{loss:.4f}")
            if on_epoch_end is not None:
                on_epoch_end(epoch, model, opt, sched, loss)
        bar.close()
        return model.eval()

    def train_epoch(self, model: nn.Module, optimizer, scheduler, epoch: int, seed: int,
                    data_seed: int | None = None, device: torch.device | None = None,
                    loss_fn: Callable | None = None) -> float:
        """One epoch of training; its randomness depends only on ``(seed, epoch)``.

        Parameters
        ----------
        model : torch.nn.Module
            Model to train (in place).
        optimizer : torch.optim.Optimizer
        scheduler : LRScheduler or None
            Stepped after every mini-batch.
        epoch : int
            Epoch index (selects the shuffling and dropout streams).
        seed : int
            Training seed.
        data_seed : int, optional
            Train/test split seed (default: :attr:`seed`).
        device : torch.device, optional
            Where batches go (default: the model's parameters' device).
        loss_fn : callable, optional
            ``loss_fn(outputs, targets)`` (default: :meth:`task_loss`).

        Returns
        -------
        float
            Mean training loss over the epoch.
        """
        device = _model_device(model) if device is None else device
        loss_fn = self.task_loss if loss_fn is None else loss_fn
        train, _ = self.load_data(data_seed)
        gen = torch.Generator().manual_seed(epoch_seed(seed, epoch, 0))
        loader = DataLoader(train, batch_size=self.batch_size, shuffle=True, generator=gen)
        model.train()
        total, count = 0.0, 0
        with scoped_seed(epoch_seed(seed, epoch, 1), device):
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                total += float(loss.detach()) * len(y)
                count += len(y)
        return total / max(count, 1)

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Dataset | DataLoader | None = None,
                 batch_size: int = 512) -> float:
        """Classification error of ``model`` on ``data`` (default: the test set).

        The model runs in eval mode under ``torch.no_grad()``; its previous mode is restored.

        Parameters
        ----------
        model : torch.nn.Module
            Model to evaluate.
        data : Dataset or DataLoader, optional
            Yields ``(inputs, labels)``; default: the test split of :attr:`seed`.
        batch_size : int
            Batch size when ``data`` is a Dataset.

        Returns
        -------
        float
            Test error, a fraction in [0, 1].
        """
        if data is None:
            data = self.load_data()[1]
        loader = data if isinstance(data, DataLoader) else DataLoader(
            data, batch_size=batch_size, shuffle=False)
        device = _model_device(model)
        was_training = model.training
        model.eval()
        wrong, count = 0, 0
        try:
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                wrong += int((model(x).argmax(dim=-1) != y).sum())
                count += len(y)
        finally:
            model.train(was_training)
        if count == 0:
            raise ValueError("evaluate got an empty data set")
        return wrong / count
