"""Feature terms' layer indices are range-checked against the depths a config gives (random-init
architectures, keep_layers, depth pruning, checkpoint metadata) before any model loads."""

from __future__ import annotations

import importlib.util
import os
import re

import pytest
from trainer_runs import tiny

from distill_jax import experiment
from distill_jax.experiment import depths
from distill_jax.train import objective, terms

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(path):
    spec = importlib.util.spec_from_file_location("config_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _feature(c, **losses):
    c.losses = dict(forward_kl=dict(), **losses)
    return c


def test_depths_come_from_the_config_without_loading_anything():
    c = tiny(prune=True)  # a 2-block student pruned to 1 block by the schedule
    assert depths.model_depths(c) == (1, 2)
    c = tiny(teacher="ema")
    c.student.config.num_layers = 4
    c.student.keep_layers = "every_other"
    assert depths.model_depths(c) == (2, 2)  # the EMA teacher is the student
    c.teacher.kind = "self"  # supplies no hidden states: not checked
    assert depths.model_depths(c)[1] is None
    c = tiny()
    c.teacher.init, c.teacher.config = "/no/such/teacher.gguf", None
    assert depths.model_depths(c) == (1, None)  # building the teacher raises its own error


@pytest.mark.parametrize(
    "losses,match",
    [
        (
            dict(hidden_mse=dict(pairs=((0, 1), (1, 0)))),
            "Loss term 'hidden_mse'.pairs[1]=(1, 0) is outside [0, 1) x [0, 2) (student "
            "blocks x teacher blocks); use block indices in that range.",
        ),
        (
            dict(hidden_cosine=dict(pairs=((0, 2),))),
            "Loss term 'hidden_cosine'.pairs[0]=(0, 2) is outside [0, 1) x [0, 2)",
        ),
        (
            dict(hidden_cosine=dict(pairs=((0, 1, 2),))),
            "Loss term 'hidden_cosine'.pairs[0]=(0, 1, 2): each pair is (student_layer, "
            "teacher_layer), two block indices in [0, 1) x [0, 2).",
        ),
        (
            dict(hidden_mse=dict(layers="all")),
            "Loss term 'hidden_mse'.layers='all' pairs equal blocks but the student has 1 and "
            "the teacher 2; use layers='uniform' or explicit pairs.",
        ),
        (
            dict(attention_relation=dict(student_layer=1, teacher_layer=0)),
            "Loss term 'attention_relation'.student_layer=1: the student has 1 blocks; use an "
            "index in [-1, 1) (negative counts from the last block).",
        ),
        (
            dict(value_relation=dict(student_layer=0, teacher_layer=-3)),
            "Loss term 'value_relation'.teacher_layer=-3: the teacher has 2 blocks; use an "
            "index in [-2, 2)",
        ),
    ],
)
def test_out_of_range_layers_fail_before_anything_loads(tmp_path, losses, match):
    c = _feature(tiny(), **losses)
    objective.loss_spec(c)  # the registry alone cannot know the depths
    with pytest.raises(ValueError, match=re.escape(match)):
        experiment.loss_spec(c)
    with pytest.raises(ValueError, match=re.escape(match)):
        experiment.train(c, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_in_range_layers_and_unknown_depths_pass():
    c = _feature(
        tiny(),
        hidden_mse=dict(pairs=((0, 1), (0, 0))),
        attention_relation=dict(student_layer=-1, teacher_layer=-2),
        value_relation=dict(student_layer=0, teacher_layer=1),
        hidden_cosine=dict(layers="uniform"),
    )
    experiment.loss_spec(c)
    # An unknown side is not range-checked, the known side still is.
    pairs = objective.loss_spec(c).feature_terms["hidden_mse"]
    terms.check_layers([pairs], None, None)
    with pytest.raises(ValueError, match=re.escape("pairs[0]=(0, 1) is outside [0, L_s) x [0, 1)")):
        terms.check_layers([pairs], None, 1)


def test_a_scheduled_depth_cut_is_the_depth_pairs_must_fit():
    """With prune_schedule cutting 2 blocks to 1, pair (1, 1) fits the start but not the end."""
    c = _feature(tiny(prune=True), hidden_mse=dict(pairs=((1, 1),)))
    with pytest.raises(ValueError, match=re.escape("pairs[0]=(1, 1) is outside [0, 1) x [0, 2)")):
        experiment.loss_spec(c)


def test_depths_read_from_checkpoint_metadata():
    """An asset's depth comes from its GGUF metadata (SmolLM2-135M: 30 blocks), keep_layers
    from the config: layerdrop keeps every other block (15)."""
    c = _load(os.path.join(ROOT, "configs", "smollm2_layerdrop_kd.py"))
    assert depths.model_depths(c) == (15, 30)
    c.losses = dict(hidden_mse=dict(pairs=((14, 29), (15, 29))))
    match = "pairs[1]=(15, 29) is outside [0, 15) x [0, 30)"
    with pytest.raises(ValueError, match=re.escape(match)):
        experiment.loss_spec(c)
