"""Train the testbed: a large and a small SD3 transformer on 32x32 digits, plus a classifier.

    python -m hybridstitch.testbed.train --out hybridstitch/testbed/weights --seed 0

Order, each stage seeded from ``--seed``:

1. the digit classifier (``--classifier-only`` stops here; ``--reuse-classifier`` loads an
   existing one from ``OUT/classifier`` instead);
2. the large transformer (SD3.5-Large-style, ``qk_norm="rms_norm"``) jointly with the
   prompt encoder;
3. the small transformer (SD3-Medium-style, no qk_norm) with that prompt encoder frozen,
   as SD3.5 Large and SD3 Medium share their text encoders;
4. an evaluation: samples from both with :func:`~hybridstitch.testbed.quality.sample_euler`,
   FD and prompt accuracy against the held-out split, the real-vs-real FD floor, and the
   per-call latency of both transformers at batch 2 (CFG).

Objective (as SD3): rectified flow ``x_sigma = (1 - sigma) * x0 + sigma * noise``, the
model predicts ``v = noise - x0`` from ``(x_sigma, sigma * 1000)``, MSE loss; ``sigma`` is
logit-normal (``sigmoid(N(0, 1))``, SD3's default density). 10 % of the labels are dropped
to the null prompt ``""`` for classifier-free guidance. AdamW with linear warm-up and
cosine decay to a tenth; the saved weights are an EMA of the trained ones (decay
``min(--ema-decay, (1 + k) / (10 + k))`` at step k, diffusers' warm-up rule, so about 0.99
after 1,000 steps). Run with one thread for bit-reproducible results on a given machine;
``train_flow`` draws all its randomness on the CPU, so a GPU run sees the same batches.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from hybridstitch.testbed.classifier import DigitClassifier
from hybridstitch.testbed.components import IdentityVAE, TestbedPromptEncoder
from hybridstitch.testbed.data import CHANNELS, IMAGE_SIZE, NUM_CLASSES, load_split, random_shift

# Read by argparse; a constant, not the module docstring, so ``python -OO`` (no docstrings) works.
DESCRIPTION = "Train the testbed: a large and a small SD3 transformer on 32x32 digits, plus a classifier."

TEXT_TOKENS = 8
JOINT_ATTENTION_DIM = 64
POOLED_PROJECTION_DIM = 64

# SD3.5 Large-style (qk rms_norm) and SD3 Medium-style (no qk_norm), scaled down.
LARGE = dict(num_layers=6, num_attention_heads=3, attention_head_dim=32, qk_norm="rms_norm")
SMALL = dict(num_layers=3, num_attention_heads=2, attention_head_dim=16, qk_norm=None)


def make_transformer(num_layers: int, num_attention_heads: int, attention_head_dim: int, qk_norm: str | None):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE,
        patch_size=2,  # 32x32 -> 16x16 = 256 image tokens
        in_channels=CHANNELS,
        out_channels=CHANNELS,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=JOINT_ATTENTION_DIM,
        caption_projection_dim=num_attention_heads * attention_head_dim,
        pooled_projection_dim=POOLED_PROJECTION_DIM,
        pos_embed_max_size=IMAGE_SIZE,
        qk_norm=qk_norm,
    )


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, live: torch.nn.Module, step: int, max_decay: float) -> None:
    decay = min(max_decay, (1.0 + step) / (10.0 + step))  # short memory early, as diffusers' EMAModel
    for pe, pl in zip(ema.parameters(), live.parameters()):
        pe.lerp_(pl, 1.0 - decay)


def train_classifier(seed: int, steps: int, batch_size: int, lr: float) -> tuple[DigitClassifier, dict]:
    images, labels = load_split("train")
    heldout, heldout_labels = load_split("heldout")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup=20)
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
        x = random_shift(images[idx], 2, gen)  # robustness to small misplacements
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            _log(f"classifier step {step}/{steps} loss {loss.item():.4f}")
    model.eval()
    acc = float((model.predict(heldout) == heldout_labels).float().mean())
    train_acc = float((model.predict(images) == labels).float().mean())
    info = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "wall_s": round(time.perf_counter() - start, 1),
        "final_loss": round(loss.item(), 5),
        "train_accuracy": train_acc,
        "heldout_accuracy": acc,
    }
    _log(f"classifier: held-out accuracy {acc:.4f} ({info['wall_s']} s)")
    return model, info


def train_flow(
    transformer,
    encoder: TestbedPromptEncoder,
    *,
    train_encoder: bool,
    seed: int,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    ema_decay: float,
    null_prob: float,
    name: str,
    device: str | torch.device = "cpu",
):
    """Rectified-flow training; returns the EMA transformer (and EMA encoder) and a record.

    All randomness is drawn on the CPU from one generator seeded with ``seed``, so the
    batches, noise and sigmas are the same on any device.
    """
    images, labels = load_split("train")  # [N, 1, 32, 32], [N]
    n = images.shape[0]
    gen = torch.Generator().manual_seed(seed)
    modules = torch.nn.ModuleList([transformer, encoder]) if train_encoder else torch.nn.ModuleList([transformer])
    encoder.requires_grad_(train_encoder)
    ema = copy.deepcopy(modules).requires_grad_(False)
    # Weight decay on matrices only: not on norms, biases or the prompt encoder's tables.
    no_decay = {id(p) for p in encoder.parameters()}
    decay_params = [p for p in modules.parameters() if p.ndim >= 2 and id(p) not in no_decay]
    other_params = [p for p in modules.parameters() if p.ndim < 2 or id(p) in no_decay]
    opt = torch.optim.AdamW(
        [{"params": decay_params, "weight_decay": 0.01}, {"params": other_params, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.99),
    )
    losses: list[float] = []
    history = []
    order = torch.randperm(n, generator=gen)
    cursor = 0
    start = time.perf_counter()
    transformer.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        x0, y = images[idx], labels[idx].clone()  # [B, 1, 32, 32], [B]
        y[torch.rand(batch_size, generator=gen) < null_prob] = encoder.null_id
        sigma = torch.sigmoid(torch.randn(batch_size, generator=gen))  # logit-normal(0, 1)
        noise = torch.randn(x0.shape, generator=gen)
        x0, y, sigma, noise = x0.to(device), y.to(device), sigma.to(device), noise.to(device)
        s = sigma.view(-1, 1, 1, 1)
        x_sigma = (1.0 - s) * x0 + s * noise
        target = noise - x0
        embeds, pooled = encoder(y)  # [B, T, D], [B, P]
        v = transformer(
            hidden_states=x_sigma,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=sigma * 1000.0,
            return_dict=False,
        )[0]
        loss = F.mse_loss(v, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        opt.step()
        _ema_update(ema, modules, step, ema_decay)
        losses.append(float(loss.detach()))
        if (step + 1) % 50 == 0 or step == steps - 1:
            recent = sum(losses[-50:]) / len(losses[-50:])
            elapsed = time.perf_counter() - start
            history.append({"step": step + 1, "loss": round(recent, 5), "elapsed_s": round(elapsed, 1)})
            _log(f"{name} step {step + 1}/{steps} loss(50) {recent:.4f} elapsed {elapsed:.0f} s")
    wall = time.perf_counter() - start
    record = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup": warmup,
        "ema_decay": ema_decay,
        "null_prompt_prob": null_prob,
        "wall_s": round(wall, 1),
        "final_loss_last200": round(sum(losses[-200:]) / len(losses[-200:]), 5),
        "loss_history": history,
    }
    ema_transformer = ema[0].eval()
    ema_encoder = ema[1].eval() if train_encoder else encoder
    return ema_transformer, ema_encoder, record


@torch.no_grad()
def measure_latency(large, small, encoder, repeats: int = 30) -> dict:
    """Median per-call latency at batch 2 (a CFG pair), large and small interleaved."""
    from hybridstitch.bench.timer import InterleavedTimer

    large.eval()
    small.eval()
    x = torch.randn(2, CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    embeds, pooled = encoder.encode(["", "a handwritten 3"])
    t = torch.full((2,), 500.0)
    timer = InterleavedTimer(reps=repeats, warmup=3)
    for name, model in (("large", large), ("small", small)):
        timer.add(name, lambda model=model: model(x, embeds, pooled, t))
    med = {k: statistics.median(v.seconds) for k, v in timer.run().items()}
    return {
        "large_ms": round(1000 * med["large"], 2),
        "small_ms": round(1000 * med["small"], 2),
        "ratio": round(med["large"] / med["small"], 2),
        "threads": torch.get_num_threads(),
        "batch": 2,
    }


def evaluate(large, small, encoder, classifier, *, samples_per_class: int, steps: int, guidance: float, seed: int) -> dict:
    from hybridstitch.testbed import quality

    heldout, _ = load_split("heldout")
    labels = torch.arange(NUM_CLASSES).repeat_interleave(samples_per_class)
    n = labels.numel()
    result = {"samples": n, "steps": steps, "guidance_scale": guidance, "seed": seed, "reference": "heldout"}
    for name, model in (("large", large), ("small", small)):
        t0 = time.perf_counter()
        images = quality.sample_euler(
            model, encoder, labels, steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(seed)
        )
        metrics = quality.evaluate_samples(images, labels, heldout, classifier)
        metrics["sample_s"] = round(time.perf_counter() - t0, 1)
        result[name] = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
        _log(f"eval {name}: {result[name]}")
    train_images, _ = load_split("train")
    pick = torch.randperm(train_images.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    result["real_train_vs_heldout_fd"] = round(quality.image_fd(train_images[pick], heldout, classifier), 4)
    result["real_fd_floor"] = {"n": n, "seed": seed, "fd": round(quality.real_fd_floor(n, seed, classifier), 4)}
    _log(f"eval floors: train-vs-heldout {result['real_train_vs_heldout_fd']}, real_fd_floor {result['real_fd_floor']}")
    return result


def _write_model_index(path: str, components: dict) -> None:
    import diffusers

    index = {"_class_name": "HybridStitchTestbedPipeline", "_diffusers_version": diffusers.__version__}
    index.update(components)
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


def save_large(out: str, transformer, encoder) -> None:
    from hybridstitch.scheduling import sd3_scheduler

    root = os.path.join(out, "large")
    os.makedirs(root, exist_ok=True)
    transformer.save_pretrained(os.path.join(root, "transformer"))
    encoder.save_pretrained(os.path.join(root, "prompt_encoder"))
    IdentityVAE(latent_channels=CHANNELS, sample_size=IMAGE_SIZE).save_pretrained(os.path.join(root, "vae"))
    sd3_scheduler().save_pretrained(os.path.join(root, "scheduler"))
    _write_model_index(
        root,
        {
            "transformer": ["diffusers", "SD3Transformer2DModel"],
            "prompt_encoder": ["hybridstitch.testbed.components", "TestbedPromptEncoder"],
            "vae": ["hybridstitch.testbed.components", "IdentityVAE"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        },
    )


def save_small(out: str, transformer) -> None:
    root = os.path.join(out, "small")
    os.makedirs(root, exist_ok=True)
    transformer.save_pretrained(os.path.join(root, "transformer"))
    _write_model_index(root, {"transformer": ["diffusers", "SD3Transformer2DModel"]})


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def write_report(out: str, record: dict) -> None:
    with open(os.path.join(out, "training.json"), "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    lines = ["# Testbed training record", "", "Written by `python -m hybridstitch.testbed.train`; the numbers are in `training.json`.", ""]
    lines.append(f"- command: `{record['command']}`")
    lines.append(f"- seed {record['seed']}, {record['threads']} torch thread(s), torch {record['torch']}, diffusers {record['diffusers']}, {record['machine']}")
    lines.append("- data: scikit-learn `load_digits`, bilinear 8x8 -> 32x32, [-1, 1], 1 channel; split seed 0, 1,500 train / 297 held-out")
    lines.append("- objective: rectified flow (SD3), v = noise - x0, timestep = 1000 sigma, sigma ~ sigmoid(N(0, 1)) (logit-normal), 10 % null-prompt dropout")
    lines.append(
        "- optimisation: AdamW (0.9, 0.99), weight decay 0.01 on weight matrices only, linear warm-up then cosine "
        "decay to 10 % of the peak lr, gradient clipping at 1.0; the saved weights are an EMA "
        "(decay min(0.999, (1 + k) / (10 + k)) at step k)"
    )
    lines.append(
        "- shared prompt encoder: trained jointly with the large transformer, then frozen while the small one trains "
        "(`large/prompt_encoder` serves both)"
    )
    lines.append(
        "- reproduce: `python -m hybridstitch.testbed.train --out DIR --seed 0` with 1 thread; `--reuse-classifier` "
        "only skips retraining the classifier (same seed, same weights)"
    )
    clf = record.get("classifier")
    if clf:
        lines.append(f"- classifier: {clf['steps']} steps, held-out accuracy {clf['heldout_accuracy']:.4f} ({clf['wall_s']} s)")
    for name in ("large", "small"):
        m = record.get(name)
        if not m:
            continue
        arch = m["architecture"]
        lines.append(
            f"- {name}: {arch['num_layers']} layers x {arch['num_attention_heads']} heads x {arch['attention_head_dim']}, "
            f"qk_norm={arch['qk_norm']}, {m['params']:,} params; {m['training']['steps']} steps at batch "
            f"{m['training']['batch_size']}, lr {m['training']['lr']}, {m['training']['wall_s']} s, "
            f"final loss (mean of last 200 steps) {m['training']['final_loss_last200']}"
        )
    lat = record.get("latency")
    if lat:
        lines.append(f"- latency per call at batch 2, {lat['threads']} thread: large {lat['large_ms']} ms, small {lat['small_ms']} ms, ratio {lat['ratio']}x")
    ev = record.get("eval")
    if ev:
        lines.append("")
        lines.append(f"## Quality ({ev['samples']} samples, {ev['steps']} Euler steps, shift 3.0, guidance {ev['guidance_scale']}, seed {ev['seed']}, FD vs the 297 held-out digits in classifier features)")
        lines.append("")
        lines.append("| | FD | prompt accuracy |")
        lines.append("|---|---|---|")
        for name in ("large", "small"):
            lines.append(f"| {name} | {ev[name]['fd']:.2f} | {100 * ev[name]['accuracy']:.1f} % |")
        lines.append(f"| real train digits ({ev['samples']}) | {ev['real_train_vs_heldout_fd']:.2f} | |")
        lines.append("")
        lines.append(f"`real_fd_floor(n={ev['real_fd_floor']['n']}, seed={ev['real_fd_floor']['seed']})` = {ev['real_fd_floor']['fd']:.2f}.")
    lines.append(f"\nTotal wall time: {record['total_wall_s']} s.")
    with open(os.path.join(out, "TRAINING.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "weights"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--large-steps", type=int, default=1000)
    p.add_argument("--small-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--null-prob", type=float, default=0.1)
    p.add_argument("--classifier-steps", type=int, default=600)
    p.add_argument("--classifier-only", action="store_true", help="train and save the classifier only")
    p.add_argument("--reuse-classifier", action="store_true", help="load OUT/classifier instead of training it")
    p.add_argument("--eval-per-class", type=int, default=30)
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--eval-guidance", type=float, default=1.25)
    p.add_argument("--smoke", action="store_true", help="a tiny run to check the plumbing (not for shipping)")
    args = p.parse_args(argv)
    if args.smoke:
        args.large_steps = args.small_steps = 20
        args.classifier_steps = 20
        args.eval_per_class, args.eval_steps = 2, 4

    import diffusers

    from hybridstitch.bench.machine import describe_machine, machine_info

    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    total_start = time.perf_counter()
    record: dict = {
        "command": "python -m hybridstitch.testbed.train " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "seed": args.seed,
        "threads": args.threads,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "machine": describe_machine(machine_info(args.threads)),
    }

    # 1. Classifier.
    clf_dir = os.path.join(args.out, "classifier")
    if args.reuse_classifier:
        classifier = DigitClassifier.from_pretrained(clf_dir).eval()
        prev = os.path.join(args.out, "training.json")
        if os.path.exists(prev):
            record["classifier"] = json.load(open(prev)).get("classifier")
    else:
        classifier, record["classifier"] = train_classifier(args.seed, args.classifier_steps, 64, 2e-3)
        classifier.save_pretrained(clf_dir)
    if args.classifier_only:
        record["total_wall_s"] = round(time.perf_counter() - total_start, 1)
        write_report(args.out, record)
        return
    classifier.requires_grad_(False)

    # 2. Large transformer + prompt encoder.
    torch.manual_seed(args.seed)
    encoder = TestbedPromptEncoder(NUM_CLASSES, TEXT_TOKENS, JOINT_ATTENTION_DIM, POOLED_PROJECTION_DIM)
    large = make_transformer(**LARGE)
    common = dict(batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, ema_decay=args.ema_decay, null_prob=args.null_prob)
    large, encoder, rec = train_flow(large, encoder, train_encoder=True, seed=args.seed + 1, steps=args.large_steps, name="large", **common)
    record["large"] = {"architecture": LARGE, "params": _params(large), "training": rec}
    save_large(args.out, large, encoder)

    # 3. Small transformer, prompt encoder frozen.
    torch.manual_seed(args.seed + 2)
    small = make_transformer(**SMALL)
    encoder.requires_grad_(False)
    small, _, rec = train_flow(small, encoder, train_encoder=False, seed=args.seed + 3, steps=args.small_steps, name="small", **common)
    record["small"] = {"architecture": SMALL, "params": _params(small), "training": rec}
    save_small(args.out, small)
    record["training_wall_s"] = round(record["large"]["training"]["wall_s"] + record["small"]["training"]["wall_s"], 1)

    # 4. Evaluation.
    record["latency"] = measure_latency(large, small, encoder)
    _log(f"latency {record['latency']}")
    record["eval"] = evaluate(
        large, small, encoder, classifier,
        samples_per_class=args.eval_per_class, steps=args.eval_steps, guidance=args.eval_guidance, seed=args.seed,
    )
    record["total_wall_s"] = round(time.perf_counter() - total_start, 1)
    write_report(args.out, record)
    _log(f"done in {record['total_wall_s']} s; weights in {args.out}")


if __name__ == "__main__":
    main()
