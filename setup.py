"""Build hook: ship the start-up ``lemonade_inferos.pth`` at the top of the wheel.

All metadata lives in ``pyproject.toml``; this file only adds one build step. Python runs the
``import`` line of every ``*.pth`` file in site-packages while ``site`` initialises, so a
wheel that carries ``hooks/lemonade/lemonade_inferos.pth`` at its root (which installers put
in ``purelib``) makes ``pip install lemonade-inferos`` enough for
``INFEROS_ENABLED=1 lemonade-server-dev serve`` to load the plugin. The file is inert unless
``INFEROS_ENABLED`` is set (see ``lemonade_inferos/integrations/_pth_loader.py``), and pip's
RECORD lists it, so ``pip uninstall`` removes it.

This is the approach packages that ship a ``.pth`` take with setuptools (a ``build_py``
that copies the file into ``build_lib``'s root, e.g. pytest-socket, better-exceptions,
rapids-dask-dependency). ``data_files`` is not used: it installs under the ``data`` scheme
(``sys.prefix``), which is not a site-packages folder.

Editable installs (``pip install -e``) get the file too: setuptools' editable wheel runs
``build_py`` with ``editable_mode`` set and includes files it produced that are not in the
source tree's packages (checked by ``tests/test_pth_wheel.py``).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_SOURCE = Path("hooks", "lemonade", "lemonade_inferos.pth")


class build_py_with_pth(build_py):
    """``build_py`` that also copies :data:`PTH_SOURCE` to the root of ``build_lib``.

    Raises:
        FileNotFoundError: the ``.pth`` source is missing (e.g. an sdist built without
            ``MANIFEST.in``); failing the build beats a wheel that silently lacks the hook.
    """

    def _pth_target(self) -> Path:
        # An editable wheel is assembled from the folder `install_lib` points at (setuptools'
        # editable_wheel ignores build_lib there); a regular wheel from build_lib.
        if getattr(self, "editable_mode", False):
            return Path(self.get_finalized_command("install").install_lib, PTH_SOURCE.name)
        return Path(self.build_lib, PTH_SOURCE.name)

    def run(self):
        super().run()
        if not PTH_SOURCE.is_file():
            raise FileNotFoundError(f"{PTH_SOURCE} is missing: the wheel must ship it at its root")
        self.copy_file(str(PTH_SOURCE), str(self._pth_target()), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        return [*super().get_outputs(include_bytecode), str(self._pth_target())]


setup(cmdclass={"build_py": build_py_with_pth})
