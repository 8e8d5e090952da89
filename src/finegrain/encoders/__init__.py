"""Encoder registry: ``create("effnet-minilm")``, ``create("clip:openai/clip-vit-base-patch32")``, ``"siglip:<dir>"``.

A name is ``family`` or ``family:argument``. Families are registered
explicitly below (no import side effects); unknown names raise ``KeyError``
listing what exists.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import Encoder, l2_normalize

__all__ = ["Encoder", "UnknownEncoder", "create", "list_encoders", "register", "l2_normalize"]

_FAMILIES: dict[str, tuple[Callable[..., Encoder], str]] = {}
_CACHE: dict[str, Encoder] = {}


def register(family: str, factory: Callable[..., Encoder], help: str) -> None:
    """Register a factory ``factory(argument_or_None, **kwargs) -> Encoder`` under ``family``."""
    _FAMILIES[family] = (factory, help)



class UnknownEncoder(KeyError):
    """No encoder family of that name (a ``KeyError``, as a registry lookup; printed without quotes)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown encoder"


def list_encoders() -> dict[str, str]:
    """Registered families and a one-line description of each."""
    return {name: help for name, (_, help) in sorted(_FAMILIES.items())}


def create(name: str, cache: bool = True, **kwargs) -> Encoder:
    """Build (or reuse) the encoder called ``name``.

    Encoders are large; with ``cache=True`` one instance per name and
    keyword set is shared within the process.
    """
    family, _, arg = name.partition(":")
    if family not in _FAMILIES:
        raise UnknownEncoder(f"unknown encoder {name!r}; available: {', '.join(sorted(_FAMILIES))}")
    key = name + repr(sorted(kwargs.items()))
    if cache and key in _CACHE:
        return _CACHE[key]
    encoder = _FAMILIES[family][0](arg or None, **kwargs)
    if cache:
        _CACHE[key] = encoder
    return encoder


def _effnet_minilm(arg: str | None, **kwargs) -> Encoder:
    from .effnet_minilm import EffNetMiniLM

    return EffNetMiniLM(weights=arg, **kwargs)


def _effnet_minilm_v2(arg: str | None, **kwargs) -> Encoder:
    from .effnet_minilm_v2 import EffNetMiniLMV2

    return EffNetMiniLMV2(weights=arg, **kwargs)


def _clip(arg: str | None, **kwargs) -> Encoder:
    if not arg:
        raise KeyError("name a CLIP model: clip:<hub id or folder>, e.g. clip:openai/clip-vit-base-patch32")
    from .clip import CLIPEncoder

    return CLIPEncoder(model=arg, **kwargs)


def _siglip(arg: str | None, **kwargs) -> Encoder:
    if not arg:
        raise KeyError("name a SigLIP model: siglip:<hub id or folder>, e.g. siglip:google/siglip-base-patch16-224")
    from .siglip import SiglipEncoder

    return SiglipEncoder(model=arg, **kwargs)


register("effnet-minilm", _effnet_minilm,
         "bundled offline model: EfficientNet-Lite0 + all-MiniLM-L6-v2 with trained alignment heads "
         "(optional ':PATH' to other aligner weights)")
register("effnet-minilm-v2", _effnet_minilm_v2,
         "bundled offline model, 2nd generation: EfficientNet-Lite0 locked + all-MiniLM-L6-v2 with tuned top layers "
         "(optional ':PATH' to other v2 weights)")
register("clip", _clip, "CLIP through transformers' CLIPModel: 'clip:<hub id in local cache or folder>'")
register("siglip", _siglip, "SigLIP (and fixed-size SigLIP 2) through transformers' SiglipModel: "
         "'siglip:<hub id in local cache or folder>'")


def _external(arg: str | None, **kwargs) -> Encoder:
    # Imported embeddings (finegrain import) of a model finegrain cannot run: a clear error, not a KeyError.
    raise ValueError(f"this index holds embeddings imported from elsewhere (encoder {arg or 'unknown'!r}), which "
                     "finegrain cannot compute: it answers vector queries only (Index.search_vectors, the "
                     "service's embedding_input); to search by text or image, import with a matching --encoder")


register("external", _external, "embeddings imported with `finegrain import` from a model finegrain cannot run: "
         "vector queries only ('external:<name>')")


def is_external(name: str | None) -> bool:
    """Whether ``name`` stands for imported embeddings finegrain cannot compute (``external[:<model>]``)."""
    return bool(name) and str(name).partition(":")[0] == "external"
