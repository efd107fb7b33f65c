"""PARA on every supported Hugging Face architecture (tiny random-weight models, CPU).

The expected outputs are built here, independently of para_kernels.transformers: the layouts
of the fused projections come from each model's HF config, and the rescaling is done by this
file's own hooks on an unwrapped copy of the backbone (docs/spec.md §1-§2).
"""
from __future__ import annotations

import copy
import re
import types

import pytest
import torch
from torch import nn

from para_kernels import MappingError, PARAConfig, get_para_model

from kit import rel_err
from kit.models import ARCHITECTURES, PAD, batch_inputs, tiny_model

GENERATOR_PARAM = re.compile(r"\.(\d+)\.para_generator\.adapters\.([^.]+)\.(\w+)$")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models are tiny: one intra-op thread is fastest, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- helpers
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list, found by architecture (not through para_kernels.mapping)."""
    base = getattr(model, model.base_model_prefix)
    if hasattr(base, "decoder"):  # OPT
        return base.decoder.layers
    return base.h if hasattr(base, "h") else base.layers  # GPT-2 | the rest


def attention_sizes(arch: str, cfg) -> tuple[int, int, int, int]:
    """(n_heads, n_kv_heads, head_dim, n_up) from the HF config."""
    if arch == "gpt2":
        heads = cfg.n_head
        return heads, heads, cfg.n_embd // heads, cfg.n_inner or 4 * cfg.n_embd
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    n_up = cfg.ffn_dim if arch == "opt" else cfg.intermediate_size
    return heads, kv, hd, n_up


def expected_layout(arch: str, cfg) -> dict[str, list]:
    """{module path inside a decoder layer: [(target | None, start in target's vector, size), ...]}
    describing that module's output features in order; None = left unscaled (keys, gate)."""
    heads, kv, hd, n_up = attention_sizes(arch, cfg)
    nq, nkv = heads * hd, kv * hd
    if arch == "gpt2":  # Conv1D c_attn: [q | k | v]
        return {"attn.c_attn": [("q", 0, nq), (None, 0, nkv), ("v", 0, nkv)], "mlp.c_fc": [("up", 0, n_up)]}
    if arch == "phi3":  # qkv_proj: [q | k | v]; gate_up_proj: [gate | up]
        return {"self_attn.qkv_proj": [("q", 0, nq), (None, 0, nkv), ("v", 0, nkv)],
                "mlp.gate_up_proj": [(None, 0, n_up), ("up", 0, n_up)]}
    if arch == "gpt_neox":  # query_key_value: per head [q_h | k_h | v_h]
        assert kv == heads
        segs = [s for h in range(heads) for s in (("q", h * hd, hd), (None, 0, hd), ("v", h * hd, hd))]
        return {"attention.query_key_value": segs, "mlp.dense_h_to_4h": [("up", 0, n_up)]}
    if arch == "opt":
        return {"self_attn.q_proj": [("q", 0, nq)], "self_attn.v_proj": [("v", 0, nkv)], "fc1": [("up", 0, n_up)]}
    return {"self_attn.q_proj": [("q", 0, nq)], "self_attn.v_proj": [("v", 0, nkv)],
            "mlp.up_proj": [("up", 0, n_up)]}


def target_sizes(arch: str, cfg) -> dict[str, int]:
    heads, kv, hd, n_up = attention_sizes(arch, cfg)
    return {"q": heads * hd, "v": kv * hd, "up": n_up}


def params_by_layer(para, name: str) -> dict[int, dict[str, nn.Parameter]]:
    """{layer index: {weight name: parameter}} of one adapter, from the PARA model's parameters."""
    out: dict[int, dict] = {}
    for pname, p in para.named_parameters():
        m = GENERATOR_PARAM.search(pname)
        if m and m.group(2) == name:
            out.setdefault(int(m.group(1)), {})[m.group(3)] = p
    return out


def randomize(para, name: str, seed: int, std: float = 0.5) -> None:
    """Nonzero generator weights: b_down, w_up, b_up random normal (w_down keeps its init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weights in params_by_layer(para, name).values():
            for key in ("b_down", "w_up", "b_up"):
                p = weights[key]
                p.copy_(std * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


class ReferencePARA:
    """PARA written out by hand as hooks on a plain HF model: a pre-hook on each decoder layer
    pools the layer's input over each row's prompt, v = 1 + g(p W_d + b_d) W_u + b_u in fp64,
    and forward hooks multiply the q / v / up features of the projections' outputs."""

    def __init__(self, model, arch, weights, pooler, start, end, activation=torch.nn.functional.gelu):
        self.layout = expected_layout(arch, model.config)
        self.sizes = target_sizes(arch, model.config)
        self.weights, self.pooler, self.start, self.end, self.act = weights, pooler, start, end, activation
        self.scales: dict[int, dict[str, torch.Tensor]] = {}
        self.handles = []
        for i, layer in enumerate(decoder_layers(model)):
            self.handles.append(layer.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            for path in self.layout:
                self.handles.append(layer.get_submodule(path).register_forward_hook(self._scale(i, path)))

    def _pre(self, i):
        def hook(layer, args, kwargs):
            h = (args[0] if args else kwargs["hidden_states"]).double()
            rows = []
            for b in range(h.shape[0]):
                prompt = h[b, int(self.start[b]):int(self.end[b])]
                rows.append(prompt[-1] if self.pooler == "last" else prompt.mean(0))
            p = torch.stack(rows)
            w = {k: t.detach().double() for k, t in self.weights[i].items()}
            v = 1 + self.act(p @ w["w_down"] + w["b_down"]) @ w["w_up"] + w["b_up"]
            pieces = dict(zip(("q", "v", "up"), v.split([self.sizes[t] for t in ("q", "v", "up")], 1)))
            self.scales[i] = {
                path: torch.cat([pieces[t][:, s:s + n] if t else torch.ones(v.shape[0], n, dtype=v.dtype)
                                 for t, s, n in segs], 1)
                for path, segs in self.layout.items()}
        return hook

    def _scale(self, i, path):
        def hook(module, args, output):
            s = self.scales[i][path]
            assert s.shape[1] == output.shape[-1], (path, s.shape, output.shape)
            # OPT runs its FFN on tokens flattened to [batch * seq, n]
            x = output.view(s.shape[0], -1, output.shape[-1])
            return (x * s[:, None, :].to(output.dtype)).view(output.shape)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def hook_snapshot(model: nn.Module) -> dict:
    """Every module's hooks, and its instance-level forward override (fused consumers set one)."""
    return {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._forward_hooks_with_kwargs),
                   dict(m._forward_pre_hooks_with_kwargs), m.__dict__.get("forward"))
            for name, m in model.named_modules()}


# ---------------------------------------------------------------------------- 1. mapping
@pytest.mark.parametrize("pooler", ["last", "mean"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_scaling_matches_hand_written_reference(arch, pooler):
    model = tiny_model(arch)
    reference_model = copy.deepcopy(model)
    before = hook_snapshot(model)
    para = get_para_model(model, PARAConfig(r=4, pooler=pooler))

    # hooks (or fused-consumer forwards) went exactly onto the modules whose outputs hold q, v
    # and up; a gated FFN whose product became scaled_glu stands for its up branch
    layout = expected_layout(arch, model.config)
    after = hook_snapshot(model)
    for i, layer in enumerate(decoder_layers(model)):
        prefix = next(n for n, m in model.named_modules() if m is layer)
        touched = set()
        for name, module in layer.named_modules():
            key = f"{prefix}.{name}"
            if not name or key not in before:
                continue
            if len(after[key][0]) > len(before[key][0]):
                touched.add(name)
            if after[key][4] is not None and before[key][4] is None:
                touched.add(f"{name}.up_proj" if hasattr(module, "gate_proj") else name)
        assert touched == set(layout), (i, touched)

    # generator sizes: N = n_q + n_v + n_u from the HF config
    weights = params_by_layer(para, "default")
    n_layers = len(decoder_layers(model))
    assert sorted(weights) == list(range(n_layers))
    n = sum(target_sizes(arch, model.config).values())
    d = model.config.hidden_size
    for w in weights.values():
        assert tuple(w["w_down"].shape) == (d, 4) and tuple(w["w_up"].shape) == (4, n)
        assert tuple(w["b_up"].shape) == (n,)
    randomize(para, "default", seed=7)

    ids, mask = batch_inputs(3, 7, pads=[0, 2, 1])
    prompt_lengths = torch.tensor([7, 3, 5])  # counted from the first attended token
    start = (mask == 0).sum(1)
    end = start + prompt_lengths
    pos = position_ids(mask)
    with torch.no_grad():
        out = para(ids, attention_mask=mask, position_ids=pos, prompt_lengths=prompt_lengths).logits
        base = reference_model(ids, attention_mask=mask, position_ids=pos).logits
        ref_hooks = ReferencePARA(reference_model, arch, weights, pooler, start, end)
        ref = reference_model(ids, attention_mask=mask, position_ids=pos).logits
        ref_hooks.remove()
    attended = mask.bool()
    assert rel_err(out[attended], ref[attended]) < 1e-5
    assert rel_err(base[attended], ref[attended]) > 1e-3  # the adapter does something

    # for fused projections the check can tell a wrong layout: scaling keys / the gate too
    # gives other logits
    if any(t is None for segs in layout.values() for t, _, _ in segs):
        sizes = target_sizes(arch, model.config)
        wrong = {p: [(t, s, n) if t else ("v" if n <= sizes["v"] else "up", 0, n) for t, s, n in segs]
                 for p, segs in layout.items()}
        ref_hooks = ReferencePARA(reference_model, arch, weights, pooler, start, end)
        ref_hooks.layout = wrong
        with torch.no_grad():
            bad = reference_model(ids, attention_mask=mask, position_ids=pos).logits
        ref_hooks.remove()
        assert rel_err(out[attended], bad[attended]) > 1e-3


# ---------------------------------------------------------------------------- 2. fresh adapter
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fresh_adapter_equals_backbone(arch):
    model = tiny_model(arch)
    ids, mask = batch_inputs(3, 6, pads=[0, 2, 5])
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
        para = get_para_model(model, PARAConfig(r=4))
        out = para(ids, attention_mask=mask).logits
        para.add_adapter("other", PARAConfig(r=3, pooler="mean"))
        mixed = para(ids, attention_mask=mask, adapter_names=["default", "other", None]).logits
    assert torch.equal(out, base)
    assert torch.equal(mixed, base)


# ---------------------------------------------------------------------------- 3. mixed batch
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_mixed_batch_rows_match_single_rows(arch):
    model = tiny_model(arch)
    ids, mask = batch_inputs(5, 6, pads=[0, 2, 1, 0, 3])
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
    para = get_para_model(model, PARAConfig(r=4, pooler="last"), adapter_name="a")
    para.add_adapter("b", PARAConfig(r=6, pooler="mean"))  # another signature: a second bank
    para.add_adapter("c", PARAConfig(r=4, pooler="last"))  # stacked with "a" in one bank
    for k, name in enumerate("abc"):
        randomize(para, name, seed=11 + k)
    rows = ["a", "b", None, "c", "a"]
    attended = mask.bool()
    with torch.no_grad():
        out = para(ids, attention_mask=mask, adapter_names=rows).logits
        for b, name in enumerate(rows):
            keep = attended[b]
            if name is None:
                assert rel_err(out[b, keep], base[b, keep]) < 1e-6
                with para.disable_adapter():
                    alone = para(ids[b:b + 1], attention_mask=mask[b:b + 1]).logits[0]
            else:
                alone = para(ids[b:b + 1], attention_mask=mask[b:b + 1], adapter_names=[name]).logits[0]
                assert rel_err(alone[keep], base[b, keep]) > 1e-4  # the adapter changes the row
            assert rel_err(out[b, keep], alone[keep]) < 1e-5, (b, name)
        para.set_adapter("b")
        alone = para(ids[1:2], attention_mask=mask[1:2]).logits[0]
        assert rel_err(out[1, attended[1]], alone[attended[1]]) < 1e-5


# ---------------------------------------------------------------------------- 4. generation
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_generate_matches_recomputation(arch):
    """KV-cached greedy generation == recomputing the whole sequence at every step with the
    vectors pooled from the prompt only (a decode step must not re-pool from new tokens)."""
    model = tiny_model(arch)
    para = get_para_model(model, PARAConfig(r=4, pooler="last"))
    para.add_adapter("mean", PARAConfig(r=5, pooler="mean"))
    randomize(para, "default", seed=3, std=1.0)
    randomize(para, "mean", seed=4, std=1.0)
    ids, mask = batch_inputs(3, 7, pads=[0, 3, 1], seed=5)
    prompt_lengths = mask.sum(1)
    rows, steps, eos = ["mean", None, "default"], 6, model.generation_config.eos_token_id
    with torch.no_grad():
        out = para.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                            use_cache=True, adapter_names=rows, return_dict_in_generate=True, output_logits=True)
        generated = out.sequences
        seq, msk = ids, mask
        done = torch.zeros(len(rows), dtype=torch.bool)
        for _ in range(steps):
            logits = para(seq, attention_mask=msk, position_ids=position_ids(msk), use_cache=False,
                          prompt_lengths=prompt_lengths, adapter_names=rows).logits[:, -1]
            assert torch.isfinite(logits).all()
            step = seq.shape[1] - ids.shape[1]
            # the cached decode step saw the same vectors: same logits, not only the same argmax
            assert rel_err(out.logits[step], logits) < 1e-5, step
            token = logits.argmax(-1).masked_fill(done, PAD)  # finished rows get pad, as generate does
            done |= token == eos
            seq = torch.cat([seq, token[:, None]], 1)
            msk = torch.cat([msk, torch.ones_like(msk[:, :1])], 1)
            if done.all():
                break
    assert torch.equal(generated, seq), (generated[:, ids.shape[1]:], seq[:, ids.shape[1]:])


# ---------------------------------------------------------------------------- 5. unload
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_unload_restores_the_model(arch):
    model = tiny_model(arch)
    ids, mask = batch_inputs(2, 6, pads=[0, 2])
    # a user hook and a frozen parameter from before wrapping must survive unwrapping
    first_layer = decoder_layers(model)[0]
    first_layer.register_forward_hook(lambda module, args, output: None)
    frozen = next(iter(model.parameters()))
    frozen.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = hook_snapshot(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = [n for n, _ in model.named_modules()]
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits

    para = get_para_model(model, PARAConfig(r=4))
    para.add_adapter("other", PARAConfig(r=2, pooler="mean"))
    randomize(para, "default", seed=1)
    with torch.no_grad():
        para(ids, attention_mask=mask)
        para.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    unloaded = para.unload()

    assert unloaded is model
    assert [n for n, _ in model.named_modules()] == modules
    assert not any(hasattr(m, "para_generator") for m in model.modules())
    new_state = model.state_dict()
    assert list(new_state) == list(state)
    assert all(torch.equal(new_state[k], state[k]) for k in state)
    assert hook_snapshot(model) == hooks
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, base)


# ---------------------------------------------------------------------------- mapping errors
class _NoProjections(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(num_hidden_layers=2, hidden_size=8, num_attention_heads=2)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(2))

    def forward(self, input_ids=None, **kwargs):
        h = torch.zeros(input_ids.shape[0], input_ids.shape[1], 8)
        for layer in self.layers:
            h = layer(h)
        return h


def _assert_untouched(model, hooks, grads):
    assert hook_snapshot(model) == hooks
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert not any(hasattr(m, "para_generator") for m in model.modules())


def test_unmappable_model_raises_mapping_error():
    model = _NoProjections()
    hooks, grads = hook_snapshot(model), {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(MappingError, match="target_modules"):
        get_para_model(model, PARAConfig(r=4))
    _assert_untouched(model, hooks, grads)
    model(torch.zeros(1, 3, dtype=torch.long))  # still runs as before


def test_missing_target_module_raises_mapping_error():
    model = tiny_model("llama")
    hooks, grads = hook_snapshot(model), {n: p.requires_grad for n, p in model.named_parameters()}
    config = PARAConfig(r=4, target_modules={"q": "self_attn.q_proj", "v": "self_attn.value_proj",
                                             "up": "mlp.up_proj"})
    with pytest.raises(MappingError, match="target_modules") as info:
        get_para_model(model, config)
    assert "self_attn.value_proj" in str(info.value)
    _assert_untouched(model, hooks, grads)
    ids, mask = batch_inputs(1, 4, pads=[0])
    with torch.no_grad():
        model(ids, attention_mask=mask)  # the failed wrap left no hook behind
