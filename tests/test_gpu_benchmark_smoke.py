"""``benchmarks/gpu.py --smoke``: the GPU benchmark runs end to end on the CPU with tiny settings."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", os.path.join(ROOT, "benchmarks", "gpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_mode_prints_a_table_for_each_core_callback(capsys):
    bench = _load()
    assert bench.main(["--smoke", "--callbacks", "DeadNeuronMonitor", "FeatureEvolution"]) == 0
    out = capsys.readouterr().out
    assert "smoke settings, not a GPU measurement" in out
    rows = [line for line in out.splitlines() if line.startswith("| tiny b8 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["DeadNeuronMonitor", "FeatureEvolution"]
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert "failed" not in row
        assert float(cells[2]) > 0 and float(cells[3]) > 0 and cells[4].startswith("×")
    assert "FeatureEvolution: " in rows[1] and "steps (first" in rows[1]  # per-run and one-time cost
