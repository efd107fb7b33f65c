"""Run in the vLLM venv: ``python -m bench.vllm.measure <work folder> <out json>`` (prepare.py wrote
the folder and ``plan.json`` in it).

Four engines, each in vLLM's default multi-process mode and eager (PARA forces eager mode, see
docs/vllm.md; the others are made eager too so that the ratios compare the adapters, not
compilation), resident at once: ``bare`` (the backbone's own class), ``para`` (PARALlamaForCausalLM,
a PARA adapter per tenant), ``lora8`` and ``lora16`` (vLLM's multi-LoRA, ``max_loras`` = tenants).
Every round times one ``generate`` of the same batch on each engine, in an order rotated per round,
so that the ratios to bare are paired within a round. Before timing, a check: every adapter engine
gives tokens that differ from bare for the adapter requests (adapters that were silently ignored
would leave them equal), and PARA's requests with no adapter equal bare exactly.
"""
from __future__ import annotations

import json
import os
import sys
import time


def _engines(plan: dict) -> dict:
    from vllm import LLM

    common = dict(max_model_len=plan["max_model_len"], dtype="float32", enforce_eager=True, seed=0,
                  max_num_seqs=plan["batch"])
    engines = {}
    t0 = time.perf_counter()
    engines["bare"] = LLM(plan["model"], **common)
    os.environ["PARA_VLLM_ADAPTERS"] = json.dumps({f"t{t}": p for t, p in enumerate(plan["adapters"]["para"])})
    os.environ["PARA_VLLM_MAX_ADAPTERS"] = str(plan["tenants"])
    engines["para"] = LLM(plan["model"], hf_overrides={"architectures": ["PARALlamaForCausalLM"]}, **common)
    for r in plan["lora_ranks"]:
        engines[f"lora{r}"] = LLM(plan["model"], enable_lora=True, max_loras=plan["tenants"], max_lora_rank=r,
                                  **common)
    return engines, time.perf_counter() - t0


def _requests(plan: dict, method: str):
    """(prompts, sampling params, lora requests) of one batch: request i is tenant i % tenants."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    prompts, params, loras = [], [], []
    for i in range(plan["batch"]):
        t = i % plan["tenants"]
        prompts.append(plan["prompts"][i % len(plan["prompts"])])
        extra = {"para_adapter": f"t{t}"} if method == "para" else None
        params.append(SamplingParams(max_tokens=plan["new_tokens"], temperature=0.0, ignore_eos=True,
                                     extra_args=extra))
        loras.append(LoRARequest(f"{method}-t{t}", t + 1, plan["adapters"][method][t]) if method.startswith("lora")
                     else None)
    return prompts, params, loras


def _run(llm, batch) -> tuple[float, list]:
    prompts, params, loras = batch
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, lora_request=loras if any(loras) else None, use_tqdm=False)
    return time.perf_counter() - t0, [list(o.outputs[0].token_ids) for o in outs]


def main(work: str, out: str) -> int:
    with open(os.path.join(work, "plan.json")) as f:
        plan = json.load(f)
    import torch
    import vllm

    engines, start_s = _engines(plan)
    batches = {m: _requests(plan, m) for m in engines}
    checks = {}
    _, bare_tokens = _run(engines["bare"], batches["bare"])
    for m in engines:
        if m == "bare":
            continue
        _, toks = _run(engines[m], batches[m])
        changed = sum(a != b for a, b in zip(toks, bare_tokens))
        checks[f"{m}_requests_differ_from_bare"] = {"value": changed, "of": len(toks), "ok": changed > 0}
    none_batch = _requests(plan, "bare")  # PARA's engine, no adapter on any request
    _, none_tokens = _run(engines["para"], none_batch)
    checks["para_no_adapter_equals_bare"] = {"value": int(none_tokens != bare_tokens), "ok": none_tokens == bare_tokens}
    for m in engines:  # warm-up: one untimed batch each
        _run(engines[m], batches[m])
    order, times = list(engines), {m: [] for m in engines}
    for r in range(plan["rounds"]):
        rotated = order[r % len(order):] + order[:r % len(order)]
        for m in rotated:
            elapsed, _ = _run(engines[m], batches[m])
            times[m].append(elapsed)
        print(f"round {r + 1}/{plan['rounds']}: " + ", ".join(f"{m} {times[m][-1]:.2f} s" for m in order),
              file=sys.stderr, flush=True)
    result = {"plan": plan, "vllm": vllm.__version__, "torch": torch.__version__, "start_s": start_s,
              "checks": checks, "times_s": times,
              "ratios": {m: [t / b for t, b in zip(times[m], times["bare"])] for m in engines if m != "bare"}}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    for llm in engines.values():
        del llm
    return 0 if all(c["ok"] for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
