"""UNet parity with diffusers' PyTorch UNet2DConditionModel on identical random weights, loaded
through our loader from the saved diffusers folder (fp32, highest matmul precision)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers import nchw, nhwc, rel_err, torch_unet  # noqa: E402
from jaxdrag import weights  # noqa: E402
from jaxdrag.models.lora import import_peft  # noqa: E402

TOL = 1e-4

CONFIGS = {
    # SD-1.5 block structure, narrow
    "sd15like": dict(block_out_channels=(32, 48, 64, 64), layers_per_block=2, norm_num_groups=8,
                     attention_head_dim=4, cross_attention_dim=24),
    # odd channel and head widths (groups of 3, heads of width 11/15/21), 1 layer per block
    "odd": dict(block_out_channels=(33, 45, 63, 63), layers_per_block=1, norm_num_groups=3,
                attention_head_dim=3, cross_attention_dim=17),
    # linear projections, per-block head counts
    "linear": dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8,
                   attention_head_dim=(2, 2, 4, 4), cross_attention_dim=16, use_linear_projection=True),
}
# (B, h, w): square, non-square, odd sizes that need diffusers' upsample-size forwarding
SHAPES = {"sd15like": (2, 16, 16), "odd": (1, 10, 14), "linear": (2, 12, 20)}


def _setup(name, tmp_path, lora_rank=0):
    cfg = dict(CONFIGS[name], down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, sample_size=16)
    tu = torch_unet(seed=len(name), **cfg)
    tu.save_pretrained(tmp_path / "unet", safe_serialization=True)
    comp = weights.load_diffusers_unet(tmp_path / "unet", dtype=jnp.float32, lora_rank=lora_rank)
    b, h, w = SHAPES[name]
    rs = np.random.RandomState(0)
    x = rs.randn(b, h, w, 4).astype(np.float32)
    ctx = rs.randn(b, 7, cfg["cross_attention_dim"]).astype(np.float32)
    t = np.array([981, 21][:b])
    return tu, comp, x, ctx, t


def _torch_run(tu, x, ctx, t, mid_override=None):
    taps = {}
    hooks = [blk.register_forward_hook(lambda m, i, o, k=k: taps.__setitem__(k, o))
             for k, blk in enumerate(tu.up_blocks)]

    def mid_hook(m, i, o):
        taps["mid"] = o
        return nchw(mid_override) if mid_override is not None else None

    hooks.append(tu.mid_block.register_forward_hook(mid_hook))
    with torch.no_grad():
        eps = tu(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample
    for hk in hooks:
        hk.remove()
    return nhwc(eps), [nhwc(taps[k]) for k in range(len(tu.up_blocks))], nhwc(taps["mid"])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_eps_and_every_tap(name, tmp_path):
    tu, comp, x, ctx, t = _setup(name, tmp_path)
    with jax.default_matmul_precision("highest"):
        eps, taps = jax.jit(lambda p, x, t, c: comp.module(params=p)(x, t, c))(comp.params, x, t, ctx)
    ref_eps, ref_up, ref_mid = _torch_run(tu, x, ctx, t)
    assert eps.dtype == jnp.float32 and eps.shape == x.shape
    assert rel_err(eps, ref_eps) < TOL
    assert rel_err(taps["mid"], ref_mid) < TOL
    for k, (o, r) in enumerate(zip(taps["up"], ref_up)):
        assert o.shape == r.shape, k
        assert rel_err(o, r) < TOL, f"up_blocks[{k}]"


def test_mid_override(tmp_path):
    tu, comp, x, ctx, t = _setup("sd15like", tmp_path)
    _, _, ref_mid = _torch_run(tu, x, ctx, t)
    override = np.random.RandomState(5).randn(*ref_mid.shape).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        eps, taps = comp.module()(x, t, ctx, mid_override=jnp.asarray(override))
    ref_eps, _, _ = _torch_run(tu, x, ctx, t, mid_override=override)
    assert rel_err(eps, ref_eps) < TOL
    assert rel_err(taps["mid"], ref_mid) < TOL  # the tap is the computed mid output


def test_lora_matches_peft(tmp_path):
    """Our LoRA (W x + B(A x) on to_q/k/v/out.0 of every attention) vs a peft LoRA on diffusers."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model_state_dict

    tu, comp, x, ctx, t = _setup("sd15like", tmp_path, lora_rank=4)
    tu.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                              target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in tu.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    sd = {k.replace(".default", ""): v.numpy() for k, v in get_peft_model_state_dict(tu).items()}
    lora = import_peft(comp.lora, sd, prefix="")
    n_lora = sum(1 for k in sd)
    assert n_lora == len(jax.tree.leaves(comp.lora)) > 0
    with jax.default_matmul_precision("highest"):
        eps, _ = comp.module(lora=lora)(x, t, ctx)
        eps_base, _ = comp.module()(x, t, ctx)
    ref_eps, _, _ = _torch_run(tu, x, ctx, t)
    assert rel_err(eps, ref_eps) < TOL
    assert rel_err(eps_base, ref_eps) > 1e-2  # the LoRA matters


class _ReferenceProcessor:
    """Mutual self-attention written from the formula: out_b = softmax(Q_b K_0ᵀ/√d) V_0."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 **kw):
        b, n, _ = hidden_states.shape
        h = attn.heads
        q = attn.to_q(hidden_states).view(b, n, h, -1).transpose(1, 2)
        k0 = attn.to_k(hidden_states)[:1].view(1, n, h, -1).transpose(1, 2)
        v0 = attn.to_v(hidden_states)[:1].view(1, n, h, -1).transpose(1, 2)
        w = torch.softmax(q @ k0.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        out = (w @ v0).transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


def test_reference_attention(tmp_path):
    """The last six decoder self-attentions (up_blocks[2] and [3] with 3 attentions each, as in
    SD-1.5's MasaCtrl layers 10–15) use row 0's keys/values; earlier ones and row 0 are untouched."""
    tu, comp, x, ctx, t = _setup("sd15like", tmp_path)
    from diffusers.models.attention_processor import AttnProcessor

    procs = {}
    for name in tu.attn_processors:
        ref = name.startswith(("up_blocks.2.", "up_blocks.3.")) and ".attn1." in name
        procs[name] = _ReferenceProcessor() if ref else AttnProcessor()
    assert sum(isinstance(p, _ReferenceProcessor) for p in procs.values()) == 6
    tu.set_attn_processor(procs)
    with jax.default_matmul_precision("highest"):
        eps, _ = comp.module()(x, t, ctx, reference_attention=True)
        plain, _ = comp.module()(x, t, ctx)
    ref_eps, _, _ = _torch_run(tu, x, ctx, t)
    assert rel_err(eps, ref_eps) < TOL
    # row 0 attends to itself either way; row 1 changes
    assert rel_err(eps[0], plain[0]) < TOL
    assert rel_err(eps[1], plain[1]) > 1e-3


@pytest.mark.slow  # remat numerics of the UNet; ≈ 80 s on 2 cores (run with -m slow)
def test_remat_policies_change_nothing_numerically_and_save_memory(tmp_path):
    """Every remat policy gives the same ε and LoRA gradients, and the residuals the backward
    keeps shrink from "off" to "dots" (matmul/conv/attention outputs) to "blocks" (block inputs).
    Residual bytes, not XLA:CPU's ``memory_analysis``: the CPU scheduler places recomputation
    early, so its temp size does not fall with remat (it does on GPU, whose scheduler is
    memory-aware)."""
    from jax._src.ad_checkpoint import saved_residuals

    from jaxdrag.models.lora import init_lora

    tu, comp, x, ctx, t = _setup("sd15like", tmp_path, lora_rank=4)
    lora = init_lora(comp.lora, jax.random.PRNGKey(0))

    def loss(lo, remat):
        return jnp.mean(comp.module(lora=lo)(x, t, ctx, remat=remat)[0] ** 2)

    kept = {}
    with jax.default_matmul_precision("highest"):
        ref = None
        for policy in ("off", "dots", "blocks"):
            res = saved_residuals(lambda lo, p=policy: loss(lo, p), lora)
            kept[policy] = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a, _ in res)
            out = jax.jit(jax.value_and_grad(lambda lo, p=policy: loss(lo, p)))(lora)
            if ref is None:
                ref = out
                continue
            assert abs(float(ref[0]) - float(out[0])) < 1e-6
            for ga, gb in zip(jax.tree.leaves(ref[1]), jax.tree.leaves(out[1])):
                np.testing.assert_allclose(ga, gb, atol=1e-6 * max(1.0, float(jnp.abs(ga).max())))
    assert kept["blocks"] < 0.7 * kept["dots"] and kept["dots"] < 0.7 * kept["off"], kept


def test_reference_attention_layers_by_up_block():
    """MasaCtrl's layers 10–15 of SD-1.5 are the self-attentions of up_blocks[2] and [3] (6 blocks);
    narrower configs take the same two decoder levels (not the last six blocks wherever they are)."""
    from flax import nnx

    from jaxdrag.models.unet import SD15_UNET, UNet2DConditionModel
    from jaxdrag.tiny import TINY_UNET
    from jaxdrag.toy.models import UNET as TOY_UNET

    for cfg, n_ref in ((SD15_UNET, 6), (TINY_UNET, 4), (TOY_UNET, 4)):
        m = nnx.eval_shape(lambda c=cfg: UNet2DConditionModel(c))
        starts = m.reference_starts
        assert starts[:2] == (1 << 30, 1 << 30) and starts[2:] == (0, 0)
        assert sum(len(b.attentions) for b in list(m.up_blocks)[2:]) == n_ref
