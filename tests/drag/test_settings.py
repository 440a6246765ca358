"""The drag settings table (jaxdrag.drag.settings): every setting declared once, and what is
generated from it — the methods' valid settings, the range checks, the command line's options and
help, the UI's fields."""

import dataclasses

import pytest

from jaxdrag.cli import build_parser
from jaxdrag.drag import methods
from jaxdrag.drag.loop import DragConfig, DragHypers
from jaxdrag.drag.settings import BY_NAME, SETTINGS
from jaxdrag.errors import SettingsError


def test_every_setting_is_declared_once_with_help():
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names))
    structural = {f.name for f in dataclasses.fields(DragConfig)} - {"sup_hw", "schedule", "host", "optimize_text",
                                                                      "use_clip"}
    assert set(names) == structural | set(DragHypers._fields)
    for s in SETTINGS:
        assert s.continuous == (s.name in DragHypers._fields), s.name
        assert len(s.help) > 20, s.name
        assert s.hosts or s.extra, s.name  # somebody reads it
        assert (s.kind == "choice") == bool(s.choices), s.name


def test_methods_read_what_the_table_says():
    assert methods.valid_settings("freedrag") == ("r_m", "max_iters", "block_steps", "background", "bg_reduction",
                                                  "stale_latent_grad", "latent_lr", "lam", "l_expected", "d_max")
    assert methods.valid_settings("clipdrag+dragtext")[-5:] == ("text_lam", "text_feature_block", "fusion",
                                                                "fuse_weight", "clip_coef")
    assert "text_feature_block" not in methods.valid_settings("gooddrag+dragtext")
    for m in methods.METHODS:  # each method's preset reads only its settings
        methods.resolve(m)
        assert set(methods.valid_settings(m)) <= set(BY_NAME)
    with pytest.raises(SettingsError, match=r"setting\(s\) not used by method 'gooddrag' \['max_iters'\]"):
        methods.resolve("gooddrag", max_iters=3)


@pytest.mark.parametrize("name,value,message", [
    ("r_m", -1, "setting r_m = -1"), ("max_iters", 0, "setting max_iters = 0"), ("max_iters", 2.5, "max_iters"),
    ("latent_lr", 0.0, "setting latent_lr = 0.0"), ("lam", -0.1, "setting lam = -0.1"),
    ("tracking", "bogus", "tracking must be 'nearest' or 'fast'")])
def test_ranges_come_from_the_table(name, value, message):
    with pytest.raises(SettingsError, match=message):
        methods.resolve("dragdiffusion", **{name: value})


def test_command_line_options_and_help_come_from_the_table():
    p = build_parser()
    edit = next(a for a in p._subparsers._group_actions[0].choices.values() if a.prog.endswith(" edit"))
    helps = {a.dest: a.help for a in edit._actions}
    for s in SETTINGS:
        assert helps[s.name].startswith(s.help), s.name
    assert "[paper | code | project | add | prograd]" in helps["fusion"]
    assert helps["lora_batch"]  # no option without help
    args = p.parse_args(["edit", "x.png", "--points", "1,1 2,2", "--out", "o", "--r-m", "2", "--latent-lr", "0.02",
                         "--stale-latent-grad", "true"])
    assert (args.r_m, args.latent_lr, args.stale_latent_grad) == (2, 0.02, True)


def test_ui_fields_are_the_labelled_settings():
    from jaxdrag.ui.settings import FIELDS

    assert [k for k, _ in FIELDS][2:] == [s.name for s in SETTINGS if s.label]
    assert dict(FIELDS)["fuse_weight"] == BY_NAME["fuse_weight"].label


def test_dragconfig_checks_with_the_table():
    from jaxdrag.drag.fusion import RULES

    assert BY_NAME["fusion"].choices == tuple(RULES)
    with pytest.raises(ValueError, match="tracking must be 'nearest' or 'fast', got 'x'"):
        DragConfig(tracking="x")
    with pytest.raises(ValueError, match=r"fusion must be one of \('paper'"):
        DragConfig(fusion="x")
    with pytest.raises(ValueError, match="max_iters must be ≥ 1, got 0"):
        DragConfig(max_iters=0)
    with pytest.raises(ValueError, match="max_step must be > 0, got 0.0"):
        DragConfig(max_step=0.0)
    assert DragConfig(r_m=0, end_step=0).r_m == 0


def test_lora_learning_rate_and_weight_decay_are_traced(tiny_pipe):
    """LoRAs with other learning rates or weight decays run the same compiled program, and the
    rate is honoured (other rates, other LoRAs)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdrag.pipeline import LoRASettings

    imgs = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)), jnp.float32)
    ctx = tiny_pipe.encode_prompt(["a", "b"])
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    out = {}
    for lr, wd in ((1e-3, 1e-2), (2e-3, 0.0)):
        before = {k for k in tiny_pipe.jit_cache if k[0] == "lora"}
        lora, losses = tiny_pipe.train_lora(imgs, ctx, keys, LoRASettings(steps=2, lr=lr, weight_decay=wd, chunk=2))
        out[lr] = [np.asarray(x) for x in jax.tree.leaves(lora)]
        if lr != 1e-3:
            assert {k for k in tiny_pipe.jit_cache if k[0] == "lora"} == before  # no new program
    diff = lambda a, b: max(float(np.abs(x - y).max()) for x, y in zip(out[a], out[b]))
    assert diff(1e-3, 2e-3) > 1e-6
