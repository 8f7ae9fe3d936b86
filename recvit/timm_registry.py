"""recvit's models in timm's model registry: where timm is installed, ``timm.create_model("edge_recvit_small",
pretrained=False, num_classes=10)`` builds ``recvit.create_model("edge_recvit_small", num_classes=10)``.

``import recvit`` never imports timm (slow to import, and optional): it registers the models at once when
timm is already imported, else right after timm's first import (a finder on ``sys.meta_path`` that wraps
the loading of the ``timm`` package); where timm is not installed nothing happens. The models are those
recvit's own registry holds at that moment. recvit publishes no pretrained weights: ``pretrained=True``
raises ``ValueError`` (load weights with :func:`recvit.load_checkpoint` or :func:`recvit.from_pretrained`).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Callable

_registered: set = set()


def timm_entrypoint(name: str) -> Callable:
    """A timm model entrypoint (``fn(pretrained=False, **kwargs)``, named ``name``) that builds recvit's ``name``."""
    def entrypoint(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None,
                   **kwargs):
        from . import create_model

        if pretrained:
            raise ValueError(f"pretrained=True: recvit publishes no pretrained weights for {name!r}; build it with "
                             f"pretrained=False and load a checkpoint with recvit.load_checkpoint(model, path) "
                             f"(DeiT/ViT or recvit weights) or use recvit.from_pretrained(directory)")
        return create_model(name, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"recvit.create_model({name!r}, **kwargs), for timm.create_model."
    return entrypoint


def register() -> list:
    """Register every model of recvit's registry in timm's (imports timm); returns the names added."""
    from timm.models import register_model

    from . import list_models

    added = [name for name in list_models() if name not in _registered]
    for name in added:
        register_model(timm_entrypoint(name))
        _registered.add(name)
    return added


class _RegisterAfterTimmLoads(importlib.abc.MetaPathFinder):
    """Finds ``timm`` through the other finders and runs :func:`register` once its package has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)  # once, and not for the look-up below
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            register()

        spec.loader.exec_module = exec_module
        return spec


def register_when_timm_loads() -> None:
    """Register now if timm is imported, when it is imported if it is installed, else do nothing."""
    if "timm" in sys.modules:
        register()
    elif importlib.util.find_spec("timm") is not None and not any(
            isinstance(finder, _RegisterAfterTimmLoads) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTimmLoads())
