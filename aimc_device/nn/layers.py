"""Analog versions of torch layers: Linear, Conv1d, Conv2d, LSTM and MultiheadAttention.

Each keeps its weight matrix on an :class:`~aimc_device.nn.tile.AnalogTile` (crossbar tiles with
the periphery of a :class:`~aimc_device.crossbar.CrossbarConfig` and the noise of a
:class:`~aimc_device.pcm.PCMModel`) and its bias in digital floating point. They are ordinary
torch modules: state_dict, ``.to()``, ``no_grad`` inference and DistributedDataParallel work.
Each class has ``from_digital(module, cfg, device, rng)`` that maps a trained floating-point
layer onto the tiles.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..crossbar import CrossbarConfig
from ..crossbar.mvm import analog_conv, conv_channel_split
from ..pcm import PCMModel
from .tile import AnalogTile, require_tensor

__all__ = ["AnalogLinear", "AnalogConv1d", "AnalogConv2d", "AnalogLSTM",
           "AnalogMultiheadAttention", "AnalogLayer"]


class AnalogLayer(nn.Module):
    """Base of the analog layers: iterate their tiles with :meth:`analog_tiles`."""

    def analog_tiles(self):
        return [m for m in self.modules() if isinstance(m, AnalogTile)]


def _spawn(rng, n: int) -> list[np.random.SeedSequence]:
    """n independent seed sequences from a seed, a SeedSequence or None."""
    ss = rng if isinstance(rng, np.random.SeedSequence) else np.random.SeedSequence(rng)
    return ss.spawn(n)


def _bias_param(bias: torch.Tensor | None) -> nn.Parameter | None:
    return None if bias is None else nn.Parameter(bias.detach().clone())


class AnalogLinear(AnalogLayer):
    """y = analog(W x) + b for x (..., in_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 cfg: CrossbarConfig | None = None, device: PCMModel | None = None, rng=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.tile = AnalogTile(in_features, out_features, cfg or CrossbarConfig(), device,
                               rng=rng)
        bound = 1.0 / math.sqrt(in_features)
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound)) if bias \
            else None

    @classmethod
    def from_digital(cls, module: nn.Linear, cfg, device=None, rng=None) -> "AnalogLinear":
        new = cls(module.in_features, module.out_features, module.bias is not None, cfg, device,
                  rng)
        new.tile.set_weight(module.weight.detach())
        new.bias = _bias_param(module.bias)
        return new.to(module.weight.device, module.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        require_tensor(x, type(self).__name__)
        y = self.tile(x)
        return y if self.bias is None else y + self.bias


class _AnalogConvNd(AnalogLayer):
    """Convolution as an analog MVM on unfolded patches (im2col), groups = 1."""

    _dims = 2

    def __init__(self, conv: nn.Module, cfg, device=None, rng=None):
        super().__init__()
        if conv.groups != 1:
            raise ValueError(f"{type(conv).__name__}: groups={conv.groups} is not supported on "
                             "crossbars here; keep this layer digital (convert(..., digital=))")
        if conv.padding_mode != "zeros":
            raise ValueError(f"{type(conv).__name__}: padding_mode={conv.padding_mode!r} is not "
                             "supported; use 'zeros' or keep the layer digital")
        if isinstance(conv.padding, str):
            raise ValueError(f"{type(conv).__name__}: padding={conv.padding!r} is not supported; "
                             "give explicit padding sizes")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        k_numel = math.prod(conv.kernel_size)
        fan_in = conv.in_channels * k_numel
        # Tiles hold whole input channels, so each tile is itself a convolution (analog_conv).
        self.channel_sizes = conv_channel_split(conv.in_channels, k_numel, cfg.max_rows)
        self.tile = AnalogTile(fan_in, conv.out_channels, cfg, device, rng=rng,
                               tile_sizes=[c * k_numel for c in self.channel_sizes])
        self.tile.set_weight(conv.weight.detach().reshape(conv.out_channels, fan_in))
        self.bias = _bias_param(conv.bias)
        # analog_conv serves every mode but per-vector noise/bound management and read asymmetry
        self._conv_path = cfg.noise_management == "none" and cfg.bound_management == "none"

    @classmethod
    def from_digital(cls, module, cfg, device=None, rng=None):
        return cls(module, cfg, device, rng).to(module.weight.device, module.weight.dtype)

    def input_absmax(self, x: torch.Tensor) -> torch.Tensor:
        """abs-max of the inputs each tile sees, (n_tiles,): the max over its channel group."""
        if x.dim() == self._dims + 1:
            x = x.unsqueeze(0)
        return torch.stack([p.abs().amax() for p in torch.split(x.detach(),
                                                                 self.channel_sizes, dim=1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        require_tensor(x, type(self).__name__)
        unbatched = x.dim() == self._dims + 1
        if unbatched:
            x = x.unsqueeze(0)
        tile = self.tile
        ops = tile.operands(x.device, x.dtype) if self._conv_path else None
        if ops is not None and ops["asymmetry"] is None:
            # Every term as a convolution: no patch matrix, and the backward of a convolution.
            y = analog_conv(x, ops["w_tiles"], tile.cfg, ops["alpha"], ops["out_scale"],
                            channel_sizes=self.channel_sizes, kernel_size=self.kernel_size,
                            stride=self.stride, padding=self.padding, dilation=self.dilation,
                            generator=ops["generator"], zeta=ops["zeta"], bias=self.bias)
            return y.squeeze(0) if unbatched else y
        if self._dims == 1:  # treat (B, C, L) as (B, C, 1, L)
            x4 = x.unsqueeze(2)
            ks, st, pd, dl = ((1, self.kernel_size[0]), (1, self.stride[0]),
                              (0, self.padding[0]), (1, self.dilation[0]))
        else:
            x4, ks, st, pd, dl = x, self.kernel_size, self.stride, self.padding, self.dilation
        b, _, h, w = x4.shape
        cols = F.unfold(x4, ks, dilation=dl, padding=pd, stride=st)  # (B, C*k, L)
        h_out = (h + 2 * pd[0] - dl[0] * (ks[0] - 1) - 1) // st[0] + 1
        w_out = (w + 2 * pd[1] - dl[1] * (ks[1] - 1) - 1) // st[1] + 1
        y = self.tile(cols.transpose(1, 2))  # (B, L, out)
        if self.bias is not None:
            y = y + self.bias
        y = y.transpose(1, 2).reshape(b, self.out_channels, h_out, w_out)
        if self._dims == 1:
            y = y.squeeze(2)
        return y.squeeze(0) if unbatched else y


class AnalogConv2d(_AnalogConvNd):
    """Analog nn.Conv2d (groups = 1, zero padding)."""

    _dims = 2


class AnalogConv1d(_AnalogConvNd):
    """Analog nn.Conv1d (groups = 1, zero padding)."""

    _dims = 1


class AnalogLSTM(AnalogLayer):
    """Analog nn.LSTM: per layer and direction one crossbar holds [W_ih, W_hh] (4H x (I + H)).

    The gates i, f, g, o = analog([x_t, h_{t-1}]) + b_ih + b_hh follow torch's gate order, so a
    trained nn.LSTM maps over exactly. Supports num_layers, bias, batch_first, dropout and
    bidirectional; not proj_size.
    """

    def __init__(self, lstm: nn.LSTM, cfg, device=None, rng=None):
        super().__init__()
        if lstm.proj_size:
            raise ValueError("nn.LSTM with proj_size > 0 is not supported; keep it digital")
        self.input_size, self.hidden_size = lstm.input_size, lstm.hidden_size
        self.num_layers, self.batch_first = lstm.num_layers, lstm.batch_first
        self.dropout, self.bidirectional = lstm.dropout, lstm.bidirectional
        self.has_bias = lstm.bias
        dirs = 2 if lstm.bidirectional else 1
        self.cells = nn.ModuleList()
        self.biases = nn.ParameterList()
        seqs = _spawn(rng, self.num_layers * dirs)
        for layer in range(self.num_layers):
            for d in range(dirs):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                w_ih = getattr(lstm, "weight_ih" + sfx).detach()
                w_hh = getattr(lstm, "weight_hh" + sfx).detach()
                w = torch.cat([w_ih, w_hh], dim=1)
                tile = AnalogTile(w.shape[1], w.shape[0], cfg, device,
                                  rng=seqs[layer * dirs + d])
                tile.set_weight(w)
                self.cells.append(tile)
                if lstm.bias:
                    b = getattr(lstm, "bias_ih" + sfx).detach() + getattr(lstm, "bias_hh" + sfx)
                    self.biases.append(nn.Parameter(b.detach().clone()))

    @classmethod
    def from_digital(cls, module, cfg, device=None, rng=None):
        p = next(module.parameters())
        return cls(module, cfg, device, rng).to(p.device, p.dtype)

    def _run_direction(self, k: int, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
                       reverse: bool):
        tile = self.cells[k]
        bias = self.biases[k] if self.has_bias else None
        steps = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
        outs = [None] * x.shape[1]
        for s in steps:
            gates = tile(torch.cat([x[:, s], h], dim=1))
            if bias is not None:
                gates = gates + bias
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs[s] = h
        return torch.stack(outs, dim=1), h, c

    def _run_layers(self, out, h0, c0, dirs):
        hn, cn = [], []
        for layer in range(self.num_layers):
            outs = []
            for d in range(dirs):
                k = layer * dirs + d
                o, h, c = self._run_direction(k, out, h0[k], c0[k], reverse=bool(d))
                outs.append(o)
                hn.append(h)
                cn.append(c)
            out = torch.cat(outs, dim=2) if dirs == 2 else outs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                out = F.dropout(out, self.dropout, training=True)
        return out, hn, cn

    def forward(self, x: torch.Tensor, hx=None):
        require_tensor(x, type(self).__name__)
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0 if self.batch_first else 1)
        if not self.batch_first:
            x = x.transpose(0, 1)
        b = x.shape[0]
        dirs = 2 if self.bidirectional else 1
        if hx is None:
            z = x.new_zeros(self.num_layers * dirs, b, self.hidden_size)
            h0, c0 = z, z
        else:
            h0, c0 = hx
            if unbatched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        with contextlib.ExitStack() as draws:  # one weight-noise draw per call, not per step
            for tile in self.cells:
                draws.enter_context(tile.one_draw())
            out, hn, cn = self._run_layers(x, h0, c0, dirs)
        hn, cn = torch.stack(hn), torch.stack(cn)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
            hn, cn = hn.squeeze(1), cn.squeeze(1)
        return out, (hn, cn)


class AnalogMultiheadAttention(AnalogLayer):
    """Analog nn.MultiheadAttention: q, k, v in-projections on one crossbar (3E x E) and the
    output projection on another; the attention arithmetic (softmax of q k^T) stays digital.

    Accepts the call signature of nn.MultiheadAttention (query, key, value, key_padding_mask,
    need_weights, attn_mask, average_attn_weights, is_causal). Requires kdim = vdim = embed_dim.
    """

    # nn.TransformerEncoderLayer checks these to decide on its fused fast path; with
    # in_proj_bias None it takes the ordinary path, which calls this module.
    in_proj_bias = None
    _qkv_same_embed_dim = True

    def __init__(self, mha: nn.MultiheadAttention, cfg, device=None, rng=None):
        super().__init__()
        if not mha._qkv_same_embed_dim:
            raise ValueError("nn.MultiheadAttention with kdim/vdim != embed_dim is not supported; "
                             "keep it digital")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv or add_zero_attn is not "
                             "supported; keep it digital")
        self.embed_dim, self.num_heads = mha.embed_dim, mha.num_heads
        self.head_dim = mha.head_dim
        self.dropout, self.batch_first = mha.dropout, mha.batch_first
        seqs = _spawn(rng, 2)
        e = self.embed_dim
        self.in_proj = AnalogTile(e, 3 * e, cfg, device, weight=mha.in_proj_weight.detach(),
                                  rng=seqs[0])
        self.in_bias = _bias_param(mha.in_proj_bias)
        self.out_proj = AnalogLinear.from_digital(mha.out_proj, cfg, device, rng=seqs[1])

    @classmethod
    def from_digital(cls, module, cfg, device=None, rng=None):
        p = module.in_proj_weight
        return cls(module, cfg, device, rng).to(p.device, p.dtype)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        for name, t in (("query", query), ("key", key), ("value", value)):
            require_tensor(t, type(self).__name__, name)
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        tgt_len, bsz, e = query.shape
        src_len = key.shape[0]
        w_q, w_k, w_v = self._proj_parts()
        if query is key and key is value:
            qkv = self.in_proj(query)
            if self.in_bias is not None:
                qkv = qkv + self.in_bias
            q, k, v = qkv.chunk(3, dim=-1)
        else:  # cross-attention: the same crossbar, each input through its rows
            b_q, b_k, b_v = (self.in_bias.chunk(3) if self.in_bias is not None
                             else (None, None, None))
            q = w_q(query, b_q)
            k = w_k(key, b_k)
            v = w_v(value, b_v)

        def heads(t, n):
            return t.reshape(n, bsz * self.num_heads, self.head_dim).transpose(0, 1)

        q, k, v = heads(q, tgt_len), heads(k, src_len), heads(v, src_len)
        mask = self._merge_masks(attn_mask, key_padding_mask, bsz, tgt_len, src_len, q.dtype)
        q4 = q.view(bsz, self.num_heads, tgt_len, self.head_dim)
        k4 = k.view(bsz, self.num_heads, src_len, self.head_dim)
        v4 = v.view(bsz, self.num_heads, src_len, self.head_dim)
        drop = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q4 @ k4.transpose(-2, -1)) / math.sqrt(self.head_dim)
            if is_causal and mask is None:
                mask = torch.full((tgt_len, src_len), float("-inf"), device=q.device,
                                  dtype=q.dtype).triu(1)
            if mask is not None:
                scores = scores + mask
            attn = torch.softmax(scores, dim=-1)
            if drop:
                attn = F.dropout(attn, drop)
            out = attn @ v4
        else:
            attn = None
            out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, dropout_p=drop,
                                                 is_causal=is_causal and mask is None)
        out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, e)
        out = self.out_proj(out)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if attn is not None and average_attn_weights:
            attn = attn.mean(dim=1)
        if attn is not None and unbatched:
            attn = attn.squeeze(0)
        return out, attn

    def _proj_parts(self):
        """Row blocks of the in-projection as callables (for cross-attention)."""
        def part(idx):
            def f(x, b):
                y = self.in_proj(x)[..., idx * self.embed_dim:(idx + 1) * self.embed_dim]
                return y if b is None else y + b
            return f
        return part(0), part(1), part(2)

    def _merge_masks(self, attn_mask, key_padding_mask, bsz, tgt_len, src_len, dtype):
        mask = None
        if attn_mask is not None:
            m = attn_mask
            if m.dtype == torch.bool:
                m = torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf"))
            mask = m.view(bsz, self.num_heads, tgt_len, src_len) if m.dim() == 3 else m
        if key_padding_mask is not None:
            kp = key_padding_mask
            if kp.dtype == torch.bool:
                kp = torch.zeros_like(kp, dtype=dtype).masked_fill(kp, float("-inf"))
            kp = kp.view(bsz, 1, 1, src_len)
            mask = kp if mask is None else mask + kp
        return mask
