"""Transformer-shaped models whose root does not trace: partial tracing factorizes their Linears.

A BERT-like encoder (nn.MultiheadAttention with a padding mask, keyword inputs, dict output) and a
GPT-like decoder (hand-written causal attention, a shape assert, dataclass output), both defined
here, small and random-initialised.
"""

import copy
import dataclasses
import io

import pytest
import torch
from torch import fx, nn

import fxfactorize as ff
from fxfactorize.errors import TraceError
from fxfactorize.passes.runner import StandIn

WIDTH, HIDDEN, VOCAB, RANK = 64, 128, 50, 8


def make_low_rank(model: nn.Module, rank: int = RANK, seed: int = 0) -> nn.Module:
    """Give every Linear a weight of exactly ``rank``, so a rank-``rank`` pair is exact."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if type(module) is nn.Linear:
            out, inp = module.weight.shape
            with torch.no_grad():
                module.weight.copy_(
                    torch.randn(out, rank, generator=gen)
                    @ torch.randn(rank, inp, generator=gen)
                    / inp
                )
    return model


class EncoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(WIDTH, 4, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, WIDTH))

    def forward(self, hidden, padding_mask=None):
        attended = self.attention(
            hidden, hidden, hidden, key_padding_mask=padding_mask, need_weights=False
        )[0]
        hidden = self.norm1(hidden + attended)
        return self.norm2(hidden + self.mlp(hidden))


class TinyBert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.layers = nn.ModuleList([EncoderLayer(), EncoderLayer()])
        self.pooler = nn.Linear(WIDTH, WIDTH)

    def forward(self, input_ids, attention_mask=None):
        padding_mask = None
        if attention_mask is not None and not bool(
            attention_mask.all()
        ):  # data-dependent: untraceable
            padding_mask = attention_mask == 0
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, padding_mask=padding_mask)
        return {"last_hidden_state": hidden, "pooled": torch.tanh(self.pooler(hidden[:, 0]))}


class CausalSelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj, self.heads = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH), 4

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        q, k, v = (t.reshape(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / (width // self.heads) ** 0.5
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        weights = scores.masked_fill(causal, float("-inf")).softmax(-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(batch, length, width))


class DecoderBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.attention = CausalSelfAttention()
        self.mlp = nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, WIDTH))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@dataclasses.dataclass
class CausalOutput:
    logits: torch.Tensor


class TinyGPT(nn.Module):
    def __init__(self, max_length: int = 16) -> None:
        super().__init__()
        self.max_length = max_length
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Parameter(torch.zeros(max_length, WIDTH))
        self.blocks = nn.ModuleList([DecoderBlock(), DecoderBlock()])
        self.lm_head = nn.Linear(WIDTH, VOCAB)

    def forward(self, input_ids):
        if input_ids.shape[1] > self.max_length:  # a shape check torch.fx cannot trace
            raise ValueError("sequence too long")
        x = self.embed(input_ids) + self.position[: input_ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return CausalOutput(self.lm_head(x))


def bert_inputs(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 7:] = 0
    return {"input_ids": torch.randint(0, VOCAB, (3, 10), generator=gen), "attention_mask": mask}


OPTIONS = {"min_features": 32, "latent_features": RANK, "progress": False}


@pytest.fixture(scope="module")
def bert_pair():
    torch.manual_seed(0)
    model = make_low_rank(TinyBert()).eval()
    return model, ff.transform(model, bert_inputs(), **OPTIONS)


def test_encoder_root_does_not_trace_but_its_layers_are_factorized(bert_pair):
    model, result = bert_pair
    assert type(result) is TinyBert and result is not model
    report = ff.report_of(result)
    assert isinstance(report, ff.PartialReport)
    assert report.regions == ["layers.0", "layers.1", "pooler"]
    (root,) = [u for u in report.untraced if u.name == ""]
    assert root.module_class == "TinyBert" and "traced" in root.reason.lower()
    assert isinstance(result.layers[0], fx.GraphModule)
    assert isinstance(result.layers[0].get_submodule("mlp.0"), ff.FactorizedLinear)
    assert isinstance(result.pooler, ff.FactorizedLinear)
    assert {r.target for r in report.factorized} == {
        "layers.0.mlp.0",
        "layers.0.mlp.2",
        "layers.1.mlp.0",
        "layers.1.mlp.2",
        "pooler",
    }
    assert type(model.pooler) is nn.Linear and type(model.layers[0]) is EncoderLayer  # not mutated
    text = str(report)
    assert "traced regions: layers.0, layers.1, pooler" in text and "not traced: (model)" in text


def test_encoder_keyword_inputs_and_dict_output_match_on_fresh_inputs(bert_pair):
    model, result = bert_pair
    for seed in (1, 2):
        inputs = bert_inputs(seed)
        with torch.no_grad():
            expected, got = model(**inputs), result(**inputs)
        assert expected.keys() == got.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # the other branch of the root's `if` (no padding) runs too
        inputs = {"input_ids": bert_inputs(3)["input_ids"]}
        torch.testing.assert_close(
            result(**inputs)["pooled"], model(**inputs)["pooled"], atol=1e-4, rtol=1e-4
        )


def test_partial_result_round_trips_through_torch_save(bert_pair):
    model, result = bert_pair
    buffer = io.BytesIO()
    torch.save(result, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    inputs = bert_inputs(4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs)["pooled"], result(**inputs)["pooled"])
    assert ff.report_of(loaded).regions == ff.report_of(result).regions
    loaded.load_state_dict(result.state_dict())  # same keys and shapes


def test_decoder_blocks_and_lm_head_are_factorized_with_dataclass_output():
    torch.manual_seed(1)
    model = make_low_rank(TinyGPT()).eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    result = ff.transform(model, ids, **OPTIONS)
    report = ff.report_of(result)
    # the attention builds its mask with torch.ones(length, length): not traceable, so the pass
    # descends to its two projections; the MLPs trace whole
    assert report.regions[:3] == [
        "blocks.0.attention.qkv",
        "blocks.0.attention.proj",
        "blocks.0.mlp",
    ]
    assert report.regions[-1] == "lm_head"
    assert {u.name for u in report.untraced} == {
        "",
        "blocks.0",
        "blocks.0.attention",
        "blocks.1",
        "blocks.1.attention",
    }
    assert len(report.factorized) == 9
    assert isinstance(result.lm_head, ff.FactorizedLinear)
    assert "blocks.0.attention.qkv" in {r.target for r in report.factorized}
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert params(result) < params(model)
    fresh = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(result(fresh).logits, model(fresh).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="too long"):  # the root's own Python still runs
        result(torch.randint(0, VOCAB, (1, 20)))


def test_on_untraceable_raise_gives_the_trace_error():
    with pytest.raises(TraceError, match="TinyGPT"):
        ff.transform(TinyGPT(), torch.randint(0, VOCAB, (2, 5)), on_untraceable="raise", **OPTIONS)


def test_plan_of_an_untraceable_model_lists_regions_and_changes_nothing():
    model = TinyBert()
    before = copy.deepcopy(model.state_dict())
    the_plan = ff.plan(model, bert_inputs(), min_features=32, latent_features=RANK)
    assert the_plan.regions == ["layers.0", "layers.1", "pooler"]
    assert len(the_plan.factorized) == 5 and the_plan.untraced[0].module_class == "TinyBert"
    assert isinstance(the_plan, ff.PartialPlan) and "not traced: (model) (TinyBert)" in str(
        the_plan
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_leaf_modules_by_qualified_name_keep_a_region_whole():
    model = make_low_rank(TinyBert()).eval()
    result = ff.transform(model, bert_inputs(), leaf_modules=("layers.1",), **OPTIONS)
    targets = {r.target for r in ff.report_of(result).factorized}
    assert "layers.0.mlp.0" in targets and not any(t.startswith("layers.1") for t in targets)
    assert type(result.layers[1]) is EncoderLayer


def pooled_nmse(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((candidate - reference) ** 2).mean() / reference.var())


def test_calibrated_partial_transform_keeps_pooled_output_close():
    """Statistics come from the whole model running keyword batches; held-out pooled nmse < 0.1."""
    torch.manual_seed(0)
    model = TinyBert().eval()
    with torch.no_grad():  # token embeddings on a 6-d subspace: data-aware solving can exploit it
        model.embed.weight.copy_(torch.randn(VOCAB, 6) @ torch.randn(6, WIDTH))
    batches = [bert_inputs(seed) for seed in range(10, 18)]
    held_out = bert_inputs(99)
    options = {"min_features": 32, "latent_features": 16, "progress": False}
    calibrated = ff.transform(model, bert_inputs(), calibration=batches, **options)
    data_free = ff.transform(model, bert_inputs(), **options)
    report = ff.report_of(calibrated)
    assert {r.nmse_source for r in report.factorized} == {"calibration"}
    with torch.no_grad():
        reference = model(**held_out)["pooled"]
        error = pooled_nmse(calibrated(**held_out)["pooled"], reference)
        baseline = pooled_nmse(data_free(**held_out)["pooled"], reference)
    assert error < 0.1 and error < baseline / 4
    assert type(calibrated.layers[0]) is not StandIn  # the stand-ins are gone


def test_optimizer_follows_a_partial_transform():
    model = make_low_rank(TinyBert())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    result = ff.transform(model, bert_inputs(), optimizers=optimizer, **OPTIONS)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in result.parameters()}


def test_partial_result_saves_and_loads_with_fxfactorize(bert_pair, tmp_path):
    model, result = bert_pair
    loaded = ff.load(ff.save(result, tmp_path / "bert"), TinyBert())
    inputs = bert_inputs(5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs)["pooled"], result(**inputs)["pooled"])
    report = ff.report_of(loaded)
    assert isinstance(report, ff.PartialReport) and report.regions == ff.report_of(result).regions
    assert report.untraced[0].module_class == "TinyBert"


@pytest.mark.skipif(
    not hasattr(ff, "check_equivalence"), reason="needs check_equivalence (issue 4)"
)
def test_check_equivalence_on_keyword_inputs_and_dict_outputs(bert_pair):
    model, result = bert_pair
    ff.check_equivalence(model, result, bert_inputs(), max_examples=5, seed=0)
    broken = make_low_rank(TinyBert(), seed=1).eval()  # same architecture, other weights
    with pytest.raises(AssertionError):
        ff.check_equivalence(model, broken, bert_inputs(), max_examples=5, seed=0)
