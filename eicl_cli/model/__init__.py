"""The Equinox model of docs/experiment.md §6: example encoder, tokens,
transformer or RNN, head."""

from .model import Model, build_model, default_image_shape, forward_batch, parameter_counts

__all__ = ["Model", "build_model", "default_image_shape", "forward_batch", "parameter_counts"]
