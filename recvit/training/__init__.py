"""Training and evaluation: the paper's fine-tuning recipe (``recvit train``), ``recvit eval``, the
image-folder data and the torchrun helpers."""
