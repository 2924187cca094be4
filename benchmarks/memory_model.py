"""Planning's and attending's allocations, counted: the bytes the public path (`sparse_attention` without a plan,
impl "triton", default settings) allocates above its inputs, per allocation and at each phase's peak.

`count(call)` lists every allocation of the pipeline that scales with the problem (the few of a handful of bytes
are left out) and `peaks(...)` the live bytes at the peak of each phase, for the code as it is (`CURRENT`) and as it
was before issue 17's memory work (`BEFORE`: all heads planned at once, float32 scratch, int32 block lists, the tile
means kept until the call ends). tests/test_memory.py checks the counts against the allocations a CPU run makes at
toy shapes (an allocation log), and that the video shapes' peak is what benchmarks/NOTES_pipeline.md says;
`bench_attention.py` prints them next to the GPU's measured peak.

    python benchmarks/memory_model.py     # the table at Wan 2.1 14B 720p and HunyuanVideo 720p on an H200
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Call:
    """One attention call: batch, heads, head dim, the video grid after patching, text tokens (after the video) and
    whether a key-padding mask is given; block and tile sizes, the inputs' element size, the scores kernel's
    persistent programs (2 per SM: 264 on an H200) and its query tiles per work item."""

    batch: int
    heads: int
    head_dim: int
    grid: tuple[int, int, int]
    text_len: int = 0
    masked: bool = False
    block_size: int = 128
    tile_size: int = 16
    element_size: int = 2
    programs: int = 264
    tiles_per_item: int = 128
    keys_per_step: int = 16  # the smallest BLOCK_N candidate: the scratch's maxima are sized for it

    @property
    def video_len(self) -> int:
        return math.prod(self.grid)

    @property
    def num_video_blocks(self) -> int:
        return -(-self.video_len // self.block_size)

    @property
    def num_blocks(self) -> int:
        return self.num_video_blocks + -(-self.text_len // self.block_size)

    @property
    def padded_len(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_tiles(self) -> int:
        return self.num_video_blocks * (self.block_size // self.tile_size)

    @property
    def qkv_bytes(self) -> int:
        return 3 * self.batch * self.heads * (self.video_len + self.text_len) * self.head_dim * self.element_size

    def items_per_head(self) -> int:
        return self.batch * -(-self.num_tiles // max(self.tiles_per_item, self.block_size // self.tile_size))

    def planning_heads(self) -> int:
        """`kernels.pooled_scores.planning_heads`: the fewest heads whose groups take no more waves than all."""
        per_head = self.items_per_head()
        programs = max(1, min(per_head * self.heads, self.programs))
        fewest = -(-per_head * self.heads // programs)
        for group in range(1, self.heads + 1):
            if -(-self.heads // group) * -(-per_head * group // programs) <= fewest:
                return group
        return self.heads


@dataclasses.dataclass(frozen=True)
class Version:
    """What the count assumes of the code: planning by groups of heads, the scratch's element size, the block
    lists' element size, and whether the tile means are freed once the scores are made."""

    grouped: bool
    scratch_size: int
    index_size: int
    free_tile_means: bool


CURRENT = Version(grouped=True, scratch_size=2, index_size=2, free_tile_means=True)
BEFORE = Version(grouped=False, scratch_size=4, index_size=4, free_tile_means=False)


def count(call: Call, version: Version = CURRENT) -> dict[str, int]:
    """Bytes of each allocation (of every head: a group's are `heads_per_group / H` of them), by name."""
    b, h, d = call.batch, call.heads, call.head_dim
    nb, nq, nt, p = call.num_video_blocks, call.num_blocks, call.num_tiles, call.padded_len
    tile = call.element_size if call.element_size < 4 else 4
    group = call.planning_heads() if version.grouped else h
    programs = max(1, min(call.items_per_head() * group, call.programs))
    rows = max(call.tiles_per_item, call.block_size // call.tile_size)
    return {
        # prepare_statistics
        "validity (key_valid, key_usable; bool)": 2 * b * h * p,
        "tile means (q_tile, k_tile, rest means, outlier keys)": 4 * b * h * nt * d * tile,
        "tile counts (4, float32)": 4 * b * h * nt * 4,
        "block statistics (5, float32)": 5 * b * h * nb * d * 4 + b * h * nb * 4,
        "key block counts, non-finite flags": b * h * nq * 5,
        # pooled_scores
        "scores (plan.block_scores, float32)": b * h * nb * (nb + 1) * 4,
        "scratch sums": programs * rows * nb * version.scratch_size,
        "scratch maxima (float32)": programs * rows * -(-nb // call.keys_per_step) * 4,
        # selection
        "GAPR gate (int8)": b * h * nb * nb,
        "plan block lists": b * h * nq * (nq + nb) * version.index_size,
        "plan counts (int32)": 2 * b * h * nq * 4,
        # attend (query rectification): the pooled keys and values in the inputs' dtype, their log counts; with a
        # mask, the canonical key rows (int32, per head: the canonical validity is per head) and full-block flags
        "attend: pooled keys, values, log counts": 2 * b * h * nb * d * call.element_size + b * h * nb * 4,
        "attend: key rows, full-block flags": (b * h * p * 4 + b * h * nq) if call.masked else 0,
        "attend: query rows (int32)": p * 4,
    }


def peaks(call: Call, version: Version = CURRENT) -> dict[str, int]:
    """Live bytes at the peak of each phase of a fresh call (planning, then attending; the output not counted)."""
    c = count(call, version)
    h = call.heads
    group = call.planning_heads() if version.grouped else h
    share = group / h
    per_head = (
        c["validity (key_valid, key_usable; bool)"]
        + c["block statistics (5, float32)"]
        + c["key block counts, non-finite flags"]
    )
    tiles = c["tile means (q_tile, k_tile, rest means, outlier keys)"] + c["tile counts (4, float32)"]
    scratch = c["scratch sums"] + c["scratch maxima (float32)"]
    scores = c["scores (plan.block_scores, float32)"]
    plan = c["plan block lists"] + c["plan counts (int32)"]
    kept_tiles = 0 if version.free_tile_means else tiles
    if version.grouped and group < h:
        # The last group's scores: every head's score tensor, the earlier groups' kept statistics, the group's own
        # preparation and scores, the scratch. Then the heads' statistics are concatenated (both copies live).
        scoring = scores + per_head + share * (tiles + scores) + scratch
        concatenating = scores + 2 * per_head
    else:
        scoring = per_head + tiles + scores + scratch
        concatenating = 0
    selecting = scores + per_head + kept_tiles + c["GAPR gate (int8)"] + plan
    attend = sum(v for k, v in c.items() if k.startswith("attend"))
    attending = scores + per_head + kept_tiles + plan + attend
    return {
        "scoring": int(scoring),
        "concatenating": int(concatenating),
        "selecting": selecting,
        "attending": attending,
    }


def peak_ratio(call: Call, version: Version = CURRENT) -> float:
    """The call's peak extra memory over the bytes of Q, K and V."""
    return max(peaks(call, version).values()) / call.qkv_bytes


WAN14B_720P = Call(batch=1, heads=40, head_dim=128, grid=(21, 45, 80))
HUNYUAN_720P = Call(batch=1, heads=24, head_dim=128, grid=(33, 45, 80), text_len=256, masked=True)


def table(calls: dict[str, Call]) -> list[str]:
    """Markdown: every allocation in MB before and now, and each phase's peak over Q + K + V."""
    lines = ["| allocation | " + " | ".join(f"{name} before MB | {name} now MB" for name in calls) + " |"]
    lines.append("|---|" + "---|---|" * len(calls))
    counts = {name: (count(call, BEFORE), count(call)) for name, call in calls.items()}
    for key in next(iter(counts.values()))[0]:
        cells = " | ".join(f"{before[key] / 1e6:.1f} | {now[key] / 1e6:.1f}" for before, now in counts.values())
        lines.append(f"| {key} | {cells} |")
    for phase in ("scoring", "concatenating", "selecting", "attending"):
        cells = " | ".join(
            f"{peaks(call, BEFORE)[phase] / call.qkv_bytes:.1%} | {peaks(call)[phase] / call.qkv_bytes:.1%}"
            for call in calls.values()
        )
        lines.append(f"| peak while {phase} / QKV | {cells} |")
    return lines


if __name__ == "__main__":
    print("\n".join(table({"Wan 14B 720p": WAN14B_720P, "Hunyuan 720p": HUNYUAN_720P})))
