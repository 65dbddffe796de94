"""kubetune trainer: LoRA/QLoRA fine-tuning driven by a FinetuneJob's training config.

Importing this package is cheap: torch and the training stack load only when a run starts.
"""

__version__ = "0.1.0"
