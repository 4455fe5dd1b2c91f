"""``inferos`` command line: a thin dispatcher.

Each area registers its own subcommands through a ``register(subparsers)`` function, so
this module stays small and imports nothing heavy before a command is chosen:

* :mod:`lemonade_inferos.commands` – ``generate``, ``demo``, ``eval``
* :mod:`lemonade_inferos.model_cli` – ``convert``, ``pull``
* :mod:`lemonade_inferos.agent.cli` – ``agent``, ``status``, ``policy``
* :mod:`lemonade_inferos.integrations.cli` – ``serve``, ``lemonade``, ``gaia``
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__

REGISTRARS = (
    "lemonade_inferos.commands",
    "lemonade_inferos.model_cli",
    "lemonade_inferos.agent.cli",
    "lemonade_inferos.integrations.cli",
    "lemonade_inferos.driver_cli",
)

EPILOG = """\
examples:
  inferos demo                                  baseline vs inferos on the embedded model
  inferos pull smollm2-135m-instruct            fetch + convert a real chat model
  inferos demo --model smollm2-135m-instruct    the main job on it
  inferos generate "Once upon a time" --policy quality
  inferos eval --text story.txt --policy default --json
  inferos agent                                 control agent on 127.0.0.1:7031
  inferos serve -m MODEL_DIR --port 8001        OpenAI-compatible backend (lemond ryzenai-server)

errors are one line; 'inferos --debug COMMAND ...' also prints the traceback.

environment:
  INFEROS_DISABLE=1            run every request as baseline (no plugins)
  INFEROS_CACHE_DIR            where converted models are cached
  INFEROS_AGENT_URL / _TOKEN   the control agent the plugin reports to
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inferos",
        description="Infer-OS: faster, leaner local LLM serving (ORT policy, tiered KV cache, control agent).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lemonade-inferos {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level to stderr")
    parser.add_argument("--debug", dest="debug_traceback", action="store_true",
                        help="on an error, print the full traceback (default: one line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name in REGISTRARS:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("lemonade_inferos"):
                continue  # that area is not built into this install
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every command: one clear line; --debug shows the traceback
        return report_error(e, debug=getattr(args, "debug_traceback", False))
    return int(rc or 0)


def report_error(e: BaseException, *, debug: bool = False) -> int:
    """Print ``e`` as one ``inferos: error: ...`` line on stderr (the traceback too with
    ``debug``); returns the exit code, 1."""
    if debug:
        import traceback

        traceback.print_exception(e, file=sys.stderr)
    msg = " ".join(str(e).split()) or type(e).__name__
    if not isinstance(e, (ValueError, OSError, ImportError)):  # not an input problem: name the kind
        msg = f"{type(e).__name__}: {msg}" if not msg.startswith(type(e).__name__) else msg
    hint = "" if debug else " (run 'inferos --debug ...' for the traceback)"
    print(f"inferos: error: {msg}{hint}", file=sys.stderr)
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
