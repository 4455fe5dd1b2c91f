"""Interpreter-start loader, imported by ``lemonade_inferos.pth`` in a site-packages folder.

Python executes every line of a ``.pth`` file that starts with ``import`` while ``site``
initialises (before ``__main__`` runs), so the one-line file ``hooks/lemonade/lemonade_inferos.pth``::

    import lemonade_inferos.integrations._pth_loader

makes this module run at the start of *every* interpreter of that environment. It therefore:

* reads the environment first and returns at once unless ``INFEROS_ENABLED`` is truthy
  (``1``, ``true``, ``yes``, ``on``): a disabled interpreter imports nothing beyond this
  module and the two package ``__init__`` files (no onnxruntime, pluggy, pydantic, Lemonade);
* when enabled, imports the light :mod:`lemonade_inferos.integrations.lemonade` and installs
  its import hook, which does nothing until Lemonade's ``lemonade`` package is imported
  (then it runs the ``lemonade.plugins`` entry points, ours included) and patches
  ``lemonade.tools.oga.utils`` when that module is imported;
* never breaks the host: any exception is caught and reported once as a warning on the
  ``lemonade_inferos`` logger (which reaches stderr even before logging is configured).
"""

import os as _os

ENV_VAR = "INFEROS_ENABLED"
_TRUTHY = frozenset({"1", "true", "yes", "on"})
_warned = False


def enabled(environ=None) -> bool:
    """Whether the Lemonade integration is switched on for this process.

    Args:
        environ: mapping to read (default ``os.environ``).

    Returns:
        True when ``INFEROS_ENABLED`` is one of ``1``/``true``/``yes``/``on`` (any case).
    """
    env = _os.environ if environ is None else environ
    return env.get(ENV_VAR, "").strip().lower() in _TRUTHY


def _warn_once(message: str) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    try:
        import logging

        logging.getLogger("lemonade_inferos").warning(message)
    except BaseException:  # noqa: BLE001 - the host must keep running whatever happens
        pass


def load() -> bool:
    """Install the Lemonade integration's import hook when enabled.

    Returns:
        True when the hook was installed, False when disabled or when installing failed
        (the failure is logged once as a warning; it is never raised).
    """
    if not enabled():
        return False
    try:
        from lemonade_inferos.integrations import lemonade as _lemonade

        _lemonade.install_import_hook(load_entry_points=True)
        return True
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - SystemExit from a plugin must not stop the host
        _warn_once(
            f"lemonade-inferos: {ENV_VAR} is set but the Lemonade integration could not be "
            f"installed ({type(e).__name__}: {e}); the host continues without it"
        )
        return False


load()
