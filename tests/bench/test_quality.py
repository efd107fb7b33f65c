"""The quality harness (bench/quality): disjoint splits, the metrics on hand-made cases, the
methods (PEFT's own LoRA and (IA)3, the matched LoRA rank) and ``--quick`` end to end (every
method's training loss falls, the bare model is scored zero-shot, the JSON and Markdown carry
every field). About 15 s on 2 cores."""
from __future__ import annotations

import json
import os

import pytest

from bench.quality import data as D
from bench.quality import methods as M
from bench.quality import metrics, train
from bench.quality.backbone import CharTok, tiny

SIZES = dict(train=40, validation=10, test=10)


def _prompts(rows):
    return {e.prompt for e in rows}


@pytest.mark.parametrize("family", list(D.FAMILIES) + [D.MIXTURE])
def test_splits_share_no_prompt(family):
    splits = D.mixture_splits(SIZES, 3) if family == D.MIXTURE else D.make_splits(family, SIZES, 3)
    k = len(D.FAMILIES) if family == D.MIXTURE else 1
    tr, va, te = (_prompts(splits[s]) for s in D.SPLITS)
    assert (len(tr), len(va), len(te)) == (k * 40, k * 10, k * 10)  # distinct within each split too
    assert not (tr & va) and not (tr & te) and not (va & te)
    again = D.mixture_splits(SIZES, 3) if family == D.MIXTURE else D.make_splits(family, SIZES, 3)
    assert again == splits  # deterministic from the seed
    if family == D.MIXTURE:
        assert {e.family for e in splits["test"]} == set(D.FAMILIES)


def test_families_have_their_answers():
    rows = D.make_splits("arith", SIZES, 0)["train"] + D.make_splits("sort", SIZES, 0)["train"]
    for e in rows:
        if e.family == "arith":
            a, b, c = (int(t) for t in e.prompt.replace("Compute ", "").split(".")[0].replace("+", "").replace(
                "-", "").split())
            assert e.answer == str(a + b - c)
        else:
            nums = [int(t) for t in e.prompt.split(": ")[1].split()]
            assert e.answer == " ".join(map(str, sorted(nums)))
    assert all(e.answer in e.labels for e in D.make_splits("topic", SIZES, 0)["test"])


@pytest.mark.parametrize("pred,gold,case_sensitive,ok", [
    ("83", "83", False, True), ("  83\n", "83", False, True), ("83.", "83", False, True),
    ("84", "83", False, False), ("83 4", "83", False, False), ("8 3", "83", False, False),
    ("tiger  apple", "tiger apple", False, True), ("Tiger Apple", "tiger apple", False, True),
    ("Tiger Apple", "tiger apple", True, False), ("tiger apple\nmore text", "tiger apple", False, True),
    ("apple tiger", "tiger apple", False, False), ("", "83", False, False),
])
def test_exact_match(pred, gold, case_sensitive, ok):
    assert metrics.exact_match(pred, gold, case_sensitive) is ok


@pytest.mark.parametrize("pred,label", [
    ("positive", "positive"), ("Negative.", "negative"), ("The review is positive.", "positive"),
    ("positive or negative?", None), ("nonpositive", None), ("neutral", None), ("  NEGATIVE\n", "negative"),
    ("", None), ("\nnegative", "negative"), ("positive\nnegative", "positive"),
])
def test_label_of(pred, label):
    assert metrics.label_of(pred, ("positive", "negative")) == label


def test_score_counts_accuracy_for_label_tasks_only():
    labels = ("positive", "negative")
    rows = [D.Example("sentiment", f"p{i}", a, labels) for i, a in enumerate(["positive", "negative", "negative"])]
    s = metrics.score(rows, ["positive", "It is negative.", "positive or negative"])
    assert s == {"exact_match": 1 / 3, "accuracy": 2 / 3, "n": 3}  # the last names both labels: wrong
    s = metrics.score([D.Example("arith", "p", "7")], ["7"])
    assert s == {"exact_match": 1.0, "n": 1}


def test_collate_masks_the_prompt():
    tok = CharTok()
    rows = D.make_splits("arith", SIZES, 0)["train"][:3]
    ids, mask, lab = train.collate(tok, rows)
    for i, e in enumerate(rows):
        p, a = tok.prompt_ids(e.prompt), tok.answer_ids(e.answer)
        assert lab[i, :len(p)].eq(-100).all() and lab[i, len(p):len(p) + len(a)].tolist() == a
        assert lab[i, len(p) + len(a):].eq(-100).all() and mask[i].sum() == len(p) + len(a)
    assert train.batch_order(10, 7, 4, 1) == train.batch_order(10, 7, 4, 1)


def test_methods_are_peft_own_and_the_rank_is_matched():
    import peft
    from peft.tuners.ia3 import IA3Model
    from peft.tuners.lora import LoraModel

    import para_kernels as pk

    backbone, _ = tiny()
    target = M.para_count(backbone, M.PARA_DEFAULT)
    r = M.matched_lora_rank(backbone, target)
    assert all(abs(M.lora_count(backbone, r) - target) <= abs(M.lora_count(backbone, k) - target)
               for k in range(1, 200))
    lora = M.build(M.Method("lora", "lora", dict(r=r)), backbone, 0)
    assert isinstance(lora, peft.PeftModel) and isinstance(lora.base_model, LoraModel)
    assert M.trainable(lora) == M.lora_count(backbone, r)
    ia3 = M.build(M.Method("ia3", "ia3"), backbone, 0)
    assert isinstance(ia3, peft.PeftModel) and isinstance(ia3.base_model, IA3Model)
    para = M.build(M.Method("para", "para", dict(M.PARA_DEFAULT)), backbone, 0)
    assert isinstance(para, pk.PARAModel) and M.trainable(para) == target
    assert all(p.requires_grad for p in backbone.parameters())  # built on copies: the backbone is untouched
    names = [m.name for m in M.default_methods(backbone)]
    assert names[:3] == ["bare", "para", f"lora-r{r} (matched)"] and "ia3" in names


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    from bench.quality import run

    out = tmp_path_factory.mktemp("quality")
    path = run.run("quick", out=str(out), progress=False)
    with open(path) as f:
        return path, json.load(f)


def test_quick_every_method_trains(quick):
    _, res = quick
    assert not res["skipped"]
    for name, r in res["methods"].items():
        assert len(r["runs"]) == 1
        run = r["runs"][0]
        if r["kind"] == "bare":
            assert r["trainable"] == 0 and run["lr"] is None and "losses" not in run
            continue
        assert run["train_loss_after"] < run["train_loss_before"] - 0.05, name
        assert run["lr"] in res["grids"][r["kind"]] and set(run["grid"]) == {str(x) for x in res["grids"][r["kind"]]}
        assert min(run["grid"].values()) == run["val_loss"]
        assert len(run["losses"]) == res["config"]["steps"] and run["step_s"] > 0


def test_quick_writes_every_field(quick):
    path, res = quick
    for key in ("benchmark", "mode", "backbone", "config", "grids", "picked_lr", "families", "methods", "skipped",
                "wall_s", "environment"):
        assert key in res, key
    assert res["environment"]["git"] and res["environment"]["date_utc"]
    for name, r in res["methods"].items():  # the bare model too: scored zero-shot on every family
        run = r["runs"][0]
        assert set(run["families"]) == set(D.FAMILIES), name
        assert 0 <= run["score"] <= 1 and run["test_loss"] > 0 and run["samples"]
        assert set(r["summary"]) == {"score", "exact_match", "test_loss", "step_s"}
        assert all("accuracy" in run["families"][f] for f in D.LABELS)
    md = path[:-5] + ".md"
    text = open(md).read()
    for needle in ("commit", "Machine", "| method |", "reverse", "bare", "ia3", "matched", "decode ÷ bare"):
        assert needle in text, needle
    assert os.path.getsize(path[:-5] + ".png") > 1000


def test_serving_cost_quotes_only_what_the_serving_benchmark_measured(tmp_path):
    from bench.quality import run

    methods = [M.Method("para", "para", dict(M.PARA_DEFAULT)), M.Method("lora-r8", "lora", dict(r=8)),
               M.Method("lora-r19 (matched)", "lora", dict(r=19)), M.Method("ia3", "ia3")]
    ratio = lambda m: {"ratio": {"median": m, "q1": m - 0.01, "q3": m + 0.01}}
    bench = {"env": {"date_utc": "2026-01-01T00:00:00Z", "git": {"commit": "abc"}},
             "serving": {"model_name": "m", "config": {"lora_r": 8, "batch": 8},
                         "decode": {"para": ratio(1.01), "peft_lora": ratio(1.25), "ia3": ratio(0.99)}}}
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(bench))
    cost = run.serving_cost(methods, str(path))
    assert cost["commit"] == "abc" and cost["date_utc"] == "2026-01-01T00:00:00Z"
    assert {k: v["median"] for k, v in cost["decode_ratio"].items()} == {"para": 1.01, "lora-r8": 1.25, "ia3": 0.99}
    assert run.serving_cost(methods, str(tmp_path / "missing.json")) is None


def test_report_flags_a_learning_rate_at_the_end_of_its_grid():
    from bench.quality import report

    res = {"grids": {"para": [1, 2, 3], "lora": [1, 2, 3], "ia3": [1, 2, 3]},
           "picked_lr": {"para": 2, "lora-r8": 3, "ia3": 1},
           "methods": {"para": {"kind": "para"}, "lora-r8": {"kind": "lora"}, "ia3": {"kind": "ia3"}}}
    flagged = report._edges(res)
    assert len(flagged) == 2 and flagged[0].startswith("lora-r8 (3, top") and flagged[1].startswith("ia3 (1, bottom")


def test_full_runs_every_ablation_at_paras_learning_rate(tmp_path):
    """--full: PARA's ablations (pooler, r, targets, activation) train on PARA's picked rate and
    get their own table in the report."""
    from bench.quality import run

    path = run.run("quick", full=True, out=str(tmp_path), progress=False, only=["para"], steps=4)
    res = json.loads(open(path).read())
    ablations = {n: r for n, r in res["methods"].items() if r["ablation"]}
    want = {f"para {axis}={tag}" for axis, variants in M.ABLATIONS.items() for tag, _ in variants}
    assert set(ablations) == want and not res["skipped"]
    assert {"para pooler=max", "para activation=rational", "para r=32", "para targets=qv"} <= want
    for name, r in ablations.items():
        assert r["runs"][0]["lr"] == res["picked_lr"]["para"] and r["runs"][0]["grid"] is None, name
    trainable = {n: r["trainable"] for n, r in res["methods"].items()}
    assert trainable["para r=4"] < trainable["para"] < trainable["para r=32"]
    assert trainable["para targets=qv"] < trainable["para"]
    assert "Ablations (PARA, at PARA's learning rate)" in open(path[:-5] + ".md").read()
