"""Mixed-precision checks of the UNet at the published SD 1.5 / SDXL architectures (random weights),
run by ``scripts/gpu_check.sh``; one ``PASS``/``FAIL``/``SKIP`` line per check, exit 1 on a FAIL.

    python -m memreg.arch.gpu_check --device cuda            # 512 px SD 1.5, 1024 px SDXL, batch 2
    python -m memreg.arch.gpu_check --device cpu --latent 8 --blocks 1   # the dry run (64 px)

Per family the UNet is built in memory on the device from ``memreg/arch/<family>/unet/config.json``
(nothing is read from a hub or written to disk) and checked for:

* ``sdpa``: every attention processor is diffusers' ``AttnProcessor2_0`` (torch's
  ``scaled_dot_product_attention``), and SDPA in fp16/bf16 matches the fp32 softmax(QK^T/sqrt(d))V
  written out here within the dtype's tolerance;
* ``autocast <dtype> forward``: finite, and within ``FORWARD_TOL`` (relative L2) of the fp32 output;
* ``probe <dtype>``: the guard's probe quantity, the norm term ``||eps(x_T, t_hi, c) - eps(x_T, t_hi, u)||``
  (``memreg.score.AnisotropyScore`` for SD 1.5; for SDXL computed here with its added conditioning),
  finite and within ``PROBE_TOL`` of fp32;
* ``autocast <dtype> LoRA backward``: a denoising loss through rank-4 attention LoRA adapters, fp16
  with a gradient scaler; every adapter gradient finite, the loss finite;
* ``8-bit AdamW``: with bitsandbytes installed and a CUDA device, one ``bnb.optim.AdamW8bit`` step on
  those adapters moves them and keeps them finite (SKIP otherwise).

Tolerances: random weights give outputs of order 1, so the relative L2 error of a half-precision
forward through the whole UNet is a few 1e-3 (fp16) to 1e-2 (bf16); the limits leave 5x room.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from memreg.arch.build import published_config, unet_config

FAMILIES = ("sd15", "sdxl")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
FORWARD_TOL = {"fp16": 0.02, "bf16": 0.08}
PROBE_TOL = {"fp16": 0.02, "bf16": 0.08}
SDPA_TOL = {"fp16": 5e-3, "bf16": 3e-2}
DEFAULT_LATENT = {"sd15": 64, "sdxl": 128}   # the published resolutions: 512 and 1024 px
T_HI = 981


class Report:
    def __init__(self):
        self.failed = 0

    def line(self, status: str, name: str, detail: str = "") -> None:
        print(f"{status} {name}" + (f": {detail}" if detail else ""), flush=True)
        self.failed += status == "FAIL"

    def run(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as e:  # a check that raises is a FAIL with its reason, the others still run
            self.line("FAIL", name, f"{type(e).__name__}: {e}".splitlines()[0])
            traceback.print_exc(limit=3, file=sys.stderr)
            return
        status, detail = out if isinstance(out, tuple) else ("PASS", str(out or ""))
        self.line(status, name, f"{detail} ({time.perf_counter() - t0:.1f} s)")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def build_unet(family: str, latent: int, blocks: int | None, device: torch.device):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_config(family, latent, blocks))
    return unet.eval().requires_grad_(False)


def conditioning(family: str, unet, batch: int, latent: int, device, seed: int = 0) -> dict:
    """Random prompt embeddings (and SDXL's added conditioning) shaped as the family's encoders give them."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    cfg = unet.config
    cond = {"encoder_hidden_states": torch.randn(batch, 77, cfg.cross_attention_dim, generator=g).to(device)}
    if cfg.addition_embed_type == "text_time":
        pooled = published_config(family, "text_encoder_2")["projection_dim"]
        px = 8 * latent
        ids = torch.tensor([[px, px, 0, 0, px, px]], dtype=torch.float32).repeat(batch, 1)
        cond["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, generator=g).to(device),
                                     "time_ids": ids.to(device)}
    return cond


def call(unet, x, t, cond: dict) -> torch.Tensor:
    return unet(x, t, **cond).sample


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_sdpa(unet, device, dtypes) -> tuple[str, str]:
    procs = {type(p).__name__ for p in unet.attn_processors.values()}
    if procs != {"AttnProcessor2_0"}:
        return "FAIL", f"attention processors {sorted(procs)}, expected AttnProcessor2_0 (torch SDPA)"
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(2, 8, 256, 64, generator=g).to(device) for _ in range(3))
    ref = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1) @ v
    errs = []
    for name in dtypes:
        out = F.scaled_dot_product_attention(q.to(DTYPES[name]), k.to(DTYPES[name]), v.to(DTYPES[name]))
        err = rel_err(out, ref)
        errs.append(f"{name} rel err {err:.1e}")
        if not err < SDPA_TOL[name]:
            return "FAIL", "; ".join(errs) + f" > {SDPA_TOL[name]}"
    return "PASS", f"{len(unet.attn_processors)} processors AttnProcessor2_0; " + "; ".join(errs)


def check_forward(unet, x, t, cond, ref, device, name) -> tuple[str, str]:
    with torch.no_grad(), autocast(device, DTYPES[name]):
        out = call(unet, x, t, cond)
    if not torch.isfinite(out).all():
        return "FAIL", "non-finite output"
    err = rel_err(out, ref)
    return ("PASS" if err < FORWARD_TOL[name] else "FAIL"), f"rel L2 err vs fp32 {err:.2e} (limit {FORWARD_TOL[name]})"


def probe_norm(family, unet, x, cond, uncond, scheduler, device, dtype=None) -> torch.Tensor:
    """(B,) norm term at t_hi in fp32 math (the UNet call under autocast ``dtype`` if given)."""
    ctx = autocast(device, dtype) if dtype is not None else torch.autocast(device.type, enabled=False)
    with torch.no_grad(), ctx:
        if family == "sd15":
            from memreg.score import AnisotropyScore

            scorer = AnisotropyScore(unet, scheduler, preset="sd1")
            return scorer(x, cond["encoder_hidden_states"], uncond["encoder_hidden_states"][:1]).norm.float()
        both = {"encoder_hidden_states": torch.cat([uncond["encoder_hidden_states"], cond["encoder_hidden_states"]])}
        if "added_cond_kwargs" in cond:
            both["added_cond_kwargs"] = {k: torch.cat([uncond["added_cond_kwargs"][k], v])
                                         for k, v in cond["added_cond_kwargs"].items()}
        out = call(unet, torch.cat([x, x]), T_HI, both).float()
    e_u, e_c = out.chunk(2)
    return (e_c - e_u).flatten(1).norm(dim=1)


def check_probe(family, unet, x, cond, uncond, scheduler, device, name, ref) -> tuple[str, str]:
    got = probe_norm(family, unet, x, cond, uncond, scheduler, device, DTYPES[name])
    if not torch.isfinite(got).all():
        return "FAIL", "non-finite probe"
    err = float(((got - ref).abs() / ref.abs().clamp_min(1e-12)).max())
    how = "memreg.score.AnisotropyScore" if family == "sd15" else "norm term with text_time conditioning"
    return ("PASS" if err < PROBE_TOL[name] else "FAIL"), (f"{how}: norm {ref.mean():.3f}, max rel err vs fp32 "
                                                           f"{err:.2e} (limit {PROBE_TOL[name]})")


def add_lora(unet):
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def check_backward(unet, params, x, t, cond, device, name) -> tuple[str, str]:
    for p in params:
        p.grad = None
    target = torch.randn_like(x)
    scaler = torch.amp.GradScaler(device.type) if name == "fp16" and device.type == "cuda" else None
    with autocast(device, DTYPES[name]):
        loss = F.mse_loss(call(unet, x, t, cond).float(), target)
    (scaler.scale(loss) if scaler else loss).backward()
    grads = [p.grad for p in params]
    if not torch.isfinite(loss) or any(g is None or not torch.isfinite(g).all() for g in grads):
        return "FAIL", f"loss {float(loss):.4f}, non-finite or missing adapter gradients"
    nonzero = sum(bool(g.abs().max() > 0) for g in grads)
    return "PASS", f"loss {float(loss):.4f}, {len(grads)} adapter gradients finite ({nonzero} non-zero)"


def check_adam8bit(params, unet, x, t, cond, device) -> tuple[str, str]:
    if importlib.util.find_spec("bitsandbytes") is None:
        return "SKIP", "bitsandbytes not installed"
    if device.type != "cuda":
        return "SKIP", "8-bit AdamW needs a CUDA device"
    import bitsandbytes as bnb

    opt = bnb.optim.AdamW8bit(params, lr=1e-3)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = None
    with autocast(device, torch.bfloat16):
        loss = F.mse_loss(call(unet, x, t, cond).float(), torch.randn_like(x))
    loss.backward()
    opt.step()
    moved = sum(not torch.equal(a, p.detach()) for a, p in zip(before, params))
    finite = all(torch.isfinite(p).all() for p in params)
    status = "PASS" if moved and finite else "FAIL"
    return status, f"bitsandbytes {bnb.__version__}: {moved}/{len(params)} adapters moved, finite {finite}"


def check_family(report: Report, family: str, device: torch.device, latent: int, blocks: int | None,
                 batch: int, dtypes: list[str]) -> None:
    from diffusers import DDPMScheduler

    tag = f"{family} (latent {latent}, {8 * latent} px, batch {batch}" + (f", blocks {blocks})" if blocks else ")")
    state: dict = {}

    def build():
        state["unet"] = build_unet(family, latent, blocks, device)
        n = sum(p.numel() for p in state["unet"].parameters())
        return f"{n / 1e6:.0f}M parameters on {device}"

    report.run(f"{tag} build UNet", build)
    if "unet" not in state:
        return
    unet = state["unet"]
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(batch, unet.config.in_channels, latent, latent, generator=g).to(device)
    t = torch.tensor([T_HI, 500][:batch] + [500] * max(0, batch - 2), device=device)
    cond = conditioning(family, unet, batch, latent, device, seed=0)
    uncond = conditioning(family, unet, batch, latent, device, seed=1)
    scheduler = DDPMScheduler.from_config(published_config(family, "scheduler"))
    report.run(f"{tag} sdpa", lambda: check_sdpa(unet, device, dtypes))
    with torch.no_grad():
        ref = call(unet, x, t, cond).float()
    probe_ref = probe_norm(family, unet, x, cond, uncond, scheduler, device)
    for name in dtypes:
        report.run(f"{tag} autocast {name} forward", lambda n=name: check_forward(unet, x, t, cond, ref, device, n))
        report.run(f"{tag} probe {name}",
                   lambda n=name: check_probe(family, unet, x, cond, uncond, scheduler, device, n, probe_ref))
    params = add_lora(unet)
    for name in dtypes:
        report.run(f"{tag} autocast {name} LoRA backward",
                   lambda n=name: check_backward(unet, params, x, t, cond, device, n))
    report.run(f"{tag} 8-bit AdamW", lambda: check_adam8bit(params, unet, x, t, cond, device))
    del state, unet, params
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a dry run at --latent 8)")
    ap.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    ap.add_argument("--latent", type=int, default=None, help="latent size (default: 64 SD 1.5, 128 SDXL)")
    ap.add_argument("--blocks", type=int, default=None, help="cap on SDXL's transformer blocks per attention")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = Report()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        report.line("FAIL", "cuda", "torch.cuda.is_available() is False")
        return 1
    torch.backends.cudnn.allow_tf32 = False      # the fp32 reference in full fp32
    torch.backends.cuda.matmul.allow_tf32 = False
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report.line("INFO", "device", f"{where}, torch {torch.__version__}")
    for family in args.families:
        check_family(report, family, device, args.latent or DEFAULT_LATENT[family],
                     args.blocks if family == "sdxl" else None, args.batch, args.dtypes)
    report.line("FAIL" if report.failed else "PASS", "gpu_check components", f"{report.failed} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
