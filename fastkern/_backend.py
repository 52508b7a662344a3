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


# FASTKERN_BACKEND is read on every op call, so that a change of os.environ at run time
# (monkeypatch.setenv, a launcher script) takes effect at the next call. os.environ.get
# costs ~0.5 us (key encoding, a KeyError when unset); the mapping behind os.environ is
# a plain dict that every change of os.environ updates in place, and one lookup in it
# costs ~30 ns. It is only read while os.environ is still the object seen at import:
# if someone rebinds os.environ, the ordinary lookup runs.
_ENV_NAME = "FASTKERN_BACKEND"
_environ = os.environ
try:
    _env_data = os.environ._data
    _env_key = os.environ.encodekey(_ENV_NAME)
    _env_decode = os.environ.decodevalue
    if type(_env_data) is not dict:
        raise TypeError(type(_env_data))
except (AttributeError, TypeError):  # not CPython's os._Environ
    _env_data = None


def env_backend():
    """FASTKERN_BACKEND as os.environ holds it now (validated), or None when unset or empty."""
    if _env_data is not None and os.environ is _environ:
        raw = _env_data.get(_env_key)
        name = None if raw is None else _env_decode(raw)
    else:
        name = os.environ.get(_ENV_NAME)
    if name:
        _check_name(name)
        return name
    return None


def requested_backend():
    """The backend forced by use_backend() or FASTKERN_BACKEND, or None for the default."""
    name = _override.get()
    if name is not None:
        return name
    return env_backend()
