"""flash-attention's tolerance rule for the kernel tests: the one in recvit_kernels.tolerance."""
from recvit_kernels.tolerance import assert_flash_rule, flash_rule  # noqa: F401
