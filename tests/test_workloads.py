"""Tests of aimc_device.workloads: data, determinism, quick training beats chance."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from aimc_device.cli._types import WORKLOAD_NAMES
from aimc_device.workloads import (QUICK, WORKLOADS, Workload, chance_error, epoch_seed,
                                   get_workload)
from aimc_device.workloads.digits import as_patches, as_rows, load_digits_split

from _quick_models import quick_fp

NAMES = ["cnn", "deepcnn", "lstm", "transformer"]
SHAPES = {"cnn": (1, 8, 8), "deepcnn": (1, 8, 8), "lstm": (8, 8), "transformer": (16, 4)}


def test_registry():
    assert set(NAMES) <= set(WORKLOADS)
    assert set(WORKLOAD_NAMES) == set(WORKLOADS)  # every workload is a --workload choice
    for name in NAMES:
        wl = get_workload(name)
        assert isinstance(wl, Workload) and wl.name == name and not wl.quick
        quick = get_workload(name, quick=True)
        assert type(quick) is type(wl) and quick.quick
        # the quick settings replace exactly their fields; the rest is the full recipe
        for field in wl.__dataclass_fields__:
            if field in QUICK[name]:
                assert getattr(quick, field) == QUICK[name][field] != getattr(wl, field)
            elif field not in ("quick", "_data_cache"):
                assert getattr(quick, field) == getattr(wl, field), (name, field)
        assert QUICK[name]["epochs"] < wl.epochs
    assert get_workload("cnn", quick=True, epochs=2).epochs == 2
    with pytest.raises(ValueError, match="unknown workload"):
        get_workload("mlp")


@pytest.mark.parametrize("name", NAMES)
def test_data_shapes_and_determinism(name):
    wl = get_workload(name)
    train, test = wl.load_data(seed=3)
    x, y = train.tensors
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape[1:] == SHAPES[name]
    assert len(train) + len(test) == 1797
    assert len(test) == pytest.approx(0.25 * 1797, abs=1)
    assert set(y.tolist()) == set(range(10))
    # standardised on the training split
    assert abs(float(x.mean())) < 1e-4 and float(x.std()) == pytest.approx(1.0, abs=1e-3)
    # same seed, same data (also from a fresh workload object); other seed, other split
    train2, test2 = get_workload(name).load_data(seed=3)
    assert torch.equal(train2.tensors[0], x) and torch.equal(test2.tensors[1], test.tensors[1])
    train3, _ = get_workload(name).load_data(seed=4)
    assert not torch.equal(train3.tensors[1], y)


def test_layouts_are_views_of_the_same_images():
    x_tr = load_digits_split(0)[0]
    img = x_tr.reshape(-1, 8, 8)
    assert np.array_equal(as_rows(x_tr)[:, 2], img[:, 2])
    p = as_patches(x_tr)
    assert np.array_equal(p[:, 0], img[:, :2, :2].reshape(-1, 4))
    assert np.array_equal(p[:, 5], img[:, 2:4, 2:4].reshape(-1, 4))   # row 1, column 1
    with pytest.raises(ValueError):
        as_patches(x_tr, patch=3)
    # shorter pixel runs: the same pixels in raster order, over more time steps
    seq = as_rows(x_tr, 4)
    assert seq.shape[1:] == (16, 4)
    assert np.array_equal(seq[:, 5], img[:, 2, 4:]) and np.array_equal(as_rows(x_tr, 8), img)
    assert np.array_equal(as_rows(x_tr, 1)[:, 19, 0], img[:, 2, 3])
    with pytest.raises(ValueError, match="divide 64"):
        as_rows(x_tr, 3)


@pytest.mark.parametrize("name, kw, shape, train", [
    ("lstm", dict(pixels_per_step=4), (16, 4), True),
    ("lstm", dict(pixels_per_step=1), (64, 1), False),
    ("transformer", dict(patch=1), (64, 1), False),
    ("transformer", dict(patch=4), (4, 16), True)])
def test_sequence_layouts(name, kw, shape, train):
    """The sequence layout options reshape the data (the same pixels) and the model reads it;
    a few batches of training lower the loss; the defaults stay those of the published tables."""
    wl = get_workload(name, quick=True, epochs=2, n_train=32, batch_size=32, **kw)
    x = wl.load_data()[0].tensors[0]
    assert x.shape[1:] == shape
    default = get_workload(name, n_train=32).load_data()[0].tensors[0]
    assert default.shape[1:] == SHAPES[name]
    assert torch.equal(x.reshape(len(x), -1).sort(dim=1).values,      # the same pixels
                       default.reshape(len(x), -1).sort(dim=1).values)
    model = wl.build_model(seed=0)
    with torch.no_grad():
        assert model.eval()(x[:3]).shape == (3, 10)
    if train:
        losses = []
        wl.train_fp(model, seed=0, progress=False,
                    on_epoch_end=lambda e, m, o, s, loss: losses.append(loss))
        assert losses[1] < losses[0]


def test_n_train_subsample():
    wl = get_workload("lstm", n_train=200)
    train, test = wl.load_data(0)
    assert len(train) == 200 and len(test) == pytest.approx(450, abs=1)


def test_chance_error():
    assert chance_error([0, 1, 2, 3]) == pytest.approx(0.75)
    assert chance_error(np.array([1, 1, 1, 0])) == pytest.approx(0.25)
    assert chance_error(torch.arange(10).repeat(5)) == pytest.approx(0.9)
    with pytest.raises(ValueError):
        chance_error([])
    wl = get_workload("cnn")
    labels = wl.load_data()[1].tensors[1].numpy()
    expected = 1 - np.bincount(labels).max() / labels.size
    assert wl.chance_error == pytest.approx(expected)
    assert 0.88 < wl.chance_error < 0.91


@pytest.mark.parametrize("name", NAMES)
def test_build_model_deterministic_and_leaves_global_rng(name):
    wl = get_workload(name, quick=True)
    state = torch.get_rng_state()
    a, b, c = wl.build_model(seed=1), wl.build_model(seed=1), wl.build_model(seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    # the conventionally digital layers exist and are standard modules
    names = dict(a.named_modules())
    for layer in wl.digital_layers:
        assert isinstance(names[layer], (nn.Linear, nn.Conv2d)), layer
    # the classifier is a separate nn.Linear with one output per class
    assert isinstance(a.fc, nn.Linear) and a.fc.out_features == 10


def test_model_structure():
    cnn = get_workload("cnn").build_model()
    assert sum(isinstance(m, nn.Conv2d) for m in cnn.modules()) >= 7
    assert isinstance(get_workload("lstm").build_model().lstm, nn.LSTM)
    tr = get_workload("transformer").build_model()
    layers = [m for m in tr.modules() if isinstance(m, nn.TransformerEncoderLayer)]
    assert len(layers) == 2 and all(m.self_attn.batch_first for m in layers)
    # odd head count keeps torch's fused inference path (which bypasses submodules) off
    assert all(m.self_attn.num_heads % 2 == 1 for m in layers)


def test_deepcnn_structure():
    """depth plain 3x3 convolutions of width channels at 8x8 (no shortcut), each with
    BatchNorm and ReLU, global pooling, one linear layer; the digital layers are the first
    convolution and the classifier."""
    wl = get_workload("deepcnn", depth=5, width=12)
    model = wl.build_model()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 5 and all(c.kernel_size == (3, 3) and c.stride == (1, 1) for c in convs)
    assert [c.in_channels for c in convs] == [1, 12, 12, 12, 12]
    assert all(c.out_channels == 12 for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 5
    assert [type(m) for m in model.features[:3]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    names = dict(model.named_modules())
    assert names[wl.digital_layers[0]] is convs[0] and names[wl.digital_layers[1]] is model.fc
    x = torch.randn(3, 1, 8, 8)
    feats = model.features.eval()(x)
    assert feats.shape == (3, 12, 8, 8)                     # full resolution to the end
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), model.fc(feats.mean(dim=(2, 3))), atol=1e-6)
    with pytest.raises(ValueError, match="depth"):
        get_workload("deepcnn", depth=0).build_model()


def test_transformer_eval_calls_submodules():
    """A converter swaps linear1/linear2; in eval mode the swap must take effect."""
    wl = get_workload("transformer", quick=True)
    model = wl.build_model().eval()
    x = wl.load_data()[1].tensors[0][:8]
    calls = []
    model.encoder.layers[0].linear1.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model(x)
    assert calls


@pytest.mark.parametrize("name", NAMES)
def test_train_fp_returns_the_model_trained_without_global_seeding(name):
    small = {"depth": 4, "width": 8} if name == "deepcnn" else {}
    wl = get_workload(name, quick=True, epochs=2, n_train=192, **small)  # 3 batches per epoch
    model = wl.build_model(seed=0)
    state = torch.get_rng_state()
    losses = []
    out = wl.train_fp(model, seed=0, progress=False,
                      on_epoch_end=lambda e, m, o, s, loss: losses.append((e, m, loss)))
    assert out is model and not model.training
    assert torch.equal(torch.get_rng_state(), state)          # no global seeding left behind
    assert [e for e, _, _ in losses] == [0, 1] and all(m is model for _, m, _ in losses)
    assert losses[1][2] < losses[0][2]


def test_small_deep_cnn_training_beats_chance():
    # The deep CNN's quick mode (16 layers) is the demonstration's, too slow for the tests: the
    # same network at depth 4 and width 8, trained 3 epochs, must already learn.
    wl = get_workload("deepcnn", quick=True, depth=4, width=8, epochs=3)
    model = wl.train_fp(wl.build_model(seed=0), seed=0, progress=False)
    err = wl.evaluate(model)
    assert err < 0.5 * wl.chance_error and err < 0.5 * wl.evaluate(wl.build_model(seed=0))


@pytest.mark.parametrize("name", [n for n in NAMES if n != "deepcnn"])
def test_quick_training_beats_chance(name):
    run = quick_fp(name)  # the quick settings' training, once per session (shared)
    wl, model = run["workload"], run["model"]
    err = wl.evaluate(model)
    assert err < 0.5 * wl.chance_error and err < 0.5 * wl.evaluate(wl.build_model(seed=0))
    # evaluate counts the misclassified test samples, deterministically, and restores the mode
    x, y = wl.load_data()[1].tensors
    with torch.no_grad():
        logits = model(x)
    assert err == float((logits.argmax(dim=1) != y).sum()) / len(y)
    try:
        model.train()
        assert wl.evaluate(model) == err and model.training
    finally:
        model.eval()
    _, test_loader = wl.loaders()
    assert wl.evaluate(model, test_loader) == err
    # the task loss is the mean cross-entropy of the logits
    loss = wl.task_loss(logits[:4], y[:4])
    torch.testing.assert_close(loss, -torch.log_softmax(logits[:4], 1)[range(4), y[:4]].mean())


def _train(wl, seed, **kw):
    model = wl.build_model(seed=0)
    wl.train_fp(model, seed=seed, progress=False, **kw)
    return model


def test_training_deterministic_and_resumable():
    # the transformer has dropout; 192 training images (3 batches per epoch) suffice here
    wl = get_workload("transformer", quick=True, epochs=3, n_train=192)
    ckpt = {}

    def save(epoch, model, opt, sched, loss):  # a checkpoint after epoch 1
        if epoch == 1:
            # deep copies: state_dict() holds live references that later steps update
            ckpt.update(copy.deepcopy(dict(model=model.state_dict(), opt=opt.state_dict(),
                                           sched=sched.state_dict())))
    a, b, c = _train(wl, 7), _train(wl, 7, on_epoch_end=save), _train(wl, 8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    # resume from the checkpoint of epoch 1: the same model as the uninterrupted run
    resumed = wl.build_model(seed=5)
    resumed.load_state_dict(ckpt["model"])
    wl.train_fp(resumed, seed=7, progress=False, start_epoch=2,
                optimizer_state=ckpt["opt"], scheduler_state=ckpt["sched"])
    sr = resumed.state_dict()
    assert all(torch.equal(sa[k], sr[k]) for k in sa)


def test_epoch_seed():
    assert epoch_seed(0, 1) == epoch_seed(0, 1)
    assert len({epoch_seed(0, 1), epoch_seed(0, 2), epoch_seed(1, 1), epoch_seed(0, 1, 1)}) == 4
    assert 0 <= epoch_seed(2**40, 10**6) < 2**63


def test_sgd_and_bad_optimizer():
    wl = get_workload("cnn", quick=True)
    opt, sched = wl.make_optimizer(wl.build_model())
    assert isinstance(opt, torch.optim.SGD)
    with pytest.raises(ValueError, match="optimizer"):
        get_workload("cnn", optimizer="rmsprop").make_optimizer(wl.build_model())
