"""Quality benchmark: does PARA learn as well as LoRA? (``python -m bench.quality``, ``make eval``)

Generated tasks (data.py), the metrics (metrics.py), the backbones and tokenizers (backbone.py),
the methods (methods.py: PARA via para_kernels, LoRA and (IA)3 via PEFT's own ``get_peft_model``),
one training loop for all of them (train.py), the run (run.py) and its report (report.py).
A run writes JSON first; the Markdown and the PNG are drawn from that JSON only.
"""
