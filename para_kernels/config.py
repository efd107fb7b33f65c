"""PARAConfig: what one PARA adapter is (PARA_SPEC §1), stored as JSON beside its weights."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .ops.activations import ACTIVATIONS
from .ops.checks import POOL_MODES

TARGETS = ("q", "v", "up")  # the order of the generator's output: [l_q | l_v | l_u]
POOL_INPUTS = ("residual", "normed")


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
    base_model_name_or_path: str | None = field(default=None, compare=False)

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive int, got {self.r!r}")
        if self.pooler not in POOL_MODES:
            raise ValueError(f"pooler must be one of {POOL_MODES}, got {self.pooler!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.pool_input not in POOL_INPUTS:
            raise ValueError(f"pool_input must be one of {POOL_INPUTS}, got {self.pool_input!r}")
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
            layers = [layers] if isinstance(layers, int) else list(layers)
            if not layers or any(not isinstance(i, int) or i < 0 for i in layers):
                raise ValueError(f"layers_to_transform must be non-negative layer indices, got {layers!r}")
            self.layers_to_transform = sorted(set(layers))
        if not self.init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {self.init_scale!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PARAConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown PARAConfig fields {unknown}; known fields are {sorted(names)}")
        return cls(**d)

    def generator_signature(self) -> tuple:
        """Adapters with equal signatures share one stacked bank in a mixed batch."""
        return (self.r, self.pooler, self.activation, self.targets, self.pool_input,
                tuple(sorted((self.target_modules or {}).items())),
                tuple(self.layers_to_transform or ()), self.layers_path)
