"""Smoke test of the benchmark harness (recvit.bench, benchmarks/) on the CPU with tiny sizes."""
import json

import pytest
import torch

from recvit import bench, create_model

pytest.importorskip("tqdm")


def test_paper_profile_hits_the_papers_sums():
    alpha = bench.profile_alpha("paper", 12)
    assert alpha[0] == 1 and all(a >= b for a, b in zip(alpha, alpha[1:]))
    assert round(sum(alpha), 2) == 8.21 and round(sum(a * a for a in alpha), 2) == 6.64
    depths = bench.profile_depths("paper", 3, 197, 12, torch.Generator().manual_seed(1))
    steps = torch.arange(1, 13)
    assert ((depths[:, :, None] >= steps).sum(1) == torch.tensor(bench.PAPER_ACTIVE_TOKENS_224)).all()
    assert (depths[:, 0] == 12).all()
    assert not torch.equal(depths[0], depths[1])  # positions drawn per image
    s1, s2 = bench.alpha_sums(depths, 12)
    assert (round(s1, 2), round(s2, 2)) == (8.21, 6.64)


def test_extreme_profiles():
    generator = torch.Generator().manual_seed(0)
    deep = bench.profile_depths("all-deep", 2, 17, 12, generator)
    assert (deep == 12).all() and bench.alpha_sums(deep, 12) == (12.0, 12.0)
    shallow = bench.profile_depths("all-shallow", 2, 17, 12, generator)
    assert (shallow[:, 0] == 12).all() and (shallow[:, 1:] == 1).all()
    assert bench.alpha_sums(shallow, 12)[0] == pytest.approx(1 + 11 / 17)  # only [CLS] after step 1
    uniform = bench.profile_depths("uniform", 1, 49, 12, generator)
    assert sorted(torch.bincount(uniform[0], minlength=13)[1:].tolist()) == [4] * 11 + [5]
    assert bench.profile_depths("ranker", 2, 17, 12, torch.Generator()) is None
    with pytest.raises(ValueError, match="profile"):
        bench.profile_alpha("steep", 12)


@pytest.mark.parametrize("name", ["gather-scatter", "nested-sdpa", "packed"])
def test_baselines_compute_the_reference(name):
    model = create_model("edge_recvit_tiny", img_size=48, num_classes=10).eval()
    deit = bench.DeiTDense(48, embed_dim=192, num_heads=3, num_classes=10).eval()
    images = torch.randn(3, 3, 48, 48)
    depths = torch.randint(1, 13, (3, model.num_tokens))
    depths[1] = 1  # one image with every patch token exiting at once (and [CLS] forced deep below)
    depths[:, 0] = 12
    impl = {i.name: i for i in bench.implementations()}[name]
    with torch.inference_mode():
        fn = impl.build(model, deit, images, depths)
        expected = model(images, depths=depths, backend="eager")
        torch.testing.assert_close(fn(images, depths), expected, rtol=1e-4, atol=1e-4)
        ranked = model(images, backend="eager")
        torch.testing.assert_close(fn(images, None), ranked, rtol=1e-4, atol=1e-4)


def test_harness_end_to_end(tmp_path):
    settings = bench.Settings("cpu", ["tiny"], ["fp32"], [32], [1, 2], ["paper", "ranker"], [1],
                              latency_batches=[1], implementations=[
                                  "deit-dense", "reference", "gather-scatter", "packed", "cuda",
                                  "packed+graph", "varlen_attn", "packed+compile"],
                              warmup=1, min_repeats=3, max_repeats=3, target_s=0.0, latency_repeats=3,
                              rotate=2)
    results = bench.run(settings, progress=False)
    records = results["records"]
    assert len(records) == 8 * (2 + 1)
    by = {(r["profile"], r["implementation"], r["batch"]): r for r in records}
    for impl in ("deit-dense", "reference", "gather-scatter", "packed"):
        record = by[("paper", impl, 2)]
        assert record["status"] == "ok" and record["images_per_s"] > 0 and record["repeats"] == 3
        assert record["p50_ms"] <= record["p90_ms"] <= record["p99_ms"]
        assert record["peak_memory_mb"] is None  # not measured on the CPU
    assert by[("paper", "deit-dense", 1)]["speedup_vs_deit"] == 1.0
    assert by[("paper", "packed", 2)]["speedup_vs_reference"] > 0
    for impl in ("cuda", "packed+graph", "packed+compile"):
        assert by[("paper", impl, 1)]["status"] == "unavailable" and by[("paper", impl, 1)]["reason"]
    assert by[("paper", "varlen_attn", 1)]["status"] in ("ok", "unavailable")
    # the ranker profile's FLOPs come from the depths the ranker chose
    assert by[("ranker", "reference", 1)]["flops_per_image"] > 0

    folder = bench.write_results(results, tmp_path)
    assert folder.name.startswith("cpu-")
    loaded = json.loads((folder / "results.json").read_text())
    assert loaded["device"]["torch"] == torch.__version__ and "git_commit" in loaded["device"]
    for plot in ("throughput.png", "latency.png", "speedup.png"):
        assert (folder / plot).stat().st_size > 1000
    report = (folder / "results.md").read_text()
    assert "| packed |" in report and "CUDA graphs need a CUDA GPU" in report

    from benchmarks.make_readme_table import main as make_table, replace_between_markers
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench-table:start -->\nold\n<!-- bench-table:end -->\nend\n")
    assert make_table([str(folder / "results.json"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and "| packed |" in text and text.endswith("end\n")
    with pytest.raises(ValueError, match="readme"):
        replace_between_markers("no markers", "table")


def test_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        bench.main(["--dtypes", "bf16", "--cpu"])
    with pytest.raises(SystemExit):
        bench.main(["--img-sizes", "30", "--cpu"])
    with pytest.raises(ValueError, match="implementations"):
        bench.run(bench.Settings("cpu", ["tiny"], ["fp32"], [32], [1], ["paper"], [1],
                                 implementations=["warp-drive"]), progress=False)
