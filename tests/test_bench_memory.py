"""bench/bench_memory.py at toy size on the CPU: the same code the GPU run uses (models built where they
compute, fp8 weights with bf16 compute, block swap chosen through the trainer), one configuration per
family run in this process (the script runs each in a child process; importing ComfyUI there is slow)."""

import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
