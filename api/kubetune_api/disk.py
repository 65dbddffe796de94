"""The local disk a trainer pod needs: the size of its scratch volume, from the base model's size where it is known."""

from __future__ import annotations

import math

GIB = 1024**3
DEFAULT_SCRATCH_SIZE = "200Gi"
"""The scratch volume's size limit when the model's size is not known before the trainer starts."""
DOWNLOADED_BYTES_PER_PARAMETER = 2
"""Hub and S3 checkpoints hold the weights in 16 bits."""
COPIES = 2
"""The downloaded weights (the Hugging Face cache), and the merged model written beside them."""
MARGIN = 1.25
FIXED_GIB = 20
"""Room for the rest: the prepared data, local checkpoints of the adapter, the tokenizer, logs."""


def scratch_size(model_parameters: int | None) -> str:
    """The scratch volume's size limit: room for the weights twice over with a margin, or the default when unknown."""
    if not model_parameters:
        return DEFAULT_SCRATCH_SIZE
    needed = model_parameters * DOWNLOADED_BYTES_PER_PARAMETER * COPIES * MARGIN
    return f"{math.ceil(needed / GIB) + FIXED_GIB}Gi"
