"""The architecture registry: what the package needs to know about each family of ViT-style encoders.

Each family module in this package registers one :class:`Architecture` (timm's VisionTransformer,
Beit and Eva, the CAPI port); the loader, the zoo table, the size hints and the attention recorder
look them up here instead of branching on names or classes. The registry imports no family.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from torch import Tensor, nn

from beyond_cls.models.architectures.attention import AttentionAdapter

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "architecture_of",
    "attention_adapter",
    "builder_for",
    "register_architecture",
    "supported_attention",
]

#: ``builder(img_size=..., num_classes=..., **model_kwargs) -> model``; ``img_size`` may be None (the default).
Builder = Callable[..., nn.Module]
#: ``prepare(state_dict, model) -> state_dict``, applied to converted weights before the strict load.
StateDictHook = Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]]


@dataclass(frozen=True)
class Architecture:
    """One family of encoders, as the rest of the package sees it.

    - ``models``: the family's model classes (exact classes: a subclass may behave differently).
    - ``attention``: exact attention-module class -> :class:`AttentionAdapter` (how the recorder
      projects q, k, v and finishes the module's output).
    - ``builders``: architecture names the family builds itself (``--arch NAME``, a zoo entry's
      ``arch``); every other name goes to ``timm.create_model``.
    - ``timm_prefixes``: prefixes of the timm names of the family's standard sizes, tried by size hints.
    - ``prepare_state_dict``: a last adaptation of converted weights to the built model, or None.
    """

    name: str
    models: tuple[type[nn.Module], ...] = ()
    attention: Mapping[type[nn.Module], AttentionAdapter] = field(default_factory=lambda: MappingProxyType({}))
    builders: Mapping[str, Builder] = field(default_factory=lambda: MappingProxyType({}))
    timm_prefixes: tuple[str, ...] = ()
    prepare_state_dict: StateDictHook | None = None


#: Registered families by name; add one with :func:`register_architecture`. Kept across importlib.reload of
#: this module: the family modules that filled it do not run again.
ARCHITECTURES: dict[str, Architecture] = globals().get("ARCHITECTURES", {})


def _identity(arch: Architecture) -> tuple:
    """What stays the same when a family's module is reloaded: its classes (module and name) and builder names."""
    return arch.name, [(c.__module__, c.__qualname__) for c in (*arch.models, *arch.attention)], sorted(arch.builders)


def register_architecture(arch: Architecture, *, overwrite: bool = False) -> Architecture:
    """Add ``arch`` to :data:`ARCHITECTURES`; its classes and builder names must be new unless ``overwrite``.

    The same family registered again (its module reloaded: same name, classes and builder names) replaces itself.
    """
    old = ARCHITECTURES.get(arch.name)
    if not overwrite and not (old is not None and _identity(old) == _identity(arch)):
        if arch.name in ARCHITECTURES:
            raise ValueError(f"architecture {arch.name!r} is already registered")
        for other in ARCHITECTURES.values():
            taken = [c.__name__ for c in (*arch.models, *arch.attention) if c in (*other.models, *other.attention)]
            taken += [n for n in arch.builders if n in other.builders]
            if taken:
                raise ValueError(f"architecture {arch.name!r}: {', '.join(taken)} already belong to {other.name!r}")
    ARCHITECTURES[arch.name] = arch
    return arch


def architecture_of(model: nn.Module) -> Architecture | None:
    """The family whose model classes include ``type(model)``, or None."""
    return next((a for a in ARCHITECTURES.values() if type(model) in a.models), None)


def attention_adapter(module: nn.Module) -> AttentionAdapter | None:
    """The adapter of ``module``'s exact class, or None when it is not an attention module we know."""
    return next((a.attention[type(module)] for a in ARCHITECTURES.values() if type(module) in a.attention), None)


def builder_for(name: str) -> Builder | None:
    """The builder a family registered for architecture ``name``, or None (then timm builds it)."""
    return next((a.builders[name] for a in ARCHITECTURES.values() if name in a.builders), None)


def supported_attention() -> list[str]:
    """``family: AttentionClass`` of every attention module the recorder supports."""
    return [f"{a.name}: {c.__name__}" for a in ARCHITECTURES.values() for c in a.attention]
