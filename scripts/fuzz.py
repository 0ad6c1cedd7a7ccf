"""Fuzz the package's entry points: N random hostile inputs (mask building, dataset records, LoRA key
conversion; tests/support/fuzz_cases.py) and the count of each outcome. Any exception type other than the
package's named errors (ValueError and subclasses) is unexpected and makes the exit status 1.

    .venv/bin/python scripts/fuzz.py [--cases 10000] [--seed 20251128]
"""

import argparse
import collections
import os
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=20251128)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    import conftest  # noqa: F401  (puts ComfyUI on sys.path and registers the package, as the tests do)
    import fuzz_cases
    from tiny_models import tiny_flux

    model = tiny_flux()
    counts = collections.Counter()
    unexpected = collections.OrderedDict()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        fuzz_cases.make_dataset_folder(folder)
        for index in range(args.cases):
            target = fuzz_cases.TARGETS[index % len(fuzz_cases.TARGETS)]
            error = fuzz_cases.run_one(target, fuzz_cases.case_rng(args.seed, index), folder, model)
            outcome = "ok" if error is None else type(error).__name__
            counts[(target, outcome)] += 1
            if error is not None and not isinstance(error, fuzz_cases.EXPECTED):
                unexpected.setdefault((target, outcome), (index, "".join(traceback.format_exception(error))))
    seconds = time.monotonic() - started
    print(f"{args.cases} cases, seed {args.seed}, {seconds:.1f} s")
    for target in fuzz_cases.TARGETS:
        row = {outcome: n for (t, outcome), n in sorted(counts.items()) if t == target}
        print(f"  {target:16s} " + ", ".join(f"{outcome} {n}" for outcome, n in row.items()))
    print(f"unexpected exception types: {len(unexpected)}")
    for (target, outcome), (index, trace) in unexpected.items():
        print(f"--- {target} {outcome} (first at case {index})\n{trace}")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
