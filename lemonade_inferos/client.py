"""The plugin side of the control agent: policy from the agent, PostRun stats to the agent.

:class:`AgentClientPlugin` is a pluggy plugin (project ``inferos``):

* ``before_request`` returns the agent's effective policy, fetched with ``GET /v1/policy``
  and cached for ``policy_ttl`` seconds (default 1 s). When the agent is in baseline mode it
  returns :func:`~lemonade_inferos.policy.baseline_policy`. With ``follow_policy=False``
  (a command given an explicit ``--policy``) it fetches nothing and keeps the policy in
  force: the command line wins for that command; stats are still reported.
* ``after_request`` only enqueues ``stats.to_dict()`` on a bounded queue; a daemon thread
  posts each report to ``POST /v1/stats`` (with ``X-Inferos-Token``), so generation never
  waits on the network. When the queue is full the report is dropped and counted; the
  count rides along (``dropped``) with the next successful post, so the agent's metrics
  show it. Retries keep the report; the agent deduplicates by ``(instance, request_id)``.

Agent down or answering errors → the plugin runs requests with the baseline policy, logs
once (a warning), retries with exponential backoff and jitter (``backoff_initial`` doubling
up to ``backoff_max`` seconds, each delay scaled by a random factor in [0.5, 1.0]), and logs
once more when the agent is back. Nothing here imports FastAPI; HTTP is ``requests``.

Environment (:func:`agent_plugin_from_env`): ``INFEROS_AGENT_URL`` (e.g.
``http://127.0.0.1:7031``) enables the plugin; the token comes from ``INFEROS_AGENT_TOKEN``
or the user's token file.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import random
import socket
import threading
import time
import uuid
from typing import Any, Callable

import requests

from .agent import TOKEN_HEADER
from .agent.auth import configured_token, read_token_file
from .hookspecs import hookimpl
from .policy import Policy, PolicyError, baseline_policy, validate_policy

log = logging.getLogger("lemonade_inferos.client")

PLUGIN_NAME = "inferos.agent"
ENV_URL = "INFEROS_AGENT_URL"


class AgentError(RuntimeError):
    """The agent answered, but not with what the client needs (status and message named)."""


def _error_message(resp: requests.Response) -> str:
    try:
        err = resp.json().get("error", {})
        return f"HTTP {resp.status_code}: {err.get('message', resp.reason)}"
    except (ValueError, AttributeError):
        return f"HTTP {resp.status_code}: {resp.reason}"


class Backoff:
    """Exponential backoff with jitter: after the n-th consecutive failure the next attempt
    waits ``min(maximum, initial * 2**(n-1)) * U(0.5, 1.0)`` seconds (monotonic clock)."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, rng: Callable[[], float] = random.random):
        self.initial, self.maximum, self.rng = initial, maximum, rng
        self.failures = 0
        self.next_attempt = 0.0

    def ready(self, now: float) -> bool:
        return now >= self.next_attempt

    def failure(self, now: float) -> float:
        """Record a failure; returns the delay (s) before the next attempt."""
        self.failures += 1
        base = min(self.maximum, self.initial * 2 ** min(self.failures - 1, 30))
        delay = base * (0.5 + 0.5 * self.rng())
        self.next_attempt = now + delay
        return delay

    def success(self) -> None:
        self.failures = 0
        self.next_attempt = 0.0


class _Channel:
    """Backoff + log-once bookkeeping for one kind of call (policy fetch, stats post)."""

    def __init__(self, name: str, url: str, backoff: Backoff):
        self.name, self.url, self.backoff = name, url, backoff
        self.down = False
        self.last_error: str | None = None

    def failed(self, error: Any, consequence: str) -> float:
        delay = self.backoff.failure(time.monotonic())
        self.last_error = str(error)
        if not self.down:
            self.down = True
            log.warning("control agent at %s: %s failed (%s); %s; retrying with backoff",
                        self.url, self.name, error, consequence)
        else:
            log.debug("control agent %s still failing (%s); next try in %.2f s", self.name, error, delay)
        return delay

    def succeeded(self) -> None:
        if self.down:
            log.warning("control agent at %s: %s works again", self.url, self.name)
        self.down = False
        self.last_error = None
        self.backoff.success()


class AgentClientPlugin:
    """Pluggy plugin talking to the control agent (see the module docstring).

    Args:
        url: agent base URL, e.g. ``http://127.0.0.1:7031``.
        token: the agent token; None = ``INFEROS_AGENT_TOKEN`` or the token file (re-read
            after a 401, in case the agent generated a new one).
        instance: this process's id in reports; default ``<host>-<pid>-<random>``.
        policy_ttl: seconds a fetched policy is reused without asking the agent.
        timeout: per-call HTTP timeout in seconds (connect and read).
        queue_size: bounded stats queue length (reports); overflow is dropped and counted.
        backoff_initial / backoff_max: retry delays in seconds (see :class:`Backoff`).
        follow_policy: False = never replace the policy in force (an explicit ``--policy``
            on the command line wins); stats are still posted.
    """

    name = PLUGIN_NAME

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        instance: str | None = None,
        policy_ttl: float = 1.0,
        timeout: float = 1.0,
        queue_size: int = 256,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        rng: Callable[[], float] = random.random,
        follow_policy: bool = True,
    ):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"agent URL {url!r} must start with http:// or https:// (e.g. http://127.0.0.1:7031)")
        self.url = url.rstrip("/")
        self._token_from_env_or_file = token is None
        self.token = token if token is not None else configured_token()[0]
        self.instance = (instance or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")[:128]
        self.instance = "".join(c if c.isalnum() or c in "_.:@/+-" else "-" for c in self.instance)
        self.policy_ttl = policy_ttl
        self.timeout = timeout
        self.follow_policy = follow_policy

        self._policy_lock = threading.Lock()
        self._policy_session = requests.Session()
        self._policy_channel = _Channel("policy fetch", self.url, Backoff(backoff_initial, backoff_max, rng))
        self._cached: Policy | None = None
        self._fetched_at = 0.0
        self._agent_policy: Policy | None = None
        self.policy_version: int | None = None
        self.agent_baseline: bool | None = None
        self.policy_source = "none"  # "agent" | "fallback"

        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=queue_size)
        self._stats_channel = _Channel("stats post", self.url, Backoff(backoff_initial, backoff_max, rng))
        self._count_lock = threading.Lock()
        self._dropped_unreported = 0
        self.dropped_total = 0
        self.sent_total = 0
        self.rejected_total = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        atexit.register(self._at_exit)

    # -- status ----------------------------------------------------------------------
    @property
    def agent_available(self) -> bool:
        """False while the last policy fetch failed (requests run with the baseline policy)."""
        return not self._policy_channel.down

    def status(self) -> dict[str, Any]:
        """Counters and health, for logs and tests."""
        return {
            "url": self.url,
            "instance": self.instance,
            "policy_source": self.policy_source,
            "policy_version": self.policy_version,
            "agent_baseline": self.agent_baseline,
            "policy_channel_down": self._policy_channel.down,
            "stats_channel_down": self._stats_channel.down,
            "queued": self._queue.qsize(),
            "sent": self.sent_total,
            "dropped": self.dropped_total,
            "rejected": self.rejected_total,
            "last_error": self._policy_channel.last_error or self._stats_channel.last_error,
        }

    # -- policy ----------------------------------------------------------------------
    def _fetch_policy(self) -> tuple[Policy, int, bool]:
        resp = self._policy_session.get(f"{self.url}/v1/policy", timeout=self.timeout)
        if resp.status_code != 200:
            raise AgentError(_error_message(resp))
        doc = resp.json()
        version, baseline = int(doc["version"]), bool(doc["baseline"])
        if baseline:
            return baseline_policy(), version, True
        if version == self.policy_version and self._agent_policy is not None:
            return self._agent_policy, version, False
        pol = validate_policy(doc["effective"], source="agent policy")
        self._agent_policy = pol
        return pol, version, False

    def effective_policy(self) -> Policy:
        """The policy requests should run with now (agent's, cached ≤ ``policy_ttl`` s; baseline
        while the agent cannot be reached)."""
        with self._policy_lock:
            now = time.monotonic()
            if self._cached is not None and now - self._fetched_at < self.policy_ttl:
                return self._cached
            if not self._policy_channel.backoff.ready(now):
                self.policy_source = "fallback"
                return baseline_policy()
            try:
                pol, version, baseline = self._fetch_policy()
            except (requests.RequestException, AgentError, PolicyError, ValueError, KeyError, TypeError) as e:
                self._policy_channel.failed(e, "running requests with the baseline policy")
                self._cached = None
                self.policy_source = "fallback"
                return baseline_policy()
            self._policy_channel.succeeded()
            self._cached, self._fetched_at = pol, time.monotonic()
            self.policy_version, self.agent_baseline, self.policy_source = version, baseline, "agent"
            return pol

    @hookimpl
    def before_request(self, context: Any, policy: Policy) -> Policy:
        """PreRun: the agent's effective policy (or the baseline one while it is away); None
        (the policy in force stays) when ``follow_policy`` is off."""
        extra = getattr(context, "extra", None)
        if not self.follow_policy:
            if isinstance(extra, dict):
                extra["inferos_agent"] = {"policy_source": "command line", "policy_version": None}
            return None
        pol = self.effective_policy()
        if isinstance(extra, dict):
            extra["inferos_agent"] = {"policy_source": self.policy_source, "policy_version": self.policy_version}
        return pol

    # -- stats -----------------------------------------------------------------------
    @hookimpl
    def after_request(self, context: Any, stats: Any) -> None:
        """PostRun: enqueue the report and return at once (never blocks on the network)."""
        payload = stats.to_dict() if hasattr(stats, "to_dict") else dict(stats)
        self._ensure_sender()
        try:
            self._queue.put_nowait(payload)
        except queue.Full:
            with self._count_lock:
                self._dropped_unreported += 1
                self.dropped_total += 1

    def _ensure_sender(self) -> None:
        with self._thread_lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._send_loop, name="inferos-agent-stats", daemon=True)
                self._thread.start()

    def _take_dropped(self) -> int:
        with self._count_lock:
            n, self._dropped_unreported = self._dropped_unreported, 0
            return n

    def _give_back_dropped(self, n: int) -> None:
        if n:
            with self._count_lock:
                self._dropped_unreported += n

    def _headers(self) -> dict[str, str]:
        return {TOKEN_HEADER: self.token} if self.token else {}

    def _post_one(self, session: requests.Session, item: dict[str, Any]) -> bool:
        """Try to deliver ``item``; True when it is settled (accepted or rejected for good)."""
        dropped = self._take_dropped()
        body = {**item, "instance": self.instance, "dropped": dropped}
        try:
            resp = session.post(f"{self.url}/v1/stats", json=body, headers=self._headers(), timeout=self.timeout)
        except requests.RequestException as e:
            self._give_back_dropped(dropped)
            self._stats_channel.failed(e, "keeping reports queued")
            return False
        if resp.status_code in (200, 201):
            self._stats_channel.succeeded()
            self.sent_total += 1
            return True
        self._give_back_dropped(dropped)
        if resp.status_code == 401:
            if self._token_from_env_or_file:
                self.token = configured_token()[0] or read_token_file()
            self._stats_channel.failed(AgentError(_error_message(resp)), "check INFEROS_AGENT_TOKEN / the token file")
            return False
        if 400 <= resp.status_code < 500 and resp.status_code not in (408, 413, 429):
            self.rejected_total += 1
            log.warning("control agent rejected a report (request %s): %s", item.get("request_id"), _error_message(resp))
            return True
        self._stats_channel.failed(AgentError(_error_message(resp)), "keeping reports queued")
        return False

    def _send_loop(self) -> None:
        session = requests.Session()
        item: dict[str, Any] | None = None
        while not self._stop.is_set():
            if item is None:
                try:
                    item = self._queue.get(timeout=0.1)
                except queue.Empty:
                    continue
            wait = self._stats_channel.backoff.next_attempt - time.monotonic()
            if wait > 0:
                self._stop.wait(min(wait, 0.5))
                continue
            if self._post_one(session, item):
                item = None
                self._queue.task_done()
        session.close()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued report is settled; False on timeout (agent away)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Flush for up to ``timeout`` seconds, then stop the sender thread."""
        self.flush(timeout)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._policy_session.close()

    def _at_exit(self) -> None:  # pragma: no cover - interpreter shutdown
        if self._thread is not None and self._thread.is_alive():
            self.close(timeout=1.0)


def agent_plugin_from_env(**kwargs: Any) -> AgentClientPlugin | None:
    """The agent client plugin when ``INFEROS_AGENT_URL`` is set, else None.

    The token comes from ``INFEROS_AGENT_TOKEN`` or the token file; without one, policies
    are still fetched but stats posts are refused (401, logged once). ``kwargs`` go to
    :class:`AgentClientPlugin`.
    """
    url = os.environ.get(ENV_URL, "").strip()
    if not url:
        return None
    plugin = AgentClientPlugin(url, **kwargs)
    if not plugin.token:
        log.warning("%s is set but no agent token was found (INFEROS_AGENT_TOKEN or the token file); "
                    "stats posts will be refused", ENV_URL)
    return plugin
