"""The Infer-OS control agent: one local service that holds the policy, collects every
PostRun report from the plugin instances, and shows how inference is doing.

Modules (each small, one concept):

* :mod:`.settings` – paths (config/state dirs), the agent's own config model, config files.
* :mod:`.auth` – the token: env var or a 0600 file, constant-time checks. Stdlib only, so
  the plugin-side client (:mod:`lemonade_inferos.client`) can share it without FastAPI.
* :mod:`.metrics` – the sliding window: pure functions from reports to the metrics JSON.
* :mod:`.history` – the SQLite store (WAL, retention by row count) for reports and state.
* :mod:`.state` – the service core: policy in force + version, baseline mode, config,
  window and store behind one lock (no HTTP).
* :mod:`.prometheus` – text exposition from a private ``CollectorRegistry``.
* :mod:`.app` – the FastAPI app factory :func:`~.app.create_app` (HTTP only).
* :mod:`.server` – run it with uvicorn (blocking, or in a background thread).
* :mod:`.cli` – ``inferos agent``, ``inferos status``, ``inferos policy``.

Importing this package is cheap and never imports FastAPI.
"""

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7031
TOKEN_HEADER = "X-Inferos-Token"
