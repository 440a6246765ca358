"""Every host's drag loop on a masked canvas (the tiny pipeline's UNet, and its VAE and CLIP for
CLIPDrag): two edits of different odd latent sizes padded into one batch give each edit's
unpadded run — the same iterations and handle trajectory, the latent within 1e-4 — however loud
the padding."""

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdrag.drag import DragHypers, make_runner, resolve

LAT = [(13, 10), (11, 14)]        # two latent sizes (odd at every UNet level), in a 16×16 canvas
CANVAS = (16, 16)
# per edit: handles and targets in supervision px (h_s, w_s) = 4·latent; one handle at the border
POINTS = [
    (np.array([[50.0, 20.0], [10.0, 30.0]]), np.array([[40.0, 24.0], [16.0, 38.0]])),
    (np.array([[20.0, 55.0], [30.0, 12.0]]), np.array([[26.0, 47.0], [38.0, 18.0]])),
]
SHORT = {"max_iters": 6}  # a few iterations of each host
OVERRIDES = {"dragdiffusion": SHORT, "dragtext": SHORT, "clipdrag": SHORT, "dragnoise": SHORT,
             "gooddrag": {"drag_end_step": 2, "track_per_step": 2}, "freedrag": {**SHORT, "block_steps": 2}}


def _edit(i, rs):
    h, w = LAT[i]
    z = rs.randn(h, w, 4).astype(np.float32)
    keep = np.zeros((h, w, 1), np.float32)
    keep[: h // 2] = 1.0  # a drawn mask: the upper half must stay
    return z, keep


def _run(pipe, method, zs, keeps, points, sup_hw, sizes):
    cfg, hyp = resolve(method, **OVERRIDES[method.split("+")[0]])
    cfg = replace(cfg, sup_hw=sup_hw)
    prep, loop = make_runner(pipe.drag_networks(), cfg, donate=False)
    b = len(zs)
    shared = pipe.shared_params(cfg.use_clip)
    lora = jax.tree.map(lambda s: jnp.zeros((b,) + s.shape, jnp.float32), pipe.sd.unet.lora)
    c0 = pipe.encode_prompt(["a red disc"] * b)
    et = pipe.clip_text_embeds(["a red disc moved"] * b) if cfg.use_clip else jnp.zeros((b, 1), jnp.float32)
    hy = DragHypers(*(jnp.full((b,), hyp[k], jnp.float32) for k in DragHypers._fields))
    args = (shared, lora, jnp.asarray(np.stack(zs)), c0,
            jnp.asarray(np.stack([p[0] for p in points]), jnp.float32),
            jnp.asarray(np.stack([p[1] for p in points]), jnp.float32),
            jnp.ones((b, 2), bool), jnp.asarray(np.stack(keeps)), jnp.ones((b, 77), jnp.float32), et,
            jnp.full((b,), 601, jnp.int32), hy)
    if sizes is not None:
        args = args + (jnp.asarray(sizes, jnp.int32),)
    inp, st = prep(*args)
    return jax.tree.map(np.asarray, loop(shared, lora, inp, st))


def _pad(a, shape, fill):
    """``a`` at the top left of ``shape``, the rest ``fill`` (an array of that shape, or 0)."""
    out = np.broadcast_to(np.float32(0) if np.isscalar(fill) else fill, shape).astype(np.float32).copy()
    out[: a.shape[0], : a.shape[1]] = a
    return out


# ≈ 45–85 s each on 2 cores (three loop programs): the DragDiffusion loop with DragText in the suite,
# GoodDrag, CLIPDrag, DragNoise and FreeDrag with -m slow
SLOW = pytest.mark.slow


@pytest.mark.parametrize("method", ["dragtext", pytest.param("gooddrag", marks=SLOW), pytest.param("clipdrag", marks=SLOW),
                                    pytest.param("dragnoise", marks=SLOW), pytest.param("freedrag", marks=SLOW)])
def test_drag_loop_on_a_canvas_equals_each_edit_alone(tiny_pipe, method):
    rs = np.random.RandomState(0)
    edits = [_edit(i, rs) for i in range(2)]
    sizes = [(h, w, 4 * h, 4 * w) for h, w in LAT]
    noise = 20.0 * rs.randn(*CANVAS, 4).astype(np.float32)  # the padding of the latents: loud
    canvas = _run(tiny_pipe, method, [_pad(z, CANVAS + (4,), noise) for z, _ in edits],
                  [_pad(k, CANVAS + (1,), 0) for _, k in edits], POINTS, (4 * CANVAS[0], 4 * CANVAS[1]), sizes)
    for i, (z, keep) in enumerate(edits):
        h, w = LAT[i]
        alone = _run(tiny_pipe, method, [z], [keep], [POINTS[i]], (4 * h, 4 * w), None)
        assert int(canvas.it[i]) == int(alone.it[0]) > 0, method
        np.testing.assert_array_equal(canvas.handles[i], alone.handles[0])
        np.testing.assert_array_equal(canvas.traj[i], alone.traj[0])
        ref = alone.z[0]
        var = canvas.z[i][: ref.shape[0], : ref.shape[1]]  # the latent, or DragNoise's bottleneck
        err = float(np.max(np.abs(var - ref)) / max(1.0, float(np.max(np.abs(ref)))))
        assert err < 1e-4, (method, err)
