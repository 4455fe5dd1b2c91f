"""``inferos serve | lemonade | gaia``: the host-facing subcommands.

Nothing heavy is imported until a command runs (FastAPI, uvicorn and the engine load in
:func:`lemonade_inferos.integrations.server.serve`).
"""

from __future__ import annotations

import argparse
from typing import Any

SERVE_EPILOG = """\
examples:
  inferos serve                                   the embedded model on http://127.0.0.1:8001
  inferos serve -m ~/models/phi-3-mini-oga --port 8001 --ctx-size 4096 --policy 7b
  inferos serve --max-concurrency 2 --queue-timeout 60 --max-tokens 512

  then, from Python (pip install openai):
    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8001/v1", api_key="none")
    r = client.chat.completions.create(model="stories260K", max_tokens=64, temperature=0,
                                       messages=[{"role": "user", "content": "Tell me a story."}])
    print(r.choices[0].message.content, r.usage)

  or with curl:
    curl -s http://127.0.0.1:8001/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "Once upon a time", "max_tokens": 32, "temperature": 0}'

endpoints (also under /api/v1, /api/v0 and without prefix):
  GET /v1/health, /v1/models, /api/v1/stats   POST /v1/chat/completions, /v1/completions,
  /v1/responses (stream or not; usage + llama.cpp-style timings), /api/v1/load, /api/v1/unload

as Lemonade's backend (lemond v9.2+ runs 'ryzenai-server -m DIR --port N --ctx-size N'):
  export LEMONADE_RYZENAI_SERVER_BIN=<repo>/hooks/ryzenai-server   (see its README.md)

environment:
  INFEROS_AGENT_URL / INFEROS_AGENT_TOKEN   report every request to the control agent
  INFEROS_DISABLE=1                         baseline: no plugins, full-precision KV cache
"""

GAIA_EPILOG = """\
examples:
  inferos gaia --optimization inferos --dry-run -- chat --model Llama-3.2-1B-Instruct-Hybrid
  inferos gaia --kv-quantization enabled --quality-threshold 0.3 --memory-limit 2GiB -- chat
  inferos gaia --optimization none -- llm "What is an NPU?"          baseline for comparison
  inferos gaia --backend-url http://127.0.0.1:8001 -- chat            reuse a running backend

flag mapping (the seed guide's GAIA flag table):
  --optimization inferos|none   inferos policy | baseline (INFEROS_DISABLE=1 in the backend)
  --mode M                      policy scheduler.mode (+ prefill/decode devices)
  --kv-quantization on/off      policy kv.mode dynamic (from the base policy) / disabled
  --quality-threshold F         policy quality.max_delta_ppl (ΔPPL tolerance, 0..2)
  --memory-limit SIZE           policy kv.budget_bytes (e.g. 2GiB, 512MB)
  --batch-size N                backend --max-concurrency N (requests generated at once)
  --max-tokens N                backend --max-tokens N (cap on tokens per request)
  --debug                       backend/agent verbose logs (GAIA's own --debug goes after --)

GAIA reaches the backend through LEMONADE_BASE_URL=http://127.0.0.1:PORT/api/v1.
Install GAIA with 'pip install amd-gaia' (or from source: github.com/amd/gaia).
"""


def register(sub: Any) -> None:
    """Add ``serve``, ``lemonade`` and ``gaia`` to the ``inferos`` subparsers."""
    s = sub.add_parser(
        "serve",
        help="OpenAI-compatible server on the inferos engine (also Lemonade's ryzenai-server backend)",
        description="Serve a model folder over HTTP with the OpenAI API (/v1/chat/completions, "
        "/v1/completions, /v1/responses; streaming and not) plus Lemonade's /api/v1 health, stats and "
        "load endpoints. Every request runs through the inferos hooks (policy, KV store, stats). "
        "Responses carry OpenAI usage and llama.cpp-style timings, so Lemonade's lemond can run it as "
        "its ryzenai-server backend.",
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_serve_arguments(s)
    s.set_defaults(func=_cmd_serve)

    lm = sub.add_parser(
        "lemonade",
        help="run Lemonade Server 9.1.4 (Python) with the inferos integration enabled",
        description="Run 'lemonade-server-dev ARGS...' with INFEROS_ENABLED=1, after checking that the "
        "inferos .pth hook is installed in Lemonade's interpreter. Every argument is passed to Lemonade.",
        epilog="examples:\n  inferos lemonade serve --port 8000\n  inferos lemonade serve --help      (Lemonade's own help)\n\n"
        "environment: INFEROS_POLICY (base policy), INFEROS_LEMONADE_SERVER (path of lemonade-server-dev)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lm.add_argument("lemonade_args", nargs=argparse.REMAINDER, metavar="ARGS",
                    help="Lemonade's arguments, e.g. serve --port 8000")
    lm.set_defaults(func=_cmd_lemonade)

    g = sub.add_parser(
        "gaia",
        help="run AMD GAIA (gaia-cli) against an inferos backend + control agent",
        description="Map the GAIA optimization flags onto an inferos policy, start an inferos backend "
        "('inferos serve') and the control agent on free loopback ports (unless given running ones), point "
        "GAIA at the backend with LEMONADE_BASE_URL and run gaia-cli with the arguments after '--'. "
        "Processes started here are stopped when gaia-cli exits (unless --keep-running). "
        "--dry-run prints the policy, environment and commands and starts nothing.",
        epilog=GAIA_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g.add_argument("--optimization", choices=["inferos", "none"], default="inferos",
                   help="inferos = the policy below; none = baseline (default: inferos)")
    g.add_argument("--kv-quantization", choices=["enabled", "disabled"], default="enabled",
                   help="tiered quantized KV cache on/off (default: enabled)")
    g.add_argument("--quality-threshold", type=float, default=None, metavar="F",
                   help="ΔPPL tolerance -> quality.max_delta_ppl (0..2; default: the base policy's)")
    g.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="KV-cache memory budget -> kv.budget_bytes (e.g. 2GiB, 512MB, bytes)")
    g.add_argument("--batch-size", type=_positive_int("--batch-size", 1), default=1, metavar="N",
                   help="requests generated at once -> backend --max-concurrency (default 1)")
    g.add_argument("--max-tokens", type=_positive_int("--max-tokens", 1), default=None, metavar="N",
                   help="cap on generated tokens per request -> backend --max-tokens")
    g.add_argument("--mode", choices=["hybrid", "gpu_only", "npu_only"], default=None,
                   help="execution mode -> scheduler.mode and devices (default: the base policy's)")
    g.add_argument("--policy", metavar="PRESET|FILE", default=None,
                   help="base policy the flags are applied to (default: the 'default' preset)")
    g.add_argument("--model-dir", metavar="DIR", default=None,
                   help="model folder for the inferos backend (default: the embedded model)")
    g.add_argument("--ctx-size", type=_positive_int("--ctx-size", 2), default=None, metavar="N",
                   help="backend context cap (default: the model's)")
    g.add_argument("--backend-url", metavar="URL", default=None,
                   help="use this running inferos backend instead of starting one (env INFEROS_BACKEND_URL)")
    g.add_argument("--backend-port", type=int, default=0, metavar="N", help="port for the started backend (0 = free)")
    g.add_argument("--agent-port", type=int, default=0, metavar="N", help="port for the started agent (0 = free)")
    g.add_argument("--no-agent", action="store_true", help="do not start or use a control agent")
    g.add_argument("--start-timeout", type=float, default=180.0, metavar="SECONDS",
                   help="how long to wait for the backend/agent to answer /health (default 180)")
    g.add_argument("--keep-running", action="store_true",
                   help="leave the started backend/agent running after gaia-cli exits (prints their URLs)")
    g.add_argument("--debug", action="store_true", help="verbose backend/agent logs and inferos INFO logging")
    g.add_argument("--dry-run", action="store_true",
                   help="print the policy, environment and commands that would run; start nothing (no GAIA needed)")
    g.add_argument("gaia_args", nargs=argparse.REMAINDER, metavar="-- GAIA ARGS",
                   help="arguments for gaia-cli (after '--'), e.g. -- chat --model NAME")
    g.set_defaults(func=_cmd_gaia)


def add_serve_arguments(s: argparse.ArgumentParser) -> None:
    """The ``inferos serve`` options (shared with the ``ryzenai-server`` entry point,
    :func:`lemonade_inferos.integrations.server.ryzenai_main`)."""
    from ..listen import port_number
    from .server import DEFAULT_PORT, DEFAULT_QUEUE_TIMEOUT

    s.add_argument("-m", "--model", metavar="MODEL_DIR", default=None,
                   help="model folder (genai_config.json + model.onnx + tokenizer); default: the embedded "
                   "stories260K model")
    s.add_argument("--port", type=port_number, default=DEFAULT_PORT, metavar="N",
                   help=f"TCP port, 0..65535 (default {DEFAULT_PORT}; 0 = a free one)")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; the API has no auth)")
    s.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                   help="also accept requests whose Host header is NAME (repeatable; default: loopback names and "
                   "the --host address). '*' accepts any Host: deliberate remote use behind a proxy; it also "
                   "lets DNS-rebinding web pages reach the server")
    s.add_argument("--max-body-bytes", type=_size("--max-body-bytes"), default=None, metavar="SIZE",
                   help="request body limit, bytes or a size like 16MiB (default 8MiB); larger bodies get 413")
    s.add_argument("--ctx-size", type=_positive_int("--ctx-size", 2), default=None, metavar="N",
                   help="context cap in tokens (prompt + completion); larger than the model's = the model's")
    s.add_argument("--policy", metavar="PRESET|FILE", default=None,
                   help="policy preset (default, 3b, 7b, 13b, latency, throughput, quality) or YAML/JSON file")
    s.add_argument("--max-concurrency", type=_positive_int("--max-concurrency", 1), default=1, metavar="N",
                   help="generations at once (default 1); more requests wait for a slot")
    s.add_argument("--queue-timeout", type=float, default=DEFAULT_QUEUE_TIMEOUT, metavar="SECONDS",
                   help=f"how long a request waits for a slot before 503 + Retry-After "
                   f"(default {DEFAULT_QUEUE_TIMEOUT:g}; 0 = wait forever)")
    s.add_argument("--max-tokens", type=_positive_int("--max-tokens", 1), default=None, metavar="N",
                   help="cap on generated tokens per request (default: the rest of the context)")
    s.add_argument("--model-id", default=None, metavar="NAME",
                   help="model name in responses and /v1/models (default: the model's name)")
    s.add_argument("--prefix-cache-bytes", type=_size("--prefix-cache-bytes", lo=0), default=None, metavar="SIZE",
                   help="memory for KV states kept between requests, so a chat's next turn or a shared system "
                   "prompt is not prefilled again (bytes or a size like 512MiB; 0 = off; default: "
                   "INFEROS_PREFIX_CACHE_BYTES or 512MiB); least recently used states are evicted first")
    s.add_argument("--baseline", action="store_true",
                   help="no plugins (same as INFEROS_DISABLE=1): ORT defaults, full-precision KV cache")
    s.add_argument("--kv-budget", default=None, metavar="SIZE",
                   help="process KV-cache budget shared by all requests, e.g. 512MiB (default: "
                   "min(io.host_pool_bytes, half the available memory, cgroup-aware)); requests over it are "
                   "tightened, queued, then answered 503 + Retry-After")
    s.add_argument("--admission-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long a request waits for KV budget before 503 (default 30)")
    s.add_argument("--no-resource-manager", action="store_true",
                   help="no KV budget, admission or client quotas (every request runs as it comes)")
    s.add_argument("--no-runtime", action="store_true",
                   help="no adaptive runtime (fallback table, control loops from policy.loops)")
    s.add_argument("--verbose", dest="serve_verbose", action="store_true",
                   help="log each request (tokens, TTFT, tokens/s) and uvicorn's access log")


def _positive_int(flag: str, lo: int) -> Any:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not an integer") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{flag} {v} is not allowed; must be >= {lo}")
        return v

    return parse


def _size(flag: str, lo: int = 1) -> Any:
    def parse(text: str) -> int:
        from ..policy import PolicyError, parse_size

        try:
            v = parse_size(text, field=flag)
        except (PolicyError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not allowed; must be >= {lo} byte(s)")
        return v

    return parse


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    return serve(args)


def _cmd_lemonade(args: argparse.Namespace) -> int:
    from .lemonade import run_lemonade

    return run_lemonade(list(args.lemonade_args))


def _cmd_gaia(args: argparse.Namespace) -> int:
    from .gaia import run_gaia

    return run_gaia(args)
