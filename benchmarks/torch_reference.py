"""A PyTorch reference of the same work, structured as the reference code is (DragDiffusion /
DragText: a Python loop, autograd, one optimiser step per iteration, fp16 autocast with a
GradScaler on GPU), on diffusers models. Used side by side with jaxdrag in the benchmarks.

Everything here follows ALGORITHMS.md §1–§3 as the reference scripts do it: the LoRA finetune
re-encodes the batch through the VAE every step (as released), the drag step computes the motion
loss with per-pair clipped slices and the four-slice bilinear patch, DragText takes two backward
passes, the final denoise swaps in mutual self-attention for the last six decoder self-attentions.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


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
