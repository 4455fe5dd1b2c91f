"""``inferos gaia``: run AMD GAIA (``gaia-cli``) on an inferos backend with a policy made
from GAIA-style optimization flags.

GAIA (amd/gaia) talks to Lemonade only over HTTP with the OpenAI client; its base URL comes
from ``LEMONADE_BASE_URL`` (default ``http://localhost:13305/api/v1``) and it uses
``/chat/completions``, ``/completions``, ``/models``, ``/health``, ``/stats`` and ``/load``.
GAIA has no ``--optimization`` flag, so this launcher provides the seed guide's flag table:

=============================  ==============================================================
flag                           effect
=============================  ==============================================================
``--optimization inferos``     the policy below, hooks on (default)
``--optimization none``        baseline: ``INFEROS_DISABLE=1`` in the backend (no plugins,
                               ORT defaults, full-precision KV cache) and the baseline
                               policy file; no agent is started (the backend reports nothing)
``--mode hybrid|gpu_only|...`` ``scheduler.mode`` and its devices (hybrid: prefill dml /
                               decode npu; gpu_only: dml/dml; npu_only: npu/npu; absent
                               devices fall back to CPU with a log line)
``--kv-quantization``          ``enabled``: the base policy's ``kv.mode`` (``dynamic`` when the
                               base has it disabled); ``disabled``: ``kv.mode: disabled``
``--quality-threshold F``      ``quality.max_delta_ppl = F`` (ΔPPL tolerance, 0..2)
``--memory-limit SIZE``        ``kv.budget_bytes = SIZE`` (``2GiB``, ``512MB``, bytes)
``--batch-size N``             backend ``--max-concurrency N`` (the engine runs batch 1 per
                               request; N requests are generated at once)
``--max-tokens N``             backend ``--max-tokens N`` (cap on tokens per request)
``--debug``                    backend and agent ``--verbose``, inferos INFO logs
=============================  ==============================================================

What runs (all on 127.0.0.1): the control agent (``inferos agent``, when this install has
it) on a free port with a fresh token and its own state dir under the work dir (the user's
persisted agent policy is never changed), then the policy is POSTed to it; the backend
``inferos serve`` with ``INFEROS_AGENT_URL`` / ``INFEROS_AGENT_TOKEN``, so it runs the
agent's policy (``inferos policy set`` changes it live) and reports every request there —
without an agent it gets ``--policy <work dir>/policy.yaml`` instead (an explicit
``--policy`` would win over the agent's); then ``gaia-cli ARGS`` with
``LEMONADE_BASE_URL=http://127.0.0.1:PORT/api/v1``. The work dir (``$TMPDIR/inferos-gaia-*``)
holds the policy and the processes' logs while they run; it is removed when ``inferos gaia``
exits, unless ``--keep-running`` (the processes still use it). A service that fails to
start is reported with the tail of its log first. ``--backend-url`` / ``INFEROS_BACKEND_URL`` and
``INFEROS_AGENT_URL`` reuse running services instead. ``--dry-run`` prints all of it and
starts nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GAIA_EXECUTABLES = ("gaia-cli", "gaia")
INSTALL_HINT = """\
GAIA is not installed: neither 'gaia-cli' nor 'gaia' is on PATH.
Install it into this environment (or put its scripts on PATH):

    pip install amd-gaia
    # or from source:
    git clone https://github.com/amd/gaia.git && pip install -e ./gaia

Then run this command again. 'inferos gaia --dry-run ...' shows what would run without GAIA."""

MODE_DEVICES = {
    "hybrid": {"mode": "hybrid", "prefill_device": "dml", "decode_device": "npu"},
    "gpu_only": {"mode": "gpu_only", "prefill_device": "dml", "decode_device": "dml"},
    "npu_only": {"mode": "npu_only", "prefill_device": "npu", "decode_device": "npu"},
}
FLAG_OF_FIELD = {
    "quality.max_delta_ppl": "--quality-threshold",
    "kv.budget_bytes": "--memory-limit",
    "scheduler.mode": "--mode",
}


class GaiaLaunchError(RuntimeError):
    """Something the launcher needs is missing or did not start (message says what)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# -- the policy -------------------------------------------------------------------------------
def gaia_policy(args: argparse.Namespace) -> Any:
    """The :class:`~lemonade_inferos.policy.Policy` the flags describe.

    Raises:
        PolicyError: a flag's value is out of range (the message names the flag).
    """
    from ..policy import PolicyError, baseline_policy, load_policy, parse_size

    if args.optimization == "none":
        return baseline_policy()
    base = load_policy(args.policy)
    partial: dict[str, Any] = {}
    if args.kv_quantization == "disabled":
        partial.setdefault("kv", {})["mode"] = "disabled"
    elif base.kv.mode == "disabled":
        partial.setdefault("kv", {})["mode"] = "dynamic"
    if args.memory_limit is not None:
        try:
            partial.setdefault("kv", {})["budget_bytes"] = parse_size(args.memory_limit, field="--memory-limit")
        except ValueError as e:
            msg = str(e).split(": ", 1)[-1]
            raise PolicyError([{"field": "--memory-limit", "value": args.memory_limit, "message": msg}], "GAIA flags") from None
    if args.quality_threshold is not None:
        partial["quality"] = {"max_delta_ppl": args.quality_threshold}
    if args.mode is not None:
        partial["scheduler"] = dict(MODE_DEVICES[args.mode])
    try:
        return base.merged(partial, name=f"gaia-{base.name}")
    except PolicyError as e:
        errors = [{**err, "field": f"{FLAG_OF_FIELD[err['field']]} ({err['field']})"} if err["field"] in FLAG_OF_FIELD
                  else err for err in e.errors]
        raise PolicyError(errors, "GAIA flags") from None


def policy_yaml(policy: Any) -> str:
    import yaml

    return yaml.safe_dump({"infer_os": policy.to_dict()}, sort_keys=False, allow_unicode=True)


# -- the plan ----------------------------------------------------------------------------------
@dataclass
class Step:
    """One process: what it is, its argv, the environment it adds, its URL."""

    name: str
    argv: list[str]
    env: dict[str, str]
    url: str
    reuse: bool = False  # an already running service (nothing is started)

    def shell(self, redact: set[str] = frozenset()) -> str:  # type: ignore[assignment]
        env = " ".join(f"{k}={shlex.quote('<' + k.lower() + '>' if k in redact else v)}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(self.argv)


@dataclass
class Plan:
    policy: Any
    workdir: Path
    backend: Step
    agent: Step | None
    gaia: Step
    agent_note: str = ""
    notes: list[str] = field(default_factory=list)
    token_generated: bool = False
    baseline: bool = False

    @property
    def policy_file(self) -> Path:
        return self.workdir / "policy.yaml"

    def to_dict(self) -> dict[str, Any]:
        def step(s: Step | None) -> Any:
            if s is None:
                return None
            env = {k: ("<generated>" if k == "INFEROS_AGENT_TOKEN" and self.token_generated else
                       "<from environment>" if k == "INFEROS_AGENT_TOKEN" else v) for k, v in s.env.items()}
            return {"name": s.name, "argv": s.argv, "env": env, "url": s.url, "reuse": s.reuse}

        return {"policy": self.policy.to_dict(), "policy_file": str(self.policy_file), "backend": step(self.backend),
                "agent": step(self.agent), "gaia": step(self.gaia), "notes": self.notes + ([self.agent_note] if self.agent_note else [])}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def inferos_command() -> list[str]:
    """How to start this install's CLI: ``python -m lemonade_inferos.cli`` of this interpreter."""
    return [sys.executable, "-m", "lemonade_inferos.cli"]


def agent_cli_options() -> set[str] | None:
    """Option strings of ``inferos agent`` in this install, or None when it has no agent CLI."""
    try:
        if importlib.util.find_spec("lemonade_inferos.agent.cli") is None:
            return None
    except ImportError:
        return None
    from ..cli import build_parser

    parser = build_parser()
    for action in parser._actions:  # the subparsers action
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict) and "agent" in choices:
            return {o for a in choices["agent"]._actions for o in a.option_strings}
    return None


def find_gaia() -> str | None:
    """Path of ``gaia-cli`` (or ``gaia``, the same entry point) on PATH."""
    for name in GAIA_EXECUTABLES:
        exe = shutil.which(name)
        if exe:
            return exe
    return None


def build_plan(args: argparse.Namespace, env: dict[str, str] | None = None) -> Plan:
    """Everything :func:`run_gaia` would start, without starting anything.

    Raises:
        PolicyError: bad flag values.
    """
    env = dict(os.environ if env is None else env)
    policy = gaia_policy(args)
    baseline = args.optimization == "none"
    notes: list[str] = []
    if baseline:
        ignored = [f for f, v in (("--kv-quantization", args.kv_quantization != "enabled"),
                                  ("--quality-threshold", args.quality_threshold is not None),
                                  ("--memory-limit", args.memory_limit is not None), ("--mode", args.mode is not None),
                                  ("--policy", args.policy is not None)) if v]
        if ignored:
            notes.append(f"--optimization none runs the baseline; {', '.join(ignored)} ignored")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = Path(tempfile.gettempdir()) / f"inferos-gaia-{stamp}-{os.getpid()}"
    inferos = inferos_command()

    # control agent
    agent: Step | None = None
    agent_note = ""
    token = env.get("INFEROS_AGENT_TOKEN", "").strip()
    token_generated = False
    agent_url = env.get("INFEROS_AGENT_URL", "").strip().rstrip("/")
    if args.no_agent:
        agent_note = "no control agent (--no-agent): requests are not reported"
    elif baseline:
        agent_note = ("baseline: the backend runs without plugins (INFEROS_DISABLE=1), so it reports to no agent "
                      "and none is started; per-request numbers are in the backend's /api/v1/stats and in each "
                      "response's usage/timings")
    elif agent_url:
        agent = Step("agent", [], {}, agent_url, reuse=True)
        agent_note = f"using the running agent INFEROS_AGENT_URL={agent_url}"
    else:
        opts = agent_cli_options()
        if opts is None:
            agent_note = ("the control agent CLI ('inferos agent') is not in this install: starting the backend only; "
                          "requests are not reported to an agent")
        else:
            port = args.agent_port or free_port()
            argv = [*inferos, "agent"]
            if "--host" in opts:
                argv += ["--host", "127.0.0.1"]
            if "--port" in opts:
                argv += ["--port", str(port)]
            elif port != 7031:
                port = 7031
                agent_note = "'inferos agent' has no --port option: expecting it on its default port 7031"
            if "--state-dir" in opts:
                argv += ["--state-dir", str(workdir / "agent-state")]
            if args.debug and "--log-level" in opts:
                argv += ["--log-level", "info"]
            elif args.debug and "--verbose" in opts:
                argv.append("--verbose")
            if not token:
                token, token_generated = secrets.token_urlsafe(32), True
            agent = Step("agent", argv, {"INFEROS_AGENT_TOKEN": token}, f"http://127.0.0.1:{port}")

    # backend
    backend_url = (args.backend_url or env.get("INFEROS_BACKEND_URL", "")).strip().rstrip("/")
    if backend_url:
        for suffix in ("/api/v1", "/v1"):
            if backend_url.endswith(suffix):
                backend_url = backend_url[: -len(suffix)]
        backend = Step("backend", [], {}, backend_url, reuse=True)
        notes.append(f"using the running backend {backend_url}: its own policy stays in force"
                     + (" (the agent's policy applies if it reports to this agent)" if agent else ""))
    else:
        port = args.backend_port or free_port()
        argv = [*inferos, "serve", "--host", "127.0.0.1", "--port", str(port),
                "--max-concurrency", str(args.batch_size)]
        if agent is None:  # with an agent the backend runs the agent's policy (see the module docstring)
            argv += ["--policy", str(workdir / "policy.yaml")]
        if args.model_dir:
            argv[4:4] = ["-m", str(args.model_dir)]
        if args.ctx_size:
            argv += ["--ctx-size", str(args.ctx_size)]
        if args.max_tokens:
            argv += ["--max-tokens", str(args.max_tokens)]
        if args.debug:
            argv.append("--verbose")
        benv: dict[str, str] = {}
        if baseline:
            benv["INFEROS_DISABLE"] = "1"
        if agent is not None:
            benv["INFEROS_AGENT_URL"] = agent.url
            if token:
                benv["INFEROS_AGENT_TOKEN"] = token
        backend = Step("backend", argv, benv, f"http://127.0.0.1:{port}")

    # GAIA
    gaia_args = list(args.gaia_args or [])
    if gaia_args[:1] == ["--"]:
        gaia_args = gaia_args[1:]
    exe = find_gaia() or GAIA_EXECUTABLES[0]
    genv = {"LEMONADE_BASE_URL": f"{backend.url}/api/v1"}
    if agent is not None:
        genv["INFEROS_AGENT_URL"] = agent.url  # informative: GAIA itself does not read it
    gaia = Step("gaia", [exe, *gaia_args], genv, genv["LEMONADE_BASE_URL"])
    return Plan(policy, workdir, backend, agent, gaia, agent_note, notes, token_generated, baseline)


def format_plan(plan: Plan) -> str:
    """The dry-run report: policy, then each process's environment and command line."""
    redact = {"INFEROS_AGENT_TOKEN"}
    lines = ["# inferos gaia --dry-run: nothing was started; this is what would run.",
             f"# policy {plan.policy.name!r} (would be written to {plan.policy_file}):"]
    lines += [line for line in policy_yaml(plan.policy).rstrip().splitlines()]
    n = 1
    if plan.agent is not None:
        if plan.agent.reuse:
            lines.append(f"# {n}. control agent: already running at {plan.agent.url}; the policy is POSTed to "
                         f"{plan.agent.url}/v1/policy (needs INFEROS_AGENT_TOKEN)")
        else:
            tok = "a freshly generated token" if plan.token_generated else "INFEROS_AGENT_TOKEN from the environment"
            lines.append(f"# {n}. control agent on {plan.agent.url} (token: {tok}), then POST {plan.agent.url}/v1/policy "
                         "with the policy" + (" and POST /v1/baseline {\"enable\": true}" if plan.baseline else ""))
            lines.append(plan.agent.shell(redact))
        n += 1
    if plan.agent_note:
        lines.append(f"# note: {plan.agent_note}")
    if plan.backend.reuse:
        lines.append(f"# {n}. backend: already running at {plan.backend.url}")
    else:
        lines.append(f"# {n}. inferos backend on {plan.backend.url} (waits for {plan.backend.url}/health)")
        lines.append(plan.backend.shell(redact))
    n += 1
    lines.append(f"# {n}. GAIA" + ("" if find_gaia() else " (gaia-cli is not installed: pip install amd-gaia)"))
    lines.append(plan.gaia.shell())
    for note in plan.notes:
        lines.append(f"# note: {note}")
    return "\n".join(lines)


# -- running ---------------------------------------------------------------------------------
def _http(method: str, url: str, body: Any = None, token: str | None = None, timeout: float = 5.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("X-Inferos-Token", token)
    with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - loopback URLs we built
        raw = r.read()
    return json.loads(raw) if raw else None


def healthy(url: str, timeout: float = 2.0) -> bool:
    """True when ``GET url`` answers 2xx."""
    try:
        _http("GET", url, timeout=timeout)
        return True
    except (OSError, ValueError):
        return False


@dataclass
class Started:
    name: str
    proc: subprocess.Popen
    log_path: Path


def _start(step: Step, health_url: str, workdir: Path, timeout: float) -> Started:
    log_path = workdir / f"{step.name}.log"
    log_file = open(log_path, "wb")
    kwargs: dict[str, Any] = {}
    if os.name == "posix":
        kwargs["start_new_session"] = True  # Ctrl-C in the terminal goes to GAIA, we stop these ourselves
    proc = subprocess.Popen(step.argv, env={**os.environ, **step.env}, stdout=log_file, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, **kwargs)
    log_file.close()
    started = Started(step.name, proc, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise GaiaLaunchError(f"the {step.name} exited with code {proc.returncode} before answering {health_url}; "
                                  f"its log ({log_path}):\n{_tail(log_path)}")
        if healthy(health_url, timeout=1.0):
            return started
        time.sleep(0.2)
    _stop(started)
    raise GaiaLaunchError(f"the {step.name} did not answer {health_url} within {timeout:g} s; its log ({log_path}):\n"
                          f"{_tail(log_path)}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(s: Started, timeout: float = 10.0) -> None:
    if s.proc.poll() is not None:
        return
    s.proc.terminate()
    try:
        s.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        s.proc.kill()
        s.proc.wait(timeout)


def run_gaia(args: argparse.Namespace) -> int:
    """``inferos gaia``: see the module docstring. Returns gaia-cli's exit code, 127 when GAIA
    is missing, 2 for bad flags, 1 when a service does not start."""
    import logging

    from ..policy import PolicyError

    if args.debug:
        logging.getLogger("lemonade_inferos").setLevel(logging.INFO)
    try:
        plan = build_plan(args)
    except PolicyError as e:
        print(f"inferos gaia: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(format_plan(plan))
        return 0
    gaia_exe = find_gaia()
    if gaia_exe is None:
        print(f"inferos gaia: error: {INSTALL_HINT}", file=sys.stderr)
        return 127
    plan.gaia.argv[0] = gaia_exe
    started: list[Started] = []
    made_workdir = False
    try:
        try:
            plan.workdir.mkdir(parents=True)
        except FileExistsError:
            raise GaiaLaunchError(f"work dir {plan.workdir} already exists; run again") from None
        made_workdir = True
        plan.policy_file.write_text(policy_yaml(plan.policy), encoding="utf-8")
        if plan.agent_note:
            print(f"inferos gaia: {plan.agent_note}", file=sys.stderr)
        for note in plan.notes:
            print(f"inferos gaia: note: {note}", file=sys.stderr)
        if plan.agent is not None:
            if not plan.agent.reuse:
                started.append(_start(plan.agent, plan.agent.url + "/v1/health", plan.workdir, args.start_timeout))
            elif not healthy(plan.agent.url + "/v1/health"):
                raise GaiaLaunchError(f"INFEROS_AGENT_URL={plan.agent.url} does not answer /v1/health")
            _configure_agent(plan)
        if plan.backend.reuse:
            if not healthy(plan.backend.url + "/health"):
                raise GaiaLaunchError(f"the backend {plan.backend.url} does not answer /health")
        else:
            started.append(_start(plan.backend, plan.backend.url + "/health", plan.workdir, args.start_timeout))
        print(f"inferos gaia: backend {plan.backend.url} (policy {plan.policy.name!r}), "
              + (f"agent {plan.agent.url}" if plan.agent else "no agent")
              + f"; running: LEMONADE_BASE_URL={plan.gaia.env['LEMONADE_BASE_URL']} {shlex.join(plan.gaia.argv)}",
              file=sys.stderr, flush=True)
        proc = subprocess.Popen(plan.gaia.argv, env={**os.environ, **plan.gaia.env})
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                continue  # GAIA got the same Ctrl-C (same terminal); wait for its clean exit
    except GaiaLaunchError as e:
        print(f"inferos gaia: error: {e}", file=sys.stderr)
        return e.code
    finally:
        if args.keep_running and started:
            for s in started:
                print(f"inferos gaia: left running: {s.name} pid {s.proc.pid} "
                      f"({plan.backend.url if s.name == 'backend' else plan.agent.url if plan.agent else ''}); "
                      f"log {s.log_path}", file=sys.stderr)
        else:
            for s in reversed(started):
                _stop(s)
            if made_workdir:  # policy + logs: nothing runs from it any more
                shutil.rmtree(plan.workdir, ignore_errors=True)


def _configure_agent(plan: Plan) -> None:
    """POST the policy (and baseline mode) to the agent. A reused agent without a token only
    gets a warning: its policy stays in force."""
    assert plan.agent is not None
    token = plan.agent.env.get("INFEROS_AGENT_TOKEN") or os.environ.get("INFEROS_AGENT_TOKEN", "").strip()
    if not token:
        print("inferos gaia: warning: no INFEROS_AGENT_TOKEN: the agent's policy is left as it is", file=sys.stderr)
        return
    try:
        _http("POST", plan.agent.url + "/v1/policy", {"infer_os": plan.policy.to_dict()}, token=token)
        _http("POST", plan.agent.url + "/v1/baseline", {"enable": plan.baseline}, token=token)
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:500]
        raise GaiaLaunchError(f"the agent refused the policy ({e.code}): {detail}") from None
    except OSError as e:
        raise GaiaLaunchError(f"cannot reach the agent at {plan.agent.url}: {e}") from None
