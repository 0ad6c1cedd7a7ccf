"""The recipe ablations: each variant really changes what the trainer does, and the paired comparison
against the baseline is computed over the same layouts."""

import pytest

from comfyui_eligen.lab import ablations, evaluate
from comfyui_eligen.toyworld import models

TINY = dict(steps=6, batch_size=4, learning_rate=1e-2, rank=8, warmup_steps=0, count=16, size=64)


@pytest.fixture(scope="module")
def toy():
    """The toy FLUX and TINY's training set, encoded once: no variant changes the training data."""
    model, clip, vae = models.load_toy_models("flux", "pretrained")
    return model, clip, vae, evaluate.training_samples(model, clip, vae, TINY["count"], 0, TINY["size"])


def train(toy, **overrides):
    model, clip, vae, samples = toy
    assert not {"count", "size"} & set(overrides), "a variant of the training data needs its own encoded set"
    lora, losses, _ = evaluate.train_lora(model, clip, vae, seed=0, samples=samples, **dict(TINY, **overrides))
    return lora, [loss for _, loss in losses]


def test_every_variant_changes_the_training(toy):
    base_lora, base_losses = train(toy)
    for name, (factor, overrides) in ablations.VARIANTS.items():
        if name == "baseline":
            continue
        lora, losses = train(toy, **{k: (min(v, 5) if k == "steps" else v) for k, v in overrides.items()})
        if "preset" in overrides:
            assert set(lora) != set(base_lora), name  # other layers wrapped
        elif "rank" in overrides:
            down = next(v for k, v in lora.items() if k.endswith("lora_down.weight"))
            assert down.shape[0] == overrides["rank"], name
        elif "steps" in overrides:
            assert len(losses) == min(overrides["steps"], 5), name
        else:  # timestep sampling, entity weight, entity dropout: another loss for the same seed and data
            assert losses != base_losses, name


def test_attention_preset_wraps_a_subset_of_the_toy_recipe(toy):
    attention, _ = train(toy, preset="attention")
    recipe, _ = train(toy)
    eligen, _ = train(toy, preset="eligen")
    assert set(attention) < set(recipe) < set(eligen)


def run(variant, seed, success):
    return {"variant": variant, "seed": seed, "success": success,
            "iou": [[0.9 if hit else 0.1 for hit in image] for image in success]}


def test_paired_difference_counts_entities_over_seeds_and_resamples_layouts_together():
    # two layouts (2 entities, then 1), two seeds
    runs = [run("baseline", 0, [[True, False], [False]]), run("baseline", 1, [[False, False], [True]]),
            run("rank_4", 0, [[True, True], [True]]), run("rank_4", 1, [[False, True], [True]])]
    mean, (low, high) = ablations.paired_difference(runs, "rank_4", [0, 1], samples=400)
    assert mean == pytest.approx((5 - 2) / 6)
    assert low <= mean <= high and high <= 1.0 and low >= 0.0  # the variant wins on every layout
    mean, (low, high) = ablations.paired_difference(runs, "rank_4", [0, 1], "iou", samples=400)
    assert mean == pytest.approx(0.8 * (5 - 2) / 6) and 0.0 <= low <= mean + 1e-12 and mean <= high + 1e-12 <= 0.8
    same = [run("baseline", 0, [[True], [False]]), run("steps_100", 0, [[True], [False]])]
    assert ablations.paired_difference(same, "steps_100", [0], samples=100) == (0.0, (0.0, 0.0))


def test_table_lists_only_variants_done_for_every_seed():
    summary = {"mean_iou": 0.5, "success_rate": 0.5}
    runs = [dict(run("baseline", s, [[True, False]]), summary=summary, train_seconds=1.0) for s in (0, 1)]
    runs.append(dict(run("rank_4", 0, [[True, True]]), summary=summary, train_seconds=1.0))
    text = ablations.table(runs, [0, 1])
    assert "| baseline |" in text and "rank_4" not in text


def test_out_file_of_other_settings_is_refused_not_overwritten(tmp_path):
    out = tmp_path / "ablations.json"
    ablations.main(["--size", "64", "--layouts", "1", "--seeds", "0", "--steps", "1", "--batch-size", "1", "--count", "2",
                    "--sample-steps", "1", "--variants", "baseline", "--out", str(out)])
    before = out.read_bytes()
    with pytest.raises(SystemExit, match="holds runs whose train"):
        ablations.main(["--size", "64", "--layouts", "1", "--seeds", "0", "--steps", "2", "--batch-size", "1",
                        "--count", "2", "--out", str(out)])
    assert out.read_bytes() == before
    with pytest.raises(SystemExit):  # argparse names the option and the rule
        ablations.main(["--size", "100"])
