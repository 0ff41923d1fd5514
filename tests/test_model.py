"""The GPT model: sizes match the estimates, it learns, and KV-cache generation equals no-cache generation."""

from __future__ import annotations

import pytest
import torch

from workbench.engine import estimates
from workbench.engine.config import ModelConfig
from workbench.engine.device import DeviceInfo
from workbench.engine.formatting import format_mfu
from workbench.engine.model import GPT, sample_token
from workbench.kernels import select

pytestmark = pytest.mark.usefixtures("torch_single_thread")

OPS = select("torch", "cpu")


def make(**kw) -> GPT:
    cfg = ModelConfig(**{"n_layer": 2, "n_head": 4, "d_model": 32, "seq_len": 32, "vocab_size": 61, **kw})
    torch.manual_seed(0)
    return GPT(cfg, OPS)


@pytest.mark.parametrize("kw", [
    {},
    {"tie_embeddings": False},
    {"n_kv_head": 2},
    {"n_kv_head": 1, "d_ff": 48, "tie_embeddings": False},
    {"n_layer": 3, "d_model": 48, "n_head": 3},
])
def test_param_count_matches_estimates(kw):
    model = make(**kw)
    assert model.num_params() == estimates.param_count(estimates.Shape.of(model.cfg))
    assert model.flops_per_token() == estimates.flops_per_token(model.shape) > 0
    assert model.memory_estimate(8, bf16=False) > 16 * model.num_params()


def test_tied_embeddings_share_one_tensor():
    tied, untied = make(), make(tie_embeddings=False)
    assert tied.output_weight is tied.wte.weight
    assert "lm_head.weight" not in tied.state_dict() and "lm_head.weight" in untied.state_dict()


def test_forward_shapes_and_per_token_loss():
    model = make(n_kv_head=2)
    idx = torch.randint(0, 61, (3, 20))
    logits = model(idx)
    assert logits.shape == (3, 20, 61) and logits.dtype == torch.float32
    targets = torch.randint(0, 61, (3, 20))
    targets[0, :5] = -1
    loss = model(idx, targets)
    assert loss.shape == (3, 20)
    assert torch.all(loss[0, :5] == 0)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 61), targets.reshape(-1),
                                                 ignore_index=-1, reduction="none").view(3, 20)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    # At init the loss is close to uniform: ln(61) ~ 4.11.
    assert abs(loss[1:].mean().item() - torch.log(torch.tensor(61.0)).item()) < 0.3


def test_causal_future_tokens_do_not_change_past_logits():
    model = make()
    a = torch.randint(0, 61, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 7) % 61
    torch.testing.assert_close(model(a)[:, :10], model(b)[:, :10])


def test_sequence_longer_than_seq_len_is_refused():
    with pytest.raises(ValueError, match="seq_len"):
        make()(torch.zeros(1, 33, dtype=torch.long))


def test_learns_a_repeating_pattern():
    model = make()
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=1e-2)
    seq = torch.arange(33) % 5
    x, y = seq[:-1][None], seq[1:][None]
    first = None
    for _ in range(60):
        loss = model(x, y).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 < first


def test_weight_decay_only_on_matrices():
    model = make()
    decay, no_decay = model.param_groups(0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2, "tie_embeddings": False}])
@pytest.mark.parametrize("sampling", [
    {"temperature": 0.0},
    {"temperature": 1.0, "seed": 3},
    {"temperature": 0.8, "top_k": 10, "top_p": 0.9, "seed": 7},
])
def test_kv_cache_generation_equals_no_cache(kw, sampling):
    model = make(**kw)
    prompt = [1, 5, 9, 2]
    # 40 new tokens run past seq_len (32), so the sliding-window path is covered too.
    with_cache = model.generate(prompt, 40, use_cache=True, **sampling)
    without = model.generate(prompt, 40, use_cache=False, **sampling)
    assert len(with_cache) == 40
    assert with_cache == without


def test_cached_logits_equal_full_forward():
    from workbench.engine.model import KVCache

    model = make(n_kv_head=2)
    ids = torch.randint(0, 61, (1, 12))
    full = model(ids)
    cache = KVCache(2, 32)
    h = model.hidden(ids[:, :7], cache)
    step_logits = [torch.nn.functional.linear(h, model.output_weight)]
    for t in range(7, 12):
        step_logits.append(torch.nn.functional.linear(model.hidden(ids[:, t:t + 1], cache), model.output_weight))
    torch.testing.assert_close(torch.cat(step_logits, dim=1), full, rtol=1e-5, atol=1e-5)


def test_generation_is_seedable_and_stops_at_stop_ids():
    model = make()
    a = model.generate([1], 20, temperature=1.0, seed=11)
    assert a == model.generate([1], 20, temperature=1.0, seed=11)
    assert a != model.generate([1], 20, temperature=1.0, seed=12)
    # Stop at the token greedy decoding would produce third: the output ends before it.
    greedy = model.generate([1], 5, temperature=0.0)
    stopped = model.generate([1], 5, temperature=0.0, stop_ids=[greedy[2]])
    assert stopped == greedy[:greedy.index(greedy[2])]


def test_sample_token_filters():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([5.0, 4.0, 0.0, -1.0])
    assert sample_token(logits, 0.0, 0, 1.0, gen) == 0
    assert {sample_token(logits, 1.0, 2, 1.0, gen) for _ in range(200)} == {0, 1}
    # p(0) ~ 0.73: top_p 0.5 keeps only token 0; top_p 0.9 keeps 0 and 1.
    assert {sample_token(logits, 1.0, 0, 0.5, gen) for _ in range(100)} == {0}
    assert {sample_token(logits, 1.0, 0, 0.9, gen) for _ in range(300)} == {0, 1}


def test_mfu_is_none_without_a_known_peak():
    cpu = DeviceInfo(torch.device("cpu"), torch.float32, "cpu", 1e11)
    assert cpu.mfu(1e6, 1e4) == pytest.approx(0.1)
    unknown = DeviceInfo(torch.device("cpu"), torch.float32, "Mystery GPU", None)
    assert unknown.mfu(1e6, 1e4) is None and format_mfu(None) == "n/a" and format_mfu(0.123) == "12.3%"
    assert estimates.peak_flops("NVIDIA H100 80GB HBM3", True) == 989e12
    assert estimates.peak_flops("Mystery GPU", True) is None
