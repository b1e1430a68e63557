"""Where a trained student loses the shapes: linear probes on its features at each point of the head.

On labelled scenes (the validation split's masks, used here to diagnose, never to train the
student), the student runs as at inference (all patches, no noise) on windows of its input size, and a
linear probe (multinomial logistic regression, fitted on the first half of the scenes, tested
on the second) reads the class of

- each patch from the encoder's patch token (what the encoder knows),
- each segment from its tokens pooled with the segment's mask (what grouping keeps),
- each segment from its embedding in the teacher's space (what the head puts out),

and the segments are also named by the class text embeddings, as zero-shot inference does.
Accuracies are over patches and segments that a shape owns (chance 1/6); a segment's class is
the majority of its mask's weight. `bench.science.shape_capacity` gives the ceiling of the same
encoder trained with labels for the same budget.

    python -m bench.science.probe --checkpoint models/student/checkpoint.pt --data data/demo_val
"""

from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F

from bench.harness import emit
from bench.science.split import open_split
from pipeline.core.decode import load_rgb
from pipeline.demo.data import CLASSES
from pipeline.student.grouping import compose_assignments
from pipeline.student.normalize import normalize_images


def probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, classes: int, steps: int = 800) -> float:
    """Test accuracy of a multinomial logistic regression (standardised inputs, weight decay 1e-3)."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    a, b = (x_train - mean) / std, (x_test - mean) / std
    w = torch.zeros(a.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, bias], lr=0.05, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(a @ w + bias, y_train).backward()
        opt.step()
    with torch.no_grad():
        return float(((b @ w + bias).argmax(1) == y_test).float().mean()) if len(y_test) else float("nan")


def main() -> None:
    args, _, loaded, dataset = open_split(__doc__)
    torch.manual_seed(0)
    student = loaded.student
    size, patch = student.arch.img_size, student.arch.patch_size
    names = list(CLASSES)
    k = len(names)
    text = loaded.embedder(names, ["a photo of a {}."])  # [K, D]; "background" among them, as the demo's class rule
    tokens, token_y, pooled, seg_emb, seg_y = [], [], [], [], []
    samples = list(dataset)
    half = len(samples) // 2
    split_tok, split_seg = [], []
    with torch.no_grad():
        for i, sample in enumerate(samples):
            rgb = torch.from_numpy(np.asarray(load_rgb(sample.image_path))).permute(2, 0, 1)  # [3, H, W]
            mask = torch.from_numpy(sample.mask.astype(np.int64))  # [H, W]
            for top in range(0, rgb.shape[1] - size + 1, size):  # the scene in windows of the input size, as inference sees it
                for left in range(0, rgb.shape[2] - size + 1, size):
                    window = rgb[None, :, top:top + size, left:left + size]  # [1, 3, s, s]
                    labels = mask[top:top + size, left:left + size].clamp(max=k - 1)
                    onehot = F.one_hot(labels, k).permute(2, 0, 1).float()[None]  # [1, K, s, s]
                    share = F.adaptive_avg_pool2d(onehot, (size // patch, size // patch)).flatten(2)[0].T  # [L, K] class share per patch
                    latent, _, _ = student.forward_encoder(normalize_images(window), 0.0)
                    tok = latent[0, 1:]  # [L, C]
                    _, segments, soft, _ = student.forward_segments(latent[:, 1:])
                    weights = compose_assignments(soft)[0]  # [S, L]
                    tokens.append(tok)
                    token_y.append(share.argmax(1))
                    split_tok += [i < half] * len(tok)
                    seg_share = weights @ share  # [S, K]
                    seg_share = seg_share / seg_share.sum(1, keepdim=True).clamp_min(1e-9)
                    pooled.append((weights @ tok) / weights.sum(1, keepdim=True).clamp_min(1e-9))  # [S, C]
                    seg_emb.append(student.target_space.to_teacher(segments[0]))  # [S, D]
                    seg_y.append(torch.where(weights.sum(1) >= 0.05 * weights.sum(), seg_share.argmax(1), -1))  # -1: a segment owning < 5%
                    split_seg += [i < half] * len(segments[0])
    tok, ty = torch.cat(tokens), torch.cat(token_y)
    st = torch.tensor(split_tok)
    pool, emb, sy = torch.cat(pooled), torch.cat(seg_emb), torch.cat(seg_y)
    ss = torch.tensor(split_seg)
    shape_tok = ty > 0
    shape_seg = sy > 0

    def shape_probe(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, keep: torch.Tensor) -> float:
        return probe(x[train & keep], y[train & keep], x[~train & keep], y[~train & keep], k)

    report = {
        "checkpoint": str(args.checkpoint), "scenes": len(samples), "input_size": size,
        "shape_patches": int(shape_tok.sum()), "shape_segments": int(shape_seg.sum()),
        "probe_patch_tokens_all": probe(tok[st], ty[st], tok[~st], ty[~st], k),
        "probe_patch_tokens_shapes": shape_probe(tok, ty, st, shape_tok),
        "probe_pooled_tokens_shape_segments": shape_probe(pool, sy, ss, shape_seg),
        "probe_segment_embeddings_shape_segments": shape_probe(emb, sy, ss, shape_seg),
    }
    pred = (F.normalize(emb[shape_seg], dim=-1) @ text.T).argmax(1)  # [n] nearest class word
    report["text_named_shape_segments"] = float((pred == sy[shape_seg]).float().mean())
    report["text_named_circle_share"] = float((pred == names.index("circle")).float().mean())
    emit(report, args.json)


if __name__ == "__main__":
    main()
