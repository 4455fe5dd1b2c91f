"""lemonade-inferos ("Infer-OS"): a plugin for local LLM serving on AI PCs.

It wraps every generation request of an onnxruntime / onnxruntime-genai serving loop
(Lemonade Server, GAIA, or its own ``inferos serve`` backend) with pluggy hooks that
inject a per-request policy into ORT ``SessionOptions``/``RunOptions``, swap in a tiered
quantized KV cache, and report per-request statistics to a local control agent.
"""

__version__ = "0.1.0"
