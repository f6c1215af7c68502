"""What the size loss costs: the bulk flip evaluation against one distance transform per
flipped pixel, and a training step with the size loss against nnU-Net's supervised step.

    python -m benchmarks.benchmark --size_loss --out docs/benchmarks/size_loss_cpu.md

Per image side (default 64, 128, 256; batch 16, one elliptic object per image, masks sampled from
a soft prediction as in training): milliseconds for the sizes after every single flip of the batch
(:func:`~nnunet_stseg.core.sizes.flipped_sizes`), and for the naive estimator that runs one
distance transform per flipped pixel, timed on 64 flips and scaled to the object-and-border
pixels it would have to flip (the authors' suggested restriction) and to every pixel. Then one
training step of a U-Net of nnU-Net's 2D layout (width ``--features``): supervised = forward,
cross-entropy, backward on ``batch`` labelled images; with the size loss = forward and backward
on ``batch`` labelled plus ``batch`` size-only images, the gradient estimate included. Network
weights are random: the cost does not depend on what they learned.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from benchmarks.runner import report_header
from nnunet_stseg.core.sizes import flip_candidates, flipped_sizes, object_size, sample_masks, size_loss_gradient


def soft_objects(batch: int, side: int, seed: int = 0) -> torch.Tensor:
    """(batch, side, side) foreground probabilities: one soft ellipse per image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side].astype(np.float32)
    out = np.empty((batch, side, side), np.float32)
    for b in range(batch):
        cy, cx = rng.uniform(0.3, 0.7, 2) * side
        ry, rx = rng.uniform(0.1, 0.25, 2) * side
        r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        out[b] = 1 / (1 + np.exp((r - 1) * 8))
    return torch.from_numpy(out)


def _ms(fn, repeats: int = 3) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1000 * (time.perf_counter() - t0) / repeats


def flip_costs(side: int, batch: int) -> dict:
    y = sample_masks(soft_objects(batch, side), torch.Generator().manual_seed(0))
    bulk = _ms(lambda: flipped_sizes(y))
    one = y[:1].clone()

    def naive_64():
        for i in range(64):
            f = one.clone()
            f.view(-1)[i * 7 % (side * side)] ^= True
            object_size(f)

    per_flip = _ms(naive_64, 1) / 64
    candidates = float(flip_candidates(y).flatten(1).sum(1).float().mean())
    return {"side": side, "batch": batch, "bulk_ms": bulk, "per_flip_ms": per_flip,
            "naive_border_ms": per_flip * candidates * batch, "naive_all_ms": per_flip * side * side * batch,
            "candidates": candidates}


def _unet(features: int, side: int):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    n_stages = int(min(6, np.log2(side / 4) + 1))
    return PlainConvUNet(3, n_stages, [min(features * 2 ** i, 16 * features) for i in range(n_stages)],
                         torch.nn.Conv2d, 3, [1] + [2] * (n_stages - 1), 2, 2, 2, conv_bias=True,
                         norm_op=torch.nn.InstanceNorm2d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def step_costs(side: int, batch: int, features: int) -> dict:
    net = _unet(features, side)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    labelled = torch.randn(batch, 3, side, side)
    target = (soft_objects(batch, side, seed=1) > 0.5).long()
    size_only = torch.randn(batch, 3, side, side)
    sizes = object_size(soft_objects(batch, side, seed=2) > 0.5).float()
    timings = {"estimator_ms": 0.0}

    def supervised():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(labelled), target).backward()
        opt.step()

    def with_sizes():
        opt.zero_grad()
        out = net(torch.cat([labelled, size_only]))
        loss = torch.nn.functional.cross_entropy(out[:batch], target)
        p = torch.softmax(out[batch:], 1)[:, 1]
        t0 = time.perf_counter()
        grad, _ = size_loss_gradient(p.detach(), sizes)
        timings["estimator_ms"] = 1000 * (time.perf_counter() - t0)
        (loss + (grad * p).flatten(1).sum(1).mean()).backward()
        opt.step()

    sup = _ms(supervised)
    size = _ms(with_sizes)
    return {"supervised_ms": sup, "size_step_ms": size, "ratio": size / sup, **timings}


def free_logit_trace(target: float, steps: int = 1000, lr: float = 2.0, seed: int = 0) -> list[dict]:
    """What the expected size loss does to the ARGMAX mask: free logits of 8 images 24 x 24 (an
    8 x 8 core at logit 4, the ring around it at 0, background at -4; argmax size 8) optimised by
    SGD on the estimator alone. Rows at 0, 1/4, 1/2 and all steps: mean sampled loss, mean size
    of Bernoulli samples and the argmax sizes."""
    torch.manual_seed(seed)
    logits = torch.full((8, 24, 24), -4.0)
    logits[:, 7:17, 7:17] = 0.0
    logits[:, 8:16, 8:16] = 4.0
    logits.requires_grad_(True)
    opt = torch.optim.SGD([logits], lr=lr)
    rows = []
    for step in range(steps + 1):
        p = torch.sigmoid(logits)
        grad, loss = size_loss_gradient(p.detach(), torch.full((8,), float(target)))
        if step in (0, steps // 4, steps // 2, steps):
            sampled = torch.stack([object_size(sample_masks(p.detach())) for _ in range(20)]).float()
            rows.append({"step": step, "loss": float(loss.mean()), "sampled_size": float(sampled.mean()),
                         "argmax_size": sorted(set(object_size(p.detach() > 0.5).tolist()))})
        opt.zero_grad()
        (grad * p).sum().backward()
        opt.step()
    return rows


def size_loss_report(args, cmd: str) -> str:
    torch.manual_seed(0)
    lines = [*report_header("What the size loss costs", cmd),
             f"Batch {args.size_loss_batch}, one elliptic object per image, masks sampled from a soft prediction; "
             f"U-Net of nnU-Net's 2D layout, width {args.features or 16}, random weights; torch threads "
             f"{torch.get_num_threads()}. Naive = one distance transform per flipped pixel, timed on 64 flips and "
             f"scaled to the flips it needs.", "",
             "| side | flipped sizes, bulk ms | naive, object + border ms | naive, every pixel ms | object + border "
             "pixels / image | supervised step ms | size step ms | ratio | estimator ms |", "|---" * 9 + "|"]
    for side in args.size_loss_sides:
        f = flip_costs(side, args.size_loss_batch)
        s = step_costs(side, args.size_loss_batch, args.features or 16)
        lines.append(f"| {side} | {f['bulk_ms']:.1f} | {f['naive_border_ms']:.0f} | {f['naive_all_ms']:.0f} | "
                     f"{f['candidates']:.0f} | {s['supervised_ms']:.0f} | {s['size_step_ms']:.0f} | "
                     f"{s['ratio']:.2f} | {s['estimator_ms']:.1f} |")
    lines += ["", "The size step pushes twice the images through the network (the labelled batch and the size-only "
              "batch), so its cost is about twice a supervised step whatever the estimator costs; the estimator "
              "itself is the 'estimator ms' column (bulk flips + one distance transform per sample).", "",
              "What the objective moves (`free_logit_trace`: free logits of 8 images 24 x 24, an 8 x 8 core at logit 4 "
              "inside a ring at 0 and a background at -4, argmax size 8; SGD, learning rate 2, on the size loss "
              f"alone, {args.size_loss_steps} steps):", "",
              "| target size | step | sampled relative loss | mean size of samples | argmax sizes |", "|---" * 5 + "|"]
    for target in (6.0, 14.0):
        for r in free_logit_trace(target, steps=args.size_loss_steps):
            lines.append(f"| {target:g} | {r['step']} | {r['loss']:.3f} | {r['sampled_size']:.1f} | "
                         f"{', '.join(map(str, r['argmax_size']))} |")
    lines += ["", "The loss is the squared size error of the SAMPLED masks, and a sample's chessboard size is capped by "
              "any hole the sampling punches into it: the objective can be met by how uncertain the interior is, "
              "without moving the argmax extent (docs/design.md)."]
    return "\n".join(lines) + "\n"


__all__ = ["flip_costs", "step_costs", "size_loss_report", "soft_objects"]
