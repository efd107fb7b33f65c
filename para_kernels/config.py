"""PARAConfig: what one PARA adapter is (docs/spec.md §1), stored as JSON beside its weights.

The fields PEFT's own configs carry (``base_model_name_or_path``, ``revision``, ``task_type``,
``inference_mode``) are here too, so ``adapter_config.json`` reads like a PEFT adapter's
(``peft_type: "PARA"``, flat fields); they do not change the generator and are not compared.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .ops.activations import ACTIVATIONS
from .ops.checks import POOL_MODES

TARGETS = ("q", "v", "up")  # the order of the generator's output: [l_q | l_v | l_u]
POOL_INPUTS = ("residual", "normed")
TASK_TYPES = ("CAUSAL_LM",)  # PARA rescales a decoder's activations: causal LMs only
# far past any useful initialisation, and small enough that ±init_scale/sqrt(d) fits every float dtype
MAX_INIT_SCALE = 1e4


@dataclass
class PARAConfig:
    """One PARA adapter.

    r: generator rank (width of the bottleneck).
    pooler: 'last' | 'mean' | 'max' | 'attn' — how the prompt's hidden states become one vector.
    activation: 'relu' | 'gelu' | 'silu' | 'tanh' | 'identity' | 'rational' (learnable Padé,
        initialised to GELU).
    targets: which activations are rescaled, a subset of ('q', 'v', 'up').
    target_modules: None to find the projections by name, or {target: module path inside a
        decoder layer}, e.g. {'q': 'self_attn.q_proj', 'v': 'self_attn.v_proj', 'up': 'mlp.up_proj'};
        each named module's whole output is that target.
    pool_input: 'residual' (the stream entering the layer) or 'normed' (after its input norm).
    layers_to_transform: indices of the decoder layers that get a generator (None: all).
    layers_path: dotted path of the decoder-layer list (None: found from the config's layer count).
    init_scale: W_down starts uniform in ±init_scale/sqrt(d); W_up and b_up start at zero.
    base_model_name_or_path, revision: the backbone the adapter was trained on (filled from the
        model when saved, if not given); what AutoPARAModelForCausalLM loads.
    modules_to_save: names of backbone modules outside the decoder layers (e.g. ['lm_head']; a
        name matches a module path equal to it or ending in '.<name>', as in PEFT) of which the
        adapter keeps its own trainable copy, saved and loaded with it; rows of other adapters
        (or none) use the original.
    task_type: 'CAUSAL_LM' (as in PEFT).
    inference_mode: True freezes the adapter (get_para_model, add_adapter); saved files say
        True, and loading sets it to ``not is_trainable``, as PEFT does.
    """

    r: int = 12
    pooler: str = "last"
    activation: str = "gelu"
    targets: tuple = TARGETS
    target_modules: dict | None = None
    pool_input: str = "residual"
    layers_to_transform: list | None = None
    layers_path: str | None = None
    init_scale: float = 1.0
    modules_to_save: list | None = None
    base_model_name_or_path: str | None = field(default=None, compare=False)
    revision: str | None = field(default=None, compare=False)
    task_type: str | None = field(default="CAUSAL_LM", compare=False)
    inference_mode: bool = field(default=False, compare=False)

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive int, got {self.r!r}")
        if self.pooler not in POOL_MODES:
            raise ValueError(f"pooler must be one of {POOL_MODES}, got {self.pooler!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.pool_input not in POOL_INPUTS:
            raise ValueError(f"pool_input must be one of {POOL_INPUTS}, got {self.pool_input!r}")
        if not isinstance(self.targets, (str, list, tuple, set, frozenset)):
            raise ValueError(f"targets must be names from {TARGETS}, got {self.targets!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        unknown = [t for t in targets if t not in TARGETS]
        if unknown or not targets or len(set(targets)) != len(targets):
            raise ValueError(f"targets must be distinct names from {TARGETS}, got {self.targets!r}")
        self.targets = tuple(t for t in TARGETS if t in targets)
        if self.target_modules is not None:
            if not isinstance(self.target_modules, dict):
                raise ValueError("target_modules must be a dict {target: module path inside a decoder layer}, "
                                 f"e.g. {{'q': 'self_attn.q_proj'}}, got {self.target_modules!r}")
            missing = [t for t in self.targets if t not in self.target_modules]
            extra = [t for t in self.target_modules if t not in self.targets]
            if missing or extra:
                raise ValueError(f"target_modules must name exactly the targets {self.targets}; "
                                 f"missing {missing}, not targeted {extra}")
            self.target_modules = {t: str(self.target_modules[t]) for t in self.targets}
        if self.layers_to_transform is not None:
            layers = self.layers_to_transform
            layers = [layers] if isinstance(layers, int) else list(layers) if isinstance(layers, (list, tuple)) \
                else None
            if not layers or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers):
                raise ValueError(f"layers_to_transform must be non-negative layer indices, got {layers!r}")
            self.layers_to_transform = sorted(set(layers))
        if self.layers_path is not None and not isinstance(self.layers_path, str):
            raise ValueError(f"layers_path must be a dotted module path (str) or None, got {self.layers_path!r}")
        if isinstance(self.init_scale, bool) or not isinstance(self.init_scale, (int, float)) \
                or not 0 < self.init_scale <= MAX_INIT_SCALE:
            raise ValueError(f"init_scale must be a positive number at most {MAX_INIT_SCALE:g} (W_down starts "
                             f"uniform in ±init_scale/sqrt(d)), got {self.init_scale!r}")
        if self.modules_to_save is not None:
            names = [self.modules_to_save] if isinstance(self.modules_to_save, str) else self.modules_to_save
            if not isinstance(names, (list, tuple)) or not names or any(not isinstance(n, str) or not n for n in names):
                raise ValueError(f"modules_to_save must be a list of module names, e.g. ['lm_head'], got "
                                 f"{self.modules_to_save!r}")
            self.modules_to_save = sorted(set(names))
        for name in ("base_model_name_or_path", "revision"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a str or None, got {getattr(self, name)!r}")
        if self.task_type not in TASK_TYPES + (None,):
            raise ValueError(f"task_type must be one of {TASK_TYPES} (or None), got {self.task_type!r}: PARA "
                             "adapts decoder-only causal LMs")
        if not isinstance(self.inference_mode, bool):
            raise ValueError(f"inference_mode must be a bool, got {self.inference_mode!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PARAConfig":
        if not isinstance(d, dict):
            raise TypeError(f"PARAConfig.from_dict takes a dict of fields, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown PARAConfig fields {unknown}; known fields are {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_pretrained(cls, path: str, subfolder: str | None = None, adapter_name: str | None = None,
                        **hub_kwargs) -> "PARAConfig":
        """The config saved in a local adapter folder or a Hub repo id (``path``, its ``subfolder``
        or its ``adapter_name`` subfolder); hub_kwargs: revision, token, cache_dir, local_files_only."""
        from .transformers import io  # io imports this module

        folder = io.resolve_adapter(path, adapter_name, subfolder, **hub_kwargs)
        return io.read_config(folder)[0]

    def save_pretrained(self, save_directory: str) -> None:
        """Write this config alone as ``save_directory/adapter_config.json`` (flat, PEFT-style)."""
        from .transformers import io

        io.write_config(save_directory, self, {})

    def generator_signature(self) -> tuple:
        """Adapters with equal signatures share one stacked bank in a mixed batch."""
        return (self.r, self.pooler, self.activation, self.targets, self.pool_input,
                tuple(sorted((self.target_modules or {}).items())),
                tuple(self.layers_to_transform or ()), self.layers_path)
