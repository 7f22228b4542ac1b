"""The Equinox model of docs/experiment.md §6: example encoder, tokens,
transformer or RNN, head."""

from .model import (Model, build_model, default_image_shape, forward_batch, logits_batch,
                    parameter_counts)
from .transformer import Intervention

__all__ = ["Intervention", "Model", "build_model", "default_image_shape", "forward_batch",
           "logits_batch", "parameter_counts"]
