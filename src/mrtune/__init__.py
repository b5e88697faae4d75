"""mrtune: fine-tune causal language models with LoRA/QLoRA to turn sentences into meaning representations."""

__version__ = "0.1.0"
