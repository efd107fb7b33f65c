"""Fuzzed calls (the reliability campaign, category "calls").

1. Random configs (r, pooler, activation, targets, pool_input, layers_to_transform) x tiny
   architectures x padding sides x prompt lengths (1 to the whole row) x adapter assignments
   (the active one, one repeated, all different, None / "__base__" rows) x dtypes: every row of
   the mixed batch equals that row run alone with its adapter (logits; greedy generate tokens for
   the fp32 / fp64 left-padded cases), within the dtype's tolerance. A seeded loop: case k is
   reproducible alone (``_fuzz_case(k)``).
2. Wrong types and values for every public argument (docs/api.md): each raises a TypeError /
   ValueError (KeyError) that names the argument, before any decoder layer runs and without
   changing the model's adapters. One case per (argument, bad value).
"""
from __future__ import annotations

import math
import os
import random

import pytest
import torch

from para_kernels import PARAConfig
from para_kernels.transformers import PARAModel, get_para_model

from kit import rel_err
from kit.models import ARCHITECTURES, PAD, VOCAB, randomize_adapter, tiny_llama, tiny_model

FUZZ_ARCHS = tuple(ARCHITECTURES)  # all ten tiny architectures
DTYPES = (torch.float32, torch.bfloat16, torch.float64)
# batched row vs the same row alone: the same ops on other shapes (rounding of a bigger GEMM)
ROW_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}
POOLERS = ("last", "mean", "max", "attn")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "identity", "rational")


def _random_config(rng: random.Random, r: int | None = None, like: PARAConfig | None = None) -> PARAConfig:
    if like is not None:  # same generator signature but r: stacked in one bank (or r equal too)
        return PARAConfig(r=like.r if r is None else r, pooler=like.pooler, activation=like.activation,
                          targets=like.targets, pool_input=like.pool_input,
                          layers_to_transform=like.layers_to_transform)
    targets = [t for t in ("q", "v", "up") if rng.random() < 0.6] or [rng.choice(("q", "v", "up"))]
    layers = rng.choice((None, None, [0], [1], [0, 1]))
    return PARAConfig(r=r or rng.randint(1, 6), pooler=rng.choice(POOLERS), activation=rng.choice(ACTIVATIONS),
                      targets=tuple(targets), pool_input=rng.choice(("residual", "normed")),
                      layers_to_transform=layers)


def _inputs(rng: random.Random, batch: int, length: int, side: str, pad: bool = True):
    """ids, mask with random per-row lengths (1 and the full row included), padded on ``side``
    (``pad=False``: every row full)."""
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    lengths = [length] + [rng.randint(1, length) if pad else length for _ in range(batch - 1)]
    if batch > 2 and pad:
        lengths[1] = 1
    rng.shuffle(lengths)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for b, n in enumerate(lengths):
        if side == "left":
            mask[b, length - n:] = 1
        else:
            mask[b, :n] = 1
    ids[mask == 0] = PAD
    return ids, mask, lengths


def _assignment(rng: random.Random, names: list[str], batch: int):
    mode = rng.choice(("active", "repeated", "different", "with_base"))
    if mode == "active":
        return mode, None
    if mode == "repeated":
        return mode, [rng.choice(names)] * batch
    pool = names + [None, "__base__"] if mode == "with_base" else names
    rows = [pool[b % len(pool)] for b in range(batch)]
    rng.shuffle(rows)
    return mode, rows


def _fuzz_case(k: int) -> dict:
    """Case k of the campaign: build, run the mixed batch, compare every row with it alone."""
    rng = random.Random(1000 + k)
    arch = FUZZ_ARCHS[k % len(FUZZ_ARCHS)]
    dtype = DTYPES[(k // len(FUZZ_ARCHS)) % len(DTYPES)] if k >= len(FUZZ_ARCHS) else torch.float32
    side = "left" if k % 3 == 0 else rng.choice(("left", "right"))
    model = tiny_model(arch, dtype=dtype, seed=k)
    model.generation_config.eos_token_id = None
    first = _random_config(rng)
    configs = {"a": first, "b": _random_config(rng, like=first, r=rng.randint(1, 6)), "c": _random_config(rng)}
    pm = get_para_model(model, configs["a"], adapter_name="a")
    for name in ("b", "c"):
        pm.add_adapter(name, configs[name])
    for j, name in enumerate(configs):
        randomize_adapter(pm, name, seed=100 * k + j, std=0.5)
    batch, length = rng.randint(2, 5), rng.choice((1, 2, 5, 8))
    # fp64 and left padding: transformers' eager mask overflows (finfo.min + finfo.min = -inf), so a
    # left-padded row is NaN in the bare backbone already; fp64 rows are right-padded or full
    ids, mask, lengths = _inputs(rng, batch, length, side, pad=not (dtype == torch.float64 and side == "left"))
    mode, rows = _assignment(rng, list(configs), batch)
    prompt_lengths = None
    if rng.random() < 0.4:  # a prompt shorter than the attended tokens
        prompt_lengths = torch.tensor([rng.randint(1, n) for n in lengths])
    call = dict(attention_mask=mask)
    tol = ROW_TOL[dtype]
    with torch.no_grad():
        out = pm(ids, adapter_names=rows, prompt_lengths=prompt_lengths, **call).logits
        with pm.disable_adapter():
            base = pm(ids, **call).logits
        changed = 0
        for b in range(batch):
            one = dict(attention_mask=mask[b:b + 1])
            name = pm.active_adapter if rows is None else rows[b]
            pl = None if prompt_lengths is None else prompt_lengths[b:b + 1]
            if name in (None, "__base__"):
                with pm.disable_adapter():
                    alone = pm(ids[b:b + 1], prompt_lengths=pl, **one).logits[0]
            else:
                alone = pm(ids[b:b + 1], adapter_names=[name], prompt_lengths=pl, **one).logits[0]
            keep = mask[b].bool()
            err = rel_err(out[b, keep], alone[keep])
            assert err < tol, (k, arch, dtype, side, mode, rows, b, err)
            changed += name not in (None, "__base__") and rel_err(out[b, keep], base[b, keep]) > 10 * tol
        generated = False
        if side == "left" and dtype != torch.bfloat16:  # greedy tokens: no bf16 near-ties
            generated = True
            steps = 3
            seqs = pm.generate(input_ids=ids, attention_mask=mask, adapter_names=rows, max_new_tokens=steps,
                               do_sample=False)
            for b in range(batch):
                name = pm.active_adapter if rows is None else rows[b]
                kw = dict(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1], max_new_tokens=steps,
                          do_sample=False)
                if name in (None, "__base__"):
                    with pm.disable_adapter():
                        alone = pm.generate(**kw)
                else:
                    alone = pm.generate(adapter_names=[name], **kw)
                assert torch.equal(seqs[b:b + 1], alone), (k, arch, dtype, mode, rows, b)
    return {"arch": arch, "generated": generated, "changed": changed}


def test_mixed_batches_equal_rows_alone(campaign):
    n = campaign.cases(90)
    counts = {"generated": 0, "changed": 0}
    for k in range(n):
        result = _fuzz_case(k)
        for key in counts:
            counts[key] += result[key]
    campaign.tried("calls", n + counts["generated"])
    assert counts["generated"] > 0
    assert counts["changed"] > n  # the adapters do change their rows: the comparison is not vacuous


# ---------------------------------------------------------------------------- wrong arguments
class _Ran(Exception):
    pass


@pytest.fixture
def served():
    """A tiny Llama with adapters "default" and "other" (same signature) and "wide" (r differs),
    and a counter of the decoder layers' forwards."""
    model = tiny_llama()
    pm = get_para_model(model, PARAConfig(r=4))
    pm.add_adapter("other", PARAConfig(r=4))
    pm.add_adapter("wide", PARAConfig(r=6))
    ran = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda *_: ran.append(1))
    return pm, ran


IDS = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
MASK = torch.ones(2, 5, dtype=torch.long)


def _config_cases():
    good = {}
    bad = [("r", 0), ("r", 1.5), ("r", "4"), ("r", True), ("r", None), ("pooler", "sum"), ("pooler", None),
           ("pooler", ["last"]), ("activation", "swish"), ("activation", 3), ("targets", ()), ("targets", ("k",)),
           ("targets", ("q", "q")), ("targets", 5), ("targets", None), ("target_modules", "self_attn.q_proj"),
           ("target_modules", {"q": "self_attn.q_proj"}), ("target_modules", {"k": "self_attn.k_proj"}),
           ("pool_input", "post"), ("pool_input", None), ("layers_to_transform", [-1]),
           ("layers_to_transform", []), ("layers_to_transform", ["0"]), ("layers_to_transform", 1.5),
           ("layers_to_transform", [True]), ("layers_to_transform", True), ("layers_path", 5),
           ("init_scale", 0), ("init_scale", -1.0), ("init_scale", "1"), ("init_scale", math.nan),
           ("init_scale", math.inf), ("init_scale", 1e300), ("init_scale", None),
           ("modules_to_save", [""]), ("modules_to_save", 5),
           ("modules_to_save", []), ("base_model_name_or_path", 5), ("revision", 5), ("task_type", "SEQ_CLS"),
           ("inference_mode", "yes"), ("inference_mode", 1)]
    for field, value in bad:
        yield f"PARAConfig.{field}={value!r}", (lambda pm, f=field, v=value: PARAConfig(**{**good, f: v})), field


def _model_cases():
    cfg = PARAConfig(r=4)
    return [
        ("get_para_model.model=None", lambda pm: get_para_model(None, cfg), "model"),
        ("get_para_model.model='llama'", lambda pm: get_para_model("llama", cfg), "model"),
        ("get_para_model.config=dict", lambda pm: get_para_model(tiny_llama(), {"r": 4}), "config"),
        ("get_para_model.config=None", lambda pm: get_para_model(tiny_llama(), None), "config"),
        ("get_para_model.adapter_name=5", lambda pm: get_para_model(tiny_llama(), cfg, adapter_name=5), "adapter_name"),
        ("get_para_model.adapter_name=''", lambda pm: get_para_model(tiny_llama(), cfg, adapter_name=""),
         "adapter_name"),
        ("get_para_model.adapter_name='__base__'",
         lambda pm: get_para_model(tiny_llama(), cfg, adapter_name="__base__"), "adapter_name"),
        ("get_para_model.revision=5", lambda pm: get_para_model(tiny_llama(), cfg, revision=5), "revision"),
        ("PARAModel.model=5", lambda pm: PARAModel(5), "model"),
        ("PARAModel.config='r=4'", lambda pm: PARAModel(tiny_llama(), "r=4"), "config"),
        ("PARAConfig.from_dict('r')", lambda pm: PARAConfig.from_dict("r"), "from_dict"),
        ("PARAConfig.from_dict(unknown)", lambda pm: PARAConfig.from_dict({"rank": 4}), "rank"),
        # adapters
        ("add_adapter.adapter_name=5", lambda pm: pm.add_adapter(5, cfg), "adapter_name"),
        ("add_adapter.adapter_name=None", lambda pm: pm.add_adapter(None, cfg), "adapter_name"),
        ("add_adapter.adapter_name='a.b'", lambda pm: pm.add_adapter("a.b", cfg), "adapter_name"),
        ("add_adapter.adapter_name='a/b'", lambda pm: pm.add_adapter("a/b", cfg), "adapter_name"),
        ("add_adapter.adapter_name='__base__'", lambda pm: pm.add_adapter("__base__", cfg), "adapter_name"),
        ("add_adapter.adapter_name=resident", lambda pm: pm.add_adapter("other", cfg), "other"),
        ("add_adapter.config=None", lambda pm: pm.add_adapter("new", None), "config"),
        ("add_adapter.config=dict", lambda pm: pm.add_adapter("new", {"r": 4}), "config"),
        ("add_adapter.layers_to_transform=[7]",
         lambda pm: pm.add_adapter("new", PARAConfig(layers_to_transform=[7])), "layers_to_transform"),
        ("add_adapter.layers_path='model.nope'",
         lambda pm: pm.add_adapter("new", PARAConfig(layers_path="model.nope")), "layers_path"),
        ("set_adapter.adapter_name='nope'", lambda pm: pm.set_adapter("nope"), "adapter_name"),
        ("set_adapter.adapter_name=5", lambda pm: pm.set_adapter(5), "adapter_name"),
        ("set_adapter.adapter_name=None", lambda pm: pm.set_adapter(None), "adapter_name"),
        ("set_adapter.adapter_name=[]", lambda pm: pm.set_adapter([]), "set_adapter"),
        ("set_adapter.adapter_name=[a,b]", lambda pm: pm.set_adapter(["default", "other"]), "set_adapter"),
        ("set_adapter.adapter_name=['__base__']", lambda pm: pm.set_adapter(["__base__"]), "adapter_name"),
        ("set_adapter.inference_mode='yes'", lambda pm: pm.set_adapter("other", inference_mode="yes"),
         "inference_mode"),
        ("delete_adapter.adapter_name='nope'", lambda pm: pm.delete_adapter("nope"), "adapter_name"),
        ("delete_adapter.adapter_name=5", lambda pm: pm.delete_adapter(5), "adapter_name"),
        ("delete_adapter.adapter_name=None", lambda pm: pm.delete_adapter(None), "adapter_name"),
        ("delete_adapter.adapter_name=[x]", lambda pm: pm.delete_adapter(["other"]), "adapter_name"),
        ("load_adapter.path=None", lambda pm: pm.load_adapter(None, "new"), "path"),
        ("load_adapter.path=5", lambda pm: pm.load_adapter(5, "new"), "path"),
        ("load_adapter.adapter_name=5", lambda pm, d="/nonexistent": pm.load_adapter(d, 5), "adapter_name"),
        ("load_adapter.adapter_name='a/b'", lambda pm: pm.load_adapter("/nonexistent", "a/b"), "adapter_name"),
        ("load_adapter.adapter_name='__base__'", lambda pm: pm.load_adapter("/nonexistent", "__base__"),
         "adapter_name"),
        ("load_adapter.adapter_name=resident", lambda pm: pm.load_adapter("/nonexistent", "other"), "other"),
        ("load_adapter.is_trainable='yes'", lambda pm: pm.load_adapter("/nonexistent", "new", is_trainable="yes"),
         "is_trainable"),
        ("load_adapter.subfolder=5", lambda pm: pm.load_adapter("/nonexistent", "new", subfolder=5), "subfolder"),
        # combining
        ("add_weighted_adapter.adapters='default'",
         lambda pm: pm.add_weighted_adapter("default", [1.0], "mix"), "adapters"),
        ("add_weighted_adapter.adapters=[]", lambda pm: pm.add_weighted_adapter([], [], "mix"), "adapters"),
        ("add_weighted_adapter.adapters=[nope]", lambda pm: pm.add_weighted_adapter(["nope"], [1.0], "mix"),
         "adapters"),
        ("add_weighted_adapter.adapters=5", lambda pm: pm.add_weighted_adapter(5, [1.0], "mix"), "adapters"),
        ("add_weighted_adapter.adapters=[5]", lambda pm: pm.add_weighted_adapter([5], [1.0], "mix"), "adapters"),
        ("add_weighted_adapter.weights=None", lambda pm: pm.add_weighted_adapter(["default"], None, "mix"),
         "weights"),
        ("add_weighted_adapter.weights=['x']", lambda pm: pm.add_weighted_adapter(["default"], ["x"], "mix"),
         "weights"),
        ("add_weighted_adapter.weights=[nan]", lambda pm: pm.add_weighted_adapter(["default"], [math.nan], "mix"),
         "weights"),
        ("add_weighted_adapter.weights=[inf]", lambda pm: pm.add_weighted_adapter(["default"], [math.inf], "mix"),
         "weights"),
        ("add_weighted_adapter.weights=short", lambda pm: pm.add_weighted_adapter(["default", "other"], [1.0], "mix"),
         "weights"),
        ("add_weighted_adapter.weights=1.0", lambda pm: pm.add_weighted_adapter(["default"], 1.0, "mix"), "weights"),
        ("add_weighted_adapter.adapter_name=resident",
         lambda pm: pm.add_weighted_adapter(["default"], [1.0], "other"), "other"),
        ("add_weighted_adapter.adapter_name='a.b'",
         lambda pm: pm.add_weighted_adapter(["default"], [1.0], "a.b"), "adapter_name"),
        ("add_weighted_adapter.adapter_name=None",
         lambda pm: pm.add_weighted_adapter(["default"], [1.0], None), "adapter_name"),
        ("add_weighted_adapter.combination_type='svd'",
         lambda pm: pm.add_weighted_adapter(["default"], [1.0], "mix", combination_type="svd"), "combination_type"),
        ("add_weighted_adapter.adapters=r-and-more",
         lambda pm: (pm.add_adapter("mean", PARAConfig(r=4, pooler="mean")),
                     pm.add_weighted_adapter(["default", "mean"], [1.0, 1.0], "mix")), "add_weighted_adapter"),
        # files
        ("save_pretrained.selected_adapters='default'",
         lambda pm: pm.save_pretrained(_tmp(), selected_adapters="default"), "selected_adapters"),
        ("save_pretrained.selected_adapters=5", lambda pm: pm.save_pretrained(_tmp(), selected_adapters=5),
         "selected_adapters"),
        ("save_pretrained.selected_adapters=[nope]",
         lambda pm: pm.save_pretrained(_tmp(), selected_adapters=["nope"]), "selected_adapters"),
        ("save_pretrained.selected_adapters=[None]",
         lambda pm: pm.save_pretrained(_tmp(), selected_adapters=[None]), "selected_adapters"),
        ("save_pretrained.selected_adapters=[]", lambda pm: pm.save_pretrained(_tmp(), selected_adapters=[]),
         "selected_adapters"),
        ("save_pretrained.save_directory=None", lambda pm: pm.save_pretrained(None), "save_directory"),
        ("save_pretrained.save_directory=5", lambda pm: pm.save_pretrained(5), "save_directory"),
        ("save_pretrained.safe_serialization=False", lambda pm: pm.save_pretrained(_tmp(), safe_serialization=False),
         "safe_serialization"),
        ("save_pretrained.max_shard_size", lambda pm: pm.save_pretrained(_tmp(), max_shard_size="1GB"),
         "max_shard_size"),
        # calls
        ("forward.adapter_names='default'", lambda pm: pm(IDS, adapter_names="default"), "adapter_names"),
        ("forward.adapter_names=5", lambda pm: pm(IDS, adapter_names=5), "adapter_names"),
        ("forward.adapter_names=short", lambda pm: pm(IDS, adapter_names=["default"]), "adapter_names"),
        ("forward.adapter_names=long", lambda pm: pm(IDS, adapter_names=["default"] * 3), "adapter_names"),
        ("forward.adapter_names=[nope]", lambda pm: pm(IDS, adapter_names=["default", "nope"]), "adapter_names"),
        ("forward.adapter_names=[5]", lambda pm: pm(IDS, adapter_names=[5, None]), "adapter_names"),
        ("forward.adapter_names=[[a]]", lambda pm: pm(IDS, adapter_names=[["default"], None]), "adapter_names"),
        ("forward.adapter_names=['']", lambda pm: pm(IDS, adapter_names=["", None]), "adapter_names"),
        ("forward.prompt_lengths=[0,1]", lambda pm: pm(IDS, prompt_lengths=[0, 1]), "prompt_lengths"),
        ("forward.prompt_lengths=[9,1]", lambda pm: pm(IDS, prompt_lengths=[9, 1]), "prompt_lengths"),
        ("forward.prompt_lengths=[-1,1]", lambda pm: pm(IDS, prompt_lengths=[-1, 1]), "prompt_lengths"),
        ("forward.prompt_lengths=short", lambda pm: pm(IDS, prompt_lengths=[2]), "prompt_lengths"),
        ("forward.prompt_lengths=float", lambda pm: pm(IDS, prompt_lengths=[2.0, 1.0]), "prompt_lengths"),
        ("forward.prompt_lengths=2", lambda pm: pm(IDS, prompt_lengths=2), "prompt_lengths"),
        ("forward.prompt_lengths='ab'", lambda pm: pm(IDS, prompt_lengths="ab"), "prompt_lengths"),
        ("forward.prompt_lengths=[[2,1]]", lambda pm: pm(IDS, prompt_lengths=[[2, 1]]), "prompt_lengths"),
        ("forward.prompt_lengths=[None,1]", lambda pm: pm(IDS, prompt_lengths=[None, 1]), "prompt_lengths"),
        ("forward.completion_mask=shape", lambda pm: pm(IDS, completion_mask=torch.ones(2, 4)), "completion_mask"),
        ("forward.completion_mask=rows", lambda pm: pm(IDS, completion_mask=torch.ones(3, 5)), "completion_mask"),
        ("forward.completion_mask='x'", lambda pm: pm(IDS, completion_mask="x"), "completion_mask"),
        ("forward.completion_mask=first", lambda pm: pm(IDS, completion_mask=torch.ones(2, 5)), "completion_mask"),
        ("forward.assistant_masks=shape",
         lambda pm: pm(IDS, completion_mask=torch.ones(2, 5), assistant_masks=torch.ones(2, 3)), "assistant_masks"),
        ("forward.reprefill='yes'", lambda pm: pm(IDS, reprefill="yes"), "reprefill"),
        ("forward.attention_mask=shape", lambda pm: pm(IDS, attention_mask=torch.ones(2, 4)), "attention_mask"),
        ("forward.attention_mask=holes",
         lambda pm: pm(IDS, attention_mask=torch.tensor([[1, 0, 1, 1, 1], [1] * 5])), "attention_mask"),
        ("forward.labels=input_ids", lambda pm: pm(IDS, labels=IDS), "prompt_lengths"),
        ("forward.input_ids=twice", lambda pm: pm(IDS, input_ids=IDS), "input_ids"),
        ("generate.adapter_names='default'", lambda pm: pm.generate(IDS, adapter_names="default"), "adapter_names"),
        ("generate.adapter_names=short", lambda pm: pm.generate(IDS, adapter_names=["default"]), "adapter_names"),
        ("generate.adapter_names=[nope]",
         lambda pm: pm.generate(input_ids=IDS, adapter_names=["nope", None]), "adapter_names"),
        ("generate.adapter_names=[{}]", lambda pm: pm.generate(IDS, adapter_names=[{}, None]), "adapter_names"),
        ("generate.reprefill='yes'", lambda pm: pm.generate(IDS, reprefill="yes"), "reprefill"),
        ("gradient_checkpointing_enable.kwargs='x'",
         lambda pm: pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs="x"),
         "gradient_checkpointing_kwargs"),
        ("gradient_checkpointing_enable.use_reentrant",
         lambda pm: pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True}),
         "use_reentrant"),
        ("set_backend('nope')", lambda pm: __import__("para_kernels").set_backend("nope"), "backend"),
    ]


_TMP = []


def _tmp() -> str:
    return _TMP[-1]


CASES = list(_config_cases()) + _model_cases()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_wrong_argument_is_refused_by_name(case, served, campaign, tmp_path):
    """Each bad (argument, value): a TypeError / ValueError naming the argument, raised before any
    decoder layer ran, with the resident adapters, the active one and the files untouched."""
    label, call, named = case
    pm, ran = served
    _TMP.append(str(tmp_path / "out"))
    before = (dict(pm.peft_config), pm.active_adapter, {n: p.requires_grad for n, p in pm.named_parameters()})
    campaign.tried("calls")
    with pytest.raises((TypeError, ValueError, KeyError)) as info:
        call(pm)
    assert named in str(info.value), (label, repr(info.value))
    assert not ran, f"{label}: a decoder layer ran before the error"
    after = (dict(pm.peft_config), pm.active_adapter, {n: p.requires_grad for n, p in pm.named_parameters()})
    if "r-and-more" not in label:  # that case adds "mean" on purpose before the refused combination
        assert after == before, label
    assert not os.path.exists(_tmp()), f"{label}: files written before the error"
