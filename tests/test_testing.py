"""The input generators of `spattn_compile.testing`: `video_attention_inputs` (the smooth regression set) and
`dit_attention_inputs` (the hard generator): determinism, shapes and mask, and the structural claims their docstrings
make (peaked, local, sinks, text share, padding, smooth values; token-scale heterogeneity, head kinds and temperatures,
step-to-step drift), measured on float64 full attention."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from spattn_compile import SparseAttentionConfig, reference, sparse_attention
from spattn_compile.layout import token_layout
from spattn_compile.testing import (
    HEAD_KINDS,
    VideoAttentionInputs,
    dit_attention_inputs,
    rope_dims,
    video_attention_inputs,
)

GRID = (4, 10, 12)


def video_query_probabilities(inputs: VideoAttentionInputs) -> torch.Tensor:
    """float64 `(B, H, num_video, S)`: the full-attention rows of the video queries (text queries dropped)."""
    video = slice(inputs.text_len, None) if inputs.text_first else slice(0, inputs.num_video)
    q = inputs.query.double()[..., video, :]
    logits = q @ inputs.key.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if inputs.attn_mask is not None:
        logits = logits.masked_fill(~inputs.attn_mask[:, :, 0, None, :], -math.inf)
    return torch.softmax(logits, dim=-1)


def grid_distance(grid: tuple[int, int, int]) -> torch.Tensor:
    """int64 `(N, N)`: Chebyshev distance between raster positions of the grid."""
    axes = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    position = torch.stack([a.flatten() for a in axes], dim=-1)
    return (position[:, None] - position[None]).abs().amax(-1)


def top_share(probabilities: torch.Tensor, fraction: float = 0.1) -> float:
    count = math.ceil(fraction * probabilities.shape[-1])
    return probabilities.topk(count, dim=-1).values.sum(-1).mean().item()


def test_same_seed_same_tensors_other_seed_other_tensors():
    kwargs = {"batch": 2, "heads": 3, "head_dim": 16, "text_len": 7, "text_padding": 2, "dtype": torch.float64}
    first, again = video_attention_inputs(GRID, seed=4, **kwargs), video_attention_inputs(GRID, seed=4, **kwargs)
    other = video_attention_inputs(GRID, seed=5, **kwargs)
    for name in ("query", "key", "value", "attn_mask"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    for name in ("query", "key", "value"):
        assert not torch.allclose(getattr(first, name), getattr(other, name))


def test_dtype_is_a_conversion_of_the_float64_tensors():
    wide = video_attention_inputs(GRID, head_dim=16, text_len=3, dtype=torch.float64, seed=1)
    half = video_attention_inputs(GRID, head_dim=16, text_len=3, dtype=torch.float16, seed=1)
    assert half.query.dtype == torch.float16
    assert torch.equal(half.query, wide.query.half()) and torch.equal(half.value, wide.value.half())
    meta = video_attention_inputs(GRID, head_dim=16, text_len=3, text_padding=1, device="meta", seed=1)
    assert meta.query.device.type == "meta" and meta.attn_mask.device.type == "meta"


@pytest.mark.parametrize("text_first", [False, True])
@pytest.mark.parametrize(("text_len", "text_padding"), [(0, 0), (9, 0), (9, 4), (5, 5)])
def test_shapes_and_padding_mask(text_first, text_len, text_padding):
    grid = (3, 5, 7)
    inputs = video_attention_inputs(
        grid, batch=2, heads=3, head_dim=24, text_len=text_len, text_first=text_first, text_padding=text_padding
    )
    seq_len = 105 + text_len
    for tensor in (inputs.query, inputs.key, inputs.value):
        assert tensor.shape == (2, 3, seq_len, 24) and tensor.dtype == torch.float32 and tensor.is_contiguous()
        assert torch.isfinite(tensor).all() and tensor.abs().amax() > 0
    assert (inputs.video_grid, inputs.text_len, inputs.text_first) == (grid, text_len, text_first)
    assert (inputs.seq_len, inputs.num_video) == (seq_len, 105)
    if not text_padding:
        assert inputs.attn_mask is None
    else:
        assert inputs.attn_mask.shape == (2, 1, 1, seq_len) and inputs.attn_mask.dtype == torch.bool
        text_start = 0 if text_first else 105
        padded = torch.zeros(seq_len, dtype=torch.bool)
        padded[text_start + text_len - text_padding : text_start + text_len] = True
        assert torch.equal(inputs.attn_mask[0, 0, 0], ~padded) and torch.equal(inputs.attn_mask[1], inputs.attn_mask[0])
    assert inputs.kwargs() == {
        "video_grid": grid,
        "text_len": text_len,
        "text_first": text_first,
        "attn_mask": inputs.attn_mask,
    }


def test_kwargs_drive_sparse_attention():
    inputs = video_attention_inputs(
        (2, 6, 8), head_dim=16, text_len=6, text_first=True, text_padding=2, dtype=torch.float64
    )
    config = SparseAttentionConfig(sparsity=0.0, block_size=16, min_seq_len=0)
    out = sparse_attention(inputs.query, inputs.key, inputs.value, **inputs.kwargs(), config=config)
    expected = F.scaled_dot_product_attention(inputs.query, inputs.key, inputs.value, attn_mask=inputs.attn_mask)
    assert ((out - expected).norm() / expected.norm()) < 1e-12


@pytest.mark.parametrize("head_dim", [6, 16, 64, 128])
def test_rope_split_is_wan_like(head_dim):
    time_dims, height_dims, width_dims = rope_dims(head_dim)
    assert time_dims + height_dims + width_dims == head_dim
    assert height_dims == width_dims == 2 * (head_dim // 6) and time_dims % 2 == 0
    if head_dim == 128:
        assert rope_dims(head_dim) == (44, 42, 42)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("head_dim", [32, 64])
def test_attention_is_peaked(seed, head_dim):
    """The brief's bar: the top 10% of keys hold most of a video query's attention (measured 0.81 to 0.92 here)."""
    inputs = video_attention_inputs(GRID, heads=4, head_dim=head_dim, text_len=16, dtype=torch.float64, seed=seed)
    assert top_share(video_query_probabilities(inputs)) > 0.7


def test_peakedness_sharpens_attention():
    shares = [
        top_share(video_query_probabilities(video_attention_inputs(GRID, heads=4, peakedness=p, dtype=torch.float64)))
        for p in (0.5, 1.0, 2.0)
    ]
    assert shares[0] < shares[1] < shares[2]  # measured 0.62, 0.91, 0.99
    assert shares[0] > 0.3 and shares[2] > 0.95


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nearby_tokens_attend_more(seed):
    """Attention per key at grid distance <= 1 vs >= 4 (Chebyshev): measured 44x to 95x for the average over queries
    and 39x to 112x for the median query, over seeds 0-5."""
    inputs = video_attention_inputs(GRID, heads=4, head_dim=64, dtype=torch.float64, seed=seed)
    probabilities = video_query_probabilities(inputs)
    distance = grid_distance(GRID)
    near, far = distance <= 1, distance >= 4
    per_near_key = (probabilities * near).sum(-1) / near.sum(-1)
    per_far_key = (probabilities * far).sum(-1) / far.sum(-1)
    ratio = per_near_key / per_far_key
    assert per_near_key.mean() > 20 * per_far_key.mean()
    assert ratio.median() > 20
    assert (ratio > 3).double().mean() > 0.9


def attention_from_far_queries(inputs: VideoAttentionInputs) -> torch.Tensor:
    """`(B, H, N)`: mean attention each video key receives from the queries at grid distance >= 4 from it."""
    far = (grid_distance(inputs.video_grid) >= 4).double()
    return torch.einsum("bhqk,qk->bhk", video_query_probabilities(inputs), far / far.sum(0, keepdim=True))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sinks_are_the_longest_keys_and_attended_from_afar(seed):
    """Locality keeps distant queries off ordinary keys; sinks get attention from everywhere. Over seeds 0-5 the two
    sinks took 0.037 to 0.11 of a distant query's attention per head, the most any other key got was 0.019."""
    with_sinks = video_attention_inputs(GRID, heads=4, num_sinks=2, dtype=torch.float64, seed=seed)
    received = attention_from_far_queries(with_sinks)
    most = received.topk(2, dim=-1)
    longest = with_sinks.key.norm(dim=-1).topk(2, dim=-1).indices
    assert torch.equal(most.indices.sort(-1).values, longest.sort(-1).values)
    assert most.values.sum(-1).mean() > 0.04
    without = video_attention_inputs(GRID, heads=4, num_sinks=0, dtype=torch.float64, seed=seed)
    assert attention_from_far_queries(without).amax() < 0.03


@pytest.mark.parametrize("text_first", [False, True])
def test_text_takes_a_modest_share_and_padding_would_dominate(text_first):
    inputs = video_attention_inputs(
        GRID, heads=4, text_len=24, text_first=text_first, text_padding=8, dtype=torch.float64
    )
    text = slice(0, 24) if text_first else slice(inputs.num_video, None)
    share = video_query_probabilities(inputs)[..., text].sum(-1).mean()
    assert 0.05 < share < 0.2  # _TEXT_SHARE = 10%
    unmasked = dataclasses.replace(inputs, attn_mask=None)
    padded = video_query_probabilities(unmasked)[..., text][..., 16:].sum(-1)
    assert padded.mean() > 0.5, "ignoring the mask would be visibly wrong"


def test_values_are_spatially_smooth():
    inputs = video_attention_inputs(GRID, heads=2, dtype=torch.float64)
    values = torch.nn.functional.normalize(inputs.value, dim=-1)
    cosine = values @ values.transpose(-1, -2)
    distance = grid_distance(GRID)
    near = cosine[..., distance == 1].mean()
    far = cosine[..., distance >= 4].mean()
    assert near > far + 0.3  # measured 0.58 vs 0.01


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"video_grid": (2, 3)}, ValueError, "video_grid must be three positive ints"),
        ({"video_grid": (0, 3, 3)}, ValueError, "video_grid"),
        ({"batch": 0}, ValueError, "batch must be >= 1"),
        ({"heads": 1.0}, TypeError, "heads must be an int"),
        ({"head_dim": 4}, ValueError, "head_dim must be >= 6"),
        ({"head_dim": 15}, ValueError, "head_dim must be even"),
        ({"text_len": -1}, ValueError, "text_len must be >= 0"),
        ({"text_len": 2, "text_padding": 3}, ValueError, "text_padding=3 exceeds text_len=2"),
        ({"text_first": 0}, TypeError, "text_first must be a bool"),
        ({"num_sinks": 100}, ValueError, "num_sinks=100 exceeds the 18 video tokens"),
        ({"peakedness": 0.0}, ValueError, "peakedness must be a positive finite float"),
        ({"peakedness": math.inf}, ValueError, "peakedness"),
        ({"peakedness": "high"}, TypeError, "peakedness must be a float"),
        ({"dtype": torch.int32}, TypeError, "dtype must be a floating torch.dtype"),
        ({"seed": -1}, ValueError, "seed must be >= 0"),
    ],
)
def test_bad_arguments_raise(kwargs, error, message):
    arguments = {"video_grid": (2, 3, 3), **kwargs}
    with pytest.raises(error, match=message):
        video_attention_inputs(arguments.pop("video_grid"), **arguments)


# --------------------------------------------------------------------------------------------------------------------
# The hard generator: dit_attention_inputs
# --------------------------------------------------------------------------------------------------------------------

DIT_GRID = (4, 12, 16)


def dit(**kwargs) -> VideoAttentionInputs:
    arguments = {"heads": 4, "head_dim": 32, "dtype": torch.float64, "seed": 3, **kwargs}
    return dit_attention_inputs(arguments.pop("video_grid", DIT_GRID), **arguments)


def relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    return float((new - old).norm() / old.norm())


def test_dit_same_seed_same_tensors_other_seed_other_tensors():
    kwargs = {"batch": 2, "text_len": 9, "text_padding": 3, "step": 2, "drift": 0.1}
    first, again, other = dit(seed=4, **kwargs), dit(seed=4, **kwargs), dit(seed=5, **kwargs)
    for name in ("query", "key", "value", "attn_mask"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    for name in ("query", "key", "value"):
        assert not torch.allclose(getattr(first, name), getattr(other, name)), name
    half = dit(seed=4, dtype=torch.float16, **kwargs)
    assert half.query.dtype == torch.float16 and torch.equal(half.query, first.query.half())


@pytest.mark.parametrize("text_first", [False, True])
def test_dit_shapes_mask_and_kwargs(text_first):
    inputs = dit(video_grid=(3, 5, 7), batch=2, heads=3, head_dim=24, text_len=9, text_first=text_first, text_padding=4)
    for tensor in (inputs.query, inputs.key, inputs.value):
        assert tensor.shape == (2, 3, 114, 24) and tensor.is_contiguous() and torch.isfinite(tensor).all()
    text_start = 0 if text_first else 105
    padded = torch.zeros(114, dtype=torch.bool)
    padded[text_start + 5 : text_start + 9] = True
    assert inputs.attn_mask.shape == (2, 1, 1, 114) and torch.equal(inputs.attn_mask[1, 0, 0], ~padded)
    assert inputs.kwargs()["video_grid"] == (3, 5, 7) and inputs.kwargs()["text_first"] == text_first
    assert dit(video_grid=(3, 5, 7), text_len=9).attn_mask is None


@pytest.mark.parametrize("drift", [0.05, 0.1])
def test_dit_drift_moves_the_content_about_drift_per_step(drift):
    """Step 0 is the same draw whatever the drift; consecutive steps differ by about `drift` in relative terms: the
    video values (content and noise only, all drifting) by 2 sin(drift / 2) ~ drift, the queries and keys by less (their
    position codes, sink and text parts are fixed)."""
    still = dit(drift=0.0, text_len=8)
    steps = [dit(drift=drift, step=s, text_len=8) for s in range(4)]
    for name in ("query", "key", "value"):
        assert torch.equal(getattr(steps[0], name), getattr(still, name)), name
    video = slice(0, math.prod(DIT_GRID))
    for previous, current in zip(steps, steps[1:]):
        value_change = relative_change(current.value[..., video, :], previous.value[..., video, :])
        assert 0.85 * drift < value_change < 1.15 * drift  # measured 1.00-1.01 x drift
        for name in ("query", "key"):
            change = relative_change(getattr(current, name), getattr(previous, name))
            assert 0.3 * drift < change < drift, name  # measured 0.60 (q) and 0.74 (k) x drift
        assert torch.equal(current.value[..., video.stop :, :], previous.value[..., video.stop :, :])  # text is fixed
    far = dit(drift=drift, step=30, text_len=8)
    assert relative_change(far.value[..., video, :], still.value[..., video, :]) > 10 * drift


def block_cosine(tensor: torch.Tensor, block_size: int) -> torch.Tensor:
    """Per head: the mean cosine similarity between a video token's (centred) vector and the mean of its canonical
    block. Centring removes the per-head components every token shares (the sink and text directions)."""
    layout = token_layout(DIT_GRID, 0, False, block_size)
    nb = layout.num_video_blocks
    canonical = reference.gather_canonical(tensor, layout)
    blocks = canonical.reshape(*tensor.shape[:2], nb, block_size, tensor.shape[-1])
    blocks = blocks - blocks.mean(dim=(2, 3), keepdim=True)
    means = blocks.mean(-2, keepdim=True).expand_as(blocks)
    return F.cosine_similarity(blocks, means, dim=-1).mean(dim=(0, 2, 3))


@pytest.mark.parametrize("seed", [0, 2, 3])
def test_dit_heterogeneity_makes_block_means_represent_their_tokens_worse(seed):
    """Same seed, heterogeneity 0 vs 1: the token-to-block-mean cosine drops in every head, for queries and keys
    (measured drops of 0.005-0.09 per head, 0.02-0.04 on average, over seeds 0-5, blocks of 128)."""
    smooth = dit(video_grid=DIT_GRID, heterogeneity=0.0, num_sinks=0, seed=seed, head_dim=64)
    hard = dit(video_grid=DIT_GRID, heterogeneity=1.0, num_sinks=0, seed=seed, head_dim=64)
    for name in ("query", "key"):
        before, after = block_cosine(getattr(smooth, name), 128), block_cosine(getattr(hard, name), 128)
        assert (after < before).all(), name
        assert (before - after).mean() > 0.015, name


def entropy(inputs: VideoAttentionInputs) -> torch.Tensor:
    """Mean entropy of the video queries' full-attention rows, per head."""
    probabilities = video_query_probabilities(inputs)
    return -(probabilities * probabilities.clamp(min=1e-300).log()).sum(-1).mean(dim=(0, 2))


def test_dit_temperatures_multiply_the_queries_and_sharpen_every_head():
    cold = dit(temperatures=1.0)
    hot = dit(temperatures=2.0)
    mixed = dit(temperatures=(1.0, 2.0))  # cycled over the four heads
    assert torch.equal(hot.query, 2 * cold.query) and torch.equal(hot.key, cold.key)
    assert torch.equal(mixed.query[:, 1::2], hot.query[:, 1::2])
    assert torch.equal(mixed.query[:, ::2], cold.query[:, ::2])
    assert (entropy(hot) < entropy(cold) - 0.5).all()  # measured 1.4-2.5 nats lower


def sink_share(inputs: VideoAttentionInputs, num_sinks: int) -> torch.Tensor:
    """Per head: the mean share of a video query's attention on the sink keys (the `num_sinks` longest video keys;
    the generator makes sink keys long)."""
    probabilities = video_query_probabilities(inputs)
    sinks = inputs.key[..., : inputs.num_video, :].norm(dim=-1).topk(num_sinks, dim=-1).indices
    index = sinks[:, :, None, :].expand(-1, -1, probabilities.shape[-2], -1)
    return probabilities.gather(-1, index).sum(-1).mean(dim=(0, 2))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dit_head_kinds_put_their_profile_share_on_the_sinks(seed):
    """Global heads give the sinks about their profile's share (0.3, calibrated on a sample of queries; measured
    0.27-0.32 over seeds 0-5), the other kinds about theirs (0.03; measured 0.017-0.041), and the sinks are the keys
    global heads attend to most. (Head dim 64: at 32 the longest keys of a content head are not always its sinks.)"""
    kinds = ("global", "spatial", "temporal", "content")
    inputs = dit(head_kinds=kinds, num_sinks=2, seed=seed, head_dim=64)
    shares = sink_share(inputs, 2)
    assert 0.2 < float(shares[0]) < 0.4
    assert (shares[1:] < 0.08).all() and (shares[1:] > 0.008).all()
    assert float(shares[0]) > 2 * float(shares[1:].max())
    received = video_query_probabilities(inputs).mean(-2)[:, 0, : inputs.num_video]
    longest = inputs.key[:, 0, : inputs.num_video].norm(dim=-1).topk(2, dim=-1).indices
    assert torch.equal(received.topk(2, dim=-1).indices.sort(-1).values, longest.sort(-1).values)
    assert HEAD_KINDS["global"].sink_share == 0.3


def test_dit_head_kinds_differ_in_locality():
    """Spatial heads are local in (t, y, x); global heads much less so."""
    inputs = dit(head_kinds=("spatial", "global"), heads=2, num_sinks=0, head_dim=64)
    probabilities = video_query_probabilities(inputs)
    near = grid_distance(DIT_GRID) <= 1
    near_share = (probabilities * near).sum(-1).mean(dim=(0, 2))
    assert float(near_share[0]) > 2 * float(near_share[1])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"video_grid": (2, 3)}, ValueError, "video_grid must be three positive ints"),
        ({"heads": 0}, ValueError, "heads must be >= 1"),
        ({"head_dim": 15}, ValueError, "head_dim must be even"),
        ({"head_kinds": "sinky"}, ValueError, r"head_kinds: unknown kind 'sinky'"),
        ({"head_kinds": ()}, TypeError, "head_kinds must be one value or a sequence"),
        ({"temperatures": -1.0}, ValueError, "temperatures must be positive finite numbers"),
        ({"temperatures": (1.0, math.nan)}, ValueError, "temperatures must be positive finite numbers"),
        ({"heterogeneity": -0.1}, ValueError, "heterogeneity must be a finite number >= 0"),
        ({"drift": math.inf}, ValueError, "drift must be a finite number >= 0"),
        ({"segment_size": 0}, ValueError, "segment_size must be >= 1"),
        ({"num_sinks": 1000}, ValueError, "num_sinks=1000 exceeds the 18 video tokens"),
        ({"text_len": 2, "text_padding": 3}, ValueError, "text_padding=3 exceeds text_len=2"),
        ({"text_first": 1}, TypeError, "text_first must be a bool"),
        ({"step": -1}, ValueError, "step must be >= 0"),
        ({"step": 1.0}, TypeError, "step must be an int"),
        ({"seed": -1}, ValueError, "seed must be >= 0"),
        ({"dtype": torch.int64}, TypeError, "dtype must be a floating torch.dtype"),
    ],
)
def test_dit_bad_arguments_raise_naming_the_argument(kwargs, error, message):
    arguments = {"video_grid": (2, 3, 3), "num_sinks": 2, **kwargs}
    with pytest.raises(error, match=message):
        dit_attention_inputs(arguments.pop("video_grid"), **arguments)
