"""``inferos agent``, ``inferos status``, ``inferos policy show|set|baseline``.

``agent`` runs the service; the other two talk to a running agent over HTTP (``requests``)
at ``--url``, else ``$INFEROS_AGENT_URL``, else ``http://127.0.0.1:$INFEROS_AGENT_PORT``
(7031), with the token from ``INFEROS_AGENT_TOKEN`` or the token file for changes.

Exit codes: 0 ok, 1 the agent refused (its error is printed), 2 bad arguments or local
files, 3 no agent reachable.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from typing import Any

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def register(subparsers: Any) -> None:
    """Add the ``agent``, ``status`` and ``policy`` subcommands."""
    p = subparsers.add_parser(
        "agent",
        help="run the control agent (HTTP API, metrics, history, dashboard)",
        description="Run the Infer-OS control agent: holds the policy, collects PostRun reports from plugin "
        "instances, serves /v1/metrics, /v1/history and the dashboard at /dashboard. Loopback only unless "
        "--allow-remote is given and a token is configured.",
    )
    p.add_argument("--config", metavar="FILE", help="YAML/JSON: `agent:` settings, `policy:` preset/file, `infer_os:` policy")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default $INFEROS_AGENT_PORT or 7031)")
    p.add_argument("--state-dir", metavar="DIR", help="history database directory (default $INFEROS_STATE_DIR or the user data dir)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host (needs a configured token)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_agent)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="agent URL (default $INFEROS_AGENT_URL or http://127.0.0.1:7031)")
    common.add_argument("--timeout", type=float, default=3.0, help="HTTP timeout, seconds")

    s = subparsers.add_parser(
        "status", parents=[common], help="one-line agent metrics (TPS, FTL, memory, utilisation)",
        description="Print the agent's metrics as one line: TPS, FTL (first-token latency), memory, utilisation.",
    )
    s.add_argument("--watch", action="store_true", help="print a line every --interval seconds until Ctrl-C")
    s.add_argument("--interval", type=_positive_seconds("--interval"), default=2.0,
                   help="seconds between lines with --watch, > 0 (default 2)")
    s.add_argument("--count", type=_non_negative_int("--count"), default=0,
                   help="with --watch: stop after N lines (0 = until Ctrl-C)")
    s.add_argument("--json", action="store_true", help="print the full metrics JSON instead")
    s.set_defaults(func=cmd_status)

    pol = subparsers.add_parser(
        "policy", help="show or change the agent's policy",
        description="Show or change the policy the agent hands to plugin instances.",
    )
    psub = pol.add_subparsers(dest="policy_command", metavar="ACTION")
    show = psub.add_parser("show", parents=[common], help="print the policy in force and its version")
    show.add_argument("--json", action="store_true", help="print the agent's JSON answer")
    show.add_argument("--effective", action="store_true", help="print what plugins apply (baseline policy in baseline mode)")
    show.set_defaults(func=cmd_policy_show)
    st = psub.add_parser(
        "set", parents=[common], help="set a preset, merge a YAML/JSON file, or set key=value pairs",
        description="Examples: `inferos policy set quality`, `inferos policy set my.yaml`, "
        "`inferos policy set kv.recent_window=128 quality.max_delta_ppl=0.3`. A preset replaces the policy; "
        "a file or key=value pairs are merged over the policy in force.",
    )
    st.add_argument("spec", nargs="+", help="preset name | policy file | key=value ...")
    st.set_defaults(func=cmd_policy_set)
    bl = psub.add_parser("baseline", parents=[common], help="baseline mode on/off (plugins pass requests through)")
    bl.add_argument("state", nargs="?", choices=["on", "off"], help="omit to print the current state")
    bl.set_defaults(func=cmd_policy_baseline)
    pol.set_defaults(func=lambda args: (pol.print_help(), EXIT_USAGE)[1])


# -- agent ------------------------------------------------------------------------------
def _port_free(host: str, port: int) -> bool:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _raise_interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def _positive_seconds(flag: str) -> Any:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not a number of seconds") from None
        if not (0 < v < 86400):
            raise argparse.ArgumentTypeError(f"{flag} {text} is not allowed; must be > 0 and < 86400 seconds")
        return v

    return parse


def _non_negative_int(flag: str) -> Any:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not an integer") from None
        if v < 0:
            raise argparse.ArgumentTypeError(f"{flag} {v} is not allowed; must be >= 0")
        return v

    return parse


def _check_state_dir(path: Any) -> str | None:
    """None when ``path`` is (or can be made) a writable directory, else why not."""
    from pathlib import Path

    p = Path(path).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"--state-dir {str(p)!r} cannot be created: {e.strerror or e}"
    if not p.is_dir():
        return f"--state-dir {str(p)!r} is not a directory"
    probe = p / f".inferos-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return f"--state-dir {str(p)!r} is not writable: {e.strerror or e}"
    return None


def cmd_agent(args: argparse.Namespace) -> int:
    from ..policy import PolicyError, load_policy
    from .auth import TokenError, fingerprint, load_or_create_token
    from .server import BindError, check_bind, default_port, serve
    from .settings import ConfigError, default_state_dir, load_config_file

    try:
        port = args.port if args.port is not None else default_port()
        check_bind(args.host, args.allow_remote)
        config = initial_policy = None
        if args.config:
            config, pol_doc, spec = load_config_file(args.config)
            if spec or pol_doc:
                initial_policy = load_policy(spec)
                if pol_doc:
                    initial_policy = initial_policy.merged(pol_doc)
        token, source = load_or_create_token()
    except (BindError, ConfigError, PolicyError, TokenError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if not 0 < port < 65536:
        print(f"error: --port {port} is out of range (1..65535)", file=sys.stderr)
        return EXIT_USAGE
    if not _port_free(args.host, port):
        print(f"error: {args.host}:{port} is in use (another agent? try `inferos status --url "
              f"http://{args.host}:{port}`), or pick --port", file=sys.stderr)
        return EXIT_USAGE
    state_dir = args.state_dir or default_state_dir()
    problem = _check_state_dir(state_dir)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"inferos agent on http://{host}:{port}  dashboard: http://{host}:{port}/dashboard\n"
          f"  token: {fingerprint(token)} (from {source}; never printed)   state: {state_dir}", file=sys.stderr)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal: a stop
    # requested that way is a normal end (exit 0), not an interruption.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        serve(host=args.host, port=port, allow_remote=args.allow_remote, log_level=args.log_level, token=token,
              config=config, state_dir=state_dir, initial_policy=initial_policy)
    except KeyboardInterrupt:
        pass
    print("inferos agent stopped", file=sys.stderr)
    return EXIT_OK


# -- talking to the agent ----------------------------------------------------------------------
class CliError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def agent_url(args: argparse.Namespace) -> str:
    from .server import default_port

    url = getattr(args, "url", None) or os.environ.get("INFEROS_AGENT_URL") or f"http://127.0.0.1:{default_port()}"
    return url.rstrip("/")


def _request(args: argparse.Namespace, method: str, path: str, body: Any = None, auth: bool = False) -> Any:
    import requests

    from . import TOKEN_HEADER
    from .auth import configured_token
    from .settings import token_path

    url = agent_url(args)
    headers = {}
    if auth:
        tok, _ = configured_token()
        if not tok:
            raise CliError(EXIT_USAGE, f"no agent token: set INFEROS_AGENT_TOKEN or run where the agent stored {token_path()}")
        headers[TOKEN_HEADER] = tok
    try:
        resp = requests.request(method, url + path, json=body, headers=headers, timeout=args.timeout)
    except requests.ConnectionError:
        raise CliError(EXIT_UNREACHABLE, f"no control agent at {url}; start it with `inferos agent`") from None
    except requests.RequestException as e:
        raise CliError(EXIT_UNREACHABLE, f"control agent at {url} did not answer: {e}") from None
    try:
        doc = resp.json()
    except ValueError:
        doc = None
    if resp.status_code >= 400:
        err = (doc or {}).get("error", {}) if isinstance(doc, dict) else {}
        lines = [f"agent refused ({resp.status_code}): {err.get('message', resp.reason)}"]
        details = err.get("details")
        if isinstance(details, list):
            for d in details:
                if isinstance(d, dict) and "field" in d:
                    lines.append(f"  {d['field']}: {d.get('message')} (got {d.get('value')!r})")
        raise CliError(EXIT_REFUSED, "\n".join(lines))
    if doc is None:
        raise CliError(EXIT_REFUSED, f"agent at {url} answered {resp.status_code} without JSON")
    return doc


def _run(fn: Any, args: argparse.Namespace) -> int:
    try:
        return fn(args)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code


# -- status ------------------------------------------------------------------------------------
def _f(v: Any, fmt: str, unit: str = "") -> str:
    return "n/a" if v is None else f"{v:{fmt}}{unit}"


def status_line(m: dict[str, Any]) -> str:
    """The monitor line: TPS, FTL (first-token latency), memory, utilisation, quality, policy."""
    tp, ftl, mem, dev = m["throughput"], m["first_token_latency"], m["memory"], m["device_utilization"]
    q = m["quality"]["delta_ppl_est"]["delta"]
    st, win = m["optimization_status"], m["measurement_window"]
    pct = lambda v: "n/a" if v is None else f"{v * 100:.0f}%"  # noqa: E731
    return (
        f"TPS {tp['tokens_per_second']:.1f} tok/s | FTL {_f(ftl['mean_ms'], '.1f', ' ms')} (p95 {_f(ftl['p95_ms'], '.1f')}) | "
        f"RPS {tp['requests_per_second']:.2f} | KV {_f(mem['kv_cache_usage_mb'], '.3f', ' MB')} | "
        f"mem {_f(mem['total_allocated_mb'], '.1f', ' MB')} (peak {_f(mem['peak_usage_mb'], '.1f')}) | "
        f"CPU {pct(dev['cpu_utilization'])} NPU {pct(dev['npu_utilization'])} DML {pct(dev['dml_utilization'])} | "
        f"ΔPPL {_f(q, '+.3f')} | policy {st['current_policy']} v{st['policy_version']} | "
        f"{win['sample_count']} reports/{win['duration_seconds']:g}s"
    )


def cmd_status(args: argparse.Namespace) -> int:
    def once(a: argparse.Namespace) -> int:
        m = _request(a, "GET", "/v1/metrics")
        print(json.dumps(m, indent=2) if a.json else status_line(m), flush=True)
        return EXIT_OK

    if not args.watch:
        return _run(once, args)
    n = 0
    try:
        while True:
            try:
                m = _request(args, "GET", "/v1/metrics")
                line = json.dumps(m) if args.json else status_line(m)
                print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)
            except CliError as e:  # keep watching: the agent may come back
                print(f"[{time.strftime('%H:%M:%S')}] error: {e}", file=sys.stderr, flush=True)
            n += 1
            if args.count and n >= args.count:
                return EXIT_OK
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return EXIT_OK


# -- policy ------------------------------------------------------------------------------------
def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _print_policy(view: dict[str, Any], effective: bool) -> None:
    import yaml

    pol = view["effective"] if effective else view["policy"]
    print(f"# policy {pol.get('name')!r}, version {view['version']}, baseline mode {'on' if view['baseline'] else 'off'}"
          + (" (plugins apply the baseline policy)" if view["baseline"] and not effective else ""))
    print(yaml.safe_dump(pol, sort_keys=False).rstrip())


def cmd_policy_show(args: argparse.Namespace) -> int:
    def run(a: argparse.Namespace) -> int:
        view = _request(a, "GET", "/v1/policy")
        if a.json:
            print(json.dumps(view, indent=2))
        else:
            _print_policy(view, a.effective)
        return EXIT_OK

    return _run(run, args)


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """``["kv.recent_window=128", "io.enable_iobinding=false"]`` → nested dict (YAML scalars).

    Raises:
        CliError: an item is not ``dotted.key=value``.
    """
    import yaml

    doc: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or any(not p for p in key.strip().split(".")):
            raise CliError(EXIT_USAGE, f"expected key=value like kv.recent_window=128; got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        cur = doc
        parts = key.strip().split(".")
        for p in parts[:-1]:
            nxt = cur.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise CliError(EXIT_USAGE, f"{key}: {p!r} was already given a value")
            cur = nxt
        cur[parts[-1]] = value
    return doc


def resolve_policy_spec(spec: list[str]) -> tuple[dict[str, Any], str]:
    """The document to POST for ``inferos policy set SPEC...`` and a description of it."""
    from pathlib import Path

    from ..policy import PolicyError, load_document, load_policy, preset_names

    try:
        if len(spec) == 1 and "=" not in spec[0]:
            s = spec[0]
            if s in preset_names():
                return load_policy(s).to_dict(), f"preset {s!r}"
            if Path(s).is_file() or s.endswith((".yaml", ".yml", ".json")):
                return load_document(s), f"file {s}"
            raise CliError(EXIT_USAGE, f"{s!r} is neither a preset ({', '.join(preset_names())}), an existing "
                           "YAML/JSON file, nor key=value pairs like kv.recent_window=128")
    except PolicyError as e:
        raise CliError(EXIT_USAGE, str(e)) from None
    return parse_assignments(spec), " ".join(spec)


def cmd_policy_set(args: argparse.Namespace) -> int:
    def run(a: argparse.Namespace) -> int:
        doc, what = resolve_policy_spec(a.spec)
        before = _request(a, "GET", "/v1/policy")
        after = _request(a, "POST", "/v1/policy", doc, auth=True)
        old, new = _flatten(before["policy"]), _flatten(after["policy"])
        changed = [k for k in new if old.get(k) != new[k]]
        print(f"policy {after['policy'].get('name')!r} in force, version {after['version']} (from {what})")
        for k in changed:
            print(f"  {k}: {old.get(k)!r} -> {new[k]!r}")
        if not changed:
            print("  (no field changed)")
        if after["baseline"]:
            print("note: baseline mode is on; plugins apply the baseline policy until `inferos policy baseline off`")
        return EXIT_OK

    return _run(run, args)


def cmd_policy_baseline(args: argparse.Namespace) -> int:
    def run(a: argparse.Namespace) -> int:
        if a.state is None:
            view = _request(a, "GET", "/v1/policy")
        else:
            view = _request(a, "POST", "/v1/baseline", {"enable": a.state == "on"}, auth=True)
        on = view["baseline"]
        print(f"baseline mode {'on' if on else 'off'} (version {view['version']}): "
              + ("plugins pass requests through untouched" if on else f"plugins apply policy {view['policy']['name']!r}"))
        return EXIT_OK

    return _run(run, args)
