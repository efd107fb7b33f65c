"""What the suite measures, one module per scenario, each built on bench/harness:

    serving.py      the headline: one model's checks, decode / prefill timing, sweep (run)
    serving_setup   ServingConfig and the Setup holding every method's model
    methods.py      method names (para, para@<backend>, peft_lora_r16, ...) and labels
    checks.py       the one correctness checker (bench refuses to time a failing model)
    decode.py       warm-up, alternated decode and prefill, interleaved cross-check
    lockstep.py     bare and methods decoding side by side, one step each in turn
    popularity.py   tenant-popularity layouts (distinct, uniform, zipf, identical)
    sweep.py        tenant-count sweep (GPU)
    graphs.py       the decode step under CUDA-graph replay (GPU)
    attribution.py  PARA's decode overhead piece by piece, and the profiles
    ops.py          op microbenchmarks per backend (cases in ops_cases.py)
    models.py       the backbones (SmolLM2 real weights, LLaMA shapes random weights)
    lora_baselines  BGMV-style LoRA and (IA)3 as forward hooks

Each returns a plain dict of measurements: the report JSON's parts (bench/report/schema.py).
"""
