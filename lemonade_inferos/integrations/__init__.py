"""Host integrations: Lemonade Server (``lemonade``) and its interpreter-start loader
(``_pth_loader``).

This package ``__init__`` stays empty on purpose: ``lemonade_inferos.pth`` imports a
submodule of it at the start of every interpreter of an environment, so importing the
package must cost nothing.
"""
