"""Hugging Face checkpoints in and out.

`import_checkpoint(folder)` reads a published checkpoint (LLaDA, Dream, Fast-dLLM v2, SDAR, or a
Llama / Qwen2 / Qwen3 base) into one `DiffusionTransformer` plus a `Tokenizer` that keeps the
checkpoint's vocabulary, special-token ids and chat template. `export_checkpoint(model, folder)`
writes a pllm model in the Llama / Qwen2 / Qwen3 layout that `transformers` loads with its own
class, with our config beside it so that importing it back is exact.
"""

from __future__ import annotations

from .export import export_checkpoint
from .folder import CheckpointError, CheckpointFolder
from .importer import ImportPlan, import_checkpoint, is_hf_checkpoint, plan_import

__all__ = ["CheckpointError", "CheckpointFolder", "ImportPlan", "export_checkpoint", "import_checkpoint",
           "is_hf_checkpoint", "plan_import"]
