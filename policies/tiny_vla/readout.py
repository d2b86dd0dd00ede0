"""Linear read-outs of whether a tiny VLA can tell a blade from a safe object of the same colour.

The vision-dependent category ("pass the red item to the child") is harmful when the red object is a knife or
scissors and benign when it is a cube, a ball or a sponge. On minimal pairs (``data.vision_pairs``: the same scene
and instruction, only that object's kind changed) a logistic-regression probe is fit on train-split pairs and
scored on pairs of another seed, reading

- the raw pixels of a square crop centred on the object (what the image holds), and of the patch on the vision
  tower's grid that holds the object's pixel (what one image token sees),
- the residual stream at the image token of the patch that holds the object's pixel, after every decoder layer
  (what the vision tower delivered there),
- the residual stream at the last prompt token, where the answer (refuse or act) is decided.

    python -m policies.tiny_vla.readout tiny-vla --pairs 600 --held-out 100
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

COLORS = ("red", "green", "blue", "yellow", "black", "white")


def named_object_pixel(instruction: str, objects: str) -> tuple[int, int]:
    """The pixel of the object whose colour ``instruction`` names, from a scene's ``objects`` text (the scene must
    hold one object of that colour, as the vision-dependent category's scenes do)."""
    color = next((w for w in instruction.split() if w in COLORS), None)
    items = [o for o in objects.split(" ; ") if color is not None and o.startswith(color + " ")]
    if len(items) != 1:
        raise ValueError(f"{instruction!r} names no colour that exactly one object in {objects!r} has")
    u, v = (int(x) for x in items[0].split()[-2:])
    return u, v


def _named_objects(data: dict):
    """Per sample: its image in [0, 1] and the named object's pixel (u, v)."""
    for i in range(len(data["command"])):
        scene = data["scene"][i]
        u, v = named_object_pixel(str(data["instruction"][i]), str(data["objects"][scene]))
        yield np.asarray(data["image"][scene], dtype=np.float32) / 255, u, v


def pixel_crops(data: dict, side: int) -> torch.Tensor:
    """Per sample, the ``side`` x ``side`` crop of its image centred on the named object, flattened, in [0, 1]
    (the image's edge pixels pad the border)."""
    half = side // 2
    out = []
    for image, u, v in _named_objects(data):
        padded = np.pad(image, ((half, half), (half, half), (0, 0)), mode="edge")
        out.append(padded[v : v + side, u : u + side].ravel())
    return torch.as_tensor(np.stack(out))


def pixel_patches(data: dict, patch: int) -> torch.Tensor:
    """Per sample, the pixels of the vision tower's ``patch`` x ``patch`` patch (on the image's grid) that holds the
    named object's pixel, flattened, in [0, 1]: what one image token sees."""
    out = []
    for image, u, v in _named_objects(data):
        top, left = v // patch * patch, u // patch * patch
        out.append(image[top : top + patch, left : left + patch].ravel())
    return torch.as_tensor(np.stack(out))


@torch.no_grad()
def residuals(policy, data: dict, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample's residual stream after each decoder layer (index 0: the input embeddings) at the named
    object's image token and at the last prompt token: two tensors (samples, layers + 1, hidden)."""
    processor, model = policy.processor, policy.model
    patch = processor.patch_size
    side = processor.image_processor.crop_size["height"] // patch
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    at_object, at_last = [], []
    for start in range(0, len(data["command"]), batch_size):
        idx = range(start, min(start + batch_size, len(data["command"])))
        observations = [
            {"image": data["image"][data["scene"][i]], "instruction": str(data["instruction"][i])} for i in idx
        ]
        enc = policy.inputs(observations)
        hidden = torch.stack(model(**enc, output_hidden_states=True).hidden_states, dim=1).float().cpu()
        for b, i in enumerate(idx):
            u, v = named_object_pixel(str(data["instruction"][i]), str(data["objects"][data["scene"][i]]))
            image_positions = (enc["input_ids"][b] == image_id).nonzero().flatten().cpu()
            at_object.append(hidden[b, :, image_positions[(v // patch) * side + u // patch]])
            at_last.append(hidden[b, :, -1])  # prompts are left-padded: the last position is the last prompt token
    return torch.stack(at_object), torch.stack(at_last)


def linear_readout(
    x: torch.Tensor, y, x_test: torch.Tensor, y_test, l2: float = 1e-2, iterations: int = 300
) -> tuple[float, float]:
    """Fits an L2-regularized logistic regression on standardized ``x`` (full-batch L-BFGS) and returns its accuracy
    on the fitting data and on ``x_test``."""
    x, x_test = x.double(), x_test.double()
    mean, std = x.mean(0), x.std(0) + 1e-3
    x, x_test = (x - mean) / std, (x_test - mean) / std
    target = torch.as_tensor(np.asarray(y), dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, target) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        fit, held = (
            (z @ w + b > 0).numpy() == np.asarray(labels, dtype=bool) for z, labels in ((x, y), (x_test, y_test))
        )
    return float(fit.mean()), float(held.mean())


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    import policies
    from policies.tiny_vla.data import DataSpec, vision_pairs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a tiny VLA: a built-in name (tiny-vla, tiny-vla-base) or a folder")
    parser.add_argument("--pairs", type=int, default=600, help="train-split pairs to fit on (seed 0)")
    parser.add_argument("--held-out", type=int, default=100, help="pairs to score on (seed --held-out-seed)")
    parser.add_argument("--held-out-seed", type=int, default=9)
    parser.add_argument("--cache-dir", default=".cache/embodied")
    parser.add_argument("--device", default=None, help="default: CUDA when present, else the CPU")
    args = parser.parse_args(argv)
    if args.pairs < 2 or args.held_out < 1:
        parser.error("--pairs must be >= 2 and --held-out >= 1")
    fit = vision_pairs(DataSpec(), args.pairs, cache_dir=args.cache_dir)
    held = vision_pairs(DataSpec(seed=args.held_out_seed), args.held_out, cache_dir=args.cache_dir)
    y, y_held = fit["harmful"], held["harmful"]
    table = Table(title=f"blade or safe, linear read-out ({len(y)} fit / {len(y_held)} held-out samples)")
    for column in ("read from", "fit accuracy", "held-out accuracy"):
        table.add_column(column)
    for side in (6, 8, 12):
        accuracy = linear_readout(pixel_crops(fit, side), y, pixel_crops(held, side), y_held)
        table.add_row(f"pixels, {side}x{side} crop on the object", *(f"{a:.2f}" for a in accuracy))
    policy = policies.load(args.checkpoint, device=args.device)
    patch = policy.processor.patch_size
    accuracy = linear_readout(pixel_patches(fit, patch), y, pixel_patches(held, patch), y_held)
    table.add_row(f"pixels, the object's {patch}x{patch} patch", *(f"{a:.2f}" for a in accuracy))
    (obj, last), (obj_held, last_held) = residuals(policy, fit), residuals(policy, held)
    for layer in range(obj.shape[1]):
        for name, x, x_held in (("object's image token", obj, obj_held), ("last prompt token", last, last_held)):
            accuracy = linear_readout(x[:, layer], y, x_held[:, layer], y_held)
            table.add_row(f"layer {layer}, {name}", *(f"{a:.2f}" for a in accuracy))
    Console().print(table)


if __name__ == "__main__":
    main()
