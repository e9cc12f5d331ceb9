"""Models: loading and saving (safetensors only), the built-in tiny models and their tokenizer."""
