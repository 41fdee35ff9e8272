"""loadtest/report.py: a shortened report on the tiny model writes every file, and every plot has data; the pure
helpers (text files, histogram quantiles, the ladder's verdict, the knee) on made-up numbers."""

import json
import math
import os
import random
import shutil

import pytest

from loadtest.probe import histogram_quantile
from loadtest.report import main, per_bucket, read_texts
from loadtest.report_output import PLOTS, knee, ladder_verdict

STRATEGIES = ("fixed", "dynamic", "buckets", "service", "batching_off", "plain")
WORDS = [
    *("the", "a", "film", "movie", "was", "great", "good", "bad", "awful", "loved", "hated"),
    *("plot", "story", "actors", "acting", "boring", "long", "slow"),
]


def long_tailed_texts(count: int, seed: int = 0) -> list[str]:
    """Mostly short texts with a tail past the tiny model's 64 tokens, like real traffic."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(max(1, int(rng.paretovariate(1.2) * 3)))) for _ in range(count)]


def require_wrk() -> None:
    if shutil.which("wrk") is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("wrk is required under CI (apt-get install wrk)")
        pytest.skip("wrk is not installed")


@pytest.mark.integration  # starts six server processes and wrk
def test_a_shortened_report_writes_every_file_and_every_plot_has_data(tiny_model_dir, tmp_path, capsys):
    require_wrk()
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(long_tailed_texts(300)))
    out = tmp_path / "report"
    main(
        [
            "--out",
            str(out),
            "--model",
            str(tiny_model_dir),
            "--texts",
            str(texts),
            "--duration",
            "1",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--rate-duration",
            "1",
            "--rate-fractions",
            "0.3,1.2",
            "--concurrency",
            "8",
            "--threads",
            "1",
            "--service-env",
            "CLASSIFIER_TUNING_TIME_LIMIT=2",
        ]
    )
    printed = capsys.readouterr().out
    assert f"report written to {out}" in printed

    for name in ("report.md", "results.json", "plots.json", *PLOTS):
        assert (out / name).stat().st_size > 0, name
        assert str(out / name) in printed
    for name in PLOTS:
        assert (out / name).read_bytes().startswith(b"\x89PNG")

    plots = json.loads((out / "plots.json").read_text())
    assert set(plots) == set(PLOTS)
    for name, series in plots.items():
        assert series, f"{name} drew nothing"
        for label, points in series.items():
            assert points, f"{name}: {label} is empty"
            assert all(math.isfinite(x) and math.isfinite(y) and y >= 0 for x, y in points), (name, label)
    assert len(plots["latency_vs_load.png"]) == 6  # p50 and p99 of the service, batching off, the plain server
    assert any(y > 0 for _, y in plots["memory.png"]["peak_rss_mib"])

    results = json.loads((out / "results.json").read_text())
    by_key = {entry["key"]: entry for entry in results["strategies"]}
    assert tuple(by_key) == STRATEGIES
    for entry in by_key.values():
        assert len(entry["texts_per_second"]) == 2 and min(entry["texts_per_second"]) > 0, entry["key"]
        assert entry["peak_rss_mib"] >= entry["rss_ready_mib"] > 0
    assert by_key["fixed"]["server"]["padding_efficiency"] < by_key["buckets"]["server"]["padding_efficiency"]
    # Fixed padding pads every batch to the tiny model's maximum length.
    padded = [(bound, count) for bound, count in by_key["fixed"]["server"]["padded_length_histogram"] if count]
    assert padded and all(bound == 64 for bound, _ in padded)
    assert by_key["service"]["server"]["latency_by_length"]
    for key in ("service", "batching_off", "plain"):
        assert [point["fraction_of_saturation"] for point in by_key[key]["load_curve"]] == [0.3, 1.2]

    report = (out / "report.md").read_text()
    for name in PLOTS:
        assert f"]({name})" in report
    for entry in by_key.values():
        assert entry["title"] in report
    assert "AMD" in report or "Intel" in report or results["machine"]["cpu"] in report
    assert "Verdict:" in report


def test_texts_come_from_a_file_one_per_line_or_from_a_csv_column(tmp_path):
    lines = tmp_path / "texts.txt"
    lines.write_text("first text\n\n  second text  \n")
    assert read_texts(lines) == ["first text", "second text"]
    table = tmp_path / "texts.csv"
    table.write_text('id,review\n1,"good, really"\n2,"line one\nline two"\n3,\n')
    assert read_texts(table, "review") == ["good, really", "line one\nline two"]
    with pytest.raises(SystemExit, match="no column 'text'"):
        read_texts(table)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(SystemExit, match="no non-empty text"):
        read_texts(empty)


def test_histogram_quantiles_interpolate_within_buckets_as_prometheus_does():
    buckets = {0.1: 50.0, 0.2: 90.0, 0.5: 100.0, math.inf: 100.0}  # cumulative, as /metrics has them
    assert per_bucket(buckets) == [(0.1, 50.0), (0.2, 40.0), (0.5, 10.0), (math.inf, 0.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.15)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.2 + 0.3 * 0.9)
    assert histogram_quantile(0.5, {0.1: 0.0, math.inf: 0.0}) is None
    assert histogram_quantile(0.99, {0.1: 1.0, math.inf: 10.0}) == 0.1  # beyond the last bound: its bound


def test_the_ladder_verdict_says_when_a_step_is_not_faster():
    ordered, lines = ladder_verdict([("fixed", [10, 11]), ("dynamic", [30, 33]), ("buckets", [60, 66])])
    assert ordered and lines[0].startswith("fixed -> dynamic: **3.00x** (runs 2.73-3.30x)")
    ordered, lines = ladder_verdict([("fixed", [10, 11]), ("dynamic", [9, 12])])
    assert not ordered and "overlap" in lines[0]


def test_the_knee_is_the_heaviest_load_still_kept_up_with():
    def point(rate, p99, answered_rate):
        return {"offered_rps": rate, "p99_ms": p99, "texts_per_second": answered_rate, "sent": 100, "answered": 100}

    curve = [point(10, 20, 10), point(50, 25, 50), point(90, 55, 89), point(120, 900, 95)]
    assert knee(curve)["offered_rps"] == 90
