"""Per-request vectors inside a vLLM worker: computed once when a request's prompt is prefilled,
kept in a slot of the request's own until it finishes, applied to every token it schedules.

Contract:
- ``ServingState`` belongs to one PARA model instance (``model.para_serving``). It holds the
  adapter registry, the slot banks and {request id: slot}; nothing in it is shared between
  requests except slot 0, the all-ones row of requests with no adapter.
- Slot banks, per decoder layer: ``qkv[l]`` ``[S, q+k+v]`` and ``gate_up[l]`` ``[S, 2·up]`` (this
  rank's shard), ones outside the q, v and up columns, in the model's dtype; ``S`` is
  ``max_num_seqs + 1``. A token is scaled by ``para::scale(out, bank, token_rows)`` (the packed
  layout), one call per merged projection.
- ``begin_step(runner, num_tokens)`` reads the runner's batch (request ids, ``query_start_loc``,
  computed and prompt token counts), frees the slots of requests that left the runner, gives a
  slot to every request whose prompt completes in this step, and returns the ``Step`` (token ->
  slot, the prompts to pool) or ``None`` when no token of the step is scaled (the bare model's
  exact computation). A prompt split across steps (chunked prefill, a prefix-cache hit, a KV
  transfer) is an error, not a silent pooling of part of it: the config hook turns these off. A
  preempted request loses its slot (``release``, from the runner's state update) and is pooled
  again when it is prefilled again; new input of a continued session keeps the first vectors.
- ``Step.prefill(layer, stream, normed)`` pools the completing prompts at a layer's input and
  writes their slots' rows of that layer (``para::pool_generate``, one launch per generator
  signature: adapters of one signature share a stacked bank, adapters.py).
"""
from __future__ import annotations

import contextvars
import dataclasses
import os

import numpy as np
import torch

from .. import ops
from . import ADAPTER_KEY, PATH_KEY
from .adapters import AdapterRegistry, ModelFacts

STEP: contextvars.ContextVar = contextvars.ContextVar("para_vllm_step", default=None)


class ServingError(RuntimeError):
    """A batch PARA cannot serve correctly (never served silently wrong)."""


@dataclasses.dataclass
class Shard:
    """Where this tensor-parallel rank's columns sit in the whole model's q, v and up."""
    q: tuple  # (start, size) in l_q; bank columns [0, size)
    k_size: int
    v: tuple  # (start, size) in l_v; bank columns [q size + k size, + size)
    up: tuple  # (start, size) in l_u; gate_up bank columns [size, 2 size)


@dataclasses.dataclass
class Prefill:
    adapters: list  # adapters.LoadedAdapter of one generator signature: one pool_generate per layer
    ids: torch.Tensor  # [B] long, each row's index in adapters
    slots: torch.Tensor  # [B] long
    start: torch.Tensor  # [B] long, token index of the prompt's first token in this step's input
    end: torch.Tensor  # [B] long


@dataclasses.dataclass
class Step:
    state: "ServingState"
    token_rows: torch.Tensor  # [num_tokens] slot of each token (0: no adapter, padding)
    prefills: list
    runs: list  # [(start, end, slot)]: the step's runs of consecutive tokens with one nonzero slot
    layers_seen: int = 0

    def prefill(self, layer: int, stream: torch.Tensor, normed: torch.Tensor) -> None:
        if self.prefills:
            self.state.write_vectors(layer, self.prefills, stream, normed)


def shard_of(qkv_proj, gate_up_proj) -> Shard:
    """This rank's columns of q, v and up (vLLM's QKVParallelLinear / MergedColumnParallelLinear)."""
    hd, rank = qkv_proj.head_size, getattr(qkv_proj, "tp_rank", 0)
    if getattr(qkv_proj, "v_head_size", hd) != hd:
        raise ServingError(f"qkv_proj has v_head_size {qkv_proj.v_head_size} != head_size {hd}: not the LLaMA layout")
    nq, nkv = qkv_proj.num_heads * hd, qkv_proj.num_kv_heads * hd
    kv_index = rank // getattr(qkv_proj, "num_kv_head_replicas", 1)
    up_local = gate_up_proj.output_sizes[1] // getattr(gate_up_proj, "tp_size", 1)
    return Shard((rank * nq, nq), nkv, (kv_index * nkv, nkv), (getattr(gate_up_proj, "tp_rank", 0) * up_local,
                                                                 up_local))


class ServingState:
    def __init__(self, facts: ModelFacts, shards: dict, max_num_seqs: int, device, dtype: torch.dtype,
                 max_adapters: int | None = None, known: dict | None = None):
        self.shards = shards  # {layer index: Shard}
        self.device, self.dtype = device, dtype
        self.registry = AdapterRegistry(facts, device, dtype, max_adapters or default_max_adapters(),
                                        known if known is not None else known_adapters())
        self.num_slots = max_num_seqs + 1
        self.qkv = {i: torch.ones(self.num_slots, s.q[1] + s.k_size + s.v[1], device=device, dtype=dtype)
                    for i, s in shards.items()}
        self.gate_up = {i: torch.ones(self.num_slots, 2 * s.up[1], device=device, dtype=dtype)
                        for i, s in shards.items()}
        self.slot_of: dict[str, int] = {}  # request id -> slot
        self.free = list(range(self.num_slots - 1, 0, -1))  # slot 0 stays all ones
        self.preempted = 0  # slots given back by preemption (a count for tests and logs)

    # ------------------------------------------------------------------ per step
    def begin_step(self, runner, num_tokens: int) -> Step | None:
        batch = runner.input_batch
        n = batch.num_reqs
        requests = runner.requests
        self.release([r for r in self.slot_of if r not in requests])  # finished or aborted
        if n == 0:
            return None
        qsl = runner.query_start_loc.np[:n + 1]
        if qsl[n] > num_tokens:
            raise ServingError(f"the batch schedules {int(qsl[n])} tokens but the forward has {num_tokens}: the "
                               "runner's layout is not this forward's; refusing to guess which tokens are whose")
        computed, prompt = batch.num_computed_tokens_cpu[:n], batch.num_prompt_tokens[:n]
        slots = np.zeros(n, dtype=np.int64)
        groups: dict[tuple, dict] = {}  # generator signature -> {id(adapter): [adapter, [(slot, start, end)]]}
        for i, rid in enumerate(batch.req_ids[:n]):
            params = requests[rid].sampling_params
            extra = params.extra_args if params is not None else None
            name = extra.get(ADAPTER_KEY) if extra else None
            if name is None:
                continue
            scheduled = int(qsl[i + 1] - qsl[i])
            done, total = int(computed[i]), int(prompt[i])
            slot = self.slot_of.get(rid)
            if done == 0 and total <= scheduled:  # the whole prompt in this step (a new or a resumed request): pool it
                adapter = self.registry.get(name, extra.get(PATH_KEY))
                if slot is None:
                    if not self.free:
                        raise ServingError(f"no free PARA slot for request {rid!r}: {self.num_slots - 1} slots "
                                           "(max_num_seqs) are held by running requests")
                    slot = self.slot_of[rid] = self.free.pop()
                # one pool_generate per generator signature; rows know their adapter object, never a name alone
                group = groups.setdefault(adapter.config.generator_signature(), {})
                group.setdefault(id(adapter), [adapter, []])[1].append((slot, int(qsl[i]), int(qsl[i]) + total))
            elif slot is None:
                if done < total:
                    raise ServingError(
                        f"request {rid!r}: {done} of its {total} prompt tokens were computed before this step "
                        f"and {scheduled} are scheduled now (chunked prefill, a prefix-cache hit or a KV "
                        "transfer), so PARA cannot pool its whole prompt; the PARA config hook turns these off, "
                        "keep them off (docs/vllm.md)")
                raise ServingError(f"request {rid!r} uses PARA adapter {name!r} but its prompt was not "
                                   "prefilled through PARA (no vectors): refusing to serve it with the bare model")
            # else: a request with vectors continues (decode, or new input of a continued session: the
            # vectors of its first prompt are kept, as PARAModel.generate keeps them on a cache)
            slots[i] = slot
        if not slots.any():
            return None
        rows = np.zeros(num_tokens, dtype=np.int64)
        rows[:qsl[n]] = np.repeat(slots, np.diff(qsl))
        prefills = []
        for group in groups.values():
            members = list(group.values())
            entries = [(k, *e) for k, (_, es) in enumerate(members) for e in es]
            ids, s, b, e = (torch.tensor(c, dtype=torch.long, device=self.device) for c in zip(*entries))
            prefills.append(Prefill([a for a, _ in members], ids, s, b, e))
        change = np.flatnonzero(np.diff(rows[:qsl[n]], prepend=-1, append=-1))  # where a run of one slot starts
        runs = [(int(a), int(z), int(rows[a])) for a, z in zip(change[:-1], change[1:]) if rows[a]]
        return Step(self, torch.from_numpy(rows).to(self.device), prefills, runs)

    def release(self, request_ids, preempted: bool = False) -> None:
        """Give back the slots of requests that left the batch for good or lost their KV cache
        (``preempted``: a resumed request is prefilled again, its prompt pooled again)."""
        for rid in request_ids:
            slot = self.slot_of.pop(rid, None)
            if slot is not None:
                self.free.append(slot)
                self.preempted += preempted

    # ------------------------------------------------------------------ prefill
    def write_vectors(self, layer: int, prefills: list, stream: torch.Tensor, normed: torch.Tensor) -> None:
        shard, qkv, gate_up = self.shards[layer], self.qkv[layer], self.gate_up[layer]
        for p in prefills:
            qkv[p.slots] = 1.0
            gate_up[p.slots] = 1.0
            if layer not in p.adapters[0].layers:  # layers_to_transform leaves this layer alone
                continue
            w = self.registry.stacked(p.adapters, layer)
            config = p.adapters[0].config
            hidden = stream if config.pool_input == "residual" else normed
            w_sa = w["w_sa"][p.ids].to(hidden.dtype) if "w_sa" in w else None
            v = ops.pool_generate(hidden, p.start, p.end, config.pooler, w_sa, w["w_down"], w["b_down"], w["w_up"],
                                  w["b_up"], p.ids, config.activation, w.get("act_params")).to(self.dtype)
            sizes = self.registry.facts.sizes
            pieces = dict(zip(config.targets, v.split([sizes[t] for t in config.targets], dim=1)))
            if "q" in pieces:  # bank columns: [q | k | v] of this rank's shard, [gate | up]
                start, size = shard.q
                qkv[p.slots, :size] = pieces["q"][:, start:start + size]
            if "v" in pieces:
                start, size = shard.v
                first = shard.q[1] + shard.k_size
                qkv[p.slots, first:first + size] = pieces["v"][:, start:start + size]
            if "up" in pieces:
                start, size = shard.up
                gate_up[p.slots, size:] = pieces["up"][:, start:start + size]

    # ------------------------------------------------------------------ worker control
    def load(self, name: str, path: str) -> None:
        self.registry.load(name, path)

    def unload(self, name: str) -> bool:
        return self.registry.unload(name)


def known_adapters() -> dict:
    """{name: folder} from ``PARA_VLLM_ADAPTERS`` (a JSON object), checked."""
    import json

    raw = os.environ.get("PARA_VLLM_ADAPTERS", "").strip()
    if not raw:
        return {}
    try:
        known = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"PARA_VLLM_ADAPTERS must be a JSON object {{name: adapter folder}}: {e}") from None
    if not isinstance(known, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in known.items()):
        raise ValueError(f"PARA_VLLM_ADAPTERS must be a JSON object {{name: adapter folder}}, got {raw[:200]!r}")
    return known


def default_max_adapters() -> int:
    raw = os.environ.get("PARA_VLLM_MAX_ADAPTERS", "8")
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"PARA_VLLM_MAX_ADAPTERS must be a positive int, got {raw!r}")
    return value
