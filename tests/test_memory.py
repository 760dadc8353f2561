"""The command line tunes glibc's malloc (exporter/memory.py): its mmap threshold is pinned, so
that large arrays freed at a rebuild leave no holes in the heap, and threads share one arena.
And the price book lets go of the catalogue's providers it does not price with, a snapshot
keeps its exposition gzipped only and compresses it without joining it, and PyYAML is loaded
only to read a YAML file."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric as Family
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from exporter.catalog import MetricSpec
from exporter.config import DEFAULT_PROVIDER_RULES
from exporter.exposition import Families, TextRenderer
from exporter.families import family_of
from exporter.memory import one_arena, pin_mmap_threshold
from exporter.snapshot import GZIP_LEVEL, Snapshot

# In a fresh process: start the command line (it pins, then --help exits), or not; free a large
# block (glibc then raises its threshold past 1 MiB, unless pinned); allocate eight blocks of
# 1 MiB; print how much the heap grew.
HEAP_GROWTH = """
import sys
from exporter import cli

def heap():
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            low, high = line.split()[0].split("-")
            return int(high, 16) - int(low, 16)
    return 0

if sys.argv[1] == "cli":
    try:
        cli.main(["--help"])
    except SystemExit:
        pass
big = bytearray(16 << 20)
del big
before = heap()
blocks = [bytearray(1 << 20) for _ in range(8)]
print(heap() - before)
"""


# In a fresh process: start the command line, or not; then four threads allocate at the same
# time; glibc's malloc_stats reports each arena on stderr.
ARENAS = """
import ctypes, sys, threading
from exporter import cli

if sys.argv[1] == "cli":
    try:
        cli.main(["--help"])
    except SystemExit:
        pass
together = threading.Barrier(4)

def work():
    blocks = [bytearray(4096) for _ in range(100)]
    together.wait()  # every thread alive and holding its blocks
    del blocks

threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
ctypes.CDLL(None).malloc_stats()
"""


# In a fresh process: make a price book of the default rules; print how many of the catalogue's
# providers are alive.
PROVIDERS = """
import gc
from genai_prices.types import Provider
from exporter.config import DEFAULT_PROVIDER_RULES
from exporter.prices import PriceBook

book = PriceBook(DEFAULT_PROVIDER_RULES, (), lambda provider: "other")
gc.collect()
print(sum(isinstance(o, Provider) for o in gc.get_objects()))
"""


# In a fresh process: load the settings as `serve` does, from the environment or from a config
# file too, with what a serving exporter imports; print whether PyYAML was loaded.
YAML_LOADED = """
import os
import sys
from pathlib import Path
from exporter import cli, service
from exporter.config import env_var, load_settings

config = Path(os.environ["CONFIG_FILE"]) if sys.argv[1] == "file" else None
load_settings(env={env_var("dsn"): "host=/nonexistent"}, config_file=config)
print("yaml" in sys.modules)
"""


def _run(script: str, mode: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_"))}
    return subprocess.run(
        [sys.executable, "-c", script, mode],
        env=environ | env,
        capture_output=True,
        text=True,
        check=True,
    )


def _heap_growth(mode: str, **env: str) -> int:
    return int(_run(HEAP_GROWTH, mode, **env).stdout.strip().splitlines()[-1])


def _arenas(mode: str, **env: str) -> int:
    return sum(line.startswith("Arena ") for line in _run(ARENAS, mode, **env).stderr.splitlines())


def test_an_exporter_configured_by_its_environment_never_loads_pyyaml(tmp_path: Path) -> None:
    config = tmp_path / "exporter.yml"
    config.write_text("interval_seconds: 15\n", encoding="utf-8")
    assert _run(YAML_LOADED, "env").stdout == "False\n"
    assert _run(YAML_LOADED, "file", CONFIG_FILE=str(config)).stdout == "True\n"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc")
def test_the_command_line_keeps_large_blocks_out_of_the_heap() -> None:
    assert _heap_growth("plain") >= 4 << 20  # glibc's own behaviour: into the heap
    assert _heap_growth("cli") < 1 << 20  # pinned: each in a mapping of its own
    # The operator's setting is left alone (here, the same value, set before start).
    assert _heap_growth("plain", MALLOC_MMAP_THRESHOLD_=str(128 * 1024)) < 1 << 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_stats")
def test_the_command_line_keeps_its_threads_to_one_arena() -> None:
    assert _arenas("plain") > 1  # glibc's own behaviour: an arena per thread
    assert _arenas("cli") == 1
    assert _arenas("plain", MALLOC_ARENA_MAX="2") == 2  # the operator's setting is left alone
    assert _arenas("cli", MALLOC_ARENA_MAX="2") == 2


def test_the_price_book_keeps_only_the_providers_its_rules_name() -> None:
    named = {rule.price_provider for rule in DEFAULT_PROVIDER_RULES} - {None}
    assert len(named) == 5
    assert int(_run(PROVIDERS, "plain").stdout) == len(named)  # not all 47 of the catalogue


def test_a_snapshot_served_gzipped_keeps_its_exposition_gzipped_only() -> None:
    spec = MetricSpec("scidex_test_usd_total", "counter", "a test", ("quest", "layer"))
    values: dict[tuple[str, ...], float] = {(f"q-{i}", f"l-{i % 5}"): i / 4 for i in range(3_000)}
    families = [family_of(spec, values)]
    text = generate_latest(Families(families))
    snapshot = Snapshot.of(families, renderer=TextRenderer())
    # What Prometheus asks for (OpenMetrics), and other scrapers (text), both gzipped.
    for openmetrics in (True, False):
        assert snapshot.body(openmetrics=openmetrics, compressed=True)
    held = sum(len(v) for v in vars(snapshot).values() if isinstance(v, bytes))
    assert held < len(text) / 4  # 168 kB of text: neither it nor OpenMetrics is held as is
    assert snapshot.body(openmetrics=False, compressed=False) == text  # made when asked


def _many_series() -> tuple[list[Family], bytes]:
    """30,000 series of one family, and their text as prometheus-client renders it (1.8 MB)."""
    spec = MetricSpec("scidex_test_usd_total", "counter", "a test: ünïcode", ("quest", "layer"))
    values: dict[tuple[str, ...], float] = {(f"q-é{i}", f"l-{i % 5}"): i / 4 for i in range(30_000)}
    families = [family_of(spec, values)]
    return families, generate_latest(Families(families))


def test_a_rendering_is_compressed_without_being_joined_whole() -> None:
    """A refresh's snapshot is gzipped from its rendering's pieces, a few hundred lines at a
    time, to the bytes ``gzip.compress`` makes of the whole text; neither the text nor its
    OpenMetrics is ever held whole (as a string, then as bytes) on the way."""
    families, text = _many_series()
    renderer = TextRenderer()
    Snapshot.of(families, renderer=renderer)  # the renderer keeps its lines from now on
    tracemalloc.start()
    try:
        snapshot = Snapshot.of(families, renderer=renderer, openmetrics=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < len(text)  # 1.8 MB of text: joined whole, as a string and as bytes, twice
    assert snapshot.text_gzip == gzip.compress(text, compresslevel=GZIP_LEVEL, mtime=0)
    assert snapshot.text == text
    assert snapshot.openmetrics == generate_openmetrics(Families(families))  # type: ignore[no-untyped-call]


def test_an_exposition_is_decompressed_into_one_buffer_of_its_length() -> None:
    """A scraper that does not take gzip gets the text (or OpenMetrics) decompressed, once a
    snapshot, into one buffer of its length: ``gzip.decompress`` allocated about three times
    the text at once (zlib's blocks, then their join)."""
    families, text = _many_series()
    snapshot = Snapshot.of(families, renderer=TextRenderer(), openmetrics=True)
    peaks = []
    for openmetrics in (False, True):
        tracemalloc.start()
        try:
            body = snapshot.body(openmetrics=openmetrics, compressed=False)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        peaks.append(peak / len(body))
    assert max(peaks) < 1.1, peaks
    assert snapshot.text == text
    assert snapshot.openmetrics == generate_openmetrics(Families(families))  # type: ignore[no-untyped-call]


@pytest.mark.parametrize(
    ("tune", "variable", "tunable"),
    [
        (pin_mmap_threshold, "MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold=1048576"),
        (one_arena, "MALLOC_ARENA_MAX", "glibc.malloc.arena_max=2"),
    ],
)
def test_the_operators_setting_is_left_alone(
    monkeypatch: pytest.MonkeyPatch, tune: Callable[[], bool], variable: str, tunable: str
) -> None:
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setenv(variable, "2")
    assert tune() is False
    monkeypatch.delenv(variable)
    monkeypatch.setenv("GLIBC_TUNABLES", tunable)
    assert tune() is False
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert tune() is (sys.platform.startswith("linux"))
