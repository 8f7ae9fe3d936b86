"""FLOPs and params accounting against the Edge-RecViT supplement (section 3), hand counts, and MoR-ViT."""
import pytest
import torch

import recvit
from recvit.flops import (FlopsBreakdown, check_alpha_sums, count_flops, count_params, expert_choice_flops,
                          full_depth_flops, profile_flops)


@pytest.fixture(scope="module")
def base():
    return recvit.create_model("edge_recvit_base")


def test_table1_from_paper_sums(base):
    g = profile_flops(base, (8.21, 6.64)).gflops()
    assert round(g["patch_embed"], 3) == 0.231
    assert round(g["ranker"], 3) == 0.472
    assert round(g["attention"], 2) == 8.42
    assert round(g["mlp"], 2) == 15.26
    assert round(g["blocks"], 2) == 23.69  # eq. 18
    assert round(g["total"], 2) == 24.39   # eq. 19


def test_full_depth_figures(base):
    g = full_depth_flops(base).gflops()
    assert round(g["blocks"], 2) == 34.89  # eq. 13 (the paper rounds 34.895 to 34.90)
    assert round(g["total"], 2) == 35.60   # eq. 14
    assert g["patch_embed"] + g["ranker"] + g["blocks"] == pytest.approx(g["total"])


def test_paper_formulas_exactly(base):
    n0, c, L = 197, 768, 12
    full = full_depth_flops(base)
    assert full.patch_embed == 2 * 14 ** 2 * 3 * 16 ** 2 * c
    assert full.ranker == 2 * n0 * (c * 2 * c + 2 * c * L)
    assert full.blocks == 2 * L * (12 * n0 * c ** 2 + 2 * n0 ** 2 * c)
    dynamic = profile_flops(base, (8.21, 6.64))
    assert dynamic.blocks == pytest.approx(24 * n0 * c ** 2 * 8.21 + 4 * n0 ** 2 * c * 6.64, rel=1e-12)


@pytest.mark.parametrize("kv", ["active", "all"])
def test_all_depths_L_equals_full_depth(kv):
    model = recvit.create_model("edge_recvit_tiny", img_size=64, num_steps=5)
    depths = torch.full((3, model.num_tokens), 5)
    counted, full = count_flops(model, depths, kv=kv), full_depth_flops(model)
    for name in ("patch_embed", "ranker", "attention", "mlp", "total"):
        assert getattr(counted, name) == pytest.approx(getattr(full, name), rel=1e-12)


def _hand_count(model, depths, kv):
    """Per-image mean FLOPs by explicit loops over images, steps and tokens."""
    c, L, n0 = model.embed_dim, model.num_steps, model.num_tokens
    hidden = model.recursion.layer_for_step(1).mlp.fc1.out_features
    attention = mlp = 0
    for row in depths.tolist():
        for step in range(1, L + 1):
            n = 0
            for d in row:
                if d >= step:
                    n += 1
            if kv == "active":
                attention += 2 * (4 * n * c * c + 2 * n * n * c)
            elif n > 0:
                attention += 2 * (n * c * c + 2 * n0 * c * c + n * c * c + n * n0 * c + n * n0 * c)
            mlp += 2 * (n * c * hidden + n * hidden * c)
    return attention / len(depths), mlp / len(depths)


@pytest.mark.parametrize("kv", ["active", "all"])
def test_count_flops_matches_hand_count(kv):
    model = recvit.create_model("edge_recvit_tiny", img_size=80, num_steps=6, mlp_ratio=3.0)
    depths = torch.randint(1, 7, (4, model.num_tokens))
    depths[1] = 1  # one image whose tokens all exit after the head layer
    attention, mlp = _hand_count(model, depths, kv)
    counted = count_flops(model, depths, kv=kv)
    assert counted.attention == pytest.approx(attention, rel=1e-12)
    assert counted.mlp == pytest.approx(mlp, rel=1e-12)
    assert counted.total == pytest.approx(counted.patch_embed + counted.ranker + attention + mlp, rel=1e-12)


def test_count_flops_from_forward_depths():
    model = recvit.create_model("edge_recvit_tiny", img_size=48, num_steps=4)
    out = model(torch.randn(2, 3, 48, 48), return_aux=True)
    counted = count_flops(model, out.depths)
    attention, mlp = _hand_count(model, out.depths, "active")
    assert counted.attention == pytest.approx(attention) and counted.mlp == pytest.approx(mlp)
    assert count_flops(model, out.depths).total <= full_depth_flops(model).total


def test_profile_matches_count_on_a_histogram():
    model = recvit.create_model("edge_recvit_tiny", img_size=64, num_steps=5)
    depths = torch.randint(1, 6, (1, model.num_tokens))
    alpha = torch.stack([(depths >= l).double().mean() for l in range(1, 6)])
    profiled = profile_flops(model, (float(alpha.sum()), float((alpha ** 2).sum())))
    assert profiled.total == pytest.approx(count_flops(model, depths).total, rel=1e-12)


def test_params_column():
    expected = {"edge_recvit_tiny": 1.6, "edge_recvit_small": 6.0, "edge_recvit_base": 23.2}
    for name, millions in expected.items():
        model = recvit.create_model(name)
        assert round(count_params(model) / 1e6, 1) == millions
        head = sum(p.numel() for p in model.head.parameters())
        assert count_params(model, include_head=True) == count_params(model) + head


@pytest.mark.parametrize("sums, message", [
    ((13.0, 12.0), "must lie in \\[1, L = 12\\]"),
    ((0.5, 0.5), "must lie in \\[1, L = 12\\]"),
    ((8.0, 9.0), "sum alpha_l\\^2 must lie in"),
    ((8.21, 2.0), "sum alpha_l\\^2 must lie in"),
    ((8.21,), "expected two numbers"),
])
def test_bad_alpha_sums(base, sums, message):
    with pytest.raises(ValueError, match="^alpha_sums: .*" + message):
        profile_flops(base, sums)


def test_alpha_sum_bounds_are_reached():
    assert check_alpha_sums((1.0, 1.0), 12) == (1.0, 1.0)       # all depths 1
    assert check_alpha_sums((12.0, 12.0), 12) == (12.0, 12.0)   # all depths L
    assert check_alpha_sums((6.5, 1 + 5.5 ** 2 / 11), 12)       # equal alpha_2..L


def test_bad_depths():
    model = recvit.create_model("edge_recvit_tiny", img_size=32, num_steps=4)
    with pytest.raises(ValueError, match="depths: values must lie in 1..4"):
        count_flops(model, torch.full((1, 5), 5))
    with pytest.raises(ValueError, match="depths: expected shape \\(batch >= 1, 5\\)"):
        count_flops(model, torch.full((1, 6), 2))
    with pytest.raises(ValueError, match="kv='some'"):
        count_flops(model, torch.full((1, 5), 2), kv="some")
    with pytest.raises(TypeError, match="model: expected an Edge-RecViT-style model"):
        count_flops(torch.nn.Linear(2, 2), torch.full((1, 5), 2))


def test_breakdown_gflops():
    b = FlopsBreakdown(1e9, 2e9, 3e9, 4e9, 10e9)
    assert b.blocks == 7e9
    assert b.gflops() == {"patch_embed": 1, "ranker": 2, "attention": 3, "mlp": 4, "total": 10, "blocks": 7}


MOR = dict(img_size=48, patch_size=8, num_classes=10, embed_dim=32, num_heads=2, num_steps=5)


def mor(**overrides):
    return recvit.create_model("mor_vit_tiny", **{**MOR, **overrides}).eval()


@pytest.mark.parametrize("routing", ["expert_choice", "token_choice"])
@pytest.mark.parametrize("backend", ["eager", "packed"])
@pytest.mark.parametrize("kv", ["active", "all"])
def test_mor_vit_count_matches_what_the_forward_ran(routing, backend, kv):
    """Router FLOPs = 2 C per (token, step) the router scored (MoRViTOutput.scored); attention and
    MLP by the hand count over the forward's depths."""
    model = mor(routing=routing, beta=0.4)
    with torch.no_grad():
        out = model(torch.randn(3, 3, 48, 48), return_aux=True, backend=backend)
    counted = count_flops(model, out.depths, kv=kv)
    assert counted.ranker == pytest.approx(2 * model.embed_dim * out.scored.sum().item() / 3, rel=1e-12)
    attention, mlp = _hand_count(model, out.depths, kv)
    assert counted.attention == pytest.approx(attention, rel=1e-12)
    assert counted.mlp == pytest.approx(mlp, rel=1e-12)
    assert counted.patch_embed == 2 * 36 * 3 * 8 ** 2 * 32
    assert counted.total == pytest.approx(counted.patch_embed + counted.ranker + attention + mlp, rel=1e-12)
    if routing == "expert_choice":  # fixed by N0 and beta: the same for every input
        assert expert_choice_flops(model, kv=kv) == counted


def test_mor_vit_router_by_formula():
    n0, c, L = 37, 32, 5
    token = count_flops(mor(routing="token_choice"), torch.randint(1, L + 1, (2, n0)))
    assert token.ranker == 2 * n0 * c * L
    model = mor(beta=0.5)
    counts = model.active_counts(n0)
    assert counts == [37, 19, 10, 5, 3]
    assert expert_choice_flops(model).ranker == 2 * c * (37 + 37 + 19 + 10 + 5)  # N0 at step 1, N_{l-1} at l
    assert expert_choice_flops(model).mlp == sum(4 * c * 4 * c * n for n in counts)


@pytest.mark.parametrize("routing", ["expert_choice", "token_choice"])
def test_mor_vit_full_depth(routing):
    model = mor(routing=routing)
    full = full_depth_flops(model)
    n0, c, L = 37, 32, 5
    assert full.ranker == 2 * n0 * c * L  # every router scores every token
    assert full.blocks == 2 * L * (12 * n0 * c ** 2 + 2 * n0 ** 2 * c)
    assert count_flops(model, torch.full((2, n0), L)) == full


def test_mor_vit_profile():
    token = mor(routing="token_choice")
    depths = torch.randint(1, 6, (1, 37))
    alpha = torch.stack([(depths >= l).double().mean() for l in range(1, 6)])
    profiled = profile_flops(token, (float(alpha.sum()), float((alpha ** 2).sum())))
    assert profiled.total == pytest.approx(count_flops(token, depths).total, rel=1e-12)
    with pytest.raises(ValueError, match="alpha_sums: an expert-choice MoR-ViT's depth profile is fixed"):
        profile_flops(mor(), (3.0, 2.5))
    with pytest.raises(ValueError, match="model: expected a MoR-ViT with routing='expert_choice'.*EARR"):
        expert_choice_flops(recvit.create_model("edge_recvit_tiny", img_size=32))
    with pytest.raises(ValueError, match="routing='token_choice'"):
        expert_choice_flops(token)


def test_mor_vit_base_against_the_paper():
    """MoR-B/16, beta = 0.35, 224 px: 8.34 GFLOPs = 4.17 G multiply-adds. The MoR-ViT paper's Table 2
    counts multiply-adds (its ViT-B/16 17.6 G is ViT-B's MAC count): it gives 4.1 G."""
    model = recvit.create_model("mor_vit_base")
    g = expert_choice_flops(model).gflops()
    assert round(g["total"], 2) == 8.34 and round(g["total"] / 2, 1) == 4.2
    assert round(g["patch_embed"], 3) == 0.231 and round(g["ranker"], 4) == 0.0012
    dense = full_depth_flops(model).gflops()
    assert round((dense["total"] - dense["ranker"]) / 2, 1) == 17.6  # ViT-B/16 in MACs


@pytest.mark.parametrize("kv", ["active", "all"])
def test_early_exit_deit_counts_its_active_tokens(kv):
    """The early-exit DeiT: the hand count of its depths, and at every depth L the dense DeiT's
    FLOPs plus the ranker's."""
    from recvit.bench import DeiTDense, dense_flops

    model = recvit.create_model("deit_tiny_early_exit", img_size=80, num_steps=6, mlp_ratio=3.0)
    depths = torch.randint(1, 7, (4, model.num_tokens))
    depths[1] = 1
    attention, mlp = _hand_count(model, depths, kv)
    counted = count_flops(model, depths, kv=kv)
    assert counted.attention == pytest.approx(attention, rel=1e-12)
    assert counted.mlp == pytest.approx(mlp, rel=1e-12)
    assert counted.ranker == 2.0 * model.num_tokens * (192 * 384 + 384 * 6)
    deit = DeiTDense(img_size=80, embed_dim=192, num_heads=3, depth=6, mlp_ratio=3.0)
    full = count_flops(model, torch.full((2, model.num_tokens), 6))
    assert full.total - full.ranker == pytest.approx(dense_flops(deit), rel=1e-12)
    assert full == full_depth_flops(model)
