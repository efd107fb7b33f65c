"""Multi-tenant baselines for the decode comparison, as forward hooks on an unmodified
Hugging Face model (docs/spec.md §5):

* :class:`BGMVLoRA` — unmerged LoRA served per row, as BGMV / punica kernels do: each row
  gathers its adapter's ``A[ids] [B, d, r]`` and ``B[ids] [B, r, n]`` and adds
  ``(x @ A_row) @ B_row`` to the projection's output (``torch.bmm`` / ``baddbmm``).
* :class:`IA3` — (IA)³-style per-tenant static vectors: each row's output of k, v and the
  FFN's up projection is multiplied by its tenant's vector (gathered per row).

Both keep a bank of ``A`` tenants plus one all-neutral slot, so id ``-1`` (no adapter)
gives the bare model's output. Rows are routed with ``with baseline.rows(ids): ...``.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of a LLaMA-style Hugging Face causal LM (``model.model.layers``)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.layers ModuleList")
    return layers


class _RowHooks:
    """Forward hooks on named modules of every decoder layer, routed per row by ``ids``."""

    modules: tuple = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = decoder_layers(model)
        self.device = next(model.parameters()).device
        self._ids: torch.Tensor | None = None
        self._handles: list = []

    def _slot(self, ids) -> torch.Tensor:
        """Tenant ids [B] (-1: none) -> bank slots (the neutral slot is the last)."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return torch.where(ids < 0, torch.full_like(ids, self.num_tenants), ids)

    def attach(self) -> "_RowHooks":
        """Register the hooks (once); until rows are routed every row is bare (id -1)."""
        if not self._handles:
            for i, layer in enumerate(self.layers):
                for path in self.modules:
                    module = layer.get_submodule(path)
                    self._handles.append(module.register_forward_hook(self._hook(i, path)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @contextmanager
    def rows(self, ids):
        """Route row b to tenant ``ids[b]`` (-1: bare) inside the block; the hooks are attached
        for the block unless :meth:`attach` holds them already."""
        attached_here = not self._handles
        previous = self._ids
        slots = self._slot(ids)
        if previous is None or not torch.equal(previous, slots):
            self._set_rows(slots)
        if attached_here:
            self.attach()
        try:
            yield self
        finally:
            if attached_here:
                self.detach()
            if previous is not None and not torch.equal(previous, slots):
                self._set_rows(previous)

    def _set_rows(self, slots: torch.Tensor) -> None:
        self._ids = slots


class BGMVLoRA(_RowHooks):
    """Per-row LoRA on ``q_proj`` and ``v_proj``. Banks: ``A[path] [T+1, L, d, r]`` and
    ``B[path] [T+1, L, r, n]`` with the LoRA scaling (alpha / r) folded into B; slot T is zero."""

    modules = ("self_attn.q_proj", "self_attn.v_proj")

    def __init__(self, model: nn.Module, A: dict, B: dict):
        super().__init__(model)
        self.num_tenants = next(iter(A.values())).shape[0]
        self.A = {p: torch.cat([a, a.new_zeros(1, *a.shape[1:])]) for p, a in A.items()}
        self.B = {p: torch.cat([b, b.new_zeros(1, *b.shape[1:])]) for p, b in B.items()}

    @classmethod
    def from_peft(cls, model: nn.Module, peft_model: nn.Module, adapter_names: list[str]) -> "BGMVLoRA":
        """The same weights as a PEFT LoRA model's adapters (lora_A [r, d], lora_B [n, r])."""
        layers = decoder_layers(peft_model.get_base_model())
        A, B = {}, {}
        for path in cls.modules:
            a_rows, b_rows = [], []
            for name in adapter_names:
                a_l, b_l = [], []
                for layer in layers:
                    lin = layer.get_submodule(path)
                    a_l.append(lin.lora_A[name].weight.detach().T)  # [d, r]
                    b_l.append(lin.lora_B[name].weight.detach().T * lin.scaling[name])  # [r, n]
                a_rows.append(torch.stack(a_l))
                b_rows.append(torch.stack(b_l))
            A[path], B[path] = torch.stack(a_rows).contiguous(), torch.stack(b_rows).contiguous()
        # PEFT may keep adapter weights in fp32 under a 16-bit base model; serve them in the
        # base model's dtype, as a BGMV kernel would
        dtype = next(model.parameters()).dtype
        return cls(model, {p: a.to(dtype) for p, a in A.items()}, {p: b.to(dtype) for p, b in B.items()})

    @classmethod
    def random(cls, model: nn.Module, tenants: int, rank: int, b_std: float, scaling: float,
               seed: int = 0) -> "BGMVLoRA":
        """Random banks for ``tenants`` tenants without a PEFT model (the tenant sweep): A [d, r]
        ~ U(-1/sqrt(d), 1/sqrt(d)) (PEFT's default lora_A init) and B [r, n] ~ N(0, b_std²) x
        ``scaling`` (alpha / r, folded in), drawn on the model's device from ``seed``."""
        layers = decoder_layers(model)
        p = next(model.parameters())
        g = torch.Generator(device=p.device).manual_seed(seed)
        A, B = {}, {}
        for path in cls.modules:
            lin = layers[0].get_submodule(path)
            d, n = lin.in_features, lin.out_features
            a = torch.rand(tenants, len(layers), d, rank, generator=g, device=p.device)
            A[path] = ((2 * a - 1) / d ** 0.5).to(p.dtype)
            b = torch.randn(tenants, len(layers), rank, n, generator=g, device=p.device)
            B[path] = (b * (b_std * scaling)).to(p.dtype)
        return cls(model, A, B)

    def _hook(self, i: int, path: str):
        A, B = self.A[path], self.B[path]

        def hook(module, args, output):
            ids = self._ids
            x = args[0]
            a_rows = A[ids, i]  # [B, d, r]  (gathered per call, per row)
            b_rows = B[ids, i]  # [B, r, n]
            shape = output.shape
            x3 = x.reshape(shape[0], -1, x.shape[-1])
            y = torch.baddbmm(output.reshape(shape[0], -1, shape[-1]), torch.bmm(x3, a_rows), b_rows)
            return y.reshape(shape)
        return hook


class IA3(_RowHooks):
    """Per-row (IA)³ vectors on the outputs of ``k_proj``, ``v_proj`` and ``mlp.up_proj``
    (scaling up's output equals scaling the FFN's intermediate, as (IA)³ does, since
    ``down(silu(gate) * up * l) = down((silu(gate) * up) * l)``). Bank ``L[path] [T+1, L, n]``,
    slot T all ones. The rows' vectors are gathered once per batch (they are static)."""

    modules = ("self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj")

    def __init__(self, model: nn.Module, vectors: dict):
        super().__init__(model)
        self.num_tenants = next(iter(vectors.values())).shape[0]
        self.L = {p: torch.cat([v, v.new_ones(1, *v.shape[1:])]) for p, v in vectors.items()}
        self._rows_l: dict = {}

    @classmethod
    def random(cls, model: nn.Module, tenants: int, std: float = 0.1, generator=None) -> "IA3":
        """Vectors 1 + std * N(0, 1), one per tenant, layer and module."""
        layers = decoder_layers(model)
        vectors = {}
        p = next(model.parameters())
        for path in cls.modules:
            n = layers[0].get_submodule(path).out_features
            v = torch.randn(tenants, len(layers), n, generator=generator) * std + 1.0
            vectors[path] = v.to(device=p.device, dtype=p.dtype)
        return cls(model, vectors)

    def _set_rows(self, slots: torch.Tensor) -> None:
        super()._set_rows(slots)
        # [L, B, 1, n]: each layer's per-row vectors, broadcast over tokens
        self._rows_l = {p: v[slots].transpose(0, 1).unsqueeze(2).contiguous()
                        for p, v in self.L.items()}

    def _hook(self, i: int, path: str):
        def hook(module, args, output):
            return output * self._rows_l[path][i]
        return hook

    def scaled_copy(self, model: nn.Module, tenant: int) -> None:
        """Fold tenant ``tenant``'s vectors into ``model``'s weights (in place): the reference
        the per-row hooks are checked against."""
        with torch.no_grad():
            for i, layer in enumerate(decoder_layers(model)):
                for path in self.modules:
                    lin = layer.get_submodule(path)
                    lin.weight.mul_(self.L[path][tenant, i][:, None])
                    if lin.bias is not None:
                        lin.bias.mul_(self.L[path][tenant, i])
