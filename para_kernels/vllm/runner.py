"""The hooks into vLLM's model runner: every forward of a PARA model runs inside its step.

``GPUModelRunner._model_forward`` (documented by vLLM as the method to override for model
execution; the CPU runner inherits it) is wrapped once (and ``_update_states``, so that a
preempted request gives its slot back): for a model with ``para_serving`` it
builds the step's layout (serving.ServingState.begin_step) and sets ``serving.STEP`` for the
duration of the call; other models go straight through. After a step that scaled tokens, a forward
in which no PARA layer ran (a compiled graph traced without PARA, another runner) raises instead
of returning the bare model's output as if it were the adapters'.
"""
from __future__ import annotations

from .serving import STEP, ServingError


def install() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner._model_forward, "para_wrapped", False):
        return
    original = GPUModelRunner._model_forward

    def _model_forward(self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None,
                       **model_kwargs):
        state = getattr(self.get_model(), "para_serving", None)
        if state is None:
            return original(self, input_ids, positions, intermediate_tensors, inputs_embeds, **model_kwargs)
        tokens = input_ids if input_ids is not None else inputs_embeds
        step = state.begin_step(self, tokens.shape[0])
        token = STEP.set(step)
        try:
            out = original(self, input_ids, positions, intermediate_tensors, inputs_embeds, **model_kwargs)
        finally:
            STEP.reset(token)
        if step is not None and step.layers_seen == 0:
            raise ServingError("a PARA step ran without reaching any PARA layer (the model was compiled or "
                               "captured without PARA?): its adapters would have been ignored. The PARA config "
                               "hook forces enforce_eager; keep it (docs/vllm.md)")
        return out

    original_update = GPUModelRunner._update_states

    def _update_states(self, scheduler_output):
        out = original_update(self, scheduler_output)
        state = getattr(self.get_model(), "para_serving", None) if hasattr(self, "model") else None
        if state is not None and scheduler_output.preempted_req_ids:
            state.release(scheduler_output.preempted_req_ids, preempted=True)  # pooled again on resume
        return out

    _model_forward.para_wrapped = True
    GPUModelRunner._model_forward = _model_forward
    GPUModelRunner._update_states = _update_states
