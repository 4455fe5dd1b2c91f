"""Model loading and conversion: llama2.c checkpoints, tokenizers, ONNX decoder export."""
