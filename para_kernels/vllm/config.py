"""The PARA model classes' config hook (vLLM's ``MODELS_CONFIG_MAP``), run when the engine's
config is built, before anything is compiled or allocated.

- Prefix caching and chunked prefill off: a request's vectors pool its whole prompt in one
  forward (a prompt split across steps, or partly served from another request's cache, has no
  whole prompt to pool); ``max_num_batched_tokens`` is raised to ``max_model_len`` so that the
  longest prompt fits one step.
- Eager mode: the vectors are per request and per step, set outside the model; vLLM's
  torch.compile traces the model once (at warm-up, with no request) and would replay a graph
  without them. Registering the PARA step as a custom op that compile splits on, as attention
  is, would lift this (docs/vllm.md).
- Refused with the reason: speculative decoding, vLLM's own LoRA in the same engine, pipeline
  parallelism, KV transfer (a request arriving with its prompt computed elsewhere), micro-batching
  (model threads that do not see the step), the V2 model runner (no ``_model_forward`` to hook).
- The worker extension (worker.py) is set when none is given, for load / unload at run time.
- ``PARA_VLLM_ENGINE=1`` is set in this process's environment: the front end then accepts requests
  naming an adapter (admission.py); elsewhere they are refused rather than served bare.
Each change is logged once, with why.
"""
from __future__ import annotations

import logging
import os

from vllm.model_executor.models.config import VerifyAndUpdateConfig

from .admission import ENGINE_ENV, FACTS_ENV

logger = logging.getLogger("vllm.para_kernels")  # under vLLM's logger: its handlers and level
WORKER_EXTENSION = "para_kernels.vllm.worker.PARAWorkerExtension"


class PARAConfigHook(VerifyAndUpdateConfig):
    @classmethod
    def verify_and_update_config(cls, vllm_config) -> None:
        model, cache, scheduler = vllm_config.model_config, vllm_config.cache_config, vllm_config.scheduler_config
        parallel = vllm_config.parallel_config
        for what, value in (("speculative decoding", vllm_config.speculative_config),
                            ("vLLM's LoRA (enable_lora)", vllm_config.lora_config),
                            ("pipeline parallelism", parallel.pipeline_parallel_size > 1),
                            ("KV transfer (kv_transfer_config)", vllm_config.kv_transfer_config),
                            ("micro-batching (enable_dbo, ubatch_size)", parallel.use_ubatching)):
            if value:
                raise ValueError(f"para_kernels.vllm does not support {what}; serve PARA adapters without it")
        if vllm_config.use_v2_model_runner:
            raise ValueError("para_kernels.vllm needs vLLM's V1 model runner (the V2 runner has no _model_forward "
                             "hook): set VLLM_USE_V2_MODEL_RUNNER=0")
        if cache.enable_prefix_caching:
            cache.enable_prefix_caching = False
            logger.warning("PARA: prefix caching off (a request's vectors pool its whole prompt in one forward)")
        if scheduler.enable_chunked_prefill:
            scheduler.enable_chunked_prefill = False
            logger.warning("PARA: chunked prefill off (a request's vectors pool its whole prompt in one forward)")
        if scheduler.long_prefill_token_threshold:
            scheduler.long_prefill_token_threshold = 0
            logger.warning("PARA: long_prefill_token_threshold 0 (a request's prompt in one step)")
        if scheduler.max_num_scheduled_tokens is not None and scheduler.max_num_scheduled_tokens < model.max_model_len:
            scheduler.max_num_scheduled_tokens = model.max_model_len
            logger.warning("PARA: max_num_scheduled_tokens -> max_model_len (the longest prompt in one step)")
        if scheduler.max_num_batched_tokens < model.max_model_len:
            logger.warning("PARA: max_num_batched_tokens %d -> max_model_len %d (the longest prompt in one step)",
                        scheduler.max_num_batched_tokens, model.max_model_len)
            scheduler.max_num_batched_tokens = model.max_model_len
        if not model.enforce_eager:
            model.enforce_eager = True
            logger.warning("PARA: enforce_eager=True: the per-request vectors are set per step outside the model, "
                           "and a torch.compile / CUDA-graph trace would replay the model without them "
                           "(docs/vllm.md)")
        if not parallel.worker_extension_cls:
            parallel.worker_extension_cls = WORKER_EXTENSION
        from .models import model_facts

        os.environ[FACTS_ENV] = model_facts(model.hf_config).to_json()  # what the front end checks adapters against
        os.environ[ENGINE_ENV] = "1"  # the front end accepts para_adapter (admission.py)
