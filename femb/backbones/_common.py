"""Shared argument and input checks for femb backbones."""

import torch

# Every femb backbone with a fixed-size head halves the resolution four times (stride 16 in
# total), so the last feature map is (input_size / 16) pixels wide: 7 for 112x112 faces.
INPUT_SIZE_MULTIPLE = 16


def check_embed_dim(embed_dim: int) -> int:
    """Validate the embedding size of a backbone.

    Args:
        embed_dim: Requested embedding size.

    Returns:
        ``embed_dim`` unchanged.

    Raises:
        TypeError: If ``embed_dim`` is not an ``int``.
        ValueError: If ``embed_dim < 1``.
    """
    # bool is an int subclass; True as an embedding size is a config mistake.
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int):
        raise TypeError(
            f"embed_dim must be an int, got {embed_dim!r} ({type(embed_dim).__name__})"
        )
    if embed_dim < 1:
        raise ValueError(f"embed_dim must be >= 1, got {embed_dim}; typical values are 128 or 512")
    return embed_dim


def check_input_size(input_size: int) -> int:
    """Validate the side length of the square input images.

    Args:
        input_size: Side length ``S`` of the ``(B, 3, S, S)`` input, in pixels.

    Returns:
        ``input_size`` unchanged.

    Raises:
        TypeError: If ``input_size`` is not an ``int``.
        ValueError: If ``input_size`` is not a positive multiple of 16.
    """
    if isinstance(input_size, bool) or not isinstance(input_size, int):
        raise TypeError(
            f"input_size must be an int, got {input_size!r} ({type(input_size).__name__})"
        )
    if input_size < INPUT_SIZE_MULTIPLE or input_size % INPUT_SIZE_MULTIPLE != 0:
        raise ValueError(
            f"input_size must be a positive multiple of {INPUT_SIZE_MULTIPLE} "
            f"(e.g. 112 for aligned faces), got {input_size}"
        )
    return input_size


def check_dropout(dropout: float) -> float:
    """Validate a dropout probability.

    Args:
        dropout: Probability of zeroing an activation.

    Returns:
        ``dropout`` as a float.

    Raises:
        ValueError: If ``dropout`` is outside ``[0, 1)``.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return float(dropout)


def check_images(x: torch.Tensor, input_size: int, owner: str) -> None:
    """Check that a batch has shape ``(B, 3, S, S)`` with ``S == input_size``.

    Only the shape is checked (no value range scan), so the cost is negligible.

    Args:
        x: Image batch.
        input_size: Expected side length ``S``.
        owner: Name of the calling backbone, used in the message.

    Raises:
        ValueError: If the shape does not match.
    """
    expected = f"(B, 3, {input_size}, {input_size})"
    if x.dim() != 4:
        raise ValueError(
            f"{owner} expects a 4-D image batch {expected}, got shape {tuple(x.shape)}"
        )
    if x.shape[1] != 3:
        raise ValueError(
            f"{owner} expects 3-channel (RGB) images {expected}, got shape {tuple(x.shape)}; "
            "repeat greyscale images to 3 channels"
        )
    if x.shape[2] != input_size or x.shape[3] != input_size:
        raise ValueError(
            f"{owner} was built with input_size={input_size} and expects {expected}, got shape "
            f"{tuple(x.shape)}; resize the faces or build the backbone with a matching input_size"
        )
