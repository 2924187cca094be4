"""The mask proof (`spattn_compile.passes.masks`): full (B, 1, S, S) masks built from one validity vector are key
-padding masks (key form) or key-valid AND query-valid (HunyuanVideo 1.5); anything else is left unproved. End to end:
a compiled joint attention with such a mask is sparse on its valid rows and gives its padded query rows exactly what
dense SDPA gives them."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from helpers import SETTINGS, SparseSDPA, compile_spattn, explain_model

import spattn_compile
from spattn_compile.passes.attention import SDPA_TARGETS
from spattn_compile.passes.masks import MaskForm, prove_padding_mask
from spattn_compile.testing import relative_error, zoo

B, S = 2, 12


def _sdpa_graph(build_mask) -> fx.Graph:
    """The Dynamo graph of SDPA over random q/k/v with the mask `build_mask(valid, other)` (two (B, S) booleans)."""
    graphs: list[fx.GraphModule] = []

    def capture(gm, example_inputs, **_):
        graphs.append(gm)
        return gm.forward

    def attention(q, valid, other):
        return F.scaled_dot_product_attention(q, q, q, attn_mask=build_mask(valid, other))

    valid = torch.ones(B, S, dtype=torch.bool)
    valid[1, -3:] = False
    torch.compile(attention, backend=capture, fullgraph=True)(torch.randn(B, 2, S, 8), valid, valid.clone())
    [gm] = graphs
    return gm.graph


def _prove(build_mask) -> MaskForm | str:
    graph = _sdpa_graph(build_mask)
    [node] = [n for n in graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]
    return prove_padding_mask(node.kwargs["attn_mask"], B, S)


def _hunyuan_video_15(valid, other):
    rows = valid.view(B, 1, 1, S).repeat(1, 1, S, 1)
    return (rows & rows.transpose(2, 3)).bool()


def _written(valid, other):
    mask = _hunyuan_video_15(valid, other)
    mask[:, :, :, 0] = True  # HunyuanVideo's token refiner: the first key of every row is kept
    return mask


def _view_written(valid, other):
    rows = valid.view(B, 1, 1, S).repeat(1, 1, S, 1)
    rows.view(-1)[0] = True  # a write through a view of a tensor on the way
    return rows & rows.transpose(2, 3)


@pytest.mark.parametrize(
    "build_mask, kind",
    [
        (_hunyuan_video_15, "key_and_query"),
        (lambda valid, other: valid[:, None, None, :] & valid[:, None, :, None], "key_and_query"),
        (lambda valid, other: torch.logical_and(valid[:, None, :, None], valid[:, None, None, :]), "key_and_query"),
        (lambda valid, other: valid[:, None, None, :].expand(B, 1, S, S), "key"),
        (lambda valid, other: valid.unsqueeze(1).unsqueeze(1).repeat(1, 1, S, 1), "key"),
    ],
)
def test_padding_masks_are_proved(build_mask, kind):
    form = _prove(build_mask)
    assert isinstance(form, MaskForm) and form.kind == kind, form
    assert tuple(form.valid.meta["example_value"].shape) == (B, S)


@pytest.mark.parametrize(
    "build_mask, words",
    [
        (_written, "written in place"),
        (_view_written, "written in place"),
        (lambda valid, other: valid[:, None, None, :] & other[:, None, :, None], "different validity vectors"),
        (lambda valid, other: valid[:, None, :, None].expand(B, 1, S, S), "query rows only"),
        (lambda valid, other: torch.ones(S, S, dtype=torch.bool).tril()[None, None].expand(B, 1, S, S), "neither"),
        (lambda valid, other: valid[:, None, None, :].repeat(1, 1, S, 1).roll(1, dims=2), "not built"),
        (lambda valid, other: valid[:, None, 1:2, None] & valid[:, None, None, :], "not built"),
    ],
)
def test_other_masks_are_not_proved(build_mask, words):
    reason = _prove(build_mask)
    assert isinstance(reason, str) and words in reason, reason


class PaddedJointAttention(torch.nn.Module):
    """Joint attention over [video, text] whose mask is built as HunyuanVideo 1.5 builds it, from a validity vector
    that pads text tokens and (to have padded query rows among every kind of token) a few video tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = torch.nn.Conv3d(4, 32, (1, 2, 2), stride=(1, 2, 2))
        self.text = torch.nn.Linear(8, 32)
        self.qkv = torch.nn.Linear(32, 96)
        zoo.finish(self)

    def forward(self, video: torch.Tensor, text: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.patch(video).flatten(2).transpose(1, 2), self.text(text)], dim=1)
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4)
        batch, seq_len = valid.shape
        rows = valid.bool().view(batch, 1, 1, seq_len).repeat(1, 1, seq_len, 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(rows & rows.transpose(2, 3)).bool())


def test_key_and_query_mask_runs_sparse_and_padded_rows_match_sdpa():
    model = PaddedJointAttention()
    g = torch.Generator().manual_seed(0)
    video, text = torch.randn(2, 4, 3, 8, 12, generator=g), torch.randn(2, 5, 8, generator=g)
    valid = torch.ones(2, 77, dtype=torch.bool)
    valid[0, -2:] = False  # padded text
    valid[1, 10:14] = False  # and padded video tokens
    report = explain_model(model, {"video": video, "text": text, "valid": valid})
    [decision] = report.decisions
    assert decision.sparse and decision.mask == "key_and_query", decision
    assert (decision.video_grid, decision.text_len, decision.text_position) == ((3, 4, 6), 5, "last")
    with torch.no_grad(), spattn_compile.config(**SETTINGS, sparsity=0.5):
        dense = model(video, text, valid)
        with SparseSDPA((3, 4, 6), 5) as reference:
            expected = model(video, text, valid)
        out = compile_spattn(model)(video, text, valid)
    assert reference.sparse_calls == 1
    assert relative_error(out, expected) < 1e-5
    assert relative_error(out, dense) > 1e-4  # the valid rows are sparse
    padded = ~valid[:, None, :, None].expand_as(out)
    assert torch.equal(out[padded], dense[padded]), "padded query rows: what dense SDPA gives a fully masked row"
