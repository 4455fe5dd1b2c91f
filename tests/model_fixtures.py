"""Writers for small test checkpoints in real formats (GGUF via llama.cpp's ``gguf`` writer,
Hugging Face folders via ``safetensors``), from :class:`DecoderWeights`.

The files are written the way the real converters lay them out, so the readers under test
meet what users have: GGUF ``llama`` keeps q/k rows interleaved (llama.cpp permutes them),
GGUF ``qwen2`` and Hugging Face folders keep rotate-half rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lemonade_inferos.model.weights import DecoderConfig, DecoderWeights, interleaved_to_half_rows


def random_weights(c: DecoderConfig, seed: int = 0, bias: bool = False, std: float = 0.08) -> DecoderWeights:
    """Seeded random float32 weights (norm weights around 1) for config ``c``."""
    rng = np.random.default_rng(seed)
    L, D, H, KV = c.n_layers, c.head_size, c.n_heads, c.n_kv_heads
    r = lambda *s: (rng.standard_normal(s) * std).astype(np.float32)  # noqa: E731
    emb = r(c.vocab_size, c.dim) * 10
    kw = {}
    if bias:
        kw = dict(bq=r(L, H * D), bk=r(L, KV * D), bv=r(L, KV * D))
    return DecoderWeights(
        config=c, token_embedding=emb, rms_att=(1 + r(L, c.dim)), wq=r(L, H * D, c.dim), wk=r(L, KV * D, c.dim),
        wv=r(L, KV * D, c.dim), wo=r(L, c.dim, H * D), rms_ffn=(1 + r(L, c.dim)), w1=r(L, c.hidden_dim, c.dim),
        w2=r(L, c.dim, c.hidden_dim), w3=r(L, c.hidden_dim, c.dim), rms_final=(1 + r(c.dim)),
        wcls=emb if c.shared_classifier else r(c.vocab_size, c.dim), **kw)


def write_gguf(path: Path, w: DecoderWeights, *, arch: str = "llama", tokenizer: dict, drop: tuple[str, ...] = (),
               extra_kv: dict | None = None) -> Path:
    """Write ``w`` as an F32 GGUF file of architecture ``arch``.

    ``tokenizer``: ``model`` ('gpt2'/'llama'), ``tokens``, ``types``, and ``merges`` + ``pre``
    (gpt2) or ``scores`` (llama); optional ``bos``, ``eos``, ``add_bos``, ``chat_template``.
    ``drop``: tensor names to leave out (to test the missing-tensor error).
    """
    import gguf

    c = w.config
    g = gguf.GGUFWriter(str(path), arch)
    g.add_block_count(c.n_layers)
    g.add_context_length(c.seq_len)
    g.add_embedding_length(c.dim)
    g.add_feed_forward_length(c.hidden_dim)
    g.add_head_count(c.n_heads)
    g.add_head_count_kv(c.n_kv_heads)
    g.add_rope_freq_base(c.rope_theta)
    g.add_layer_norm_rms_eps(c.rms_eps)
    g.add_vocab_size(c.vocab_size)
    g.add_rope_dimension_count(c.head_size)
    t = tokenizer
    g.add_tokenizer_model(t["model"])
    if t.get("pre"):
        g.add_tokenizer_pre(t["pre"])
    g.add_token_list(t["tokens"])
    g.add_token_types(t["types"])
    if t.get("merges") is not None:
        g.add_token_merges(t["merges"])
    if t.get("scores") is not None:
        g.add_token_scores(t["scores"])
    g.add_bos_token_id(t.get("bos", 1))
    g.add_eos_token_id(t.get("eos", 2))
    g.add_add_bos_token(t.get("add_bos", False))
    if t.get("chat_template"):
        g.add_chat_template(t["chat_template"])
    for k, v in (extra_kv or {}).items():
        g.add_string(k, v)
    neox = arch == "qwen2"

    def put(name: str, arr: np.ndarray) -> None:
        if name not in drop:
            g.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))

    put("token_embd.weight", w.token_embedding)
    put("output_norm.weight", w.rms_final)
    if not c.shared_classifier:
        put("output.weight", w.wcls)
    for i in range(c.n_layers):
        p = f"blk.{i}."
        wq, wk = w.wq[i], w.wk[i]
        if neox:
            wq, wk = interleaved_to_half_rows(wq, c.n_heads), interleaved_to_half_rows(wk, c.n_kv_heads)
        put(p + "attn_q.weight", wq)
        put(p + "attn_k.weight", wk)
        put(p + "attn_v.weight", w.wv[i])
        put(p + "attn_output.weight", w.wo[i])
        put(p + "attn_norm.weight", w.rms_att[i])
        put(p + "ffn_norm.weight", w.rms_ffn[i])
        put(p + "ffn_gate.weight", w.w1[i])
        put(p + "ffn_down.weight", w.w2[i])
        put(p + "ffn_up.weight", w.w3[i])
        if w.bq is not None:
            bq, bk = w.bq[i], w.bk[i]
            if neox:
                bq, bk = interleaved_to_half_rows(bq, c.n_heads), interleaved_to_half_rows(bk, c.n_kv_heads)
            put(p + "attn_q.bias", bq)
            put(p + "attn_k.bias", bk)
            put(p + "attn_v.bias", w.bv[i])
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()
    return path


HF_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def write_hf(folder: Path, w: DecoderWeights, *, arch: str = "llama", tokenizer_json: Path | None = None,
             tokenizer_config: dict | None = None, bos: int = 1, eos: int | list[int] = 2, dtype=np.float32) -> Path:
    """Write ``w`` as a Hugging Face checkpoint folder (config.json, model.safetensors with
    rotate-half q/k rows, tokenizer files)."""
    from safetensors.numpy import save_file

    c = w.config
    folder.mkdir(parents=True, exist_ok=True)
    t: dict[str, np.ndarray] = {"model.embed_tokens.weight": w.token_embedding, "model.norm.weight": w.rms_final}
    if not c.shared_classifier:
        t["lm_head.weight"] = w.wcls
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = interleaved_to_half_rows(w.wq[i], c.n_heads)
        t[p + "self_attn.k_proj.weight"] = interleaved_to_half_rows(w.wk[i], c.n_kv_heads)
        t[p + "self_attn.v_proj.weight"] = w.wv[i]
        t[p + "self_attn.o_proj.weight"] = w.wo[i]
        t[p + "input_layernorm.weight"] = w.rms_att[i]
        t[p + "post_attention_layernorm.weight"] = w.rms_ffn[i]
        t[p + "mlp.gate_proj.weight"] = w.w1[i]
        t[p + "mlp.down_proj.weight"] = w.w2[i]
        t[p + "mlp.up_proj.weight"] = w.w3[i]
        if w.bq is not None:
            t[p + "self_attn.q_proj.bias"] = interleaved_to_half_rows(w.bq[i], c.n_heads)
            t[p + "self_attn.k_proj.bias"] = interleaved_to_half_rows(w.bk[i], c.n_kv_heads)
            t[p + "self_attn.v_proj.bias"] = w.bv[i]
    save_file({k: np.ascontiguousarray(v).astype(dtype) for k, v in t.items()}, str(folder / "model.safetensors"))
    cfg = {
        "architectures": [HF_ARCH[arch]], "model_type": arch, "hidden_size": c.dim, "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
        "vocab_size": c.vocab_size, "max_position_embeddings": c.seq_len, "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_eps, "tie_word_embeddings": c.shared_classifier, "hidden_act": "silu",
        "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": "float32",
    }
    if c.head_dim:
        cfg["head_dim"] = c.head_dim
    if arch == "llama":
        cfg["attention_bias"] = False
        cfg["mlp_bias"] = False
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer_json is not None:
        (folder / "tokenizer.json").write_bytes(Path(tokenizer_json).read_bytes())
    if tokenizer_config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return folder
