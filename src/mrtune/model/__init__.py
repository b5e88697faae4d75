"""Models: resolve a model name to local weights and a tokenizer (resolve), build the base model with LoRA (build)."""
