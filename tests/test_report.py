"""benchmarks/report.py: the generated benchmark tables match the committed JSON, and the profile table renders."""


import pytest
from scripts import load_script


@pytest.fixture(scope="module")
def report():
    return load_script("benchmarks/report.py")


def test_committed_pages_are_up_to_date_with_the_results(report):
    assert report.main(["--check"]) == 0


def test_profile_table_lists_the_top_operators_in_order(report):
    data = {
        "env": {"gpu": "GPU", "torch": "t", "diffusers": "d", "peft": "p", "commit": "abc", "date": "now"},
        "profile": [
            {"kernels_per_step": 1234.0},
            {"name": "aten::conv2d", "cuda_ms_per_step": 40.0, "calls_per_step": 10.0, "share": 0.4},
            {"name": "a|b", "cuda_ms_per_step": 5.5, "calls_per_step": 2.0, "share": 0.055},
        ],
    }
    table = report.profile_table(data, rows=5)
    assert "1,234 CUDA kernels a step" in table
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert rows == ["| `aten::conv2d` | 40.0 | 10 | 40.0 % |", "| `a/b` | 5.5 | 2 | 5.5 % |"]
