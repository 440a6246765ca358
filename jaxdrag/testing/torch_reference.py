"""The references' PyTorch statements, shared by the parity tests and the benchmarks (requires torch;
nothing in jaxdrag imports this module).

1. **On diffusers models** (the benchmarks' side by side, ``benchmarks/bench_steps.py``,
   ``bench_edit.py``): DragDiffusion / DragText structured as the reference code is (a Python loop,
   autograd, one optimiser step per iteration, fp16 autocast with a GradScaler on GPU). Everything
   follows ALGORITHMS.md §1–§3 as the reference scripts do it: the LoRA finetune re-encodes the batch
   through the VAE every step (as released), the drag step computes the motion loss with per-pair
   clipped slices and the four-slice bilinear patch, DragText takes two backward passes, the final
   denoise swaps in mutual self-attention for the last six decoder self-attentions.
2. **On the small stand-in networks of ``standins``** (``tests/drag/test_drag_step_vs_torch.py``,
   ``tests/drag/test_hosts_vs_torch.py``): their PyTorch forward, and the reference loops written from
   ALGORITHMS.md §2–§7 in the reference code's structure:
   DragDiffusion / DragText / CLIPDrag (``TorchRef``), GoodDrag (``torch_gooddrag``), FreeDrag
   (``torch_freedrag``), DragNoise (``TorchNoise``).
3. **The evaluation scripts** (``tests/eval/test_eval_parity.py``, ``benchmarks/bench_eval.py``):
   DragBench's DIFT feature extraction and point matching, LPIPS's import without torchvision.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from ..schedule import DDIM
from .standins import H0, SUP, T_STAR, TG, TOKEN_P, standin_weights

# ============================================================================ 1. diffusers models


def autocast(device):
    return torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()


def alphas(device):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1 - betas, 0).to(device)


class FeatureUNet:
    """UNet forward returning (ε, up_blocks[2] output), like DragDiffusion's forward_unet_features."""

    def __init__(self, unet):
        self.unet = unet
        self._f = None
        unet.up_blocks[2].register_forward_hook(lambda m, i, o: setattr(self, "_f", o))

    def __call__(self, z, t, c):
        eps = self.unet(z, t, encoder_hidden_states=c).sample
        return eps, self._f


def interpolate_feature_patch(feat, y1, y2, x1, x2):
    x1f, y1f = torch.floor(x1).long(), torch.floor(y1).long()
    x1c, y1c = x1f + 1, y1f + 1
    dx, dy = torch.floor(x2).long() - x1f, torch.floor(y2).long() - y1f
    wa = (x1c.float() - x1) * (y1c.float() - y1)
    wb = (x1c.float() - x1) * (y1 - y1f.float())
    wc = (x1 - x1f.float()) * (y1c.float() - y1)
    wd = (x1 - x1f.float()) * (y1 - y1f.float())
    return (feat[:, :, y1f:y1f + dy, x1f:x1f + dx] * wa + feat[:, :, y1c:y1c + dy, x1f:x1f + dx] * wb
            + feat[:, :, y1f:y1f + dy, x1c:x1c + dx] * wc + feat[:, :, y1c:y1c + dy, x1c:x1c + dx] * wd)


class DragTextReference:
    """DragDiffusion + DragText latent/text optimisation (r1 1, r2 3, λ 0.1, lr 0.01 / 0.004,
    λ_text 0.1), one UNet forward and two backward passes per iteration."""

    def __init__(self, unet, z, c, handles, targets, mask_lat, sup_hw, t=681, n_prompt_tokens=8,
                 r_m=1, r_p=3, lam=0.1, lr=0.01, text_lr=0.004, text_lam=0.1):
        self.net = FeatureUNet(unet)
        self.dev = z.device
        self.ac = alphas(self.dev)
        self.t, self.sup_hw = t, sup_hw
        self.r_m, self.r_p, self.lam, self.text_lam, self.P = r_m, r_p, lam, text_lam, n_prompt_tokens
        self.z = z.clone().float().requires_grad_(True)
        self.c0 = c.float()
        self.c = c.clone().float().requires_grad_(True)
        self.h = handles.clone().float().to(self.dev)
        self.h0 = self.h.clone()
        self.tg = targets.float().to(self.dev)
        self.m = mask_lat.to(self.dev)
        self.opt_z = torch.optim.Adam([self.z], lr=lr)
        self.opt_c = torch.optim.Adam([self.c], lr=text_lr)
        self.scaler = torch.amp.GradScaler("cuda") if self.dev.type == "cuda" else None
        with torch.no_grad(), autocast(self.dev):
            eps, f = self.net(self.z, t, self.c)
            self.F0 = F.interpolate(f.float(), sup_hw, mode="bilinear")
            self.phi0 = self.phi(self.z, eps.float())
        self.k = 0

    def phi(self, z, eps):
        a, ap = self.ac[self.t], self.ac[self.t - 20]
        x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
        return ap.sqrt() * x0 + (1 - ap).sqrt() * eps

    def ms_loss(self, f):
        loss, n = 0.0, 0
        hs, ws = self.sup_hw
        for i in range(len(self.h)):
            pi, ti = self.h[i], self.tg[i]
            if (ti - pi).norm() < 2.0:
                continue
            n += 1
            di = (ti - pi) / (ti - pi).norm()
            r1, r2 = max(0, int(pi[0]) - self.r_m), min(hs, int(pi[0]) + self.r_m + 1)
            c1, c2 = max(0, int(pi[1]) - self.r_m), min(ws, int(pi[1]) + self.r_m + 1)
            a = f[:, :, r1:r2, c1:c2].detach()
            b = interpolate_feature_patch(f, r1 + di[0], r2 + di[0], c1 + di[1], c2 + di[1])
            loss = loss + (2 * self.r_m + 1) ** 2 * F.l1_loss(a, b)
        return loss, n

    @torch.no_grad()
    def track(self, f):
        hs, ws = self.sup_hw
        for i in range(len(self.h)):
            q, pi = self.h0[i], self.h[i]
            f0 = self.F0[0, :, int(q[0]), int(q[1])]
            r1, r2 = max(0, int(pi[0]) - self.r_p), min(hs, int(pi[0]) + self.r_p + 1)
            c1, c2 = max(0, int(pi[1]) - self.r_p), min(ws, int(pi[1]) + self.r_p + 1)
            dist = (f0[:, None, None] - f[0, :, r1:r2, c1:c2]).abs().sum(0)
            row, col = divmod(int(dist.argmin()), dist.shape[-1])
            self.h[i, 0], self.h[i, 1] = r1 + row, c1 + col

    def step(self) -> bool:
        with autocast(self.dev):
            # on GPU autocast's fp16 cast gives the UNet a copy of z; clone() does the same on CPU so
            # the in-place latent step below does not invalidate tensors saved for the text backward
            eps, f = self.net(self.z.clone(), self.t, self.c)
            f = F.interpolate(f, self.sup_hw, mode="bilinear")
        f, eps = f.float(), eps.float()
        if self.k > 0:
            self.track(f)
        self.k += 1
        if all((self.tg[i] - self.h[i]).norm() < 2 for i in range(len(self.h))):
            return False
        ms, n = self.ms_loss(f)
        loss = ms + self.lam * ((self.phi(self.z, eps) - self.phi0) * (1.0 - self.m)).abs().sum()
        ms2, _ = self.ms_loss(f.clone())
        l_text = ms2 + n * self.text_lam * (self.c0[:, :self.P] - self.c[:, :self.P]).abs().sum()
        if self.scaler is not None:
            self.scaler.scale(loss).backward(retain_graph=True)
            self.scaler.step(self.opt_z)
            self.scaler.update()
            self.opt_z.zero_grad()
            self.scaler.scale(l_text).backward()
            self.scaler.step(self.opt_c)
            self.scaler.update()
        else:
            loss.backward(retain_graph=True)
            self.opt_z.step()
            self.opt_z.zero_grad()
            l_text.backward()
            self.opt_c.step()
        self.opt_c.zero_grad()
        self.z.grad = None  # the paper's update (no stale gradient)
        return True


def add_lora(unet, rank=16):
    """peft LoRA on to_q/k/v/out.0 (once; later calls return the same parameters)."""
    from peft import LoraConfig

    if not getattr(unet, "peft_config", None):
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return [p for n, p in unet.named_parameters() if "lora_" in n]


class LoRAReference:
    """DragDiffusion's train_lora step: batch of 4 copies of the image, VAE-encoded every step
    (as released), a posterior sample, random t, DDPM noise, MSE on ε; AdamW(5e-4, wd 1e-2)."""

    def __init__(self, unet, vae, image, c, batch=4, lr=5e-4, encode_every_step=True):
        self.unet, self.vae, self.c = unet, vae, c
        self.dev = image.device
        self.params = add_lora(unet)
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.scaler = torch.amp.GradScaler("cuda") if self.dev.type == "cuda" else None
        self.batch, self.image = batch, image
        self.ac = alphas(self.dev)
        self.encode_every_step = encode_every_step
        with torch.no_grad(), autocast(self.dev):
            self.dist = vae.encode(image).latent_dist

    def step(self):
        with autocast(self.dev):
            if self.encode_every_step:
                with torch.no_grad():
                    dist = self.vae.encode(self.image.expand(self.batch, -1, -1, -1)).latent_dist
            else:
                dist = self.dist
            z = dist.sample() * 0.18215
            if z.shape[0] != self.batch:
                z = z.expand(self.batch, -1, -1, -1)
            noise = torch.randn_like(z)
            t = torch.randint(0, 1000, (self.batch,), device=self.dev)
            a = self.ac[t][:, None, None, None]
            zt = a.sqrt() * z + (1 - a).sqrt() * noise
            pred = self.unet(zt, t, encoder_hidden_states=self.c.expand(self.batch, -1, -1)).sample
            loss = F.mse_loss(pred.float(), noise.float())
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        self.opt.zero_grad()
        return float(loss.detach())


class ReferenceProcessor:
    """MasaCtrl: queries of every row attend to row 0's keys/values (self-attention)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        b, n, _ = hidden_states.shape
        h = attn.heads
        q = attn.to_q(hidden_states).view(b, n, h, -1).transpose(1, 2)
        k = attn.to_k(hidden_states)[:1].view(1, n, h, -1).transpose(1, 2).expand(b, -1, -1, -1)
        v = attn.to_v(hidden_states)[:1].view(1, n, h, -1).transpose(1, 2).expand(b, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


@torch.no_grad()
def invert(unet, z, c, steps=35):
    ac = alphas(z.device)
    for k in range(steps):
        t = 1 + 20 * k
        with autocast(z.device):
            eps = unet(z, t, encoder_hidden_states=c).sample.float()
        a_cur = ac[t - 20] if t - 20 >= 0 else ac[0]
        x0 = (z - (1 - a_cur).sqrt() * eps) / a_cur.sqrt()
        z = ac[t].sqrt() * x0 + (1 - ac[t]).sqrt() * eps
    return z


@torch.no_grad()
def denoise(unet, z_src, z_edit, c_src, c_edit, steps=35):
    from diffusers.models.attention_processor import AttnProcessor2_0

    ac = alphas(z_src.device)
    procs = {n: (ReferenceProcessor() if n.startswith(("up_blocks.2.", "up_blocks.3.")) and ".attn1." in n
                 else AttnProcessor2_0()) for n in unet.attn_processors}
    old = unet.attn_processors
    unet.set_attn_processor(procs)
    z, c = torch.cat([z_src, z_edit]), torch.cat([c_src, c_edit])
    for k in range(steps):
        t = 1 + 20 * (steps - 1 - k)
        with autocast(z.device):
            eps = unet(z, t, encoder_hidden_states=c).sample.float()
        a, ap = ac[t], (ac[t - 20] if t - 20 >= 0 else ac[0])
        x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
        z = ap.sqrt() * x0 + (1 - ap).sqrt() * eps
    unet.set_attn_processor(old)
    return z[1:]


# ============================================================================ 2a. DragDiffusion, DragText, CLIPDrag


class TorchRef:
    def __init__(self, w, method, cfg, hyp, z0, c0, h0, tg, mask_lat, token_p, clip_text, stale):
        self.w = {k: torch.from_numpy(v) for k, v in w.items()}
        self.cfg, self.hyp, self.method, self.stale = cfg, hyp, method, stale
        s = DDIM()
        self.ac = torch.from_numpy(s.alphas_cumprod)
        self.z = torch.from_numpy(z0).permute(2, 0, 1)[None].clone().requires_grad_(True)  # NCHW
        self.c0 = torch.from_numpy(c0)[None]
        self.c = self.c0.clone().requires_grad_(cfg.optimize_text)
        self.h = torch.from_numpy(h0).clone()
        self.h0 = self.h.clone()
        self.t = torch.from_numpy(tg)
        self.m = torch.from_numpy(mask_lat)[None, None]  # 1 = editable
        self.P = token_p
        self.clip_text = torch.from_numpy(clip_text)
        self.opt_z = torch.optim.Adam([self.z], lr=hyp["latent_lr"])
        self.opt_c = torch.optim.Adam([self.c], lr=hyp["text_lr"]) if cfg.optimize_text else None
        with torch.no_grad():
            eps0, f0 = self.forward(self.z, self.c)
            self.F0 = f0
            self.phi0 = self.step(self.z, eps0)
        self.losses = []
        self.leftover = None

    def forward(self, z, c):
        u = F.conv2d(z, self.w["W1"], padding=1) + (c.mean(1) @ self.w["Wc"])[:, :, None, None]
        f = torch.tanh(u)
        g = (z.mean((2, 3)) @ self.w["Wg"])[:, None, None]
        eps = 0.5 * torch.tanh((z.permute(0, 2, 3, 1) @ self.w["W2"] + (c[:, 0] @ self.w["We"])[:, None, None] + g)
                               ).permute(0, 3, 1, 2)
        return eps, F.interpolate(f, SUP, mode="bilinear", align_corners=False)

    def alpha(self, t):
        return self.ac[t] if t >= 0 else self.ac[0]

    def step(self, z, eps):
        a, ap = self.alpha(T_STAR), self.alpha(T_STAR - 20)
        x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
        return ap.sqrt() * x0 + (1 - ap).sqrt() * eps

    # the reference's interpolate_feature_patch: one set of bilinear weights for the patch
    patch = staticmethod(interpolate_feature_patch)

    def ms_loss(self, f):
        cfg, loss, n = self.cfg, 0.0, 0
        r = cfg.r_m
        for i in range(len(self.h)):
            pi, ti = self.h[i], self.t[i]
            if (ti - pi).norm() < 2.0:
                continue
            n += 1
            di = (ti - pi) / (ti - pi).norm() * min(cfg.max_step, float((ti - pi).norm()))
            r1, r2 = max(0, int(pi[0]) - r), min(SUP[0], int(pi[0]) + r + 1)
            c1, c2 = max(0, int(pi[1]) - r), min(SUP[1], int(pi[1]) + r + 1)
            if cfg.ms_reference == "initial":
                q = self.h0[i]
                a = self.F0[:, :, int(q[0]) - r:int(q[0]) + r + 1, int(q[1]) - r:int(q[1]) + r + 1].detach()
            else:
                a = f[:, :, r1:r2, c1:c2].detach()
            b = self.patch(f, r1 + di[0], r2 + di[0], c1 + di[1], c2 + di[1])
            loss = loss + (2 * r + 1) ** 2 * F.l1_loss(a, b)
        return loss, n

    def track(self, f):
        r = self.cfg.r_p
        for i in range(len(self.h)):
            q = self.h0[i]
            f0 = self.F0[0, :, int(q[0]), int(q[1])]
            pi = self.h[i]
            r1, r2 = max(0, int(pi[0]) - r), min(SUP[0], int(pi[0]) + r + 1)
            c1, c2 = max(0, int(pi[1]) - r), min(SUP[1], int(pi[1]) + r + 1)
            dist = (f0[:, None, None] - f[0, :, r1:r2, c1:c2]).abs().sum(0)
            if self.cfg.tracking == "fast":  # paper eq. 7: only strictly closer candidates
                rows = torch.arange(r1, r2)[:, None].float()
                cols = torch.arange(c1, c2)[None, :].float()
                d2 = (rows - self.t[i][0]) ** 2 + (cols - self.t[i][1]) ** 2
                dist = torch.where(d2 < ((pi - self.t[i]) ** 2).sum(), dist, torch.tensor(float("inf")))
                if torch.isinf(dist).all():
                    continue
            row, col = divmod(int(dist.argmin()), dist.shape[-1])
            self.h[i] = torch.tensor([r1 + row, c1 + col], dtype=torch.float32)

    def clip_loss(self, z):
        zz = z.detach().clone().requires_grad_(True)
        eps, _ = self.forward(zz, self.c.detach() if self.cfg.optimize_text else self.c)
        a = self.alpha(T_STAR)
        x0 = (zz - (1 - a).sqrt() * eps) / a.sqrt()
        e = torch.tanh(x0[0].permute(1, 2, 0).reshape(-1) @ self.w["Wx"]) @ self.w["Wp"]
        cos = (e / e.norm()) @ (self.clip_text / self.clip_text.norm())
        loss = self.hyp["clip_coef"] * (1 - cos)
        return loss, torch.autograd.grad(loss, zz)[0]

    def iterate(self, k):
        eps, f = self.forward(self.z, self.c)
        if k > 0:
            with torch.no_grad():
                self.track(f)
        if all((self.t[i] - self.h[i]).norm() < 2 for i in range(len(self.h))):
            return False
        ms, n = self.ms_loss(f)
        bg = self.hyp["lam"] * ((self.step(self.z, eps) - self.phi0) * (1.0 - self.m)).abs().sum()
        loss = ms + bg
        total = float(loss.detach())
        wrt = [self.z, self.c] if self.cfg.optimize_text else [self.z]
        grads = torch.autograd.grad(loss, wrt, retain_graph=True)
        g_z = grads[0]
        if self.cfg.optimize_text:
            # L_text = Σ_active (motion term + λ_t·reg): the regulariser sits in the per-pair loop.
            # ĉ's gradient accumulates ∇_ĉ L (first backward) and ∇_ĉ L_text (second backward);
            # the second backward also leaves ∇_z L_ms in z.grad (kept only with the stale quirk).
            reg = self.hyp["text_lam"] * (self.c0[:, :self.P] - self.c[:, :self.P]).abs().sum()
            ms2, _ = self.ms_loss(f)
            l_text = ms2 + n * reg
            total += float(n * reg.detach())
            gz_text, gc_text = torch.autograd.grad(l_text, [self.z, self.c], retain_graph=self.cfg.use_clip)
            g_c = grads[1] + gc_text
        if self.cfg.use_clip:
            gloss, g_g = self.clip_loss(self.z)
            total += float(gloss)
            gl, gg = g_z.flatten(), g_g.flatten()
            cos = (gl @ gg) / (gl.norm() * gg.norm())
            sin = (1 - cos ** 2).sqrt()
            lam = self.hyp["fuse_weight"]
            g_z = g_z + lam * sin * g_g if cos >= 0 else g_z - lam * cos * g_g  # eq. 6
        if self.stale and self.leftover is not None:
            g_z = g_z + self.leftover
        self.z.grad = g_z
        self.opt_z.step()
        if self.cfg.optimize_text:
            self.leftover = gz_text
            self.c.grad = g_c
            self.opt_c.step()
        self.losses.append(total)
        return True


# ============================================================================ 2b. GoodDrag

AC = torch.from_numpy(DDIM().alphas_cumprod)


def t_alpha(t):
    return AC[t] if t >= 0 else AC[0]


def t_step(z, eps, t):
    """DDIM η = 0 from t to t − 20 (ᾱ_final = ᾱ_0 below 0)."""
    a, ap = t_alpha(t), t_alpha(t - 20)
    x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
    return ap.sqrt() * x0 + (1 - ap).sqrt() * eps


def nchw(a):
    return torch.from_numpy(np.asarray(a, np.float32)).permute(2, 0, 1)[None].contiguous()


def hwc(t):
    return t.detach()[0].permute(1, 2, 0).numpy()


def torch_forward(w, z, c):
    return TorchRef.forward(SimpleNamespace(w=w), z, c)


def torch_weights():
    return {k: torch.from_numpy(v) for k, v in standin_weights().items()}


def interp_patch(feat, y, x, r):
    """GoodDrag's ``interpolate_feature_patch``: the (2r+1)² patch centred at (y, x), one set of
    bilinear weights."""
    x0, y0 = int(np.floor(float(x))), int(np.floor(float(y)))
    x1, y1 = x0 + 1, y0 + 1
    wts = [(x1 - x) * (y1 - y), (x1 - x) * (y - y0), (x - x0) * (y1 - y), (x - x0) * (y - y0)]
    patches = [feat[:, :, y0 - r:y0 + r + 1, x0 - r:x0 + r + 1], feat[:, :, y1 - r:y1 + r + 1, x0 - r:x0 + r + 1],
               feat[:, :, y0 - r:y0 + r + 1, x1 - r:x1 + r + 1], feat[:, :, y1 - r:y1 + r + 1, x1 - r:x1 + r + 1]]
    return sum(float(wt) * p for wt, p in zip(wts, patches))


def gd_track(f0, f1, handles, handles_init, r2):
    """GoodDrag's ``point_tracking``: L1 argmin in the (2r2+1)² window (no boundary clipping)."""
    out = []
    for pi0, pi in zip(handles_init, handles):
        q = f0[:, :, int(pi0[0]), int(pi0[1])][..., None, None]
        win = f1[:, :, int(pi[0]) - r2:int(pi[0]) + r2 + 1, int(pi[1]) - r2:int(pi[1]) + r2 + 1]
        dist = (q - win).abs().sum(1)[0]
        row, col = divmod(int(dist.argmin()), dist.shape[-1])
        out.append(torch.tensor([pi[0] - r2 + row, pi[1] - r2 + col]))
    return out


def torch_gooddrag(cfg, hyp, z0, c0, mask_lat):
    """The drag phase of ``GoodDragger.good_drag`` (DragText's copy) on the stand-in network.
    Returns the latent and ĉ where the MasaCtrl denoising would take over, the timestep index
    there, the handles, the losses of every update and a log of the schedule."""
    w = torch_weights()
    m = torch.from_numpy(mask_lat)[None, None]
    c0t = torch.from_numpy(c0)[None]
    r1, r2, beta, t2 = cfg.r_m, cfg.r_p, cfg.max_step, cfg.drag_end_step
    ts = [T_STAR - 20 * j for j in range(t2 + 1)]
    feats, prev_out = {}, {}
    with torch.no_grad():  # get_original_features: i ≤ t2
        z = nchw(z0)
        for j, t in enumerate(ts):
            eps, f = torch_forward(w, z, c0t)
            z = t_step(z, eps, t)
            feats[j], prev_out[j] = f, z
    h_init = [torch.from_numpy(p) for p in H0]
    handles = [p.clone() for p in h_init]
    targets = [torch.from_numpy(p) for p in TG]
    init, orig = nchw(z0), nchw(z0)
    target_emb = c0t
    log, losses = [], []
    state = dict(do_drag=True, no_change=0)

    def reached(hs):
        return all(float((p - q).norm()) < 2.0 for p, q in zip(hs, targets))

    def gooddrag_step(j, init, handles):
        t = ts[j]
        z = init.clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=hyp["latent_lr"])
        if cfg.optimize_text:
            ce = c0t.clone().requires_grad_(True)
            opt_c = torch.optim.Adam([ce], lr=hyp["text_lr"])
        else:
            ce = c0t
        first, track_num, cur = True, 0, 0
        while track_num < cfg.track_per_step:
            opt.zero_grad()
            if cfg.optimize_text:
                opt_c.zero_grad()
            # the forward sees a copy of z (the reference's fp16 autocast makes one), so the
            # in-place Adam step between the two backward passes leaves the graph valid
            eps, f1 = torch_forward(w, z.clone(), ce)
            x_prev = t_step(z, eps, t)
            if first:
                first = False
                handles = gd_track(feats[j], f1.detach(), handles, h_init, r2)
                log.append(("track", j))
            if reached(handles):
                state["do_drag"] = False
                break
            if state["no_change"] == cfg.max_track_no_change:
                state["do_drag"] = False
                break
            drag = 0.0
            for i in range(len(handles)):
                pi, ti = handles[i], targets[i]
                if float((ti - pi).norm()) < 2.0:
                    continue
                di = (ti - pi) / (ti - pi).norm() * min(beta, float((ti - pi).norm()))
                q = h_init[i]
                a = feats[j][:, :, int(q[0]) - r1:int(q[0]) + r1 + 1, int(q[1]) - r1:int(q[1]) + r1 + 1].detach()
                b = interp_patch(f1, pi[0] + di[0], pi[1] + di[1], r1)
                drag = drag + (2 * r1) ** 2 * F.l1_loss(a, b)
            loss = drag + hyp["lam"] * ((x_prev - prev_out[j]) * (1.0 - m)).abs().sum()
            total = float(loss.detach())
            if cfg.optimize_text:
                reg = hyp["text_lam"] * (c0t[:, :TOKEN_P] - ce[:, :TOKEN_P]).abs().sum()
                loss_text = drag + reg  # the motion term on a clone of F1: same value and graph
                total += float(reg.detach())
                loss.backward(retain_graph=True)
                opt.step()
                loss_text.backward()
                opt_c.step()
            else:
                loss.backward()
                opt.step()
            losses.append(total)
            log.append(("update", j))
            cur += 1
            if cur == cfg.max_drag_per_track or float(drag.detach()) <= hyp["drag_loss_threshold"] * (2 * r1) ** 2:
                track_num += 1
                old = [p.clone() for p in handles]
                handles = gd_track(feats[j], f1.detach(), handles, h_init, r2)
                log.append(("track", j))
                moved = any(not torch.equal(p, q) for p, q in zip(handles, old))
                state["no_change"] = 0 if moved else state["no_change"] + 1
                cur = 0
        return z.detach(), handles, ce.detach()

    j_end = None
    for j, t in enumerate(ts[:t2] + [None]):
        if j < t2 and state["do_drag"] and state["no_change"] != cfg.max_track_no_change:
            init, handles, target_emb = gooddrag_step(j, init, handles)
        else:
            j_end = j  # MasaCtrl would be registered here: the drag phase is over
            break
        with torch.no_grad():
            eps_pair = torch_forward(w, torch.cat([orig, init]), torch.cat([c0t, target_emb]))[0]
            init = t_step(init, eps_pair[1:], t)
            orig = t_step(orig, eps_pair[:1], t)
        log.append(("denoise", j))
    return dict(z=hwc(init), c=target_emb[0].numpy(), j=j_end, handles=torch.stack(handles).numpy(),
                losses=np.array(losses), log=log, orig=hwc(orig))


# ============================================================================ 2c. FreeDrag


def fd_sample(feature, position):
    """FreeDrag's ``get_features_plus``: bilinear samples (N, C) at (N, 2) (row, col) points."""
    y, x = position[:, 0], position[:, 1]
    x0, y0 = x.long(), y.long()
    x1, y1 = x0 + 1, y0 + 1
    wa = ((x1.float() - x) * (y1.float() - y))[:, None]
    wb = ((x1.float() - x) * (y - y0.float()))[:, None]
    wc = ((x - x0.float()) * (y1.float() - y))[:, None]
    wd = ((x - x0.float()) * (y - y0.float()))[:, None]
    f = feature[0]
    return (f[:, y0, x0].T * wa + f[:, y1, x0].T * wb + f[:, y0, x1].T * wc + f[:, y1, x1].T * wd)


def fd_offsets(win_r):
    k = torch.linspace(-win_r, win_r, steps=2 * win_r + 1)
    return torch.stack([k.repeat_interleave(2 * win_r + 1), k.repeat(2 * win_r + 1)], 1)


def fd_each_point(current, target, L, fmap, d_max, tmpl, l_ini, l_end, local, thr):
    """FreeDrag's ``get_each_point``: the line search of one pair → (new sub-target, ltype, branch)."""
    s = torch.arange(1, 11, dtype=torch.float32)[:, None] / 10

    def cands(start, reach):
        d = (start - target).pow(2).sum().sqrt()
        end = start + min(float(reach / (d + 1e-8)), 1.0) * (target - start)
        pts = (1 - s) * start[None] + s * end[None]
        feats = fd_sample(fmap, (pts.repeat_interleave(local.shape[0], 0) + local.repeat(10, 1))).reshape(10, -1)
        return pts, (feats - tmpl.flatten()[None]).abs().mean(1)

    if l_end < thr:
        pts, dif = cands(current, d_max)
        return pts[torch.argmin((dif - L).abs())], True, "normal"
    if l_end < l_ini:
        return current, True, "stay"
    d = (current - target).pow(2).sum().sqrt()
    back = current - min(float(d_max / (d + 1e-8)), 1.0) * (target - current)
    pts, dif = cands(back, 2 * d_max)
    return pts[torch.argmin(dif)], False, "backtrack"


def torch_freedrag(cfg, hyp, z0, c0, mask_lat, code=False):
    """``freedrag_update`` (DragText's copy) on the stand-in network. ``code``: with the code's
    second backward in the non-converged branch and the text backward's latent gradient left
    for the next step (the QUIRK); without, the paper's update."""
    w = torch_weights()
    m = torch.from_numpy(mask_lat)[None, None]
    L, d_max = hyp["l_expected"], hyp["d_max"]
    text_emb = torch.from_numpy(c0)[None]
    if cfg.optimize_text:
        target_emb = text_emb.clone().requires_grad_(True)
        text_opt = torch.optim.Adam([target_emb], lr=hyp["text_lr"])
    else:
        target_emb = text_emb
    z = nchw(z0)
    with torch.no_grad():
        eps, F0 = torch_forward(w, z, target_emb)
        x_prev_0 = t_step(z, eps, T_STAR)
    z.requires_grad_(True)
    opt = torch.optim.Adam([z], lr=hyp["latent_lr"])
    n = len(H0)
    sign = torch.zeros(n)
    thr_d, thr_l = 2, 0.5 * L
    aa, bb = np.log(9.0) / (0.6 * L), 0.2 * L
    local = fd_offsets(cfg.r_m)
    loss_ini, loss_end = torch.zeros(n), torch.zeros(n)
    cur = torch.from_numpy(H0).clone()
    targets = torch.from_numpy(TG)
    current_F = F0.clone()
    tmpl = [fd_sample(F0, cur[k] + local) for k in range(n)]
    step_idx, losses, branches, blocks = 0, [], [], []
    while True:
        if torch.all(sign == 1) or step_idx > cfg.max_iters:
            break
        ltype = torch.zeros(n, dtype=torch.bool)
        for k in range(n):
            if sign[k] == 0:
                cur[k], ltype[k], br = fd_each_point(cur[k].clone(), targets[k], L, current_F, d_max, tmpl[k],
                                                     loss_ini[k], loss_end[k], local, thr_l)
                branches.append(br)
        steps_in_block = 0
        for step in range(cfg.block_steps):
            step_idx += 1
            if step_idx > cfg.max_iters:
                break
            eps, F1 = torch_forward(w, z.clone(), target_emb)
            x_prev = t_step(z, eps, T_STAR)
            sup = torch.zeros(n)
            feats = []
            for k in range(n):
                feats.append(fd_sample(F1, cur[k] + local))
                sup[k] = F.l1_loss(feats[k], tmpl[k].detach())
            loss = sup.sum()
            if torch.any(m != 0):
                loss = loss + hyp["lam"] * ((x_prev - x_prev_0) * (1.0 - m)).abs().mean()
            total = float(loss.detach())
            if cfg.optimize_text:
                loss_text = torch.stack([F.l1_loss(fk.clone(), tk.clone()) for fk, tk in zip(feats, tmpl)]).sum()
                reg = hyp["text_lam"] * (text_emb[:, :TOKEN_P] - target_emb[:, :TOKEN_P]).abs().sum()
                loss_text = loss_text + reg
                total += float(reg.detach())
            loss.backward(retain_graph=True)
            opt.step()
            opt.zero_grad()
            losses.append(total)
            steps_in_block += 1
            if step == 0:
                loss_ini = sup.detach().clone()
            conv = float(sup.max().detach()) < thr_l
            if conv and not cfg.optimize_text:
                break
            elif conv and not torch.any(ltype):
                break
            elif conv:
                loss_text.backward()
                text_opt.step()
                text_opt.zero_grad()
                if not code:
                    opt.zero_grad()
                break
            elif code:
                loss.backward()
        blocks.append(steps_in_block)
        with torch.no_grad():
            _, F1 = torch_forward(w, z, target_emb)
            feats = [fd_sample(F1, cur[k] + local) for k in range(n)]
            for k in range(n):
                loss_end[k] = F.l1_loss(feats[k], tmpl[k])
        dist = (cur - targets).pow(2).sum(1).sqrt()
        sign = ((dist < thr_d) & (loss_end <= thr_l)).float()
        for k in range(n):
            g = 1.0 if sign[k] == 1 else float(1 / (1 + np.exp(aa * (float(loss_end[k]) - bb))))
            tmpl[k] = g * feats[k] + (1 - g) * tmpl[k]
        current_F = F1
    return dict(z=hwc(z), c=target_emb.detach()[0].numpy(), q=cur.numpy(), losses=np.array(losses),
                branches=branches, blocks=blocks, sign=sign.numpy())


# ============================================================================ 2d. DragNoise


class TorchNoise(TorchRef):
    """DragNoise on the stand-in: DragDiffusion's iteration (and DragText's two backward passes)
    with the bottleneck h as the optimised variable, z fixed at z*, the background term always."""

    def __init__(self, zstar, *args, **kw):
        self.zs = nchw(zstar)
        super().__init__(*args, **kw)

    def forward(self, h, c):
        z, w = self.zs, self.w
        hu = F.interpolate(h, scale_factor=2, mode="nearest")
        u = (F.conv2d(z, w["W1"], padding=1) + (c.mean(1) @ w["Wc"])[:, :, None, None]
             + (hu.permute(0, 2, 3, 1) @ w["Wh"]).permute(0, 3, 1, 2))
        g = (z.mean((2, 3)) @ w["Wg"] + h.mean((2, 3)) @ w["Wk"])[:, None, None]
        eps = 0.5 * torch.tanh((z.permute(0, 2, 3, 1) @ w["W2"] + (c[:, 0] @ w["We"])[:, None, None] + g)
                               ).permute(0, 3, 1, 2)
        return eps, F.interpolate(torch.tanh(u), SUP, mode="bilinear", align_corners=False)

    def step(self, h, eps):
        return TorchRef.step(self, self.zs, eps)


# ============================================================================ 3. the evaluation scripts
# the evaluation scripts' torch code (DragBench's run_eval_point_matching.py / dift_sd.py and
# run_eval_similarity.py), for the parity tests and benchmarks/bench_eval.py


def torchvision_alexnet(pretrained=False, **_):
    """torchvision's ``alexnet().features`` architecture (random init). PyPI's torchvision does
    not import beside the CPU torch build the tests use ('operator torchvision::nms does not
    exist') and breaks transformers' imports when installed, so lpips gets this stand-in."""
    import torch.nn as nn

    assert not pretrained, "ImageNet weights cannot be downloaded here"
    m = nn.Module()
    m.features = nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
    return m


def import_lpips():
    """The ``lpips`` package (None when not installed), importable without torchvision."""
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("lpips") is None:
        return None
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        import lpips
        return lpips
    tv = types.ModuleType("torchvision")
    tv.models = types.SimpleNamespace(alexnet=torchvision_alexnet)
    sys.modules["torchvision"] = tv
    try:
        import lpips
    finally:
        del sys.modules["torchvision"]
    return lpips


class _Stop(Exception):
    pass


class TorchDift:
    """DIFT as ``dift_sd.py`` computes it, on the diffusers/transformers modules of an SD-2.x
    diffusers folder: the image repeated E times through the VAE encoder, posterior sample ×
    scaling factor, ``add_noise`` at t, the UNet with the prompt embedding, stopped after
    ``up_blocks[up_index]`` (its output, averaged over the ensemble)."""

    def __init__(self, folder):
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
        self.vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
        self.text = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
        self.tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        self.sched = DDIMScheduler.from_pretrained(folder / "scheduler")

    def ids(self, prompt):
        return self.tok([prompt], padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids

    def features(self, image, prompt, t=261, up_index=1, ensemble=8, eps_p=None, eps_n=None):
        """image: (1, 3, H, W) in [-1, 1] → (1, C, h, w). The noises are drawn with torch.randn
        (as the script) unless given as (E, 4, h, w) tensors."""
        import torch

        def grab(m, i, o):
            raise _Stop(o)

        handle = self.unet.up_blocks[up_index].register_forward_hook(grab)
        try:
            with torch.no_grad():
                ctx = self.text(self.ids(prompt))[0].repeat(ensemble, 1, 1)
                post = self.vae.encode(image.repeat(ensemble, 1, 1, 1)).latent_dist
                eps_p = torch.randn_like(post.mean) if eps_p is None else eps_p
                lat = (post.mean + post.std * eps_p) * self.vae.config.scaling_factor
                eps_n = torch.randn_like(lat) if eps_n is None else eps_n
                noisy = self.sched.add_noise(lat, eps_n, torch.tensor(t, dtype=torch.long))
                try:
                    self.unet(noisy, t, encoder_hidden_states=ctx)
                except _Stop as s:
                    return s.args[0].mean(0, keepdim=True)
        finally:
            handle.remove()
        raise AssertionError("up block hook did not fire")


def torch_match(ft_src, ft_drag, handles, targets):
    """The script's matching: both (1, C, H, W) full-resolution maps; handles, targets (P, 2)
    (x, y) → distances (P,) and matched (row, col)."""
    import torch

    cos = torch.nn.CosineSimilarity(dim=1)
    c = ft_src.shape[1]
    dists, matched = [], []
    for (hx, hy), (tx, ty) in zip(handles, targets):
        v = ft_src[0, :, hy, hx].view(1, c, 1, 1)
        cmap = cos(v, ft_drag).cpu().numpy()[0]
        rc = np.unravel_index(cmap.argmax(), cmap.shape)
        matched.append(rc)
        dists.append(float(np.linalg.norm(np.array([ty, tx]) - np.array(rc))))
    return dists, matched
