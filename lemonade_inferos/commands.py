"""``inferos generate | demo | eval``: the model-facing subcommands (``convert``/``pull``: :mod:`.model_cli`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DEMO_PROMPTS = [
    "Once upon a time, there was a little girl named Lily.",
    "Tom and his dog went to the park. The sun was shining and",
    "One day, a big red bird flew to the tree. The bird was sad because",
]


#: chat-model demo: (question, include the packaged passage?) — the passage makes a context of
#: ~1,000 tokens, where the tiered KV store's savings show
CHAT_DEMO = [
    ("What is the capital of France?", False),
    ("Read this text and explain in three sentences how a weather forecast is made.", True),
    ("Give me three tips for baking a simple loaf of bread.", False),
]


def demo_passage() -> str:
    """The packaged passage the chat demo asks about (written for this project)."""
    return (Path(__file__).resolve().parent / "data" / "demo_passage.txt").read_text(encoding="utf-8").strip()


def chat_prompt(folder: Path, user: str, system: str | None = None) -> str | None:
    """``user`` (and ``system``) rendered with the model folder's own chat template, or None
    when the folder has none (plain completion models such as stories260K)."""
    from .integrations.chat import ChatTemplate

    tpl = ChatTemplate.from_model_dir(folder)
    if tpl.is_plain:
        return None
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tpl.render(msgs, add_generation_prompt=True)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR|NAME",
                   help="model folder, or a known model name fetched on first use (inferos pull --list); "
                   "default: the embedded stories260K model")
    p.add_argument(
        "--policy",
        metavar="FILE|PRESET",
        default=None,
        help="policy preset (default, 3b, 7b, 13b, latency, throughput, quality) or YAML/JSON file; "
        "wins over the control agent's policy for this command (default: the agent's when "
        "INFEROS_AGENT_URL is set, else 'default')",
    )


def _int_range(flag: str, lo: int, hi: int | None = None) -> Any:
    """argparse ``type=``: an integer in [lo, hi] (hi None = no upper bound)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not an integer") from None
        if v < lo or (hi is not None and v > hi):
            allowed = f">= {lo}" if hi is None else f"in {lo}..{hi}"
            raise argparse.ArgumentTypeError(f"{flag} {v} is not allowed; must be {allowed}")
        return v

    return parse


def _json_out(flag: str) -> Any:
    """argparse ``type=``: a file path whose directory exists and is writable (checked before
    a long run, not after it)."""
    def parse(text: str) -> str:
        import os

        p = Path(text).expanduser()
        parent = p.parent if str(p.parent) else Path(".")
        if p.is_dir():
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is a directory; give a file name")
        if not parent.is_dir():
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: directory {str(parent)!r} does not exist")
        if not os.access(parent, os.W_OK):
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: directory {str(parent)!r} is not writable")
        return str(p)

    return parse


def register(sub: Any) -> None:
    g = sub.add_parser(
        "generate",
        help="generate text with hooks and the KV store, then print TTFT, TPS, KV bytes",
        description="Stream a continuation of PROMPT, then print the policy that ran, time to first "
        "token (from the request to the first generated token; the model is loaded before the clock "
        "starts), decode tokens/s, KV-cache bytes and KV/fp16 (KV bytes over the same tokens at "
        "float16). --baseline runs with no plugins for comparison.",
    )
    g.add_argument("prompt", help="prompt text")
    _add_model_args(g)
    g.add_argument("--chat", action="store_true",
                   help="send PROMPT as a user message through the model's chat template (tokenizer_config.json)")
    g.add_argument("--system", metavar="TEXT", default=None, help="system message for --chat")
    g.add_argument("--max-new-tokens", type=_int_range("--max-new-tokens", 1), default=128, metavar="N",
                   help="generated-token limit (default 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (1 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help=">= 1 (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--baseline", action="store_true", help="no plugins: ORT defaults, full-precision KV cache")
    g.add_argument("--json", action="store_true", help="print the result and stats as JSON instead of streaming")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser(
        "demo",
        help="the main job: baseline vs inferos on the embedded model, stories and a comparison table",
        description="Run the same prompts with the plugin off (baseline) and on, print the "
        "stories and a table of TTFT, decode TPS, KV bytes and prompt NLL.",
    )
    _add_model_args(d)
    d.add_argument("--max-new-tokens", type=_int_range("--max-new-tokens", 1), default=400, metavar="N",
                   help="tokens per story (default 400)")
    d.add_argument("--prompts", type=_int_range("--prompts", 1, len(DEMO_PROMPTS)), default=len(DEMO_PROMPTS),
                   metavar="N", help=f"how many demo prompts, 1..{len(DEMO_PROMPTS)} (default {len(DEMO_PROMPTS)})")
    d.add_argument("--json", metavar="FILE", type=_json_out("--json"), help="also write the results as JSON")
    d.set_defaults(func=cmd_demo)

    e = sub.add_parser(
        "eval",
        help="perplexity, ΔPPL and KL divergence of a KV policy through the cached decode path",
        description="Tokenize FILE, decode it chunk by chunk token by token with the full-precision "
        "cache and with the policy's KV store, and report PPL, ΔPPL, mean KLD, top-1 agreement "
        "and KV bytes (measured at the end of the longest chunk).",
    )
    e.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file to score")
    _add_model_args(e)
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_eval)


def _fail(msg: str, code: int = 2) -> int:
    print(f"inferos: error: {msg}", file=sys.stderr)
    return code


def _engine(args: argparse.Namespace) -> Any:
    from .host import build_engine

    return build_engine(args.model, args.policy)


def kv_fraction_of_fp16(kv: Any) -> str:
    """The one KV-size convention of every report: resident KV bytes over the same tokens at
    float16 (``0.25`` = a quarter of fp16; the baseline's float32 cache is ``2.00``); "-"
    when unknown."""
    return f"{kv.total_bytes / kv.fp16_bytes:.2f}" if kv.active and kv.fp16_bytes else "-"


def _stats_line(st: Any) -> str:
    kv = st.kv
    ttft = f"{st.ttft_ms:.1f} ms" if st.ttft_ms is not None else "n/a"
    return (
        f"policy {st.policy_name or 'baseline'} | TTFT {ttft} | decode {st.decode_tps:.0f} tokens/s | "
        f"{st.generated_tokens} tokens | KV {kv.total_bytes:,} bytes [{kv.store}], KV/fp16 {kv_fraction_of_fp16(kv)}"
        + (f" | {st.cache_n} prompt tokens from the prefix cache" if st.cache_n else "")
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from .engine import GenerationConfig
    from .model.spec import ModelFolderError
    from .policy import PolicyError

    try:
        cfg = GenerationConfig(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
        ).validate()
        eng = _engine(args)
        eng.preload()  # sessions exist before the clock starts: TTFT is the request's, not the load's
    except (PolicyError, ModelFolderError, ValueError) as e:
        return _fail(str(e))

    def stream(_tok: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    prompt = args.prompt
    if args.chat or args.system:
        prompt = chat_prompt(eng.spec.folder, args.prompt, args.system)
        if prompt is None:
            return _fail(f"--chat: model {eng.spec.name!r} has no chat template (tokenizer_config.json chat_template)")
    elif not args.json:
        sys.stdout.write(args.prompt)
    try:
        res = eng.generate(prompt, cfg, on_token=None if args.json else stream, baseline=args.baseline)
    except ValueError as e:
        return _fail(str(e))
    if args.json:
        print(json.dumps({"text": res.text, "finish_reason": res.finish_reason, "stats": res.stats.to_dict()}, indent=2))
    else:
        print()
        print(_stats_line(res.stats), file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from .engine import GenerationConfig
    from .model.spec import ModelFolderError
    from .policy import PolicyError

    console = Console()
    if not console.is_terminal:  # piped or logged: rich would wrap at 80 columns
        console = Console(width=110)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens).validate()
    with console.status("preparing the model (the first run converts or fetches it)..."):
        try:
            eng = _engine(args)
            eng.preload()
        except (PolicyError, ModelFolderError, ValueError, KeyError) as e:
            return _fail(str(e.args[0] if isinstance(e, KeyError) else e))
    eng.prefix_cache.set_max_bytes(0)  # like for like: both modes prefill every prompt in full
    shown = prompts = DEMO_PROMPTS[: args.prompts]
    if chat_prompt(eng.spec.folder, "x") is not None:  # a chat model: questions through its template
        qs = CHAT_DEMO[: args.prompts]
        shown = [q for q, _ in qs]
        prompts = [chat_prompt(eng.spec.folder, f"{demo_passage()}\n\n{q}" if ctx else q) for q, ctx in qs]
    eng.generate(prompts[0], GenerationConfig(max_new_tokens=8), baseline=True)  # warm-up: sessions loaded
    eng.generate(prompts[0], GenerationConfig(max_new_tokens=8))
    rows: list[dict[str, Any]] = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("generating", total=2 * len(prompts))
        for i, prompt in enumerate(prompts):
            for mode in ("baseline", "inferos"):
                progress.update(task, description=f"prompt {i + 1}/{len(prompts)}: {mode}")
                res = eng.generate(prompt, cfg, baseline=(mode == "baseline"))
                rows.append({"prompt": prompt, "mode": mode, "text": res.text, "stats": res.stats})
                progress.advance(task)
    for i, prompt in enumerate(prompts):
        b, o = rows[2 * i], rows[2 * i + 1]
        if shown is prompts:
            console.rule(f"[bold]story {i + 1}")
            console.print(f"[bold]{prompt}[/bold]{o['text']}")
        else:
            console.rule(f"[bold]question {i + 1} ({o['stats'].prompt_tokens} prompt tokens)")
            console.print(f"[bold]{shown[i]}[/bold]\n{o['text']}")
        same = _common_prefix_words(b["text"], o["text"])
        console.print(f"[dim](inferos output matches the baseline for the first {same} words)[/dim]")
    ran = sorted({r["stats"].policy_name for r in rows if r["mode"] == "inferos"})  # what ran, not what was asked
    table = Table(title=f"baseline vs inferos: {eng.spec.name}, policy {', '.join(map(repr, ran))}, "
                        f"{args.max_new_tokens} new tokens")
    for col in ("#", "mode", "tokens", "TTFT ms", "tok/s", "KV KiB", "KV/fp16", "prompt NLL", "L0/L1/L2/L3"):
        table.add_column(col, justify="left" if col == "mode" else "right", no_wrap=True)
    for i, r in enumerate(rows):
        st = r["stats"]
        kv = st.kv
        lv = kv.level_distribution
        table.add_row(
            str(i // 2 + 1), r["mode"], f"{st.prompt_tokens}+{st.generated_tokens}",
            f"{st.ttft_ms:.1f}" if st.ttft_ms is not None else "-", f"{st.decode_tps:.0f}",
            f"{kv.total_bytes / 1024:.1f}", kv_fraction_of_fp16(kv),
            f"{st.prompt_nll:.3f}" if st.prompt_nll is not None else "-",
            "/".join(str(lv.get(k, 0)) for k in ("L0", "L1", "L2", "L3")),
        )
    console.print(table)
    console.print(
        "[dim]KV/fp16: resident KV-cache bytes over the same tokens at float16 (baseline keeps float32 = 2.00). "
        "L0..L3: tokens x layers at float16-or-wider / INT8 / INT4 / evicted. prompt NLL: nats per prompt token.[/dim]"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{"prompt": r["prompt"], "mode": r["mode"], "text": r["text"], "stats": r["stats"].to_dict()} for r in rows], indent=2))
        console.print(f"results written to {args.json}")
    return 0


def _common_prefix_words(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split(), b.split()):
        if x != y:
            break
        n += 1
    return n


def cmd_eval(args: argparse.Namespace) -> int:
    from .model.spec import ModelFolderError
    from .policy import PolicyError
    from .quality import EvalInputError, evaluate_text

    path = Path(args.text)
    if path.is_dir():
        return _fail(f"--text: {str(path)!r} is a directory; give a UTF-8 text file")
    if not path.exists():
        return _fail(f"--text: file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is not text to score
    except UnicodeDecodeError as e:
        return _fail(f"--text: {str(path)!r} is not UTF-8 text ({e})")
    except OSError as e:
        return _fail(f"--text: cannot read {str(path)!r}: {e.strerror or e}")
    try:
        eng = _engine(args)
        res = evaluate_text(
            eng, text, eng.policy,
            progress=None if args.json else (lambda d, t: print(f"chunk {d}/{t}", file=sys.stderr)),
        )
    except (PolicyError, ModelFolderError, EvalInputError) as e:
        return _fail(str(e))
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:22s} {v}")
    return 0
