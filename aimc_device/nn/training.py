"""Hardware-aware (HWA) training in an ordinary torch loop (docs/model.md section 8).

The forward pass of an analog model in training mode already injects the hardware noise (see
``tile.py``). What an HWA loop adds after each optimiser step, and what this module provides:

- the weight-noise scale ramped linearly over the first epochs;
- normalised weights clipped to [-1, 1] after every update, optional column-wise remapping once
  per epoch;
- input ranges alpha decayed slightly toward smaller values (they are learned by gradient), and
  initialised from the average abs-max input of a few batches, capped at 10;
- optional distillation from the floating-point model (temperature 10, 0.75 distillation +
  0.25 task loss).

Two choices that the paper leaves open are made here, each measured on the deep plain CNN of
:mod:`aimc_device.workloads.deepcnn` (see ``benchmarks/hwa_ablation.py``):

- BatchNorm stays a digital layer after its analog convolution and runs with its running
  statistics during HWA training (:func:`train_mode`), as it does after programming; its affine
  parameters still learn. With batch statistics, each mini-batch re-normalises away the shift
  and scale that the weight noise of that batch causes, so the network never learns to live
  with them, and it meets them at inference, where the statistics are fixed. Folding it into
  the analog weights would map the same conductances (the column-wise output scale absorbs a
  per-channel factor) and lose nothing else, so it is not done; recalibrating its statistics
  after programming would need data and a pass on every programmed chip, and is not needed.
- The output scales (column-wise gamma, per-tile kappa) learn 10x slower than the weights
  (:func:`hwa_param_groups`): they are products of the column's largest |w|, so a step of the
  weights' size moves every weight of a column at once, by a fraction that grows as gamma
  shrinks; with BatchNorm in running-statistics mode that makes a 16-layer network diverge.

Use :class:`AnalogOptimizer` around any torch optimiser built on :func:`hwa_param_groups`, with
the model in :func:`train_mode`, or :func:`train_hwa` for one call.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .._checks import check_bool, check_float, check_instance, check_int, check_reiterable
from .convert import analog_tiles, set_noise_scale
from .tile import AnalogTile

__all__ = ["HWAConfig", "AnalogOptimizer", "init_input_ranges", "distillation_loss",
           "hwa_loss", "hwa_param_groups", "train_mode", "train_hwa", "BATCHNORM_CHOICES"]

#: How BatchNorm layers run during HWA training: with their running statistics (as after
#: programming; the affine parameters still learn) or with the statistics of each mini-batch.
BATCHNORM_CHOICES = ("frozen", "batch")


@dataclass(frozen=True)
class HWAConfig:
    """Settings of hardware-aware training (docs/model.md section 8; Rasch et al. 2023, Methods).

    Attributes
    ----------
    noise_scale : float
        Final scale of the device weight noise, dimensionless (1 = the device model's noise).
    ramp_epochs : float
        Epochs over which the noise scale rises linearly from 0 (0: full noise at once).
    training_noise_time : float
        Read-noise time of the training noise [s]; 20 s in the paper.
    alpha_decay : float
        Relative decay of each input range per step toward smaller ranges, dimensionless.
    alpha_min : float
        Smallest input range, in the layer's input units.
    clip_weights : bool
        Clip w~ to [-1, 1] after every step.
    remap_every_epoch : bool
        Column-wise remapping of w~ once per epoch.
    init_batches : int
        Batches used to initialise the input ranges (0: keep them).
    input_range_cap : float
        Cap of the initial input range, in the layer's input units; 10 in the paper.
    distill_temperature : float
        Temperature of the distillation softmax; 10 in the paper.
    distill_weight : float
        Weight of the distillation loss (the task loss gets 1 - weight); 0.75 in the paper.
    batchnorm : {"frozen", "batch"}
        BatchNorm during HWA training (:func:`train_mode`): "frozen" uses the running statistics
        (inference behaviour; affine parameters still learn), "batch" torch's training mode.
    out_scale_lr : float
        Learning rate of the output scales (gamma, kappa) relative to the weights', dimensionless
        (:func:`hwa_param_groups`); 0 keeps them at their mapped values.
    input_range_lr : float
        Learning rate of the input ranges alpha relative to the weights', dimensionless; 0
        keeps them at their initial values (and ``alpha_decay`` alone moves them).
    """

    noise_scale: float = 1.0
    ramp_epochs: float = 1.0
    training_noise_time: float = 20.0
    alpha_decay: float = 1e-4
    alpha_min: float = 1e-3
    clip_weights: bool = True
    remap_every_epoch: bool = False
    init_batches: int = 10
    input_range_cap: float = 10.0
    distill_temperature: float = 10.0
    distill_weight: float = 0.75
    batchnorm: str = "frozen"
    out_scale_lr: float = 0.1
    input_range_lr: float = 1.0

    def __post_init__(self):
        if self.batchnorm not in BATCHNORM_CHOICES:
            raise ValueError(f"HWAConfig.batchnorm = {self.batchnorm!r}: choose one of "
                             f"{BATCHNORM_CHOICES}")
        ranges = {  # name: keyword arguments of check_float
            "noise_scale": dict(lo=0.0), "ramp_epochs": dict(lo=0.0),
            "training_noise_time": dict(lo=0.0), "alpha_decay": dict(lo=0.0, hi=1.0, hi_open=True),
            "alpha_min": dict(lo=0.0, lo_open=True), "input_range_cap": dict(lo=0.0, lo_open=True),
            "distill_temperature": dict(lo=0.0, lo_open=True),
            "distill_weight": dict(lo=0.0, hi=1.0), "out_scale_lr": dict(lo=0.0),
            "input_range_lr": dict(lo=0.0)}
        for name, kw in ranges.items():
            check_float(getattr(self, name), f"HWAConfig.{name}", **kw)
        for name in ("clip_weights", "remap_every_epoch"):
            check_bool(getattr(self, name), f"HWAConfig.{name}")
        check_int(self.init_batches, "HWAConfig.init_batches", lo=0)


class AnalogOptimizer:
    """Wraps a torch optimiser with the HWA steps that follow each update.

    ``step()`` runs the wrapped optimiser, then clips the normalised weights, decays the input
    ranges and advances the noise ramp; ``epoch_end()`` remaps if configured. Everything else
    (``zero_grad``, ``param_groups``, ``state_dict``) is the wrapped optimiser's.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
    model : nn.Module, the analog model being trained
    hwa : HWAConfig
    steps_per_epoch : int, for the noise ramp (ramp in steps = ramp_epochs * steps_per_epoch)
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module,
                 hwa: HWAConfig | None = None, steps_per_epoch: int = 1):
        self.optimizer = optimizer
        self.model = model
        self.hwa = hwa or HWAConfig()
        self.steps_per_epoch = max(int(steps_per_epoch), 1)
        self.steps = 0
        self.tiles = analog_tiles(model)
        for tile in self.tiles:
            tile.training_noise_time = self.hwa.training_noise_time
        self._apply_ramp()

    def __getattr__(self, name):
        return getattr(self.optimizer, name)

    @property
    def current_noise_scale(self) -> float:
        ramp = self.hwa.ramp_epochs * self.steps_per_epoch
        frac = 1.0 if ramp == 0 else min(1.0, self.steps / ramp)
        return self.hwa.noise_scale * frac

    def _apply_ramp(self) -> None:
        set_noise_scale(self.model, self.current_noise_scale)

    def step(self, closure: Callable | None = None):
        loss = self.optimizer.step(closure)
        self.post_step()
        return loss

    @torch.no_grad()
    def post_step(self) -> None:
        """The HWA updates after one optimiser step."""
        for tile in self.tiles:
            if self.hwa.clip_weights:
                tile.clip_weights()
            if self.hwa.alpha_decay:
                tile.alpha.mul_(1.0 - self.hwa.alpha_decay)
            tile.alpha.clamp_(min=self.hwa.alpha_min)
        self.steps += 1
        self._apply_ramp()

    @torch.no_grad()
    def epoch_end(self) -> None:
        if self.hwa.remap_every_epoch:
            for tile in self.tiles:
                tile.remap()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "steps": self.steps,
                "hwa": asdict(self.hwa)}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])
        self._apply_ramp()


@torch.no_grad()
def init_input_ranges(model: nn.Module, batches, cap: float = 10.0,
                      forward: Callable | None = None) -> None:
    """Set every analog tile's input range alpha to the mean abs-max of its inputs, capped.

    Parameters
    ----------
    model : nn.Module, analog model
    batches : iterable of model inputs (or (input, target) pairs: the first element is used)
    cap : float, largest initial range, in the layer's input units (10 in the paper)
    forward : callable(model, batch), optional; default ``model(batch)``
    """
    tiles = analog_tiles(model)
    sums: dict[AnalogTile, torch.Tensor] = {}
    counts: dict[AnalogTile, int] = {}

    # Observe the inputs where the tile's input vectors are formed: at the tile itself, or at
    # the outermost convolution that holds it, whose tiles see the channel groups of its input
    # image (of each group's part of it in a grouped convolution).
    observed_by = {}
    for m in model.modules():  # outer modules come first
        if hasattr(m, "tile_input_absmax"):
            for t in m.analog_tiles():
                observed_by.setdefault(t, m)
        elif isinstance(m, AnalogTile):
            observed_by.setdefault(m, m)

    def hook(module, args):
        found = module.tile_input_absmax(args[0]) if hasattr(module, "tile_input_absmax") \
            else [(module, module.input_absmax(args[0]))]
        for tile, m in found:
            sums[tile] = sums.get(tile, 0) + m.cpu()
            counts[tile] = counts.get(tile, 0) + 1

    handles = [obs.register_forward_pre_hook(hook) for obs in set(observed_by.values())]
    was_training = model.training
    model.eval()
    saved = [t._array for t in tiles]
    for t in tiles:  # measure with the clean weights, not a programmed state
        t._array = None
    try:
        for batch in batches:
            inp = batch[0] if isinstance(batch, (tuple, list)) else batch
            (forward or (lambda m, b: m(b)))(model, inp)
    finally:
        for h in handles:
            h.remove()
        for t, a in zip(tiles, saved):
            t._array = a
        model.train(was_training)
    for tile in tiles:
        if tile in sums:
            alpha = (sums[tile] / counts[tile]).clamp(min=1e-3, max=cap)
            tile.alpha.copy_(alpha.to(tile.alpha.device, tile.alpha.dtype))


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def train_mode(model: nn.Module, hwa: HWAConfig | None = None) -> nn.Module:
    """Put ``model`` in training mode for HWA training: ``model.train()``, with its BatchNorm
    layers in eval mode when ``hwa.batchnorm == "frozen"`` (see the module docstring).

    Call it where an ordinary loop calls ``model.train()``. Returns ``model``.
    """
    hwa = hwa or HWAConfig()
    model.train()
    if hwa.batchnorm == "frozen":
        for m in model.modules():
            if isinstance(m, _BATCHNORMS):
                m.eval()
    return model


def hwa_param_groups(model: nn.Module, lr: float, hwa: HWAConfig | None = None) -> list[dict]:
    """Parameter groups for a torch optimiser of HWA training, with their learning rates.

    The analog tiles' output scales (gamma, kappa) get ``lr * hwa.out_scale_lr``, their input
    ranges (alpha) ``lr * hwa.input_range_lr``, every other trainable parameter (normalised
    weights, biases, digital layers) ``lr``. A group whose rate is 0 is left out, so that its
    parameters keep their values.

    Parameters
    ----------
    model : nn.Module, analog model
    lr : float, learning rate of the weights
    hwa : HWAConfig

    Returns
    -------
    list of dict, for ``torch.optim.SGD(groups, lr=lr, ...)`` or any other optimiser.
    """
    hwa = hwa or HWAConfig()
    tiles = analog_tiles(model)
    scales = [p for t in tiles for p in (t.gamma, t.kappa) if p.requires_grad]
    ranges = [t.alpha for t in tiles if t.alpha.requires_grad]
    special = {id(p) for p in scales + ranges}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in special]
    groups = [dict(params=rest, lr=float(lr), name="weights"),
              dict(params=scales, lr=float(lr) * hwa.out_scale_lr, name="output scales"),
              dict(params=ranges, lr=float(lr) * hwa.input_range_lr, name="input ranges")]
    return [g for g in groups if g["params"] and g["lr"] > 0]


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      targets: torch.Tensor, task_loss: Callable = F.cross_entropy,
                      temperature: float = 10.0, weight: float = 0.75) -> torch.Tensor:
    """weight * T^2 KL(softmax(teacher/T) || softmax(student/T)) + (1 - weight) * task loss."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=-1),
                  F.log_softmax(teacher_logits.detach() / t, dim=-1),
                  reduction="batchmean", log_target=True) * (t * t)
    return weight * kl + (1.0 - weight) * task_loss(student_logits, targets)


def hwa_loss(outputs: torch.Tensor, x, targets: torch.Tensor, loss_fn: Callable = F.cross_entropy,
             teacher: nn.Module | None = None, hwa: HWAConfig | None = None) -> torch.Tensor:
    """The loss of one HWA batch: the task loss or distillation from ``teacher`` (docs/model.md 8)."""
    if teacher is None:
        return loss_fn(outputs, targets)
    hwa = hwa or HWAConfig()
    with torch.no_grad():
        t_out = teacher(x)
    return distillation_loss(outputs, t_out, targets, loss_fn, hwa.distill_temperature,
                             hwa.distill_weight)


def train_hwa(model: nn.Module, loader, epochs: int = 1, lr: float = 0.01,
              optimizer: torch.optim.Optimizer | None = None,
              loss_fn: Callable = F.cross_entropy, teacher: nn.Module | None = None,
              hwa: HWAConfig | None = None, progress: bool = True,
              on_epoch_end: Callable | None = None) -> list[float]:
    """Hardware-aware fine-tuning in one call (SGD with momentum on :func:`hwa_param_groups`
    unless an optimiser is given; the model in :func:`train_mode` during each epoch).

    Parameters
    ----------
    model : nn.Module, analog model from :func:`aimc_device.nn.convert`
    loader : iterable of (inputs, targets) batches
    epochs : int
    lr : float, learning rate of the default SGD optimiser
    optimizer : torch optimiser over ``model.parameters()``, optional
    loss_fn : callable(outputs, targets) -> loss
    teacher : nn.Module, optional floating-point model for distillation
    hwa : HWAConfig
    progress : bool, show a tqdm bar
    on_epoch_end : callable(epoch, model), optional (e.g. checkpointing)

    Returns
    -------
    list of float, mean training loss per epoch.
    """
    check_instance(model, "model", nn.Module, "a torch.nn.Module (an analog model)")
    check_reiterable(loader, "loader", "train_hwa reads it once per epoch")
    epochs = check_int(epochs, "epochs", lo=1)
    if optimizer is None:
        check_float(lr, "lr", lo=0.0, lo_open=True)
    check_instance(hwa, "hwa", HWAConfig, "an HWAConfig", allow_none=True)
    check_instance(teacher, "teacher", nn.Module, "a torch.nn.Module", allow_none=True)
    hwa = hwa or HWAConfig()
    if hwa.init_batches:
        batches = []
        for i, b in enumerate(loader):
            if i >= hwa.init_batches:
                break
            batches.append(b)
        init_input_ranges(model, batches, cap=hwa.input_range_cap)
    opt = optimizer or torch.optim.SGD(hwa_param_groups(model, lr, hwa), lr=lr, momentum=0.9)
    aopt = AnalogOptimizer(opt, model, hwa, steps_per_epoch=len(loader))
    if teacher is not None:
        teacher = copy.deepcopy(teacher).eval()
    history = []
    for epoch in range(epochs):
        train_mode(model, hwa)
        total, n = 0.0, 0
        bar = tqdm(loader, desc=f"HWA epoch {epoch + 1}/{epochs}", disable=not progress,
                   leave=False)
        for x, y in bar:
            aopt.zero_grad()
            loss = hwa_loss(model(x), x, y, loss_fn, teacher, hwa)
            loss.backward()
            aopt.step()
            total += loss.item() * len(y)
            n += len(y)
            bar.set_postfix(loss=total / max(n, 1), noise=aopt.current_noise_scale)
        aopt.epoch_end()
        history.append(total / max(n, 1))
        if on_epoch_end is not None:
            on_epoch_end(epoch, model)
    return history
