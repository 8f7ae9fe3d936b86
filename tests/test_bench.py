"""The benchmark harness (recvit.bench, benchmarks/) on the CPU with tiny sizes: profiles, the
baselines against the reference, ToMe's merging and FLOPs, the spread, the command line."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from recvit import bench, create_model
from recvit.bench.tome import proportional_attention, token_counts
from tolerance import assert_flash_rule


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes: one torch thread is faster, and steady on a loaded shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.mark.parametrize("name", ["gather-scatter", "nested-sdpa", "packed", "varlen_attn"])
def test_baselines_compute_the_reference(name):
    model = create_model("edge_recvit_tiny", img_size=48, num_classes=10).eval()
    deit = bench.DeiTDense(48, embed_dim=192, num_heads=3, num_classes=10).eval()
    images = torch.randn(3, 3, 48, 48)
    depths = torch.randint(1, 13, (3, model.num_tokens))
    depths[1] = 1  # one image with every patch token exiting at once (and [CLS] forced deep below)
    depths[:, 0] = 12
    impl = {i.name: i for i in bench.implementations()}[name]
    with torch.inference_mode():
        try:
            fn = impl.build(model, deit, images, depths)
        except bench.Unavailable as error:  # varlen_attn has no CPU kernel in every torch
            pytest.skip(str(error))
        expected = model(images, depths=depths, backend="eager")
        torch.testing.assert_close(fn(images, depths), expected, rtol=1e-4, atol=1e-4)
        ranked = model(images, backend="eager")
        torch.testing.assert_close(fn(images, None), ranked, rtol=1e-4, atol=1e-4)


def test_harness_end_to_end(tmp_path):
    settings = bench.Settings("cpu", ["tiny"], ["fp32"], [32], [1, 2], ["paper", "ranker"], [1],
                              latency_batches=[1], implementations=[
                                  "deit-dense", "deit-dense+graph", "tome", "reference", "gather-scatter",
                                  "packed", "cuda", "packed+graph", "varlen_attn", "packed+compile"],
                              warmup=1, min_repeats=3, max_repeats=3, target_s=0.0, latency_repeats=3,
                              rotate=2, threads=1)
    threads = torch.get_num_threads()
    results = bench.run(settings, progress=False)
    assert torch.get_num_threads() == threads  # restored
    assert results["device"]["torch_threads"] == 1 and results["wall_s"] > 0
    records = results["records"]
    assert len(records) == 10 * (2 + 1)
    by = {(r["profile"], r["implementation"], r["batch"]): r for r in records}
    for impl in ("deit-dense", "tome", "reference", "gather-scatter", "packed"):
        record = by[("paper", impl, 2)]
        assert record["status"] == "ok" and record["images_per_s"] > 0 and record["repeats"] == 3
        assert record["min_ms"] <= record["p10_ms"] <= record["p50_ms"] <= record["p90_ms"] <= record["p99_ms"]
        assert record["peak_memory_mb"] is None  # not measured on the CPU
        low, mid, high = (record[f"speedup_vs_deit{s}"] for s in ("_p10", "", "_p90"))
        assert 0 < low <= mid <= high and record["speedup_vs_deit_ranked"] in (True, False, None)
    assert by[("paper", "deit-dense", 1)]["speedup_vs_deit"] == 1.0
    assert by[("paper", "packed", 2)]["speedup_vs_reference"] > 0
    assert by[("paper", "packed", 2)]["speedup_vs_tome"] > 0
    # ToMe's and DeiT's FLOPs are their own, fixed; ours follow the depths
    config = results["configs"][0]
    assert by[("paper", "tome", 1)]["flops_per_image"] == config["tome_flops"] < config["dense_flops"]
    assert by[("paper", "deit-dense", 1)]["flops_per_image"] == config["dense_flops"]
    for impl in ("cuda", "packed+graph", "deit-dense+graph", "packed+compile"):
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
    assert f"r = {config['tome_r']} tokens per layer" in report and bench.report.LEGEND in report
    assert "Noise: " in report

    from benchmarks.make_readme_table import main as make_table, replace_between_markers
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench-table:start -->\nold\n<!-- bench-table:end -->\nend\n")
    assert make_table([str(folder / "results.json"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and "| packed |" in text and text.endswith("end\n")
    with pytest.raises(ValueError, match="readme"):
        replace_between_markers("no markers", "table")


def _user_error(capsys, monkeypatch, argv, message):
    """``recvit bench argv`` ends in a usage error naming the problem, before any timing starts."""
    monkeypatch.setattr(bench.cli, "run", lambda *args, **kwargs: pytest.fail("ran before checking"))
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--dtypes", "bf16", "--cpu"], "--dtypes: the CPU mode times fp32 only"),
    (["--img-sizes", "30", "--cpu"], "--img-sizes: 30 is not"),
    (["--implementations", "packed", "warp-drive", "--cpu"], "--implementations: unknown warp-drive"),
    (["--batch-sizes", "0", "--cpu"], "--batch-sizes"),
    (["--threads", "0", "--cpu"], "--threads"),
    (["--min-rounds", "0", "--cpu"], "--min-rounds"),
])
def test_cli_rejects_bad_arguments(capsys, monkeypatch, argv, message):
    _user_error(capsys, monkeypatch, argv, message)
    with pytest.raises(ValueError, match="implementations"):
        bench.run(bench.Settings("cpu", ["tiny"], ["fp32"], [32], [1], ["paper"], [1],
                                 implementations=["warp-drive"]), progress=False)


def test_cli_checks_output_before_running(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    _user_error(capsys, monkeypatch, ["--full", "--cpu", "--out", str(tmp_path)], "need matplotlib")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _user_error(capsys, monkeypatch, ["--cpu", "--no-plots", "--out", str(blocker / "sub")],
                "--out: cannot create")


def test_default_results_root_is_outside_the_package(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert bench.default_results_root() == tmp_path / "recvit" / "bench"
    monkeypatch.delenv("XDG_CACHE_HOME")
    root = bench.default_results_root().resolve()
    package = Path(bench.__file__).resolve().parents[2]  # the source tree holding recvit/
    assert package not in root.parents


def test_cli_without_progress_imports_no_tqdm(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # any import of tqdm now fails
    assert bench.main(["--cpu", "--scales", "tiny", "--img-sizes", "32", "--batch-sizes", "1",
                       "--implementations", "deit-dense", "packed", "cuda", "--target-s", "0",
                       "--min-rounds", "2", "--threads", "1", "--no-progress", "--no-plots",
                       "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Timing on cpu" in out and "Edge-RecViT-Tiny against DeiT-Tiny" in out  # what is compared
    assert "| packed |" in out and "Ours (packed) over DeiT dense:" in out and "Noise: " in out
    assert "**cuda**: not measured" in out
    assert (next(tmp_path.iterdir()) / "results.json").is_file()
    assert out.splitlines()[-1].startswith("Fastest: batch 1: ")  # the run ends with the plain verdict


def _timed(name, batch, p25, p50, p75):
    return {"scale": "tiny", "dtype": "fp32", "img_size": 32, "profile": "paper", "implementation": name,
            "batch": batch, "status": "ok", "p25_ms": p25, "p50_ms": p50, "p75_ms": p75}


def test_fastest_line_ranks_only_what_the_spread_separates():
    from recvit.bench.report import fastest_line

    results = {"configs": [{"scale": "tiny", "dtype": "fp32", "img_size": 32}],
               "settings": {"headline_profile": "paper"},
               "records": [_timed("packed", 1, 9.0, 10.0, 11.0), _timed("deit-dense", 1, 14.0, 15.0, 16.0),
                           _timed("tome", 1, 19.0, 20.0, 21.0),
                           _timed("packed", 8, 70.0, 80.0, 90.0), _timed("tome", 8, 85.0, 82.0, 95.0),
                           _timed("deit-dense", 8, 100.0, 120.0, 130.0),
                           {**_timed("cuda", 8, 0, 0, 0), "status": "unavailable"},
                           {**_timed("packed", 1, 1.0, 1.0, 1.0), "profile": "uniform"}]}
    assert fastest_line(results) == (
        "Fastest: batch 1: packed, 1.50x faster than the next, deit-dense (10.00 vs 15.00 ms median); "
        "batch 8: noise could not rank packed and tome (their p25-p75 times overlap).")
    results["records"] = results["records"][:1]
    assert fastest_line(results) == "Fastest: batch 1: only packed ran."
    results["records"] = []
    assert fastest_line(results) is None


def test_busy_machine_is_named_before_the_run(monkeypatch):
    from recvit.bench import settings

    monkeypatch.setattr(settings.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(settings, "load_average", lambda: 0.5)
    assert settings.busy_warning(2) is None
    monkeypatch.setattr(settings, "load_average", lambda: 3.0)
    assert "busy (load average 3.0 on 2 cores)" in settings.busy_warning(2)
    assert "--threads 1" in settings.busy_warning(2) and "--threads 1" not in settings.busy_warning(1)


def test_cli_writes_each_batch_as_it_completes(capsys, monkeypatch, tmp_path):
    """A run cut off during its second batch (here: the timing raises, as a kill would stop it) has
    written the first batch's records, in a results.json and results.md marked partial."""
    timings = []

    def cut_off_at_the_second_batch(*args, **kwargs):
        timings.append(args)
        if len(timings) == 2:
            raise KeyboardInterrupt
        return bench.time_interleaved(*args, **kwargs)

    monkeypatch.setattr(bench.runner, "time_interleaved", cut_off_at_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--full", "--cpu", "--scales", "tiny", "--img-sizes", "32", "--batch-sizes", "1", "2",
                    "--profiles", "paper", "--implementations", "deit-dense", "packed", "--target-s", "0",
                    "--min-rounds", "2", "--threads", "1", "--no-progress", "--no-plots", "--out", str(tmp_path)])
    folder = next(tmp_path.iterdir())
    results = json.loads((folder / "results.json").read_text())
    assert results["complete"] is False
    assert sorted((r["implementation"], r["batch"], r["status"]) for r in results["records"]) == [
        ("deit-dense", 1, "ok"), ("packed", 1, "ok")]
    report = (folder / "results.md").read_text()
    assert "**Partial**" in report and "| packed |" in report
    assert sorted(p.name for p in folder.iterdir()) == ["results.json", "results.md"]  # no half-written file
    assert f"batch 1: 2 records in {folder}/results.json" in capsys.readouterr().out


def test_train_step_writes_each_round_as_it_completes(monkeypatch, tmp_path, capsys):
    """benchmarks/train_step.py cut off during its second timed round (here a step raises, as a kill
    would stop it) has written the first round of each implementation, marked partial; a whole run
    rewrites it complete."""
    from benchmarks import train_step

    argv = ["--scale", "tiny", "--img-size", "32", "--batch", "2", "--rounds", "3", "--backends", "packed",
            "--out", str(tmp_path)]
    calls, step_fn = [], train_step._step_fn

    def cut_off_in_the_second_round(*args):
        step = step_fn(*args)

        def counted(*inputs):
            calls.append(1)
            if len(calls) == 2 * 2 + 2 + 1:  # 2 warm-up rounds, 1 timed round of the 2 implementations
                raise KeyboardInterrupt
            return step(*inputs)
        return counted

    monkeypatch.setattr(train_step, "_step_fn", cut_off_in_the_second_round)
    with pytest.raises(KeyboardInterrupt):
        train_step.main(argv)
    folder = next(tmp_path.iterdir())
    result = json.loads((folder / "results.json").read_text())
    assert result["complete"] is False and sorted(result["raw_seconds"]) == ["deit-dense", "edge-recvit-packed"]
    assert all(len(seconds) == 1 and seconds[0] > 0 for seconds in result["raw_seconds"].values())
    assert "**Partial**: 1 of 3 rounds" in (folder / "results.md").read_text()
    assert sorted(p.name for p in folder.iterdir()) == ["results.json", "results.md"]  # no half-written file
    assert "timed round 1 of 3" in capsys.readouterr().out

    monkeypatch.setattr(train_step, "_step_fn", step_fn)
    assert train_step.main(argv) == 0
    result = json.loads((folder / "results.json").read_text())
    assert result["complete"] is True and all(len(s) == 3 for s in result["raw_seconds"].values())
    assert "Partial" not in (folder / "results.md").read_text()


# ----------------------------------------------------------------------------------------------
# Spread


def test_paired_ratio_ranks_only_what_noise_cannot_flip():
    steady = bench.paired_ratio([2.0, 2.2, 1.8, 2.0, 2.1], [1.0, 1.1, 0.9, 1.0, 1.05])
    assert steady["ratio"] == pytest.approx(2.0) and steady["ranked"]
    flipping = bench.paired_ratio([1.0, 2.0, 1.0, 2.0, 1.0], [2.0, 1.0, 2.0, 1.0, 2.0])
    assert flipping["p10"] < 1 < flipping["p90"] and not flipping["ranked"]
    with pytest.raises(ValueError, match="rounds"):
        bench.paired_ratio([1.0], [1.0, 2.0])
    assert not bench.summarize([1.0, 1.1, 1.2])["noisy"] and bench.summarize([1.0, 1.0, 3.0, 3.0])["noisy"]
    stats = bench.summarize([0.001 * i for i in range(1, 102)])
    assert stats["p10_ms"] < stats["p25_ms"] < stats["p50_ms"] < stats["p75_ms"] < stats["p90_ms"]


def test_one_timed_call_and_the_machine_record():
    """The helpers `recvit check`, `recvit eval`, `recvit info` and the benchmarks share."""
    import time

    from recvit.bench.settings import cpu_name, module_version
    from recvit.bench.timer import timed_call

    result, seconds = timed_call(lambda: time.sleep(0.02) or 7, torch.device("cpu"))
    assert result == 7 and 0.02 <= seconds < 2
    assert module_version("torch") == torch.__version__ and module_version("no_such_module_here") is None
    assert cpu_name() and bench.device_info(torch.device("cpu"))["name"] == cpu_name()


def test_report_marks_what_noise_cannot_rank():
    from recvit.bench.report import ratio_cell, time_cell

    record = {"status": "ok", "batch": 1, "p10_ms": 1.0, "p50_ms": 2.0, "p90_ms": 4.0, "noisy": True,
              "speedup_vs_deit": 1.05, "speedup_vs_deit_p10": 0.9, "speedup_vs_deit_p90": 1.2,
              "speedup_vs_deit_ranked": False}
    assert time_cell(record) == "2.00 (1.00-4.00)*"
    assert ratio_cell(record, "vs_deit") == "1.05x (0.90-1.20) ~"
    record.update(speedup_vs_deit_p10=1.01, speedup_vs_deit_ranked=True)
    assert ratio_cell(record, "vs_deit") == "1.05x (1.01-1.20)"
    assert ratio_cell({"status": "ok", "speedup_vs_deit": 1.3}, "vs_deit") == "1.30x"  # old results


def _record(name, batch, p50_ms=10.0, **speedups):
    """A timed record of a Base bf16 run; speedups: label -> (median, p10, p90)."""
    record = {"scale": "base", "dtype": "bf16", "img_size": 224, "tokens": 197, "profile": "paper",
              "implementation": name, "batch": batch, "status": "ok", "flops_per_image": 24e9, "p10_ms": p50_ms * 0.9,
              "p50_ms": p50_ms, "p90_ms": p50_ms * 1.1, "images_per_s": batch * 1e3 / p50_ms, "noisy": False}
    for label, (value, low, high) in speedups.items():
        record.update({f"speedup_{label}": value, f"speedup_{label}_p10": low, f"speedup_{label}_p90": high})
    return record


def _results(records, latency_batches=(1, 8), device_type="cuda"):
    return {"device": {"name": "NVIDIA H200", "device_type": device_type},
            "settings": {"headline_profile": "paper", "latency_batches": list(latency_batches),
                         "batch_sizes": [1, 8, 256] if latency_batches else [2, 4]},
            "configs": [{"scale": "base", "dtype": "bf16", "img_size": 224}], "records": records}


def test_targets_table_holds_each_of_ours_to_each_target():
    """Each target at its batch (throughput: the largest, 256; latency: the first latency batch, 1),
    each of ours against the baseline of that target; met / not met by the median, ~ where the
    p10-p90 range contains the target; a side not measured says so."""
    from recvit.bench.report import targets_table

    records = [_record("deit-dense", 256), _record("tome", 256), _record("reference", 256),
               _record("varlen_attn", 256), _record("deit-dense+graph", 1),
               _record("packed", 256, vs_deit=(1.40, 1.37, 1.45), vs_tome=(1.04, 1.01, 1.07),
                       vs_reference=(1.6, 1.5, 1.7)),
               _record("triton", 256, vs_deit=(1.30, 1.25, 1.33), vs_tome=(0.9, 0.8, 1.0),
                       vs_reference=(1.2, 1.1, 1.3), vs_varlen_attn=(0.95, 0.85, 1.02)),
               {**_record("cuda", 256), "status": "failed", "reason": "RuntimeError: boom"},
               _record("triton+graph", 1, vs_deit_graph=(1.10, 1.05, 1.2)),
               _record("cuda+graph", 1, vs_deit_graph=(0.97, 0.95, 0.99)),
               _record("packed", 1, vs_deit=(9.0, 9.0, 9.0))]  # batch 1: not a throughput figure
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in targets_table(_results(records)).splitlines()
            if line.startswith("| ") and "@ b=" in line}
    assert rows["throughput vs DeiT (both eager) @ b=256"] == [
        ">= 1.35x", "1.40x (1.37-1.45) met", "1.30x (1.25-1.33) not met", "not measured: failed |"]
    assert rows["throughput vs ToMe at the same FLOPs (both eager) @ b=256"][1:3] == [
        "1.04x (1.01-1.07) not met ~", "0.90x (0.80-1.00) not met"]
    assert rows["p50 latency vs DeiT, CUDA graph on both sides (latency <= 1.0x) @ b=1"] == [
        ">= 1.00x", "not measured: not in this run", "1.10x (1.05-1.20) met", "0.97x (0.95-0.99) not met |"]
    assert rows["throughput vs the public code's execution (`reference`) @ b=256"][1] == "1.60x (1.50-1.70) met ~"
    assert rows["throughput vs torch `varlen_attn` per step (whole forward, not attention alone) @ b=256"] == [
        ">= 0.90x", "-", "0.95x (0.85-1.02) met ~", "- |"]
    assert "this run is not that one" not in targets_table(_results(records))
    stopped = [r for r in records if r["batch"] != 256]  # a run stopped before its largest batch
    assert "| throughput vs DeiT (both eager) @ b=256 | >= 1.35x | not measured: not in this run |" \
        in targets_table(_results(stopped))
    without_tome = [r for r in records if r["implementation"] != "tome"]
    assert "| no tome: not in this run |" in targets_table(_results(without_tome))
    assert "this run is not that one" in targets_table(_results(records, device_type="cpu"))


def test_records_pair_with_the_targets_baselines(monkeypatch):
    """Every record gets its per-round speed-up over DeiT in a CUDA graph and over torch's varlen_attn
    (the targets' baselines), beside those over DeiT, ToMe and the reference."""
    stand_ins = [bench.Implementation(name, name, lambda model, deit, images, depths: (lambda x, d: deit(x)))
                 for name in ("deit-dense+graph", "varlen_attn")]
    monkeypatch.setattr(bench.runner, "select", lambda names, force=False: [
        *stand_ins, *(i for i in bench.implementations() if i.name in ("deit-dense", "packed"))])
    settings = bench.Settings("cpu", ["tiny"], ["fp32"], [32], [2], ["paper"], [2], latency_batches=[],
                              warmup=1, min_repeats=3, max_repeats=3, target_s=0.0, rotate=1, threads=1)
    packed = next(r for r in bench.run(settings, progress=False)["records"] if r["implementation"] == "packed")
    for label in ("vs_deit_graph", "vs_varlen_attn"):
        low, mid, high = (packed[f"speedup_{label}{s}"] for s in ("_p10", "", "_p90"))
        assert 0 < low <= mid <= high and packed[f"speedup_{label}_ranked"] in (True, False)


def test_plots_of_a_run_without_latency_batches(tmp_path):
    """--batch-sizes without 1 or 8 leaves no latency batch: the latency plot shows the smallest
    batch instead of failing after the whole run."""
    from recvit.bench.plot import plot

    records = [_record("deit-dense", 2, vs_deit=(1.0, 1.0, 1.0)), _record("packed", 2, vs_deit=(1.2, 1.1, 1.3)),
               _record("packed", 4, vs_deit=(1.3, 1.2, 1.4))]
    paths = plot({**_results(records, latency_batches=()), "implementations": {"deit-dense": "", "packed": ""}},
                 tmp_path)
    assert sorted(p.name for p in paths) == ["latency.png", "speedup.png", "throughput.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


# ----------------------------------------------------------------------------------------------
# ToMe


def _merged(metric, x, size, r):
    return bench.merge_wavg(bench.bipartite_soft_matching(torch.tensor([metric]), r),
                            torch.tensor([x])[..., None], torch.tensor([size])[..., None])


def test_tome_merging_hand_checked():
    # A = tokens 0, 2, 4 (even), B = 1, 3. [CLS] (0) is as similar to 1 as can be, yet never merged;
    # 2's best match is 3 (cos 0.995), 4's is 1 (cos 0.894); r = 1 keeps the stronger edge 2 -> 3.
    metric = [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.1, 1.0], [0.0, 1.0, 0.5]]
    x, size = _merged(metric, [10.0, 20.0, 30.0, 40.0, 50.0], [1.0] * 5, 1)
    assert x[0, :, 0].tolist() == [10, 50, 20, 35] and size[0, :, 0].tolist() == [1, 1, 1, 2]
    x, size = _merged(metric, [10.0, 20.0, 30.0, 40.0, 50.0], [1.0] * 5, 2)
    assert x[0, :, 0].tolist() == [10, 35, 35] and size[0, :, 0].tolist() == [1, 2, 2]
    x, size = _merged(metric, [10.0, 20.0, 30.0, 40.0, 50.0], [1.0, 1.0, 3.0, 1.0, 1.0], 1)  # sizes weigh
    assert x[0, :, 0].tolist() == [10, 50, 20, 32.5] and size[0, :, 0].tolist() == [1, 1, 1, 4]
    with pytest.raises(ValueError, match="r: expected"):
        bench.bipartite_soft_matching(torch.tensor([metric]), 3)  # at most (5 - 1) // 2 tokens


def test_proportional_attention_weighs_a_merged_token_as_its_copies():
    block = bench.DeiTDense(32, embed_dim=16, num_heads=2, depth=1).blocks[0]
    x = torch.randn(1, 4, 16)
    copies = x[:, [0, 1, 1, 1, 2, 3]]  # token 1 stands for three patches
    with torch.no_grad():
        merged, keys = proportional_attention(block, x, torch.tensor([[[1.0], [3.0], [1.0], [1.0]]]))
        dense = block.attn(block.norm1(copies))
    torch.testing.assert_close(merged, dense[:, [0, 1, 4, 5]], rtol=1e-5, atol=1e-5)
    assert keys.shape == (1, 4, 8)


def test_tome_flops_and_token_counts():
    deit = bench.DeiTDense(32, embed_dim=8, num_heads=2, depth=2, num_classes=10)  # N0 = 5, C = 8, D = 4
    assert bench.tome_flops(deit, 0) == bench.dense_flops(deit)
    # by hand: patch 2*4*3*256*8; layer 1 (N = 5, merges 1): attention 2(4*5*64 + 2*25*8),
    # matching 2*3*2*4, MLP 4*4*8*32; layer 2 (N = 4, merges 1): 2(4*4*64 + 2*16*8), 2*2*2*4, 4*3*8*32
    assert bench.tome_flops(deit, 1) == 49152 + 3360 + 48 + 4096 + 2560 + 32 + 3072
    assert token_counts(197, 12, 10) == [197 - 10 * i for i in range(12)]
    assert token_counts(9, 4, 3) == [9, 6, 4, 3]  # r capped at (N - 1) // 2: 3, then 2, then 1
    seen = []
    deit.blocks[1].mlp.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    with torch.no_grad():
        bench.ToMe(deit, 1)(torch.randn(2, 3, 32, 32))
    assert seen == [3]  # 5 tokens -> 4 after layer 1 -> 3 into layer 2's MLP


def test_tome_r_matches_edge_recvit_base_flops():
    with torch.device("meta"):  # shapes only
        deit = bench.DeiTDense(224)
        target = create_model("edge_recvit_base")
    from recvit.bench.implementations import paper_profile_flops, tome_r

    budget = paper_profile_flops(target)
    assert round(budget / 1e9, 2) == 24.39
    r = tome_r(target, deit)
    error = abs(bench.tome_flops(deit, r) - budget)
    assert error < abs(bench.tome_flops(deit, r - 1) - budget)
    assert error < abs(bench.tome_flops(deit, r + 1) - budget)
    assert error / budget < 0.05


def test_tome_without_merging_is_the_dense_model():
    deit = bench.DeiTDense(48, embed_dim=32, num_heads=2, num_classes=10).eval()
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(bench.ToMe(deit, 0)(images), deit(images))
        assert bench.ToMe(deit, 3)(images).shape == (2, 10)


# ----------------------------------------------------------------------------------------------
# torch-version-specific calls


def _segments_attention(q, k, v, cu, scale):
    out = torch.empty_like(q)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        out[start:end] = F.scaled_dot_product_attention(*(t[start:end].transpose(0, 1) for t in (q, k, v)),
                                                        scale=scale).transpose(0, 1)
    return out


def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """torch 2.10's signature: no scale (1/sqrt(D)); the slot after max_k is is_causal."""
    assert is_causal is False and return_aux is None
    return _segments_attention(query, key, value, cu_seq_q, None)


def varlen_attn_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None,
                     num_splits=None):
    """torch 2.11+'s form: keyword-only scale (and more)."""
    return _segments_attention(query, key, value, cu_seq_q, scale)


@pytest.mark.parametrize("fake", [varlen_attn_2_10, varlen_attn_2_13])
def test_varlen_attn_call_follows_the_signature(fake):
    q, k, v = (torch.randn(7, 2, 16, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    expected = _segments_attention(q, k, v, cu, 0.3)
    out = bench.scaled_varlen_call(fake)(q, k, v, cu, cu, 4, 4, 0.3)
    torch.testing.assert_close(out, expected)


# ----------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
def test_varlen_attn_call_on_this_torch():
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    q, k, v = (torch.randn(300, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, 197, 300], device="cuda", dtype=torch.int32)
    expected = _segments_attention(q.double(), k.double(), v.double(), cu, 0.05)
    theirs = _segments_attention(q, k, v, cu, 0.05)
    ours = bench.scaled_varlen_call(varlen.varlen_attn)(q, k, v, cu, cu, 197, 197, 0.05)
    assert_flash_rule(ours, theirs, expected, floor=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["deit", "tome"])
def test_dense_baselines_in_a_cuda_graph(kind):
    deit = bench.DeiTDense(224, embed_dim=192, num_heads=3).eval().cuda().half()
    model = deit if kind == "deit" else bench.ToMe(deit, 10)
    images = torch.randn(4, 3, 224, 224, device="cuda", dtype=torch.half)
    with torch.inference_mode():
        graphed = bench.capture_graph(model, images)
        for _ in range(2):
            fresh = torch.randn_like(images)
            torch.testing.assert_close(graphed(fresh), model(fresh), rtol=2e-3, atol=2e-3)
        with pytest.raises(ValueError, match="images"):
            graphed(images[:2])


@pytest.mark.parametrize("name", ["early-exit-reference", "early-exit-packed"])
def test_early_exit_rows_compute_the_deit_with_early_exit(name):
    """The early-exit rows run the bench's DeiT blocks with the depths timed: at every depth L the
    DeiT itself; with mixed depths the masked reference; the ranker profile is refused."""
    from recvit import from_vit

    model = create_model("edge_recvit_tiny", img_size=32, patch_size=8, num_classes=10).eval()
    deit = bench.DeiTDense(32, patch_size=8, embed_dim=64, num_heads=2, num_classes=10).eval()
    images = torch.randn(2, 3, 32, 32)
    depths = torch.randint(1, 13, (2, model.num_tokens))
    depths[:, 0] = 12
    impl = {i.name: i for i in bench.implementations()}[name]
    with torch.inference_mode():
        fn = impl.build(model, deit, images, depths)
        torch.testing.assert_close(fn(images, torch.full_like(depths, 12)), deit(images), rtol=1e-4, atol=1e-4)
        expected = from_vit(deit)(images, depths=depths, backend="eager")
        torch.testing.assert_close(fn(images, depths), expected, rtol=1e-4, atol=1e-4)
        with pytest.raises(bench.Unavailable, match="fixed depth profiles"):
            impl.build(model, deit, images, None)
    assert impl.flops is None  # its FLOPs are count_flops' for the depths timed, Edge-RecViT's
