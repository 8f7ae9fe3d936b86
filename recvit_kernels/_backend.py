"""Backend registry and dispatch for the recvit ops.

Every op has an ``eager`` implementation in plain PyTorch. ``packed`` names the same PyTorch
implementation (at the model level it means "sorted prefix layout, PyTorch ops"). ``triton`` and
``cuda`` register their own implementations when their modules import. ``auto`` takes the first
backend, in :data:`AUTO_ORDER`, that is available and supports the call's inputs; each fall back is
logged once with its reason. A named backend must be available (else ``RuntimeError``); a call it
declines raises too, except on the backends of :data:`HANDS_ON`, which hand it on as ``auto`` would.

The backend is chosen per call (``backend=``), per model, or by the ``RECVIT_BACKEND`` environment
variable, in that order of precedence. ``torch.compile`` traces :func:`dispatch` without a graph
break: loading the optional backends and asking whether one is available run at trace time (their
answers are fixed for the process), the rest is plain Python on the arguments' metadata.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Iterator, Optional

import torch

BACKENDS = ("eager", "packed", "triton", "cuda")
AUTO_ORDER = ("cuda", "triton", "packed")
# Backends whose kernels cover part of the calls by design (the cuda kernels are forward-only, and
# its attention takes fp16/bf16): named explicitly, a call they decline goes on to the backends after
# them in AUTO_ORDER, logged, so that a model on ``backend="cuda"`` trains and runs in fp32 too. The
# other named backends raise on a call they decline.
HANDS_ON = ("cuda",)
logger = logging.getLogger("recvit_kernels")

# op name -> backend name -> implementation
_IMPLEMENTATIONS: dict[str, dict[str, Callable]] = {}
# op name -> backend name -> check(*args, **kwargs) returning None if supported, else the reason
_SUPPORT_CHECKS: dict[str, dict[str, Callable]] = {}
# backend name -> function returning None if the backend can run here, else the reason
_AVAILABILITY: dict[str, Callable[[], Optional[str]]] = {
    "eager": lambda: None,
    "packed": lambda: None,
}
_logged_fallbacks: set[tuple[str, str, str]] = set()
_recorded_fallbacks: Optional[list[tuple[str, str, str, str]]] = None


def register(op: str, backend: str, supports: Optional[Callable] = None):
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op``.

    ``supports(*args, **kwargs)`` returns None when the implementation can run the call, or a
    string saying why not.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")

    def wrap(fn):
        _IMPLEMENTATIONS.setdefault(op, {})[backend] = fn
        if supports is not None:
            _SUPPORT_CHECKS.setdefault(op, {})[backend] = supports
        return fn

    return wrap


def register_availability(backend: str, check: Callable[[], Optional[str]]) -> None:
    """Register ``check() -> None | reason`` telling whether ``backend`` can run on this machine."""
    _AVAILABILITY[backend] = check


# Whether a backend can run is fixed for the process: torch.compile runs this at trace time (the
# cuda check may build the extension) and keeps the answer as a constant.
def constant_while_tracing(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result(fn)``: torch.compile calls ``fn`` once while tracing
    and keeps its result. Set as the marker dynamo reads, without importing ``torch._dynamo`` at
    import time (over a second, and it imports triton before ``recvit check`` can set
    ``TRITON_INTERPRET``)."""
    fn._dynamo_marked_constant = True
    return fn


@constant_while_tracing
def unavailable_reason(backend: str) -> Optional[str]:
    """None if ``backend`` can run here, else a sentence saying why not."""
    _load_optional_backends()
    check = _AVAILABILITY.get(backend)
    if check is None:
        return f"the {backend} backend is not installed"
    return check()


def available_backends() -> dict[str, Optional[str]]:
    """Map every backend name to None (available) or the reason it is not."""
    return {name: unavailable_reason(name) for name in BACKENDS}


def resolve_backend(backend: Optional[str] = None) -> str:
    """The backend name to use: ``backend``, else ``$RECVIT_BACKEND``, else ``"auto"``; validated.
    An empty ``RECVIT_BACKEND`` counts as unset (``RECVIT_BACKEND= python ...``), as in ``recvit info``."""
    name = backend if backend is not None else os.environ.get("RECVIT_BACKEND") or "auto"
    if name != "auto" and name not in BACKENDS:
        source = "backend" if backend is not None else "RECVIT_BACKEND"
        raise ValueError(f"{source}={name!r}: expected one of {('auto',) + BACKENDS}")
    return name


def dispatch(op: str, backend: Optional[str], *args, **kwargs) -> Callable:
    """The implementation of ``op`` that ``backend`` selects for these arguments.

    An explicitly named backend that cannot run the call raises ``RuntimeError`` with the reason;
    ``auto`` falls back along :data:`AUTO_ORDER` and logs why. An explicitly named backend that is
    available but declines the call (one of :data:`HANDS_ON`) or has no kernel for ``op`` at all (a
    backend added with only some ops, say) hands the op to the backends after it in
    :data:`AUTO_ORDER`, as ``auto`` would, and logs it.
    """
    _load_optional_backends()
    name = resolve_backend(backend)
    candidates = AUTO_ORDER if name == "auto" else (name,)
    falling_back = name == "auto"
    if name == "auto" and _on_cpu(args):
        candidates = ("packed",)  # the Triton interpreter is for testing: never faster on a CPU
    elif name in AUTO_ORDER and unavailable_reason(name) is None and (
            name in HANDS_ON or name not in _IMPLEMENTATIONS.get(op, {})):
        candidates, falling_back = AUTO_ORDER[AUTO_ORDER.index(name):], True
    passed_over = []
    for candidate in candidates:
        reason = _why_not(op, candidate, args, kwargs)
        if reason is None:
            if _recorded_fallbacks is not None:
                _recorded_fallbacks.extend((op, skipped, why, candidate) for skipped, why in passed_over)
            return _IMPLEMENTATIONS[op][candidate]
        if not falling_back:
            raise RuntimeError(f"{op}: backend={candidate!r} cannot run this call: {reason}")
        passed_over.append((candidate, reason))
        key = (op, candidate, reason)
        if key not in _logged_fallbacks:
            _logged_fallbacks.add(key)
            logger.info("%s: falling back from %s: %s", op, candidate, reason)
    raise AssertionError("unreachable: the packed backend supports every call")


@contextlib.contextmanager
def recorded_fallbacks() -> Iterator[list[tuple[str, str, str, str]]]:
    """Collect every fall back of :func:`dispatch` inside the block, logged or not (the log says
    each once per process): a list of (op, backend passed over, its reason, backend taken)."""
    global _recorded_fallbacks
    previous, _recorded_fallbacks = _recorded_fallbacks, []
    records = _recorded_fallbacks
    try:
        yield records
    finally:
        _recorded_fallbacks = previous
        if previous is not None:
            previous.extend(records)


def _on_cpu(args) -> bool:
    first = next((arg for arg in args if hasattr(arg, "device")), None)
    return first is not None and first.device.type == "cpu"


def _why_not(op: str, backend: str, args, kwargs) -> Optional[str]:
    reason = unavailable_reason(backend)
    if reason is not None:
        return reason
    if backend not in _IMPLEMENTATIONS.get(op, {}):
        return f"the {backend} backend has no {op} implementation"
    check = _SUPPORT_CHECKS.get(op, {}).get(backend)
    return None if check is None else check(*args, **kwargs)


_optional_loaded = False


# torch.compile cannot trace importlib; it runs this at trace time instead (idempotent: its result,
# None, is the same on every call).
@constant_while_tracing
def _load_optional_backends() -> None:
    """Import the triton and cuda backends, if present, so that they register themselves."""
    global _optional_loaded
    if _optional_loaded:
        return
    _optional_loaded = True
    import importlib

    for module in ("recvit_kernels.triton", "recvit_kernels.cuda"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                register_availability(module.rsplit(".", 1)[1], lambda e=error: f"import failed: {e}")


def call_op(op, *args, **kwargs):
    """``op(*args, **kwargs)``, a kernel backend's custom op (``torch.library.custom_op``), or the same
    call without the op's dispatch where nothing needs the op.

    ``torch.compile`` and ``torch.export`` (and fake, meta or other subclassed tensors) must see the
    op, and autograd records its registered backward through it; otherwise (eager inference, or a
    backward op called in the eager backward) the Python function the op wraps runs directly: the
    same launches without the op's dispatch, which costs 10-15 µs of host time a call (19-26 µs for
    an op that writes in place; measured on a CPU). The check costs about 1 µs: plain tensors are
    told by their type.
    """
    direct = getattr(op, "_init_fn", None)  # the wrapped function (torch has no public name for it)
    tensors = [arg for arg in (*args, *kwargs.values()) if isinstance(arg, torch.Tensor)]
    if (direct is None or torch.compiler.is_compiling()
            or any(type(tensor) not in _PLAIN_TENSORS or tensor.is_meta for tensor in tensors)
            or (torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors))):
        return op(*args, **kwargs)
    return direct(*args, **kwargs)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
