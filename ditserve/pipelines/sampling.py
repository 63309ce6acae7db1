"""Small pure sampling helpers shared by families (as BFL's `sampling.py`): the flow-matching shift."""

from __future__ import annotations


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """The resolution-dependent timestep shift mu of FLUX-style flow matching: linear in the number of image
    tokens, base_shift at base_seq_len and max_shift at max_seq_len."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)
