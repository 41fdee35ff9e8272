"""The report's output: PNG plots (matplotlib), the data each plot draws (plots.json), results.json and report.md.

Everything here is a function of the measurements `loadtest/report.py` collected; nothing is measured here.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from loadtest.probe import percentile
from service.metrics import LENGTH_CLASSES

DPI = 90
CURVE_KEYS = ("service", "batching_off", "plain")
Series = dict[str, list[list[float]]]  # series label -> [[x, y], ...]


# --- numbers the plots and the text share ---


def median_and_range(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def ratio_and_range(numerator: list[float], denominator: list[float]) -> tuple[float, float, float]:
    """Median over median, and the widest range the runs allow (slowest over fastest, fastest over slowest)."""

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else math.inf

    return (
        ratio(statistics.median(numerator), statistics.median(denominator)),
        ratio(min(numerator), max(denominator)),
        ratio(max(numerator), min(denominator)),
    )


def ladder_verdict(rungs: list[tuple[str, list[float]]]) -> tuple[bool, list[str]]:
    """Whether each rung (title, texts/s of its runs) is faster than the one before, with one line per step."""
    lines, ordered = [], True
    for (previous, slower), (title, faster) in itertools.pairwise(rungs):
        ratio, low, high = ratio_and_range(faster, slower)
        overlap = " (the runs' ranges overlap)" if low <= 1 <= high else ""
        if ratio <= 1:
            ordered = False
        lines.append(f"{previous} -> {title}: **{ratio:.2f}x** (runs {low:.2f}-{high:.2f}x){overlap}")
    return ordered, lines


def knee(curve: list[dict]) -> dict | None:
    """The highest offered load whose p99 stays within 3x the p99 at the lightest load and that is answered at
    least at 95% of the offered rate: where the server still keeps up."""
    points = [point for point in curve if point["p99_ms"] is not None]
    if not points:
        return None
    floor = points[0]["p99_ms"]
    keeping_up = [
        point
        for point in points
        if point["p99_ms"] <= 3 * floor and point["texts_per_second"] >= 0.95 * point["offered_rps"] * _answered_share(point)
    ]
    return max(keeping_up, key=lambda point: point["offered_rps"]) if keeping_up else points[0]


def _answered_share(point: dict) -> float:
    return point["answered"] / max(1, point["sent"])


# --- plots: each draws one PNG and returns the data it drew ---


def plot_throughput(results: dict, path: Path) -> Series:
    strategies = results["strategies"]
    titles = [entry["title"] for entry in strategies]
    medians = [statistics.median(entry["texts_per_second"]) for entry in strategies]
    errors = [
        [m - min(entry["texts_per_second"]) for m, entry in zip(medians, strategies)],
        [max(entry["texts_per_second"]) - m for m, entry in zip(medians, strategies)],
    ]
    colours = ["tab:blue" if entry["key"] in ("fixed", "dynamic", "buckets", "service") else "tab:grey" for entry in strategies]
    efficiency = [entry["server"]["padding_efficiency"] if entry["server"] else None for entry in strategies]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    positions = range(len(titles))
    left.barh(positions, medians, xerr=errors, color=colours, capsize=3)
    left.set_yticks(positions, titles)
    left.invert_yaxis()
    left.set_xlabel("texts/s at saturation (median of runs, bars: range)")
    for y, value, high in zip(positions, medians, errors[1]):
        left.text(value + high, y, f" {value:.0f}", va="center", fontsize=8)
    right.barh(positions, [value or 0.0 for value in efficiency], color="tab:green")
    right.set_xlim(0, 1.15)
    right.set_xlabel("padding efficiency (real / padded tokens)")
    for y, value in zip(positions, efficiency):
        right.text(value or 0.0, y, f" {value:.2f}" if value is not None else " no padding", va="center", fontsize=8)
    figure.suptitle("Throughput and padding efficiency at saturation")
    _save(figure, path)
    return {
        "texts_per_second": [[i, value] for i, value in enumerate(medians)],
        "padding_efficiency": [[i, value] for i, value in enumerate(efficiency) if value is not None],
    }


def plot_latency_against_load(results: dict, path: Path) -> Series:
    curves = {entry["title"]: entry["load_curve"] for entry in results["strategies"] if entry.get("load_curve")}
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    drawn: Series = {}
    for axis, (name, label) in zip(axes, (("p50_ms", "p50"), ("p99_ms", "p99"))):
        for title, curve in curves.items():
            points = [[point["offered_rps"], point[name]] for point in curve if point[name] is not None]
            axis.plot([x for x, _ in points], [y for _, y in points], marker="o", label=title)
            drawn[f"{title} {label}"] = points
        axis.set_xlabel("offered load (requests/s, one text each, Poisson arrivals)")
        axis.set_title(f"{label} latency")
        axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms")
    axes[0].legend(fontsize=8)
    figure.suptitle("Latency against offered load: the knee where each server saturates")
    _save(figure, path)
    return drawn


def plot_lengths(results: dict, path: Path) -> Series:
    lengths = results["texts"]["token_lengths"]
    max_length = results["max_length"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [4, 5]})
    bins = _length_bins(max_length)
    counts, edges, _ = left.hist(lengths, bins=bins, color="tab:blue")
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("tokens per text (after truncation)")
    left.set_ylabel("texts")
    left.set_title(f"{len(lengths)} texts: p50 {percentile(lengths, 50)}, p99 {percentile(lengths, 99)} tokens")
    drawn: Series = {"text lengths": [[float(edge), float(count)] for edge, count in zip(edges, counts)]}
    ordered = sorted(lengths)
    texts_cdf = [[bound, sum(1 for n in ordered if n <= bound) / len(ordered)] for bound in _cdf_bounds(max_length)]
    right.plot(*zip(*texts_cdf), color="black", linestyle="--", label="the texts' own lengths")
    for entry in results["strategies"]:
        server = entry["server"]
        if not server or not server["batches"]:
            continue
        # Buckets above the maximum length hold nothing: no text is padded past it.
        histogram = [(bound, count) for bound, count in server["padded_length_histogram"] if bound < 2 * max_length]
        total = sum(count for _, count in server["padded_length_histogram"])
        cumulative, points = 0.0, []
        for bound, count in histogram:
            cumulative += count
            points.append([bound, cumulative / total])
        right.step([x for x, _ in points], [y for _, y in points], where="post", marker=".", label=entry["title"])
        drawn[f"padded batch length: {entry['title']}"] = points
    right.set_xscale("log", base=2)
    right.set_ylim(0, 1.02)
    right.set_xlabel("padded length of a batch (tokens; histogram bucket bounds)")
    right.set_ylabel("share of batches at or below")
    right.set_title("Padded batch lengths per strategy")
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    drawn["text length CDF"] = texts_cdf
    figure.suptitle("Text lengths and padded batch lengths")
    _save(figure, path)
    return drawn


def plot_memory(results: dict, path: Path) -> Series:
    strategies = results["strategies"]
    titles = [entry["title"] for entry in strategies]
    ready = [entry["rss_ready_mib"] for entry in strategies]
    peak = [entry["peak_rss_mib"] for entry in strategies]
    figure, axis = plt.subplots(figsize=(9, 4))
    positions = range(len(titles))
    axis.barh(positions, ready, color="tab:grey", label="RSS when ready")
    axis.barh(positions, [p - r for p, r in zip(peak, ready)], left=ready, color="tab:red", label="growth to the peak under load")
    for y, value in zip(positions, peak):
        axis.text(value, y, f" {value:.0f}", va="center", fontsize=8)
    axis.set_yticks(positions, titles)
    axis.invert_yaxis()
    axis.set_xlabel("MiB (peak RSS of the server process during saturation)")
    axis.set_xlim(0, max(peak) * 1.15)
    axis.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, frameon=False)
    figure.suptitle("Peak memory per strategy", y=0.99)
    _save(figure, path)
    return {"peak_rss_mib": [[i, value] for i, value in enumerate(peak)], "rss_ready_mib": [[i, v] for i, v in enumerate(ready)]}


def latency_by_length_loads(results: dict) -> list[dict]:
    """The service's load-curve points the latency-by-length plot shows: a moderate load and the heaviest below
    saturation."""
    curve = next(entry["load_curve"] for entry in results["strategies"] if entry["key"] == "service")
    below = [point for point in curve if point["fraction_of_saturation"] < 1 and point["latency_by_length"]]
    if not below:
        return [curve[0]]
    moderate = min(below, key=lambda point: abs(point["fraction_of_saturation"] - 0.5))
    heaviest = max(below, key=lambda point: point["fraction_of_saturation"])
    return [moderate] if moderate is heaviest else [moderate, heaviest]


def plot_latency_by_length(results: dict, path: Path) -> Series:
    points = latency_by_length_loads(results)
    classes = [name for name in LENGTH_CLASSES if any(name in point["latency_by_length"] for point in points)]
    figure, axis = plt.subplots(figsize=(9, 4))
    width = 0.8 / (2 * len(points))
    drawn: Series = {}
    offset = 0
    for load_index, point in enumerate(points):
        for name, hatch, alpha in (("p50_ms", "", 1.0), ("p99_ms", "//", 0.55)):
            label = f"{name[:3]} at {point['offered_rps']:.0f} requests/s ({point['fraction_of_saturation']:.0%} of saturation)"
            values = [[i, point["latency_by_length"][c][name]] for i, c in enumerate(classes) if c in point["latency_by_length"]]
            axis.bar(
                [i + (offset - len(points) + 0.5) * width for i, _ in values],
                [v for _, v in values],
                width,
                hatch=hatch,
                alpha=alpha,
                color=f"C{load_index}",
                label=label,
            )
            drawn[label] = values
            offset += 1
    axis.set_xticks(range(len(classes)), [f"{c} tokens" for c in classes])
    axis.set_yscale("log")
    axis.set_ylabel("ms, per request of one text")
    axis.legend(fontsize=7)
    figure.suptitle("Latency by text length: the service")
    _save(figure, path)
    return drawn


def _length_bins(max_length: int) -> list[float]:
    bins, edge = [1.0], 1.0
    while edge < max_length:
        edge = min(edge * 2**0.25, max_length)
        bins.append(edge)
    return bins


def _cdf_bounds(max_length: int) -> list[int]:
    bounds, bound = [], 8
    while bound < max_length:
        bounds.append(bound)
        bound *= 2
    return [*bounds, max_length]


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


PLOTS = {
    "throughput.png": plot_throughput,
    "latency_vs_load.png": plot_latency_against_load,
    "lengths.png": plot_lengths,
    "memory.png": plot_memory,
    "latency_by_length.png": plot_latency_by_length,
}


# --- report.md ---


def write_report(results: dict, out: Path) -> list[Path]:
    """Write every plot, plots.json, results.json and report.md to `out`; return the paths written."""
    drawn = {name: plot(results, out / name) for name, plot in PLOTS.items()}
    (out / "plots.json").write_text(json.dumps(drawn, indent=1))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(markdown(results))
    return [out / "report.md", *(out / name for name in PLOTS), out / "plots.json", out / "results.json"]


def markdown(results: dict) -> str:
    strategies = {entry["key"]: entry for entry in results["strategies"]}
    machine, lengths = results["machine"], results["texts"]["token_lengths"]
    fixed = strategies["fixed"]["texts_per_second"]
    ordered, steps = ladder_verdict(
        [(entry["title"], entry["texts_per_second"]) for entry in results["strategies"] if entry["key"] in ("fixed", "dynamic", "buckets", "service")]
    )
    lines = [
        "# What each batching strategy buys",
        "",
        f"Measured {results['started']} by `{results['command']}` in {results['seconds'] / 60:.1f} minutes.",
        "",
        "## Machine, versions, texts",
        "",
        f"- CPU: {machine['cpu']}, {machine['cpus']} logical CPUs, flags {', '.join(machine['cpu_flags']) or 'none of note'}; "
        f"{machine['memory_gib']} GiB; GPU: {machine['gpu'] or 'none'}.",
        f"- Load average at start {_load(machine['load_average'])}, at the end {_load(machine['load_average_after'])} "
        "(the load generator runs on the same cores; anything else running shows here).",
        f"- Python {machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}, commit {machine['commit']}.",
        f"- Model: `{results['model']}` (maximum length {results['max_length']} tokens).",
        f"- Texts: {results['texts']['source']}; tokens per text p50 {percentile(lengths, 50)}, p90 {percentile(lengths, 90)}, "
        f"p99 {percentile(lengths, 99)}, max {max(lengths)}.",
        f"- Load: saturation is {results['options']['repeats']} wrk runs of {results['options']['duration']:g} s with "
        f"{results['options']['concurrency']} keep-alive clients, one text per request; the latency curves are Poisson "
        f"arrivals for {results['options']['rate_duration']:g} s at each of "
        f"{', '.join(f'{f:g}' for f in results['options']['rate_fractions'])} x the server's own saturation rate. "
        f"Every server gets {results['options']['threads']} torch threads.",
        "",
        "## Strategies and settings",
        "",
        "| strategy | settings | precision, token budget |",
        "|---|---|---|",
    ]
    for entry in results["strategies"]:
        settings = (
            "`loadtest/plain_server.py` (fp32, one forward per text)"
            if entry["settings"] is None
            else (", ".join(f"`{k}={v}`" for k, v in entry["settings"].items()) or "the defaults (tuning on)")
        )
        budget = f"{entry['precision']}, {entry['max_batch_tokens']}" if entry["max_batch_tokens"] else entry["precision"]
        lines.append(f"| {entry['title']} | {settings} | {budget}{'; ' + entry['tuning'] if entry['tuning'] else ''} |")
    lines += [
        "",
        "Every service process also ran with `CLASSIFIER_REQUEST_TIMEOUT_MS=120000` (a closed loop sends only as fast "
        "as it is answered, so the slow rungs are measured, not refused), `CLASSIFIER_DRAIN_DELAY_SECONDS=0`"
        + "".join(f", `{setting}`" for setting in results["options"]["service_env"])
        + ".",
        "",
        "## At saturation",
        "",
        "| strategy | texts/s, median (range) | vs fixed padding | padding efficiency | texts per batch | peak RSS MiB (ready) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for entry in results["strategies"]:
        median, low, high = median_and_range(entry["texts_per_second"])
        ratio, ratio_low, ratio_high = ratio_and_range(entry["texts_per_second"], fixed)
        server = entry["server"]
        lines.append(
            f"| {entry['title']} | {median:.1f} ({low:.1f}-{high:.1f}) | {ratio:.2f}x ({ratio_low:.2f}-{ratio_high:.2f}) | "
            f"{server['padding_efficiency']:.3f} | {server['mean_batch_size']:.1f} | "
            if server
            else f"| {entry['title']} | {median:.1f} ({low:.1f}-{high:.1f}) | {ratio:.2f}x ({ratio_low:.2f}-{ratio_high:.2f}) | (no padding) | 1 | "
        )
        lines[-1] += f"{entry['peak_rss_mib']:.0f} ({entry['rss_ready_mib']:.0f}) |"
    lines += [
        "",
        "**The ladder** (expected: each step faster than the one before, fixed padding slowest):",
        "",
        *(f"- {step}" for step in steps),
        "",
        "Verdict: the measurements show the expected order."
        if ordered
        else "Verdict: **the measurements contradict the expected order** at the step(s) at or below 1.00x above.",
        "",
        _baselines_sentence(strategies),
        "",
        "![throughput and padding efficiency](throughput.png)",
        "",
        _throughput_sentence(results),
        "",
        "## Latency against offered load",
        "",
        "![latency against offered load](latency_vs_load.png)",
        "",
        "| server | offered requests/s | answered texts/s | p50 ms | p99 ms | failures |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key in CURVE_KEYS:
        for point in strategies[key]["load_curve"]:
            lines.append(
                f"| {strategies[key]['title']} | {point['offered_rps']:.1f} | {point['texts_per_second']:.1f} | "
                f"{_ms(point['p50_ms'])} | {_ms(point['p99_ms'])} | {point['failures']} |"
            )
    lines += ["", _knee_sentence(strategies), "", "## Text lengths and padded batch lengths", "", "![lengths](lengths.png)", ""]
    lines += [_lengths_sentence(results), "", "## Peak memory", "", "![peak memory](memory.png)", "", _memory_sentence(results)]
    lines += ["", "## Latency by text length", "", "![latency by length](latency_by_length.png)", ""]
    lines += [_by_length_sentence(results), "", "Client-side, the service's load curve, per length class (p50 / p99 ms):", ""]
    lines += _by_length_table(
        [(f"{p['offered_rps']:.0f} req/s ({p['fraction_of_saturation']:.0%})", p["latency_by_length"]) for p in strategies["service"]["load_curve"]]
    )
    lines += [
        "",
        "Server-side, `classifier_text_latency_seconds{length}` during the saturation runs (p50 / p99 ms, "
        "interpolated within histogram buckets as `histogram_quantile` does):",
        "",
    ]
    lines += _by_length_table([(entry["title"], entry["server"]["latency_by_length"]) for entry in results["strategies"] if entry["server"]])
    lines += ["", "Every number is in `results.json`; the data each plot draws is in `plots.json`.", ""]
    return "\n".join(lines)


def _by_length_table(rows: list[tuple[str, dict]]) -> list[str]:
    classes = [name for name in LENGTH_CLASSES if any(name in by_length for _, by_length in rows)]
    table = ["| | " + " | ".join(f"{c} tokens" for c in classes) + " |", "|---|" + "---:|" * len(classes)]
    for title, by_length in rows:
        cells = [f"{_ms(by_length[c]['p50_ms'])} / {_ms(by_length[c]['p99_ms'])}" if c in by_length else "" for c in classes]
        table.append(f"| {title} | " + " | ".join(cells) + " |")
    return table


def _throughput_sentence(results: dict) -> str:
    by_key = {entry["key"]: entry for entry in results["strategies"]}
    fastest = max(results["strategies"], key=lambda entry: statistics.median(entry["texts_per_second"]))
    slowest = min(results["strategies"], key=lambda entry: statistics.median(entry["texts_per_second"]))
    fixed_eff = by_key["fixed"]["server"]["padding_efficiency"]
    buckets_eff = by_key["buckets"]["server"]["padding_efficiency"]
    return (
        f"Texts per second at saturation per strategy (left) and the share of computed tokens that were real text "
        f"(right): {fastest['title']} is fastest at {statistics.median(fastest['texts_per_second']):.0f} texts/s, "
        f"{slowest['title']} slowest at {statistics.median(slowest['texts_per_second']):.0f}; fixed padding computes "
        f"{1 / max(fixed_eff, 1e-9):.0f} tokens per real one (efficiency {fixed_eff:.2f}), buckets {buckets_eff:.2f}."
    )


def _baselines_sentence(strategies: dict) -> str:
    off = statistics.median(strategies["batching_off"]["texts_per_second"])
    plain = statistics.median(strategies["plain"]["texts_per_second"])
    classic = {key: statistics.median(strategies[key]["texts_per_second"]) for key in ("fixed", "dynamic")}
    slower = [strategies[key]["title"] for key, value in classic.items() if value < off]
    verdict = (
        f"so on these texts batching in arrival order ({', '.join(slower)}) is slower than no batching at all: padding "
        "a batch to the maximum length, or to the longest text that arrived with it, costs more than batching saves"
        if slower
        else "so every batching rung beats no batching at all"
    )
    return (
        f"For reference, the service with batching off reaches {off:.0f} texts/s and the plain server {plain:.0f}, "
        f"{verdict}. Strategies run one after another, so ratios between them compare runs minutes apart and carry "
        "whatever else the machine did meanwhile (see the load average above); the ranges are those of each "
        "strategy's own back-to-back runs."
    )


def _knee_sentence(strategies: dict) -> str:
    parts = []
    for key in CURVE_KEYS:
        point = knee(strategies[key]["load_curve"])
        if point:
            parts.append(f"{strategies[key]['title']} up to about {point['offered_rps']:.0f} requests/s (p99 {_ms(point['p99_ms'])} ms)")
    return (
        "p50 and p99 latency against offered load, log scale: each curve stays flat until its server saturates, then "
        "climbs steeply (the knee). Keeping up (p99 within 3x its light-load p99, answering 95% of the offered rate): " + "; ".join(parts) + "."
    )


def _lengths_sentence(results: dict) -> str:
    lengths = results["texts"]["token_lengths"]
    return (
        f"Left, how long the texts are (log scales: most are short, p50 {percentile(lengths, 50)} tokens, with a tail to "
        f"{max(lengths)}); right, the share of batches padded to at most each length per strategy, against the texts' own "
        "length distribution (dashed): fixed padding pads every batch to the maximum, arrival-order batches are padded "
        "to the longest text that happened to arrive with them, buckets keep them close to the texts' own lengths."
    )


def _memory_sentence(results: dict) -> str:
    entries = results["strategies"]
    growth = {entry["key"]: entry["peak_rss_mib"] - entry["rss_ready_mib"] for entry in entries}
    return (
        "Peak resident memory of each server process while saturated (grey: when ready; red: growth under load). "
        "A batch's activations scale with texts x padded length: fixed padding grew "
        f"+{growth['fixed']:.0f} MiB, dynamic padding in arrival order +{growth['dynamic']:.0f}, buckets "
        f"+{growth['buckets']:.0f}, the tuned service +{growth['service']:.0f}, batching "
        f"off +{growth['batching_off']:.0f}; the plain server +{growth['plain']:.0f}, from forward passes running "
        "at once in its thread pool. On a GPU that growth is what runs out of memory first. "
        f"Scope of the peak: {entries[0]['peak_rss_scope']}."
    )


def _by_length_sentence(results: dict) -> str:
    points = latency_by_length_loads(results)
    heaviest = points[-1]["latency_by_length"]
    present = [name for name in LENGTH_CLASSES if name in heaviest]
    shortest, longest = present[0], present[-1]
    return (
        "The service's p50 and p99 latency per length class, one text per request, at "
        + " and ".join(f"{p['offered_rps']:.0f} requests/s" for p in points)
        + f": at the heavier load, texts of {shortest} tokens see p99 {_ms(heaviest[shortest]['p99_ms'])} ms, texts of "
        f"{longest} tokens {_ms(heaviest[longest]['p99_ms'])} ms. The same view is in `/metrics` as "
        "`classifier_text_latency_seconds{length}` and in the Grafana dashboard."
    )


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _load(load: list[float] | tuple[float, ...]) -> str:
    return " / ".join(f"{value:.1f}" for value in load)
