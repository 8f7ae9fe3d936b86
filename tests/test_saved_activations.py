"""Training memory follows the depth profile: on the packed path (kv="active") what autograd saves
for the backward is the live rows of each step, about the same bytes per live row (sum_l M_l)
whatever the profile, while the eager reference saves every token at every step.

Measure: the distinct storages autograd saves during one forward of a RecursiveBlock
(``saved_tensors_hooks``), parameters excluded. Before the packed steps set the leaving rows aside,
each step kept a full B*N buffer alive (through the saved view of its prefix): the shallow profile
then cost 14% more per live row than the deep one.
"""
import pytest
import torch

from recvit.bench.timer import saved_activation_bytes
from recvit.models.recursion import RecursiveBlock

BATCH, TOKENS, STEPS = 2, 17, 4
PROFILES = {
    "deep": lambda: torch.full((BATCH, TOKENS), STEPS),
    "shallow": lambda: torch.ones(BATCH, TOKENS, dtype=torch.int64).index_fill_(1, torch.tensor([0]), STEPS),
    "mixed": lambda: torch.randint(1, STEPS + 1, (BATCH, TOKENS), generator=torch.Generator().manual_seed(0)),
}


def saved_bytes(block, x, depths, backend, kv="active"):
    return saved_activation_bytes(block, lambda: block(x, depths, kv=kv, backend=backend))


def live_rows(depths):
    return sum(int((depths >= step).sum()) for step in range(1, STEPS + 1))


@pytest.fixture
def block_and_input():
    return RecursiveBlock(64, 2, num_steps=STEPS), torch.randn(BATCH, TOKENS, 64, requires_grad=True)


def test_packed_saves_bytes_per_live_row(block_and_input):
    block, x = block_and_input
    per_row = {name: saved_bytes(block, x, make(), "packed") / live_rows(make())
               for name, make in PROFILES.items()}
    assert max(per_row.values()) <= 1.08 * min(per_row.values()), per_row


def test_shallow_profile_saves_less_than_eager(block_and_input):
    block, x = block_and_input
    depths = PROFILES["shallow"]()
    packed, eager = saved_bytes(block, x, depths, "packed"), saved_bytes(block, x, depths, "eager")
    assert eager == saved_bytes(block, x, PROFILES["deep"](), "eager")  # the reference ignores depths
    assert packed < 0.4 * eager, (packed, eager)


@pytest.mark.parametrize("kv", ["active", "all"])
def test_recorded_steps_equal_inference(block_and_input, kv):
    """The out-of-place steps (autograd) give the in-place steps' result, and a gradient."""
    block, x = block_and_input
    depths = PROFILES["mixed"]()
    recorded = block(x, depths, kv=kv, backend="packed")
    with torch.no_grad():
        in_place = block(x, depths, kv=kv, backend="packed")
    torch.testing.assert_close(recorded, in_place)
    recorded.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
