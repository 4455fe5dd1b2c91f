"""The Infer-OS policy: a typed, validated description of how one request should run.

The schema follows the seed guide's ``POST /v1/policy`` body (sections ``kv``, ``io``,
``scheduler``, ``quality``, ``loops``) plus a ``runtime`` section for the ORT session and
run options the hooks inject. Documents are YAML (root key ``infer_os`` optional) or JSON;
a partial document merges over a base policy (the defaults, or the policy in force), so
``{"kv": {"recent_window": 128}}`` changes one field and keeps every other.

Validation happens at this boundary: :class:`PolicyError` names each bad field, the value
given and what is allowed, and nothing is applied when any field is bad.

KV level thresholds — the one definition
----------------------------------------
Tokens are grouped in blocks. Sink blocks (the first ``kv.sink_tokens`` tokens) and the most
recent ``kv.recent_window`` tokens stay at L0 (float16) always. Every other block is
*demotable* and gets a demotion rank ``d`` in ``[0, 1)``: 0 for the most important demotable
block (largest accumulated attention mass, H2O-style), approaching 1 for the least important.
The block is stored at the deepest level whose threshold ``d`` reaches::

    d >= L3_evict -> L3 (evicted)
    d >= L2_int4  -> L2 (INT4)
    d >= L1_int8  -> L1 (INT8)
    otherwise     -> L0 (float16)

So each threshold is the fraction of demotable blocks kept *better* than that level:
``L3_evict: 0.8`` keeps 80 % of old blocks and evicts the least important 20 %;
``L1_int8: 0.0`` means no old block stays at float16. Lower thresholds compress more;
``1.0`` disables a level (``d`` is always below 1). Thresholds must satisfy
``L1_int8 <= L2_int4 <= L3_evict``. ``kv.mode`` then adjusts them:

* ``dynamic`` – as given while the cache is within ``kv.budget_bytes``; once the budget is
  reached, blocks are demoted further (least important first) until it fits again.
* ``latency_optimized`` / ``throughput_optimized`` – as ``dynamic``; the presets of those
  names pick thresholds and windows for their goal.
* ``quality_optimized`` – never below INT8: L2 and L3 are disabled whatever the thresholds.
* ``disabled`` – every token stays at L0 (no quantization, no eviction).
"""

from __future__ import annotations

import copy
import json
import re
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

GiB = 1024**3

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_size(value: Any, *, field: str = "size") -> int:
    """Parse a byte size given as an integer or a string such as ``"2048MiB"``, ``"4GiB"``,
    ``"2GB"``: B, KB, MB, GB, TB are decimal (1000^n); KiB, MiB, GiB, TiB binary (1024^n).

    Returns:
        the size in bytes (int).

    Raises:
        ValueError: not a non-negative integer or a size string (message names ``field``).
    """
    if isinstance(value, bool):
        raise ValueError(f"{field}: {value!r} is not a size; give bytes or a string like '4GiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{field}: {value} is negative")
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    raise ValueError(
        f"{field}: {value!r} is not a size; give an integer number of bytes or a string "
        "like '2048MiB', '4GiB', '2GB' (B, KB, MB, GB decimal; KiB, MiB, GiB binary)"
    )


def format_size(n: int) -> str:
    """Human-readable binary size, e.g. ``2.0 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=True)


class KVMode(str, Enum):
    dynamic = "dynamic"
    latency_optimized = "latency_optimized"
    throughput_optimized = "throughput_optimized"
    quality_optimized = "quality_optimized"
    disabled = "disabled"


class LevelThresholds(_Section):
    """Demotion-rank cutoffs; see the module docstring for the exact semantics."""

    L1_int8: float = Field(0.0, ge=0.0, le=1.0, description="fraction of demotable blocks kept at float16")
    L2_int4: float = Field(0.0, ge=0.0, le=1.0, description="fraction of demotable blocks kept at INT8 or better")
    L3_evict: float = Field(0.75, ge=0.0, le=1.0, description="fraction of demotable blocks kept at all (1.0 = no eviction)")

    @model_validator(mode="after")
    def _ordered(self) -> "LevelThresholds":
        if not (self.L1_int8 <= self.L2_int4 <= self.L3_evict):
            raise ValueError(
                f"thresholds must satisfy L1_int8 <= L2_int4 <= L3_evict (each is the fraction of "
                f"demotable blocks kept better than that level); got L1_int8={self.L1_int8}, "
                f"L2_int4={self.L2_int4}, L3_evict={self.L3_evict}"
            )
        return self


class KVPolicy(_Section):
    mode: KVMode = Field(KVMode.dynamic, description="how the tiered KV store assigns levels")
    recent_window: int = Field(64, ge=16, le=512, description="most recent tokens always kept at float16")
    sink_tokens: int = Field(4, ge=0, le=64, description="first tokens (attention sinks) always kept at float16")
    level_thresholds: LevelThresholds = Field(default_factory=LevelThresholds)
    budget_bytes: int | None = Field(
        None, description="KV-cache memory budget in bytes (or a size string); null = no budget"
    )

    @field_validator("budget_bytes", mode="before")
    @classmethod
    def _budget(cls, v: Any) -> Any:
        return None if v is None else parse_size(v, field="kv.budget_bytes")


class IOPolicy(_Section):
    enable_iobinding: bool = Field(True, description="bind inputs/outputs to OrtValues (no per-step copies)")
    dml_pool_bytes: int = Field(2 * GiB, ge=GiB, description="DirectML memory pool, bytes (>= 1 GiB)")
    host_pool_bytes: int = Field(4 * GiB, ge=GiB, description="host memory pool / CPU arena limit, bytes (>= 1 GiB)")

    @field_validator("dml_pool_bytes", "host_pool_bytes", mode="before")
    @classmethod
    def _size(cls, v: Any, info: Any) -> Any:
        return parse_size(v, field=f"io.{info.field_name}")


class SchedulerPolicy(_Section):
    mode: Literal["hybrid", "gpu_only", "npu_only"] = "hybrid"
    prefill_device: Literal["dml", "npu", "cpu"] = "dml"
    decode_device: Literal["npu", "dml", "cpu"] = "npu"


class QualityPolicy(_Section):
    max_delta_ppl: float = Field(0.5, ge=0.0, le=2.0, description="largest acceptable perplexity increase (absolute)")
    min_accept_rate: float = Field(0.5, ge=0.0, le=1.0, description="lowest acceptable speculative accept rate")
    max_kld: float = Field(0.05, ge=0.0, le=1.0, description="largest acceptable mean KL divergence (nats/token) vs full precision")
    guard: bool = Field(
        False,
        description="measure each KV setting's ΔPPL/KLD on a calibration text once and step compression "
        "back until within budget (lemonade_inferos.guard)",
    )


class LoopsPolicy(_Section):
    fast_ms: float = Field(1.0, gt=0, description="fast control loop period (ms)")
    mid_ms: float = Field(10.0, gt=0, description="mid control loop period (ms)")
    slow_ms: float = Field(100.0, gt=0, description="slow control loop period (ms)")

    @model_validator(mode="after")
    def _ordered(self) -> "LoopsPolicy":
        if not (self.fast_ms <= self.mid_ms <= self.slow_ms):
            raise ValueError(
                f"loop periods must satisfy fast_ms <= mid_ms <= slow_ms; got {self.fast_ms}, "
                f"{self.mid_ms}, {self.slow_ms}"
            )
        return self


class RuntimePolicy(_Section):
    """ORT session/run settings (see :mod:`lemonade_inferos.ort_options`)."""

    intra_op_threads: int = Field(0, ge=0, le=256, description="0 = ORT default (one per physical core)")
    inter_op_threads: int = Field(0, ge=0, le=256, description="0 = ORT default")
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    execution_mode: Literal["sequential", "parallel"] = "sequential"
    enable_mem_pattern: bool = True
    enable_cpu_mem_arena: bool = True
    arena_shrinkage: bool = Field(False, description="shrink the CPU arena after each request")
    log_severity: int = Field(3, ge=0, le=4, description="0 verbose .. 4 fatal")
    prefill_chunk_tokens: int = Field(
        512, ge=16, le=65536,
        description="prompt tokens per prefill run: attention scores of one run are [heads, chunk, "
        "past + chunk], so a long prompt never materialises [heads, T, T]")
    session_config: dict[str, str] = Field(default_factory=dict, description="extra add_session_config_entry pairs")


MAX_POLICY_NAME = 128


def check_policy_name(v: Any) -> str:
    """A policy name: a string of 1..128 characters without control or format characters
    (Unicode categories Cc, Cf: NUL, newlines, bidi overrides such as U+202E, zero-width
    characters), so every report and log line shows it as it is.

    Raises:
        ValueError: not such a string (message says what is wrong).
    """
    import unicodedata

    if not isinstance(v, str):
        raise ValueError(f"must be a string, got {type(v).__name__}")
    if not 1 <= len(v) <= MAX_POLICY_NAME:
        raise ValueError(f"must be 1..{MAX_POLICY_NAME} characters long, got {len(v)}")
    bad = next((c for c in v if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn")), None)
    if bad is not None:
        raise ValueError(f"must not contain control or format characters (found U+{ord(bad):04X})")
    return v


class Policy(_Section):
    """The whole policy. ``name`` records where it came from (preset or file); 1..128
    printable characters (:func:`check_policy_name`)."""

    name: str = "default"

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, v: Any) -> str:
        return check_policy_name(v)
    kv: KVPolicy = Field(default_factory=KVPolicy)
    io: IOPolicy = Field(default_factory=IOPolicy)
    scheduler: SchedulerPolicy = Field(default_factory=SchedulerPolicy)
    quality: QualityPolicy = Field(default_factory=QualityPolicy)
    loops: LoopsPolicy = Field(default_factory=LoopsPolicy)
    runtime: RuntimePolicy = Field(default_factory=RuntimePolicy)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def merged(self, partial: dict[str, Any], *, name: str | None = None) -> "Policy":
        """A new policy: ``partial`` deep-merged over this one, validated.

        Raises:
            PolicyError: any field is invalid; this policy is unchanged.
        """
        doc = _unwrap(partial)
        merged = deep_merge(self.to_dict(), doc)
        if name is not None:
            merged["name"] = name
        return validate_policy(merged)

    def session_key(self) -> tuple:
        """The part of the policy that affects an ORT session (cache key for sessions)."""
        r = self.runtime
        return (
            r.intra_op_threads,
            r.inter_op_threads,
            r.graph_optimization,
            r.execution_mode,
            r.enable_mem_pattern,
            r.enable_cpu_mem_arena,
            tuple(sorted(r.session_config.items())),
            self.scheduler.mode,
            self.scheduler.prefill_device,
            self.scheduler.decode_device,
            self.io.host_pool_bytes,
            self.io.dml_pool_bytes,
        )


class PolicyError(ValueError):
    """A policy document is invalid. ``errors`` lists ``{"field", "value", "message"}``."""

    def __init__(self, errors: list[dict[str, Any]], source: str = "policy"):
        self.errors = errors
        self.source = source
        lines = [f"{e['field']}: {e['message']} (got {e['value']!r})" for e in errors]
        super().__init__(f"invalid {source}: " + "; ".join(lines))


def _unwrap(doc: Any) -> dict[str, Any]:
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise PolicyError([{"field": "(root)", "value": type(doc).__name__, "message": "must be a mapping"}])
    if "infer_os" in doc and isinstance(doc["infer_os"], dict):
        extra = {k: v for k, v in doc.items() if k != "infer_os"}
        return {**doc["infer_os"], **extra}
    return doc


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge mapping ``over`` into a copy of ``base`` (``over`` wins)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _lookup(doc: Any, loc: tuple) -> Any:
    cur = doc
    for part in loc:
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            return None
    return cur


def validate_policy(doc: dict[str, Any], *, source: str = "policy") -> Policy:
    """Validate a complete or partial policy mapping (missing fields take defaults).

    Raises:
        PolicyError: naming each invalid field, its value and what is allowed.
    """
    doc = _unwrap(doc)
    try:
        return Policy.model_validate(doc)
    except ValidationError as e:
        errors = []
        for err in e.errors():
            loc = tuple(err["loc"])
            field = ".".join(str(p) for p in loc) or "(root)"
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            value = err.get("input") if err["type"] != "extra_forbidden" else _lookup(doc, loc)
            if isinstance(value, dict) and err["type"] != "extra_forbidden":
                value = _lookup(doc, loc)
            errors.append({"field": field, "value": value, "message": msg})
        raise PolicyError(errors, source) from None


def preset_names() -> list[str]:
    """Names of the shipped presets (``policies/*.yaml``)."""
    return sorted(p.name[:-5] for p in _preset_dir().iterdir() if p.name.endswith(".yaml"))


def _preset_dir() -> Any:
    return resources.files("lemonade_inferos") / "policies"


def read_structured_file(path: str | Path) -> Any:
    """Parse a YAML file, or JSON when the name ends in ``.json``; empty files give ``{}``.

    Raises:
        FileNotFoundError: no such file (the message names it).
        ValueError: not valid YAML/JSON (the message names the file and the parser error).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {str(p)!r}")
    text = p.read_text(encoding="utf-8")
    try:
        doc = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{str(p)!r} is not valid YAML/JSON: {e}") from None
    return {} if doc is None else doc


def load_document(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON policy document from ``path``.

    Raises:
        PolicyError: the file is missing or not valid YAML/JSON mapping.
    """
    try:
        doc = read_structured_file(path)
    except FileNotFoundError:
        raise PolicyError([{"field": "(file)", "value": str(path), "message": "no such policy file"}]) from None
    except ValueError as e:
        raise PolicyError([{"field": "(file)", "value": str(path), "message": str(e)}]) from None
    return _unwrap(doc)


def load_policy(spec: str | Path | None = None) -> Policy:
    """Resolve a preset name, a YAML/JSON file path, or None (the ``default`` preset).

    A file is merged over the ``default`` preset. Raises :class:`PolicyError` naming the
    unknown preset (with the known ones) or the invalid fields.
    """
    if spec is None:
        spec = "default"
    s = str(spec)
    if s.endswith((".yaml", ".yml", ".json")) or "/" in s or Path(s).is_file():
        doc = load_document(s)
        base = load_policy("default")
        return base.merged(doc, name=doc.get("name", Path(s).stem))
    names = preset_names()
    if s not in names:
        raise PolicyError(
            [{"field": "(preset)", "value": s, "message": f"unknown preset; known presets: {', '.join(names)}"}]
        )
    doc = yaml.safe_load((_preset_dir() / f"{s}.yaml").read_text(encoding="utf-8"))
    pol = validate_policy({**_unwrap(doc), "name": s}, source=f"preset {s!r}")
    return pol


def baseline_policy() -> Policy:
    """The pass-through policy: KV store disabled, ORT defaults."""
    return Policy(name="baseline", kv=KVPolicy(mode=KVMode.disabled))


def policy_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a full policy document."""
    return Policy.model_json_schema()
