"""scratchlm: build a large language model from scratch, stage by stage.

This package holds the library; the `scratchlm` command (`scratchlm.cli`) is a thin layer over it.
It is not a wrapper around other LLM libraries: tokenizer, model, training, post-training,
evaluation, inference and quantization are all written here.
"""

__version__ = "0.1.0"


def load(run_dir, **kwargs):
    """Load a run directory for inference: `lm = scratchlm.load("runs/x"); lm.generate("...")`."""
    from scratchlm.infer.api import load as _load

    return _load(run_dir, **kwargs)
