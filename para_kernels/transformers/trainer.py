"""The Hugging Face Trainer for a PARAModel: checkpoints hold the adapters, not the backbone.

``Trainer`` saves any model that is not a ``PreTrainedModel`` or a PEFT model as one full state
dict (the frozen backbone included) and cannot resume from adapter files it does not know.
:class:`PARATrainer` changes only that: ``save_model()`` and every checkpoint write the adapters
as ``save_pretrained`` does (``default`` at ``<dir>``, others in ``<dir>/<adapter>/``; checkpoints
of the first layout, every adapter in ``<dir>/<adapter>/``, still resume)
and the training arguments as JSON; ``resume_from_checkpoint`` and ``load_best_model_at_end``
copy the saved weights back into the same parameters, so the optimizer's references stay valid.
"""
from __future__ import annotations

import os

import torch
from transformers import Trainer

from .io import CONFIG_NAME, DEFAULT_ADAPTER, AdapterFileError
from .model import PARAModel

TRAINING_ARGS_JSON = "training_args.json"


def _saved_folder(checkpoint: str, name: str) -> str | None:
    """Where ``checkpoint`` holds adapter ``name``: its subfolder, or (``default`` only) the
    checkpoint folder itself."""
    folders = [os.path.join(checkpoint, name)] + ([checkpoint] if name == DEFAULT_ADAPTER else [])
    return next((f for f in folders if os.path.isfile(os.path.join(f, CONFIG_NAME))), None)


def restore_adapters(model: PARAModel, checkpoint: str) -> list[str]:
    """Copy each adapter saved in ``checkpoint`` into the resident adapter of that name, in place
    (same config required). Every trainable adapter must be there. Returns the names."""
    saved = {n: f for n in model.peft_config if (f := _saved_folder(checkpoint, n)) is not None}
    missing = [n for n in model.peft_config if model._trainable[n] and n not in saved]
    if missing or not saved:
        raise AdapterFileError(f"checkpoint {checkpoint!r} holds no saved weights for adapter(s) "
                               f"{missing or list(model.peft_config)}; expected {CONFIG_NAME} in <checkpoint> "
                               "(adapter 'default') or <checkpoint>/<adapter name>/, as PARATrainer writes it")
    for name, folder in saved.items():
        staged = f"{name}__checkpoint"
        model.load_adapter(folder, adapter_name=staged)  # checks file and shapes
        try:
            saved_sig, own_sig = (model.peft_config[n].generator_signature() for n in (staged, name))
            if saved_sig != own_sig:
                raise AdapterFileError(f"adapter {name!r} in {checkpoint!r} was saved with generator "
                                       f"{saved_sig}, but the model's {name!r} has {own_sig}")
            source = model._adapter_tensors(staged)
            with torch.no_grad():
                for key, p in model._adapter_tensors(name).items():
                    p.copy_(source[key])
        finally:
            model.delete_adapter(staged)
    return list(saved)


class PARATrainer(Trainer):
    """``transformers.Trainer`` that saves and resumes a :class:`PARAModel` as adapter files.
    Any other model is handled exactly as Trainer does."""

    def _para_model(self) -> PARAModel | None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return model if isinstance(model, PARAModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._para_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir)
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        with open(os.path.join(output_dir, TRAINING_ARGS_JSON), "w") as f:
            f.write(self.args.to_json_string())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        para = self._para_model()
        if para is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        restore_adapters(para, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        para = self._para_model()
        if para is None:
            return super()._load_best_model()
        restore_adapters(para, self.state.best_model_checkpoint)
