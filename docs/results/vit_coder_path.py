"""How much of the identity path a trained PNNH-ViT's coders still carry (docs/results/vit.md).

Usage: python docs/results/vit_coder_path.py WEIGHTS.safetensors [...]
(pnnh weights or checkpoint files of block-coder PNNH ViTs, as `pnnh train` writes them).

A block's coder adds ``D+ relu(E x) + D- relu(-E x)`` to its output. Since
``relu(e) = (e + |e|) / 2`` and ``relu(-e) = (|e| - e) / 2``, that is ``L x + (D+ + D-)/2 |E x|``
with the linear part ``L = (D+ - D-)/2 E``, the identity at initialisation. Per file this prints,
for the first, middle and last blocks, the encoder's row norm ``|E| / sqrt(d_c)`` (1 at init),
``trace(L) / dim`` (1 at init) and the extreme singular values of ``L``; then the singular values
of the product of every block's ``L`` (what the coders alone carry from the first block's input to
the last block's output; all 1 at init).
"""

import sys

import torch

import pnnh

for path in sys.argv[1:]:
    model = pnnh.load_model(path)
    coders = [b.coder for b in model.blocks()]
    print(f"{path}: {model.pnnh_name}, {len(coders)} blocks, path_param={coders[0].path_param!r}")
    prod = torch.eye(coders[0].dim, dtype=torch.float64)
    rows = []
    with torch.no_grad():
        for i, c in enumerate(coders):
            e, d = c.encoder_weight().double(), c.decoder_weight().double()
            lin = (d[:, :c.coder_dim] - d[:, c.coder_dim:]) / 2 @ e
            prod = lin @ prod
            s = torch.linalg.svdvals(lin)
            rows.append((i, float(e.norm() / c.coder_dim ** 0.5), float(lin.trace() / lin.shape[0]),
                         float(s.min()), float(s.max())))
    print("  block  |E|/sqrt(d_c)  trace(L)/dim  L: min sv  max sv")
    for i, en, tr, lo, hi in (rows[0], rows[len(rows) // 2], rows[-1]):
        print(f"  {i:5d}  {en:12.3f}  {tr:12.3f}  {lo:9.3f}  {hi:6.3f}")
    s = torch.linalg.svdvals(prod)
    print(f"  product of all {len(coders)} blocks' L: singular values min {float(s.min()):.3g}, "
          f"median {float(s.median()):.3g}, max {float(s.max()):.3g}")
