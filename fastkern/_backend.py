"""Backend selection: the default per device, `use_backend`, `FASTKERN_BACKEND`."""
import contextlib
import contextvars
import os

BACKENDS = ("cpu", "cuda", "triton", "reference")

_override = contextvars.ContextVar("fastkern_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """The requested backend was not built, or cannot run on the tensors' device."""


def _check_name(name):
    if name not in BACKENDS:
        raise ValueError("fastkern: unknown backend %r; expected one of %s" % (name, ", ".join(BACKENDS)))


@contextlib.contextmanager
def use_backend(name: str):
    """Run fastkern ops inside the block on backend ``name``.

    ``name`` is one of "cpu", "cuda", "triton", "reference". Asking for a backend
    that was not built, or that cannot run on the tensors' device, raises
    BackendUnavailableError when an op runs.
    """
    _check_name(name)
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def requested_backend():
    """The backend forced by use_backend() or FASTKERN_BACKEND, or None for the default."""
    name = _override.get()
    if name is not None:
        return name
    name = os.environ.get("FASTKERN_BACKEND")
    if name:
        _check_name(name)
        return name
    return None
