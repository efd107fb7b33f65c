"""One training loop and one evaluation for every method.

Contract:
- ``batch_order(n, steps, batch, seed)``: the example indices of every step (epochs reshuffled
  from ``seed``); every method of a seed gets the same list, so the same batches in the same order.
- ``collate(tok, examples, left)``: input_ids, attention_mask, labels; labels are -100 on the
  prompt (what PARA pools) and on padding, the answer tokens and end-of-turn supervised. Training
  and losses pad right; generation pads left.
- ``train(model, tok, data, order, lr, warmup)``: AdamW (no weight decay) on the trainable
  parameters, linear warm-up then linear decay to 0; returns {"losses", "step_s"} (step_s: mean
  wall time per step, the first step excluded when there are more than two), and
  "train_loss_before" / "train_loss_after": ``mean_loss`` on the first ``probe`` training examples
  before the first step and after the last (the check that training makes the loss fall).
- ``mean_loss(model, tok, data, batch)``: token-weighted mean loss over the answers.
- ``generate(model, tok, data, batch, max_new)``: greedy decoding, the decoded answers.
- ``on_step`` / ``on_batch`` callbacks run after every step / batch (the progress bar).
"""
from __future__ import annotations

import random
import time

import torch


def batch_order(n: int, steps: int, batch: int, seed: int) -> list[list[int]]:
    rng, pool, out = random.Random(f"order:{seed}"), [], []
    for _ in range(steps):
        while len(pool) < batch:
            perm = list(range(n))
            rng.shuffle(perm)
            pool += perm
        out.append(pool[:batch])
        pool = pool[batch:]
    return out


def collate(tok, examples, left: bool = False, with_answer: bool = True):
    rows, labels = [], []
    for e in examples:
        p = tok.prompt_ids(e.prompt)
        a = tok.answer_ids(e.answer) if with_answer else []
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    lab = torch.full_like(ids, -100)
    for i, (r, lb) in enumerate(zip(rows, labels)):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl], mask[i, sl], lab[i, sl] = torch.tensor(r), 1, torch.tensor(lb)
    return ids, mask, lab


def train(model, tok, data, order, lr: float, warmup: float = 0.1, on_step=None, probe: int = 16) -> dict:
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, int(warmup * len(order)), len(order))
    before = mean_loss(model, tok, data[:probe], probe, on_step)
    model.train()
    losses, times = [], []
    for idx in order:
        t0 = time.perf_counter()
        ids, mask, lab = collate(tok, [data[i] for i in idx])
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        if on_step:
            on_step()
    model.eval()
    kept = times[1:] if len(times) > 2 else times
    return {"losses": losses, "step_s": sum(kept) / max(1, len(kept)), "train_loss_before": before,
            "train_loss_after": mean_loss(model, tok, data[:probe], probe, on_step)}


@torch.no_grad()
def mean_loss(model, tok, data, batch: int = 16, on_batch=None) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch):
        ids, mask, lab = collate(tok, data[i:i + batch])
        n = int((lab[:, 1:] != -100).sum())
        total += float(model(input_ids=ids, attention_mask=mask, labels=lab).loss) * n
        count += n
        if on_batch:
            on_batch()
    return total / max(1, count)


@torch.no_grad()
def generate(model, tok, data, batch: int = 16, max_new: int = 16, on_batch=None) -> list[str]:
    model.eval()
    out = []
    for i in range(0, len(data), batch):
        ids, mask, _ = collate(tok, data[i:i + batch], left=True, with_answer=False)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        out += [tok.decode(row[ids.shape[1]:]) for row in gen]
        if on_batch:
            on_batch()
    return out
