"""The pooled estimator's products in bfloat16 or tf32: speed, agreement with float64 and the attention they select.

`kernels.pooled_scores` multiplies the float32 tile means of 16-bit inputs rounded to the inputs' type (the default;
`input_precision_operands=True`) or as float32 on tf32 tensor cores (`False`). This measures, side by side in one run:

- speed of the scores kernel (with and without outlier keys) and of `tile_outliers` at Wan 2.1 14B 720p (grid
  21x45x80, 75,600 tokens, 40 heads, D = 128, bf16; `profile_pipeline`'s inputs);
- on the hard generator at Wan 2.1 1.3B's grid 21x30x52 (4 heads, D = 128, bf16; moderate heads and 2x sharper
  ones): the relative error of the scores against the float64 reference estimator, the overlap of each query block's
  top 10% key blocks with the reference's, and the attention error against dense fp32 SDPA of the plan each selects
  (Triton stages, 25% and 10% density, default rectification).

Run: `python benchmarks/pooled_products.py` on a CUDA machine; the table is printed last.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spattn_compile.config import SparseAttentionConfig  # noqa: E402
from spattn_compile.estimators import PooledTiles, estimator_for  # noqa: E402
from spattn_compile.implementations import ReferenceImplementation, make_implementation  # noqa: E402
from spattn_compile.layout import token_layout  # noqa: E402
from spattn_compile.testing import dit_attention_inputs  # noqa: E402

# Everything runs on the GPU; a smoke test may point these at the CPU (Triton interpreter, float16, a small grid).
DEVICE = "cuda"
DTYPE = torch.bfloat16
_HARD_GRID = (21, 30, 52)
_ESTIMATOR = PooledTiles(tile_size=16, outliers=True)


def _speed(rows: list[str]) -> None:
    import triton
    from profile_pipeline import GRID, _inputs

    from spattn_compile.kernels.pooled_scores import pooled_scores, tile_outliers

    query, key, value = _inputs(torch.device("cuda"))
    layout = token_layout(GRID, 0, False, 128)
    inputs = make_implementation("triton").prepare(query, key, value, layout, None, 16, 128**-0.5).estimator_inputs()
    num_tiles = layout.num_video_blocks * layout.block_size // 16
    outliers_ms = triton.testing.do_bench(
        lambda: tile_outliers(inputs.k, inputs.key_valid, num_tiles, 16), return_mode="median"
    )
    rows.append(f"| Wan 14B 720p: tile_outliers (both) | {outliers_ms:.2f} ms | | |")
    for bf16 in (False, True):
        timed = [
            triton.testing.do_bench(
                lambda o=outliers, b=bf16: pooled_scores(inputs, outliers=o, input_precision_operands=b),
                return_mode="median",
            )
            for outliers in (True, False)
        ]
        rows.append(
            f"| Wan 14B 720p: scores with outliers (incl. tile_outliers) / without, "
            f"{'16-bit' if bf16 else 'tf32'} products | {timed[0]:.2f} ms / {timed[1]:.2f} ms | | |"
        )
        print(rows[-1], flush=True)


def _fidelity(rows: list[str]) -> None:
    from spattn_compile.kernels.pooled_scores import pooled_scores

    layout = token_layout(_HARD_GRID, 0, False, 128)
    stages = make_implementation("triton")
    for temperatures, label in ((None, "moderate"), (2.0, "2x sharper")):
        generated = dit_attention_inputs(
            _HARD_GRID, heads=4, head_dim=128, temperatures=temperatures, dtype=DTYPE, device=DEVICE, seed=0
        )
        q, k, v = generated.query, generated.key, generated.value
        dense = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        reference = ReferenceImplementation(torch.float64).prepare(q, k, v, layout, None, 16, 128**-0.5)
        expected = estimator_for(_ESTIMATOR).reference(reference.estimator_inputs(), _ESTIMATOR)[..., :-1]
        prepared = stages.prepare(q, k, v, layout, None, 16, 128**-0.5)
        top = max(1, round(0.1 * layout.num_video_blocks))
        expected_top = torch.zeros_like(expected).scatter(-1, expected.topk(top, -1).indices, 1.0)
        for bf16 in (False, True):
            scores = pooled_scores(prepared.estimator_inputs(), outliers=True, input_precision_operands=bf16)
            error = float((scores[..., :-1].double() - expected).norm() / expected.norm())
            got_top = torch.zeros_like(expected).scatter(-1, scores[..., :-1].double().topk(top, -1).indices, 1.0)
            overlap = float((got_top * expected_top).sum() / expected_top.sum())
            attention_errors = []
            for sparsity in (0.75, 0.9):
                config = SparseAttentionConfig(sparsity=sparsity, estimator=_ESTIMATOR)
                plan = stages.select(
                    prepared, scores, density=config.density, config=config, estimator_name=_ESTIMATOR.name
                )
                out = stages.attend(prepared, plan, rectify=config.rectify)
                attention_errors.append(float((out.float() - dense).norm() / dense.norm()))
            grid = "x".join(map(str, _HARD_GRID))
            products = "16-bit" if bf16 else "tf32"
            rows.append(
                f"| hard {grid}, {label}, {products} products | {error:.2e} | {overlap:.4f} | "
                f"{attention_errors[0]:.4f} / {attention_errors[1]:.4f} |"
            )
            print(rows[-1], flush=True)


def main() -> int:
    if not torch.cuda.is_available():
        print("pooled_products needs a CUDA GPU", file=sys.stderr)
        return 1
    import triton

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    rows = [
        "| case | scores rel. error vs float64 (or time) | top-10% overlap | attention error vs dense, 25% / 10% |",
        "|---|---|---|---|",
    ]
    _speed(rows)
    torch.cuda.empty_cache()
    _fidelity(rows)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
