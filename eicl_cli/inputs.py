"""On-device materialisation of a batch: from the generator's small integer
arrays to the model's float32 images.

The whole image set lives on the device once (`DeviceData`); each step only
ships the Batch's (B, L) index arrays. Per image, in the original's order:

1. gather the stored image by `image_index`;
2. apply the class's augmentation variant (flip/rotation) as a pixel gather;
3. with randomly_generate_rare, replace every rare item by a fresh random
   binary 105 x 105 image, one per rare class per sequence (`rare_slot`
   points all occurrences of a class at the same draw);
4. add pixel noise N(0, noise_scale);
5. with preproc.invert, feed 1 - pixel (ink 1.0 on a 0.0 background).

The original draws random images and noise at 105 x 105 and resizes the
batch afterwards. With preproc.downsample the stored images are already
28 x 28, so steps 3 and 4 draw at 105 x 105 and resize with the same
bilinear matrices (`data.dataset.resize_matrix`); resizing is linear, so
resize(image + noise) == resize(image) + resize(noise) and the pixels match
the original's.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from .config import Config
from .data.augment import variant_permutations
from .data.dataset import Dataset, resize_matrix
from .data.sequences import host_fields

# The size the original draws random rare images and noise at (Omniglot's).
SOURCE_SIZE = 105


class DeviceData(eqx.Module):
    """The image set on the device plus what is needed to turn indices into inputs."""

    images: jax.Array  # (N, H, W) uint8/float32, or (N,) int32 for symbolic data
    perms: jax.Array | None  # (8, H*W) int32 when augmenting, else None
    resize_h: jax.Array | None  # (H, 105) when downsampled, else None
    resize_w: jax.Array | None  # (W, 105)
    symbolic: bool = eqx.field(static=True)
    noise_scale: float = eqx.field(static=True)
    random_rare: bool = eqx.field(static=True)
    invert: bool = eqx.field(static=True, default=False)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])


def device_data(dataset: Dataset, cfg: Config) -> DeviceData:
    """Put the dataset's images on the device once, with the tables the step needs."""
    symbolic = dataset.kind == "symbolic"
    images = jnp.asarray(dataset.images)
    perms = resize_h = resize_w = None
    if not symbolic:
        _, h, w = dataset.images.shape
        if cfg.data.augment_images:
            perms = jnp.asarray(variant_permutations(h, w))
        if h != SOURCE_SIZE or w != SOURCE_SIZE:
            resize_h = jnp.asarray(resize_matrix(SOURCE_SIZE, h))
            resize_w = jnp.asarray(resize_matrix(SOURCE_SIZE, w))
    return DeviceData(
        images=images, perms=perms, resize_h=resize_h, resize_w=resize_w,
        symbolic=symbolic,
        noise_scale=0.0 if symbolic else float(cfg.sequences.noise_scale),
        random_rare=(not symbolic) and bool(cfg.sequences.randomly_generate_rare),
        invert=(not symbolic) and bool(cfg.preproc.invert),
    )


def to_device(batch: Any) -> dict[str, jax.Array]:
    """The Batch's index arrays the step needs, as one small host->device copy."""
    return {name: jnp.asarray(a) for name, a in host_fields(batch).items()}


def _at_source_size(data: DeviceData, x: jax.Array) -> jax.Array:
    """Resize (..., 105, 105) draws to the stored image size (identity if not downsampled)."""
    if data.resize_h is None:
        return x
    return jnp.einsum("ih,...hw,jw->...ij", data.resize_h, x, data.resize_w)


def materialise(data: DeviceData, batch: dict[str, jax.Array], key: jax.Array) -> jax.Array:
    """(B, L) indices -> (B, L, H, W) float32 images, or (B, L) int32 symbols."""
    idx = batch["image_index"]
    x = data.images[idx]
    if data.symbolic:
        return x.astype(jnp.int32)
    b, l, h, w = x.shape
    if data.perms is not None:
        flat = x.reshape(b, l, h * w)
        x = jnp.take_along_axis(flat, data.perms[batch["variant"]], axis=-1).reshape(b, l, h, w)
    x = x.astype(jnp.float32)
    k_rare, k_noise = jax.random.split(key)
    if data.random_rare:
        slot = batch["rare_slot"]
        # One draw per position; every occurrence of a rare class reads the
        # draw at its first position, so all of them show the same image.
        draws = jax.random.bernoulli(k_rare, 0.5, (b, l, SOURCE_SIZE, SOURCE_SIZE))
        draws = _at_source_size(data, draws.astype(jnp.float32))
        shared = jnp.take_along_axis(draws, jnp.maximum(slot, 0)[:, :, None, None], axis=1)
        x = jnp.where((slot >= 0)[:, :, None, None], shared, x)
    if data.noise_scale > 0:
        noise = data.noise_scale * jax.random.normal(k_noise, (b, l, SOURCE_SIZE, SOURCE_SIZE))
        x = x + _at_source_size(data, noise)
    if data.invert:
        x = 1.0 - x
    return x
