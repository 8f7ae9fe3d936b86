"""PNG plots of a results dictionary (matplotlib): throughput.png, latency.png, speedup.png for the
first config and the headline profile.

Every point carries its spread (p10-p90 of the interleaved rounds) as an error bar. A speed-up
whose range contains 1, or a time flagged noisy, is drawn hollow and grey and named "within
noise" in the legend: noise is never drawn as a finding.
"""
from __future__ import annotations

from pathlib import Path


def _ok(records, **where):
    return [r for r in records if r["status"] == "ok" and all(r[k] == v for k, v in where.items())]


def _solid(record, label=None) -> bool:
    """Whether a point may be read as a finding: its time is not noisy (and its ratio ranked)."""
    if record.get("noisy"):
        return False
    return label is None or record.get(f"speedup_{label}_ranked") is not False


def plot(results: dict, out_dir: Path) -> list[Path]:
    """Write the three plots to ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config, profile = results["configs"][0], results["settings"]["headline_profile"]
    where = {k: config[k] for k in ("scale", "dtype", "img_size")}
    records = _ok(results["records"], profile=profile, **where)
    names = [n for n in results["implementations"] if any(r["implementation"] == n for r in records)]
    title = (f"{results['device']['name']}: {config['scale']} {config['dtype']} {config['img_size']}px, "
             f"profile '{profile}'")
    note = "error bars: p10-p90 of the interleaved rounds; hollow grey: within noise"
    batches = sorted({r["batch"] for r in records})
    paths = []

    def series(ax, name, points):
        """points: (x, y, low, high, solid); a line through all, hollow grey markers where not solid."""
        x, y = [p[0] for p in points], [p[1] for p in points]
        line = ax.plot(x, y, label=name, lw=1.0, alpha=0.5)[0]  # faint: the markers are the data
        ax.errorbar(x, y, yerr=[[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]],
                    fmt="none", ecolor=line.get_color(), capsize=3, lw=0.8)
        for px, py, _, _, solid in points:
            ax.plot(px, py, "o", color=line.get_color() if solid else "grey",
                    markerfacecolor=line.get_color() if solid else "none")

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in names:
        mine = sorted((r for r in records if r["implementation"] == name), key=lambda r: r["batch"])
        series(ax, name, [(r["batch"], r["images_per_s"], r["batch"] * 1e3 / r.get("p90_ms", r["p50_ms"]),
                           r["batch"] * 1e3 / r.get("p10_ms", r["p50_ms"]), _solid(r)) for r in mine])
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="images / s", title=title)
    ax.set_xticks(batches, labels=batches)
    ax.minorticks_off()
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, title=note, title_fontsize=7)
    paths.append(_save(fig, out_dir / "throughput.png"))

    lat = [b for b in results["settings"]["latency_batches"] if b in batches] or batches[:1]  # none asked: the smallest
    fig, axes = plt.subplots(1, len(lat), figsize=(5 * len(lat), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], lat):
        rows = [r for n in names for r in records if r["implementation"] == n and r["batch"] == batch]
        p50 = [r["p50_ms"] for r in rows]
        err = [[r["p50_ms"] - r.get("p10_ms", r["p50_ms"]) for r in rows],
               [r.get("p90_ms", r["p50_ms"]) - r["p50_ms"] for r in rows]]
        ax.barh([r["implementation"] for r in rows], p50, xerr=err, capsize=3,
                color=["C0" if _solid(r) else "lightgrey" for r in rows])
        ax.invert_yaxis()
        ax.set(xlabel="latency ms (bar p50, whisker p10-p90; grey: noisy)", title=f"batch {batch}")
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(title)
    paths.append(_save(fig, out_dir / "latency.png"))

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in names:
        mine = sorted((r for r in records if r["implementation"] == name and r.get("speedup_vs_deit")
                       and name != "deit-dense"), key=lambda r: r["batch"])
        if mine:
            series(ax, name, [(r["batch"], r["speedup_vs_deit"], r.get("speedup_vs_deit_p10", r["speedup_vs_deit"]),
                               r.get("speedup_vs_deit_p90", r["speedup_vs_deit"]), _solid(r, "vs_deit"))
                              for r in mine])
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set(xscale="log", xlabel="batch size", ylabel="speed-up over DeiT dense (x)", title=title)
    ax.set_xticks(batches, labels=batches)
    ax.minorticks_off()
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, title=note, title_fontsize=7)
    paths.append(_save(fig, out_dir / "speedup.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
