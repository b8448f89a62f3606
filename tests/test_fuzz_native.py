"""Coverage-guided fuzzing of the native core (csrc/) with libFuzzer, ASan and UBSan.

The harnesses (tests/fuzz/fuzz_*.c; what each one drives and checks is in
its header comment) are built by tests/fuzz/build.sh.  Here each one

- replays its corpus (tests/fuzz/corpus/<harness>/: the seeds from
  tests/fuzz/make_seeds.py, and every input that ever failed, kept as a
  regression test), which must run clean; and
- fuzzes for a bounded time (VB_FUZZ_SECONDS, default 20 s for the ring
  walker, half that for the others) from that corpus, which must find
  nothing.  An input it finds is left in the test's tmp directory: copy it
  to the corpus as crash-<name> once the bug is fixed.

Needs clang with libFuzzer (Debian 12: ``apt-get install -y clang``, which
brings clang-14 and libclang-rt-14-dev); without it these tests are skipped
and say so.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent / "fuzz"
REPO = FUZZ.parent.parent
CORPUS = FUZZ / "corpus"
HARNESSES = ["fuzz_ring", "fuzz_ranges"]
APT = "apt-get install -y clang  (Debian 12: clang-14 + libclang-rt-14-dev, which holds libFuzzer)"
SECONDS = float(os.environ.get("VB_FUZZ_SECONDS", "20"))
BUDGET = {"fuzz_ring": SECONDS, "fuzz_ranges": max(1.0, SECONDS / 2)}


def _sources_digest() -> str:
    h = hashlib.sha256()
    for path in sorted([*REPO.glob("csrc/*.[ch]"), *FUZZ.glob("*.[ch]"), FUZZ / "build.sh"]):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def fuzzers() -> dict[str, Path]:
    """The harnesses, built once per source state (tests/fuzz/build/<digest>/).
    FUZZ_CC names another clang than the one on PATH."""
    clang = os.environ.get("FUZZ_CC") or shutil.which("clang")
    if clang is None:
        pytest.skip(f"clang not found, so no libFuzzer: {APT}")
    probe_dir = FUZZ / "build"
    probe_dir.mkdir(exist_ok=True)
    probe = probe_dir / "probe.c"
    probe.write_text("#include <stdint.h>\n#include <stddef.h>\n"
                     "int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { (void)d; (void)n; return 0; }\n")
    result = subprocess.run([clang, "-fsanitize=fuzzer,address,undefined", str(probe), "-o", str(probe_dir / "probe")],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"{clang} cannot build a libFuzzer + ASan + UBSan binary ({result.stderr.strip()[-200:]}): {APT}")
    out = probe_dir / _sources_digest()
    if not all((out / h).exists() for h in _available()):
        result = subprocess.run(["bash", str(FUZZ / "build.sh"), str(out)], capture_output=True, text=True,
                                env={**os.environ, "FUZZ_CC": clang})
        assert result.returncode == 0, f"tests/fuzz/build.sh failed:\n{result.stdout}\n{result.stderr}"
        for old in probe_dir.iterdir():  # builds of earlier sources
            if old.is_dir() and old != out:
                shutil.rmtree(old, ignore_errors=True)
    return {h: out / h for h in _available()}


def _available() -> list[str]:
    """fuzz_ranges exists only once csrc/vb_core.h declares vb_vq_pop_ranges (build.sh decides alike)."""
    has_ranges = "vb_vq_pop_ranges" in (REPO / "csrc" / "vb_core.h").read_text()
    return [h for h in HARNESSES if h != "fuzz_ranges" or has_ranges]


def _binary(fuzzers: dict[str, Path], harness: str) -> Path:
    if harness not in fuzzers:
        pytest.skip(f"{harness}: csrc/vb_core.h does not declare vb_vq_pop_ranges yet")
    return fuzzers[harness]


def _stats(output: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"stat::(\w+):\s+(\d+)", output)}


@pytest.mark.parametrize("harness", HARNESSES)
def test_corpus_replays_clean(fuzzers, harness, tmp_path):
    """Every seed and every input that once failed runs clean (a plain regression test)."""
    binary = _binary(fuzzers, harness)
    corpus = CORPUS / harness
    inputs = sorted(p for p in corpus.iterdir() if p.is_file())
    assert inputs, f"{corpus} is empty: run tests/fuzz/make_seeds.py"
    result = subprocess.run([str(binary), "-runs=0", f"-artifact_prefix={tmp_path}/", str(corpus)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, f"{harness} fails on its corpus:\n{result.stderr[-4000:]}"
    assert "INITED" in result.stderr or "DONE" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("harness", HARNESSES)
def test_fuzz_finds_nothing(fuzzers, harness, tmp_path, capsys):
    binary = _binary(fuzzers, harness)
    work = tmp_path / "corpus"
    shutil.copytree(CORPUS / harness, work)
    seconds = BUDGET[harness]
    result = subprocess.run(
        [str(binary), f"-max_total_time={int(seconds)}", "-timeout=10", "-rss_limit_mb=2048", "-use_value_profile=1",
         "-print_final_stats=1", f"-artifact_prefix={tmp_path}/", str(work)],
        capture_output=True, text=True, timeout=seconds + 120, cwd=tmp_path,
    )
    findings = sorted(p.name for p in tmp_path.iterdir() if re.match(r"(crash|leak|timeout|oom)-", p.name))
    stats = _stats(result.stderr)
    corpus_size = sum(1 for _ in work.iterdir())
    with capsys.disabled():
        print(f"\n{harness}: {stats.get('number_of_executed_units', 0)} execs in {seconds:.0f} s "
              f"({stats.get('average_exec_per_sec', 0)}/s), corpus {corpus_size} inputs, findings {len(findings)}")
    assert result.returncode == 0 and not findings, (
        f"{harness} found {findings or 'a failure'} (inputs in {tmp_path}; replay: {binary} FILE, "
        f"VB_FUZZ_TRACE=1 for a trace):\n{result.stderr[-6000:]}"
    )
