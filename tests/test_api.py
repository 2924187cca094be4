"""The public `sparse_attention` and `select_plan`: every documented bad input raises the documented error naming the
argument, the accepted forms (mask shapes, grid types, dtypes, scale, settings from the context) behave like SDPA where
they must, and autograd works on the reference path and is refused, with the fix named, on the Triton path."""

import math

import pytest
import torch
import torch.nn.functional as F

import spattn_compile
from spattn_compile import SparseAttentionConfig, SparsePlan, select_plan, sparse_attention
from spattn_compile.testing import relative_error, video_attention_inputs

GRID, TEXT = (2, 3, 5), 4  # 30 video tokens + 4 text tokens
SEQ = 34
EXACT = SparseAttentionConfig(sparsity=0.0, block_size=16, min_seq_len=0)




def qkv(batch=2, heads=2, seq=SEQ, dim=8, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, seq, dim, generator=generator, dtype=dtype) for _ in range(3))


_DEFAULT = object()


def call(query=_DEFAULT, key=_DEFAULT, value=_DEFAULT, **kwargs):
    """`sparse_attention` on valid float64 inputs, with the given arguments replaced."""
    tensors = dict(zip(("query", "key", "value"), qkv()))
    for name, given in (("query", query), ("key", key), ("value", value)):
        if given is not _DEFAULT:
            tensors[name] = given
    arguments = {"video_grid": GRID, "text_len": TEXT, "config": EXACT, "impl": "reference"}
    arguments.update(kwargs)
    return sparse_attention(tensors["query"], tensors["key"], tensors["value"], **arguments)


# --------------------------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------------------------

q64, k64, v64 = qkv()

BAD_TENSORS = [
    ("query not a tensor", {"query": q64.tolist()}, TypeError, "query must be a torch.Tensor"),
    ("key not a tensor", {"key": None}, TypeError, "key must be a torch.Tensor"),
    ("3-D query", {"query": q64[0]}, ValueError, r"query must have shape \(batch, heads, seq_len, head_dim\)"),
    ("5-D value", {"value": v64[None]}, ValueError, "value must have shape"),
    ("int query", {"query": q64.long()}, TypeError, "query must be float16, bfloat16, float32 or float64"),
    ("bool key", {"key": k64 > 0}, TypeError, "key must be float16"),
    ("complex value", {"value": v64.to(torch.complex64)}, TypeError, "value must be float16"),
    ("key shorter", {"key": k64[..., :-1, :]}, ValueError, "must have the same shape"),
    ("value head dim", {"value": torch.cat([v64, v64], -1)}, ValueError, "must have the same shape"),
    ("key fewer heads (GQA)", {"key": k64[:, :1]}, ValueError, "must have the same shape"),
    ("mixed dtypes", {"key": k64.float()}, TypeError, "must share a dtype"),
    ("mixed dtypes value", {"value": v64.half()}, TypeError, "must share a dtype"),
    ("key on another device", {"key": k64.to("meta")}, ValueError, "must be on one device"),
]


@pytest.mark.parametrize(("case", "tensors", "error", "message"), BAD_TENSORS, ids=[c[0] for c in BAD_TENSORS])
def test_bad_tensors_raise(case, tensors, error, message):
    with pytest.raises(error, match=message):
        call(**tensors)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_empty_dimension_raises(dim):
    q, k, v = (t.narrow(dim, 0, 0) for t in qkv())
    with pytest.raises(ValueError, match="query has an empty heads, sequence or head dimension"):
        sparse_attention(q, k, v, video_grid=GRID, text_len=TEXT, config=EXACT)


BAD_ARGUMENTS = [
    ("grid of two", {"video_grid": (6, 5)}, ValueError, "video_grid must be three positive ints"),
    ("grid with zero", {"video_grid": (2, 0, 5)}, ValueError, "video_grid must be three positive ints"),
    ("grid with float", {"video_grid": (2, 3, 5.0)}, TypeError, "video_grid entry=5.0 has type float"),
    ("grid with bool", {"video_grid": (True, 30, 1)}, TypeError, "video_grid entry=True has type bool"),
    ("grid with tensor", {"video_grid": (torch.tensor(2), 3, 5)}, TypeError, "video_grid entry=.* has type Tensor"),
    ("grid of four", {"video_grid": (1, 2, 3, 5)}, ValueError, "video_grid must be three positive ints"),
    ("grid as string", {"video_grid": "2x3x5"}, ValueError, "video_grid"),
    ("grid too small", {"video_grid": (2, 3, 4)}, ValueError, r"holds 24 tokens; with text_len=4 that is 28"),
    ("text too long", {"text_len": 5}, ValueError, r"that is 35, but the sequence length is 34"),
    ("negative text", {"text_len": -4}, ValueError, "text_len must be an int >= 0"),
    ("float text", {"text_len": 4.0}, TypeError, "text_len=4.0 has type float: expected an int"),
    ("None text", {"text_len": None}, TypeError, "text_len=None has type NoneType"),
    ("text_first int", {"text_first": 1}, TypeError, "text_first must be a bool"),
    ("zero scale", {"scale": 0.0}, ValueError, "scale must be None or a positive finite number, got 0.0"),
    ("negative scale", {"scale": -0.1}, ValueError, "scale must be"),
    ("nan scale", {"scale": math.nan}, ValueError, "scale must be"),
    ("inf scale", {"scale": math.inf}, ValueError, "scale must be"),
    ("string scale", {"scale": "0.1"}, ValueError, "scale must be"),
    ("bool scale", {"scale": True}, ValueError, "scale must be"),
    ("tensor scale", {"scale": torch.tensor(0.1)}, ValueError, "scale must be"),
    ("mask not a tensor", {"attn_mask": [True] * SEQ}, TypeError, "attn_mask must be a torch.Tensor or None"),
    ("float mask", {"attn_mask": torch.zeros(2, 1, 1, SEQ)}, TypeError, "boolean key-padding mask .* torch.float32"),
    ("1-D mask", {"attn_mask": torch.ones(SEQ, dtype=torch.bool)}, ValueError, r"shape \(34,\) is not a key-padding"),
    ("int mask", {"attn_mask": torch.ones(2, 1, 1, SEQ, dtype=torch.int64)}, TypeError, "boolean key-padding mask"),
    ("query-varying mask", {"attn_mask": torch.ones(2, 1, SEQ, SEQ, dtype=torch.bool)}, ValueError, "query dimension"),
    ("causal mask", {"attn_mask": torch.ones(SEQ, SEQ, dtype=torch.bool).tril()}, ValueError, "key-padding"),
    ("mask wrong length", {"attn_mask": torch.ones(2, 1, 1, SEQ - 1, dtype=torch.bool)}, ValueError, "key-padding"),
    ("mask wrong batch", {"attn_mask": torch.ones(3, 1, 1, SEQ, dtype=torch.bool)}, ValueError, "broadcastable"),
    ("mask wrong heads", {"attn_mask": torch.ones(2, 3, 1, SEQ, dtype=torch.bool)}, ValueError, "broadcastable"),
    ("5-D mask", {"attn_mask": torch.ones(1, 2, 1, 1, SEQ, dtype=torch.bool)}, ValueError, "key-padding"),
    ("0-D mask", {"attn_mask": torch.tensor(True)}, ValueError, "key-padding"),
    ("mask on meta", {"attn_mask": torch.ones(2, 1, 1, SEQ, dtype=torch.bool, device="meta")}, ValueError, "attn_mask"),
    ("config dict", {"config": {"sparsity": 0.5}}, TypeError, "config must be a SparseAttentionConfig or None"),
    ("impl unknown", {"impl": "cuda"}, ValueError, r"impl must be one of \('auto', 'triton', 'reference'\)"),
    ("impl None", {"impl": None}, ValueError, "impl must be one of"),
    ("plan not a plan", {"plan": "dense"}, TypeError, "plan must be a SparsePlan or None, got str"),
]


@pytest.mark.parametrize(("case", "arguments", "error", "message"), BAD_ARGUMENTS, ids=[c[0] for c in BAD_ARGUMENTS])
def test_bad_arguments_raise(case, arguments, error, message):
    with pytest.raises(error, match=message):
        call(**arguments)


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError):
        call(dropout_p=0.1)


def test_bad_input_is_rejected_even_below_min_seq_len():
    """Short sequences run dense SDPA, but only after validation: the error does not depend on the length."""
    short = SparseAttentionConfig(min_seq_len=10_000)
    with pytest.raises(ValueError, match="sequence length"):
        call(video_grid=(2, 3, 4), config=short)
    with pytest.raises(ValueError, match="impl"):
        call(impl="fast", config=short)


# --------------------------------------------------------------------------------------------------------------------
# Accepted inputs
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mask_shape",
    [(1, SEQ), (2, 1, SEQ), (1, 1, SEQ), (2, 1, 1, SEQ), (1, 2, 1, SEQ), (2, 2, 1, SEQ), (1, 1, 1, SEQ)],
)
@pytest.mark.parametrize("rectify", ["none", "block", "query"])
def test_key_padding_mask_shapes_match_sdpa(mask_shape, rectify):
    """Every shape SDPA broadcasts to (B, H, 1, S) (aligned right; a 3-D mask's first dim is the heads)."""
    q, k, v = qkv(seed=1)
    generator = torch.Generator().manual_seed(7)
    mask = torch.rand(mask_shape, generator=generator) > 0.3
    mask[..., 0] = True
    config = SparseAttentionConfig(sparsity=0.0, block_size=16, rectify=rectify, min_seq_len=0)
    out = sparse_attention(q, k, v, video_grid=GRID, text_len=TEXT, attn_mask=mask, config=config, impl="reference")
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert relative_error(out, expected) < 1e-12


def test_one_dimensional_mask_is_rejected_as_sdpa_rejects_it():
    q, k, v = qkv(seed=1)
    mask = torch.ones(SEQ, dtype=torch.bool)
    with pytest.raises((RuntimeError, IndexError)):  # IndexError on the CPU math backend of torch 2.13
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(34,\) is not a key-padding mask: expected 2 to 4 dims"):
        sparse_attention(q, k, v, video_grid=GRID, text_len=TEXT, attn_mask=mask, config=EXACT)


@pytest.mark.parametrize("grid", [[2, 3, 5], torch.Size([2, 3, 5]), (2, 3, 5)])
def test_grid_may_be_any_int_sequence(grid):
    q, k, v = qkv(seed=2)
    out = sparse_attention(q, k, v, video_grid=grid, text_len=TEXT, config=EXACT, impl="reference")
    assert relative_error(out, F.scaled_dot_product_attention(q, k, v)) < 1e-12


@pytest.mark.parametrize("text_first", [False, True])
def test_explicit_scale_is_used(text_first):
    q, k, v = qkv(seed=3)
    out = sparse_attention(q, k, v, video_grid=GRID, text_len=TEXT, text_first=text_first, scale=0.9, config=EXACT)
    expected = F.scaled_dot_product_attention(q, k, v, scale=0.9)
    assert relative_error(out, expected) < 1e-12
    assert relative_error(out, F.scaled_dot_product_attention(q, k, v)) > 1e-3


def test_integer_scale_is_accepted():
    q, k, v = qkv(seed=3)
    out = sparse_attention(q, k, v, video_grid=GRID, text_len=TEXT, scale=1, config=EXACT)
    assert relative_error(out, F.scaled_dot_product_attention(q, k, v, scale=1.0)) < 1e-12


def test_short_sequences_run_exact_sdpa():
    q, k, v = qkv(dtype=torch.float32, seed=4)
    config = SparseAttentionConfig(sparsity=0.9, min_seq_len=SEQ + 1)
    out = sparse_attention(q, k, v, video_grid=GRID, text_len=TEXT, config=config)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rectify", ["none", "block", "query"])
def test_low_precision_inputs_keep_their_dtype(dtype, rectify):
    inputs = video_attention_inputs((2, 6, 8), heads=2, head_dim=16, text_len=5, text_padding=2, seed=5)
    config = SparseAttentionConfig(sparsity=0.5, block_size=16, rectify=rectify, min_seq_len=0)
    wide = sparse_attention(
        inputs.query.double(), inputs.key.double(), inputs.value.double(), **inputs.kwargs(), config=config
    )
    q, k, v = (t.to(dtype) for t in (inputs.query, inputs.key, inputs.value))
    out = sparse_attention(q, k, v, **inputs.kwargs(), config=config, impl="reference")
    assert out.dtype == dtype and out.shape == q.shape
    tolerance = {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}[dtype]
    assert relative_error(out, wide) < tolerance


def test_settings_come_from_the_context_when_config_is_none():
    inputs = video_attention_inputs((2, 6, 8), heads=2, head_dim=16, text_len=5, dtype=torch.float64, seed=6)
    explicit = SparseAttentionConfig(sparsity=0.75, block_size=16, rectify="query", min_seq_len=0)
    expected = sparse_attention(inputs.query, inputs.key, inputs.value, **inputs.kwargs(), config=explicit)
    with spattn_compile.config(sparsity=0.75, block_size=16, rectify="query", min_seq_len=0):
        scoped = sparse_attention(inputs.query, inputs.key, inputs.value, **inputs.kwargs())
        scoped_plan = select_plan(inputs.query, inputs.key, inputs.value, **inputs.kwargs())
    assert torch.equal(scoped, expected)
    explicit_plan = select_plan(inputs.query, inputs.key, inputs.value, **inputs.kwargs(), config=explicit)
    assert torch.equal(scoped_plan.kv_indices, explicit_plan.kv_indices)
    with spattn_compile.config(sparsity=0.25, block_size=16, rectify="query", min_seq_len=0):
        other = sparse_attention(inputs.query, inputs.key, inputs.value, **inputs.kwargs())
    assert relative_error(other, expected) > 1e-3, "the scoped settings must change the result"


def test_auto_impl_on_cpu_is_the_reference():
    inputs = video_attention_inputs((2, 6, 8), heads=2, head_dim=16, text_len=5, dtype=torch.float64, seed=7)
    config = SparseAttentionConfig(sparsity=0.5, block_size=16, min_seq_len=0)
    auto = sparse_attention(inputs.query, inputs.key, inputs.value, **inputs.kwargs(), config=config)
    ref = sparse_attention(inputs.query, inputs.key, inputs.value, **inputs.kwargs(), config=config, impl="reference")
    assert torch.equal(auto, ref)


def test_non_contiguous_inputs_match_contiguous():
    """diffusers hands SDPA transposed views (B, S, H, D) -> (B, H, S, D)."""
    generator = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, SEQ, 2, 8, generator=generator, dtype=torch.float64).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    config = SparseAttentionConfig(sparsity=0.5, block_size=16, min_seq_len=0)
    strided = sparse_attention(q, k, v, video_grid=GRID, text_len=TEXT, config=config)
    dense = sparse_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), video_grid=GRID, text_len=TEXT, config=config
    )
    assert relative_error(strided, dense) < 1e-14


@pytest.mark.parametrize("text_first", [False, True])
def test_pipeline_op_passes_opcheck(text_first):
    """The op that compiled graphs call: schema, fake tensor and AOT dispatch agree with the real kernel."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 80, 16, generator=generator) for _ in range(3))
    mask = torch.ones(1, 1, 1, 80, dtype=torch.bool)
    mask[..., 72 if not text_first else 5] = False
    with spattn_compile.config(block_size=16, min_seq_len=0, sparsity=0.5):
        torch.library.opcheck(
            torch.ops.spattn.sparse_attention.default, (q, k, v, [3, 4, 6], 8, text_first, mask, 0.3, 1)
        )


def test_importing_the_package_registers_the_one_op():
    """One op layer (issue 13 item 4): the pipeline's op is registered; the kernels' unused custom ops are gone."""
    assert hasattr(torch.ops.spattn, "sparse_attention")
    for name in ("block_sparse_attention", "reorder_pool", "score_select"):
        assert not hasattr(torch.ops.spattn, name), name


# --------------------------------------------------------------------------------------------------------------------
# select_plan
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "arguments", "error", "message"),
    [case for case in BAD_ARGUMENTS if "plan" not in case[1]],
    ids=[c[0] for c in BAD_ARGUMENTS if "plan" not in c[1]],
)
def test_select_plan_validates_like_sparse_attention(case, arguments, error, message):
    tensors = dict(zip(("query", "key", "value"), qkv()))
    arguments = {"video_grid": GRID, "text_len": TEXT, "config": EXACT, "impl": "reference", **arguments}
    with pytest.raises(error, match=message):
        select_plan(tensors["query"], tensors["key"], tensors["value"], **arguments)


def test_select_plan_result():
    inputs = video_attention_inputs((2, 6, 8), batch=2, heads=3, head_dim=16, text_len=5, dtype=torch.float64, seed=9)
    config = SparseAttentionConfig(sparsity=0.5, block_size=32, estimator="sampled_rows", min_seq_len=0)
    plan = select_plan(inputs.query, inputs.key, inputs.value, **inputs.kwargs(), config=config)
    assert isinstance(plan, SparsePlan) and plan.estimator == "sampled_rows"
    assert (plan.batch, plan.heads, plan.device) == (2, 3, torch.device("cpu"))
    layout = plan.layout
    assert (layout.video_grid, layout.num_text, layout.text_first, layout.block_size, layout.reorder) == (
        (2, 6, 8),
        5,
        False,
        32,
        "hilbert",
    )
    # Selection reads queries and keys only: the value is optional.
    without_value = select_plan(inputs.query, inputs.key, **inputs.kwargs(), config=config)
    for name in ("kv_counts", "kv_indices", "trusted_counts", "trusted_indices", "block_scores"):
        assert torch.equal(getattr(without_value, name), getattr(plan, name)), name
    # Planning never records a graph, whatever the inputs.
    q = inputs.query.clone().requires_grad_()
    assert not select_plan(q, inputs.key, **inputs.kwargs(), config=config).block_scores.requires_grad


def test_select_plan_of_an_empty_batch_raises():
    q, k, v = (t[:0] for t in qkv())
    with pytest.raises(ValueError, match=r"query has an empty batch dimension: \(0, 2, 34, 8\)"):
        select_plan(q, k, v, video_grid=GRID, text_len=TEXT, config=EXACT)


# --------------------------------------------------------------------------------------------------------------------
# Autograd (issue 13 item 3)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rectify", ["none", "block", "query"])
@pytest.mark.parametrize("text_first", [False, True])
def test_reference_gradients_at_sparsity_zero_equal_sdpa(rectify, text_first):
    q, k, v = (t.requires_grad_() for t in qkv(seed=11))
    mask = torch.ones(2, 1, 1, SEQ, dtype=torch.bool)
    mask[1, ..., 3] = False
    config = SparseAttentionConfig(sparsity=0.0, block_size=16, rectify=rectify, min_seq_len=0)
    out = sparse_attention(
        q, k, v, video_grid=GRID, text_len=TEXT, text_first=text_first, attn_mask=mask, config=config,
        impl="reference",
    )  # fmt: skip
    assert out.requires_grad
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    expected_out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    expected = torch.autograd.grad((expected_out * weights).sum(), (q, k, v))
    for name, got, want in zip("qkv", grads, expected):
        assert relative_error(got, want) < 1e-10, name


@pytest.mark.parametrize("rectify", ["none", "block", "query"])
def test_reference_gradients_with_a_sparse_plan_pass_gradcheck(rectify):
    """With a fixed sparse plan the reference is a smooth function of Q, K, V (rectification's pooled statistics
    included): its backward matches finite differences."""
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, SEQ, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    config = SparseAttentionConfig(sparsity=0.5, block_size=16, rectify=rectify, gapr=False, min_seq_len=0)
    plan = select_plan(q, k, v, video_grid=GRID, text_len=TEXT, config=config)
    assert int(plan.trusted_counts.sum()) > 0 or rectify == "none"

    def attend(q, k, v):
        return sparse_attention(q, k, v, video_grid=GRID, text_len=TEXT, config=config, plan=plan, impl="reference")

    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(attend, inputs, eps=1e-6, atol=1e-8, fast_mode=True)


@pytest.mark.parametrize("which", ["query", "key", "value"])
def test_triton_with_inputs_requiring_grad_raises_naming_the_fix(which):
    tensors = dict(zip(("query", "key", "value"), qkv(dim=16, dtype=torch.float32, seed=12)))
    tensors[which].requires_grad_()
    config = SparseAttentionConfig(sparsity=0.5, block_size=16, min_seq_len=0)
    kwargs = dict(video_grid=GRID, text_len=TEXT, config=config, impl="triton")
    with pytest.raises(RuntimeError, match=r"has no backward.*torch\.no_grad\(\).*impl='reference'"):
        sparse_attention(tensors["query"], tensors["key"], tensors["value"], **kwargs)
    if which != "query":
        return
    plan = select_plan(tensors["query"], tensors["key"], tensors["value"], **kwargs)
    with pytest.raises(RuntimeError, match="no_grad"):
        sparse_attention(tensors["query"], tensors["key"], tensors["value"], **kwargs, plan=plan)
    # Without autograd it runs: under no_grad, under inference_mode, or on detached inputs.
    with torch.no_grad():
        out = sparse_attention(tensors["query"], tensors["key"], tensors["value"], **kwargs)
    assert not out.requires_grad
    with torch.inference_mode():
        assert torch.equal(sparse_attention(tensors["query"], tensors["key"], tensors["value"], **kwargs), out)
    detached = [t.detach() for t in tensors.values()]
    assert torch.equal(sparse_attention(*detached, **kwargs), out)
    reference = sparse_attention(*detached, **{**kwargs, "impl": "reference"})
    assert relative_error(out, reference) < 1e-5


def test_auto_impl_on_the_cpu_differentiates():
    q, k, v = (t.float().requires_grad_() for t in qkv(seed=13))
    config = SparseAttentionConfig(sparsity=0.5, block_size=16, min_seq_len=0)
    out = sparse_attention(q, k, v, video_grid=GRID, text_len=TEXT, config=config)
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in (q, k, v))
