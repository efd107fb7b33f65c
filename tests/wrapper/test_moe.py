"""PARA on mixture-of-experts decoders (Qwen2-MoE, Mixtral, Qwen3-MoE; tiny random models, CPU).

The "up" target of an MoE layer is the up half of every routed expert (one l_u of size
moe_intermediate_size, applied to each token's own request vector in whichever experts it is
routed to), followed by the shared expert's up projection when the block has one (docs/training.md).
The expected outputs are computed here by hand, token by token and expert by expert, on an
unwrapped copy of the backbone (no code of para_kernels.transformers is used for them).
"""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

from para_kernels import MappingError, PARAConfig, get_para_model

from kit import rel_err
from kit.models import PAD, VOCAB, batch_inputs

MOE = {
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=48, moe_intermediate_size=24, num_experts=4,
                                         num_experts_per_tok=2, shared_expert_intermediate_size=40)),
    "mixtral": ("MixtralConfig", dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=48, moe_intermediate_size=24, num_experts=4,
                                         num_experts_per_tok=2, head_dim=16)),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_moe(arch: str, experts_implementation: str = "eager", seed: int = 0, dtype=torch.float32, **overrides):
    cls_name, kwargs = MOE[arch]
    cfg = getattr(transformers, cls_name)(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, pad_token_id=PAD, initializer_range=0.2, tie_word_embeddings=False,
        **{**kwargs, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(
            cfg, attn_implementation="eager", experts_implementation=experts_implementation, dtype=dtype)
        with torch.no_grad():  # the 3-D expert weights are not covered by initializer_range everywhere
            for layer in model.model.layers:
                experts = getattr(layer.mlp, "experts", None)
                if experts is not None:
                    experts.gate_up_proj.normal_(0, 0.3)
                    experts.down_proj.normal_(0, 0.3)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    return model.eval()


def sizes(model) -> dict[str, int]:
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    routed = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    shared = getattr(cfg, "shared_expert_intermediate_size", 0) or 0
    return {"q": cfg.num_attention_heads * hd, "v": cfg.num_key_value_heads * hd, "routed": routed, "shared": shared}


def randomize(pm, seed: int = 3, std: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".para_generator." in name and name.rsplit(".", 1)[-1] in ("b_down", "w_up", "b_up"):
                p.copy_(std * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def generator_weights(pm) -> dict[int, dict[str, torch.Tensor]]:
    out: dict[int, dict] = {}
    for name, p in pm.named_parameters():
        if ".para_generator.adapters.default." in name:
            layer = int(name.split(".layers.")[1].split(".")[0])
            out.setdefault(layer, {})[name.rsplit(".", 1)[-1]] = p.detach().double()
    return out


class ReferenceMoE:
    """PARA by hand on a plain model: v per row from the layer input's last prompt token (fp64),
    q / v / shared-up outputs scaled by hooks, and the routed experts replaced by a per-token,
    per-expert loop that scales the up half by the token's row's l_u (routed part)."""

    def __init__(self, model, weights, start, end, targets=("q", "v", "up")):
        self.model, self.weights, self.start, self.end, self.targets = model, weights, start, end, targets
        self.n = sizes(model)
        self.v: dict[int, dict[str, torch.Tensor]] = {}
        self.handles, self.overridden = [], []
        for i, layer in enumerate(model.model.layers):
            self.handles.append(layer.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            if "q" in targets:
                self.handles.append(layer.self_attn.q_proj.register_forward_hook(self._scale(i, "q")))
            if "v" in targets:
                self.handles.append(layer.self_attn.v_proj.register_forward_hook(self._scale(i, "v")))
            if "up" in targets:
                if hasattr(layer.mlp, "shared_expert"):
                    self.handles.append(layer.mlp.shared_expert.up_proj.register_forward_hook(self._scale(i, "shared")))
                layer.mlp.experts.forward = self._experts(i, layer.mlp.experts)
                self.overridden.append(layer.mlp.experts)

    def _pre(self, i):
        def hook(layer, args, kwargs):
            h = (args[0] if args else kwargs["hidden_states"]).double()
            p = torch.stack([h[b, int(self.end[b]) - 1] for b in range(h.shape[0])])
            w = self.weights[i]
            v = 1 + torch.nn.functional.gelu(p @ w["w_down"] + w["b_down"]) @ w["w_up"] + w["b_up"]
            names = [t for t in ("q", "v") if t in self.targets]
            split = [self.n[t] for t in names]
            if "up" in self.targets:
                names += ["routed", "shared"]
                split += [self.n["routed"], self.n["shared"]]
            self.v[i] = dict(zip(names, v.split(split, 1)))
        return hook

    def _scale(self, i, key):
        def hook(module, args, output):
            s = self.v[i][key]
            rows = s.shape[0]
            return (output.view(rows, -1, output.shape[-1]) * s[:, None, :].to(output.dtype)).view(output.shape)
        return hook

    def _experts(self, i, experts):
        def forward(hidden, top_k_index, top_k_weights):
            s = self.v[i]["routed"].to(hidden.dtype)
            per_row = hidden.shape[0] // s.shape[0]
            out = torch.zeros_like(hidden)
            for t in range(hidden.shape[0]):
                for j in range(top_k_index.shape[1]):
                    e = int(top_k_index[t, j])
                    gate, up = (experts.gate_up_proj[e] @ hidden[t]).chunk(2)
                    h = experts.act_fn(gate) * (up * s[t // per_row])
                    out[t] += top_k_weights[t, j] * (experts.down_proj[e] @ h)
            return out
        return forward

    def remove(self):
        for h in self.handles:
            h.remove()
        for m in self.overridden:
            del m.forward


def prompt(batch=3, length=7):
    ids, mask = batch_inputs(batch, length, pads=[0, 2, 1][:batch])
    lengths = torch.tensor([7, 3, 5][:batch])
    start = (mask == 0).sum(1)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return ids, mask, pos, lengths, start, start + lengths


# ---------------------------------------------------------------------------- mapping
@pytest.mark.parametrize("arch", list(MOE))
def test_moe_mapping_and_generator_size(arch):
    model = tiny_moe(arch)
    pm = get_para_model(model, PARAConfig(r=4))
    n = sizes(model)
    expected = {"self_attn.q_proj", "self_attn.v_proj", "mlp.experts"}
    if n["shared"]:
        expected.add("mlp.shared_expert.up_proj")
    for status in pm.get_layer_status():
        assert set(status.scaled_modules) == expected
    for w in generator_weights(pm).values():
        assert w["w_up"].shape == (4, n["q"] + n["v"] + n["routed"] + n["shared"])
    # q, v alone leave the FFN (routed and shared experts) alone
    qv = get_para_model(tiny_moe(arch), PARAConfig(r=4, targets=("q", "v")))
    assert {m for s in qv.get_layer_status() for m in s.scaled_modules} == {"self_attn.q_proj", "self_attn.v_proj"}


# ---------------------------------------------------------------------------- fresh adapter
@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
@pytest.mark.parametrize("arch", list(MOE))
def test_moe_fresh_adapter_equals_backbone(arch, impl):
    model = tiny_moe(arch, impl)
    ids, mask, pos, lengths, _, _ = prompt()
    with torch.no_grad():
        base = model(ids, attention_mask=mask, position_ids=pos).logits
        pm = get_para_model(model, PARAConfig(r=4))
        out = pm(ids, attention_mask=mask, position_ids=pos, prompt_lengths=lengths).logits
    attended = mask.bool()
    assert rel_err(out[attended], base[attended]) < 1e-6


# ---------------------------------------------------------------------------- random adapter
@pytest.mark.parametrize("targets", [("q", "v", "up"), ("q", "v")])
@pytest.mark.parametrize("arch", list(MOE))
def test_moe_matches_hand_written_reference(arch, targets):
    model = tiny_moe(arch, "grouped_mm")
    reference = copy.deepcopy(model)
    reference.config._experts_implementation = "eager"
    pm = get_para_model(model, PARAConfig(r=4, targets=targets))
    randomize(pm)
    ids, mask, pos, lengths, start, end = prompt()
    with torch.no_grad():
        out = pm(ids, attention_mask=mask, position_ids=pos, prompt_lengths=lengths).logits
        base = reference(ids, attention_mask=mask, position_ids=pos).logits
        hooks = ReferenceMoE(reference, generator_weights(pm), start, end, targets)
        ref = reference(ids, attention_mask=mask, position_ids=pos).logits
        hooks.remove()
    attended = mask.bool()
    assert rel_err(out[attended], ref[attended]) < 1e-5
    assert rel_err(base[attended], ref[attended]) > 1e-3
    if "up" in targets:  # the routed experts' scale matters: leaving it out gives other logits
        hooks = ReferenceMoE(reference, generator_weights(pm), start, end, targets)
        for m in hooks.overridden:  # the routed experts unscaled, q / v / shared scaled
            del m.forward
        hooks.overridden = []
        with torch.no_grad():
            partial = reference(ids, attention_mask=mask, position_ids=pos).logits
        hooks.remove()
        assert rel_err(out[attended], partial[attended]) > 1e-3


def test_moe_training_step_and_cached_generation():
    model = tiny_moe("qwen2_moe")
    pm = get_para_model(model, PARAConfig(r=4))
    randomize(pm, std=0.2)
    ids, mask, pos, lengths, _, _ = prompt()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    pm.train()
    loss = pm(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    n = sizes(model)
    w_up = [p for name, p in pm.named_parameters() if name.endswith("default.w_up")]
    assert w_up and all(p.grad is not None for p in w_up)
    lo = n["q"] + n["v"]
    for p in w_up:  # gradients reach the routed and the shared part of l_u
        assert p.grad[:, lo:lo + n["routed"]].abs().sum() > 0
        assert p.grad[:, lo + n["routed"]:].abs().sum() > 0
    pm.eval()
    with torch.no_grad():
        cached = pm.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        uncached = pm.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


# ---------------------------------------------------------------------------- refused layouts
def test_moe_unsupported_experts_layout_is_refused():
    model = tiny_moe("mixtral")
    for layer in model.model.layers:
        layer.mlp.experts.is_concatenated = False  # interleaved [gate0, up0, gate1, ...]
    with pytest.raises(MappingError, match=r"MixtralDecoderLayer.*targets=\('q', 'v'\)"):
        get_para_model(model, PARAConfig(r=4))
    assert not any(".para_generator." in n for n, _ in model.named_parameters())
    get_para_model(model, PARAConfig(r=4, targets=("q", "v")))  # q and v still work


def test_moe_experts_as_module_list_is_refused():
    """An MoE block with one MLP module per expert is never half-scaled: refused by name."""
    model = tiny_moe("qwen2_moe")
    for layer in model.model.layers:
        mlp = layer.mlp
        mlp.experts = torch.nn.ModuleList([copy.deepcopy(mlp.shared_expert) for _ in range(2)])
    with pytest.raises(MappingError):
        get_para_model(model, PARAConfig(r=4))


def test_moe_mixed_dense_and_sparse_layers():
    model = tiny_moe("qwen2_moe", mlp_only_layers=[1])
    with pytest.raises(MappingError, match="layers_to_transform"):
        get_para_model(model, PARAConfig(r=4))
    pm = get_para_model(model, PARAConfig(r=4, layers_to_transform=[0]))
    assert [s.scaled_modules for s in pm.get_layer_status()][0]


def test_moe_packed_row_equals_examples_alone():
    """One row packing two examples (block-diagonal mask): each token's routed experts use its
    own example's l_u, so every example's logits equal running it alone."""
    pm = get_para_model(tiny_moe("qwen2_moe", dtype=torch.float64), PARAConfig(r=4))
    randomize(pm)
    g = torch.Generator().manual_seed(4)
    examples, prompts = [torch.randint(3, VOCAB, (n,), generator=g) for n in (5, 6)], [2, 4]
    ids = torch.cat(examples)[None]
    pos = torch.cat([torch.arange(len(e)) for e in examples])[None]
    allowed = torch.block_diag(*[torch.ones(len(e), len(e)).tril() for e in examples]).bool()
    mask = torch.zeros(1, 1, *allowed.shape, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    with torch.no_grad():
        out = pm(ids, attention_mask=mask, position_ids=pos, prompt_lengths=prompts).logits[0]
        at = 0
        for e, p in zip(examples, prompts):
            alone = pm(e[None], prompt_lengths=[p]).logits[0]
            assert rel_err(out[at:at + len(e)], alone) < 1e-6
            at += len(e)


def test_moe_experts_by_target_modules():
    """target_modules may name the experts module for 'up' (routed experts only), nothing else."""
    paths = {"q": "self_attn.q_proj", "v": "self_attn.v_proj", "up": "mlp.experts"}
    pm = get_para_model(tiny_moe("mixtral"), PARAConfig(r=4, target_modules=paths))
    auto = get_para_model(tiny_moe("mixtral"), PARAConfig(r=4))
    randomize(auto)
    theirs = dict(auto.named_parameters())
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".para_generator." in name:
                p.copy_(theirs[name])
    ids, mask, pos, lengths, _, _ = prompt()
    with torch.no_grad():
        a = pm(ids, attention_mask=mask, position_ids=pos, prompt_lengths=lengths).logits
        b = auto(ids, attention_mask=mask, position_ids=pos, prompt_lengths=lengths).logits
    assert torch.equal(a, b)
    with pytest.raises(MappingError, match="only 'up'"):
        get_para_model(tiny_moe("mixtral"), PARAConfig(r=4, target_modules={**paths, "q": "mlp.experts"}))
