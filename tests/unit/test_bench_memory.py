"""bench/bench_memory.py at toy size on the CPU: the same code the GPU run uses (models built where they
compute, fp8 weights with bf16 compute, block swap chosen through the trainer), one configuration per
family run in this process (the script runs each in a child process; importing ComfyUI there is slow)."""

import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_memory", os.path.join(REPO, "bench", "bench_memory.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family, config", [("flux", "fp8_swap"), ("qwen_image", "fp8_swap"), ("flux", "bf16")])
def test_bench_memory_child_at_toy_size(capsys, family, config):
    bench = bench_module()
    opts = bench.parser().parse_args(["--device", "cpu", "--tiny", "--steps", "2", "--images", "1",
                                      "--prompt-tokens", "6", "--entity-tokens", "3", "--size", "32",
                                      "--family-config", f"{family}:{config}"])
    bench.child(opts)
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    assert "error" not in result, result
    assert result["seconds_per_step"] > 0 and result["tries"][-1]["ok"]
    if config == "fp8_swap":
        assert "2 of 4 blocks kept in CPU memory" in result["plan"][0]
    else:
        assert result["plan"] is None


def test_bench_memory_refuses_unknown_configs():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench_memory.py"), "--device", "cpu",
                           "--configs", "fp8,fp4"], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "unknown configs ['fp4']" in done.stderr


def test_plan_table_from_the_trainers_estimate():
    """--plan-only: the trainer's own choice per budget, on meta tensors (no memory, no compute)."""
    bench = bench_module()
    opts = bench.parser().parse_args(["--device", "cpu", "--tiny", "--size", "32", "--prompt-tokens", "6",
                                      "--entity-tokens", "3", "--plan-only"])
    table = bench.plan_table(opts, budgets=(1e-4, 0.01, 1.0))
    assert set(table) == {"flux bf16", "flux fp8", "qwen_image bf16", "qwen_image fp8"}
    for row in table.values():
        swapped = [int(row[key]["blocks_swapped"].split("/")[0]) for key in ("0.0001GB", "0.01GB", "1GB")]
        assert swapped == sorted(swapped, reverse=True)  # a larger budget never swaps more
        assert swapped[0] == 4 and not row["0.0001GB"]["fits"] and swapped[-1] == 0 and row["1GB"]["fits"]
