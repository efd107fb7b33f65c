"""``python -m bench --vllm`` (``python -m bench.vllm``): vLLM serving SmolLM2-135M-Instruct bare,
with PARA adapters (para_kernels.vllm) and with vLLM's own multi-LoRA (r = 8 and 16 on q, v),
the same tenants and requests, throughput as ratios measured in one run.

prepare.py (this venv: transformers, peft) writes the model folder and the adapters; measure.py
runs in the vLLM venv (``.venv-vllm``, ``make vllm-install``) and writes the measurements;
report.py draws the Markdown and the PNG from that JSON.
"""
