"""HydraLM and its blocks: exact degenerate cases, loss formulas, gradients, switch-on, generation
(through the engine's decoder, the one the server uses).

Over 400 lines: one file for the model's behaviours, mostly small parametrised cases over the
feature combinations; splitting it would scatter the shared configs."""

import itertools
import math
import pathlib

import pytest
import torch

from hydra_ray.config import HydraConfig, MoEConfig, load_config, parse_config
from hydra_ray.models import HydraLM
from hydra_ray.models.hydra import Block, sample
from hydra_ray.models.moe import MoELayer, SwiGLU
from hydra_ray.models.mor import ForwardCtx, RecursiveBlock
from conftest import ByteBatches


def _batch(cfg, B=3, T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    dom = torch.randint(0, len(cfg.domains), (B, T), generator=g)
    return x, torch.roll(x, -1, 1), dom


def _randomize_routers(model, std=0.5):
    """Make routers and predictors look trained: well-separated scores, non-trivial decisions."""
    with torch.no_grad():
        for u in model.units:
            for r in ([u.mod_router] if u.mod_router is not None else []) + list(u.mor_routers):
                r.router.weight.normal_(std=std)
                r.predictor[2].weight.normal_(std=std)
        for layer in model.moe_layers():
            layer.router.weight.normal_(std=std)


# --------------------------------------------------------------------------- exact degenerate cases
def test_moe_with_one_expert_is_exactly_the_dense_ffn():
    cfg = MoEConfig(num_experts=1, top_k=1)
    moe = MoELayer(16, 40, cfg, [0])
    dense = SwiGLU(16, 40)
    for p in (*moe.parameters(), *dense.parameters()):
        torch.nn.init.normal_(p, std=0.3)
    with torch.no_grad():
        for name in ("w1", "w3", "w2"):
            getattr(moe.experts, name)[0].copy_(getattr(dense, name))
    moe.enabled = True
    x = torch.randn(37, 16)
    out = moe(x)
    assert torch.equal(out.y_ND, dense(x))
    assert torch.equal(out.gate_NK, torch.ones(37, 1))


def test_mod_with_capacity_one_is_exactly_the_dense_model(small_model_cfg):
    cfg = small_model_cfg(mod=dict(blocks="all"))
    model = HydraLM(cfg)
    x, y, _ = _batch(cfg)
    dense = model(x, y)
    model.set_features(mod=True, mod_capacity=1.0)  # MoD switched on, as the warm-up starts it
    mod = model(x, y, return_trace=True)
    assert torch.equal(mod.logits, dense.logits)
    assert mod.trace.mod_selected_frac() == 1.0


def test_mor_with_one_recursion_is_exactly_the_plain_block(small_model_cfg):
    cfg = small_model_cfg(mor=dict(recursions=1))
    block = Block(cfg, moe=False, domain_to_expert=[])
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    unit = RecursiveBlock(0, block, cfg, is_mod=False)
    unit.mor_on = True
    x = torch.randn(2, 20, cfg.d_model)
    pos = torch.arange(20).expand(2, 20)
    delta, _ = block(x, pos, None, None, None)
    out = unit(x, pos, ForwardCtx(causal=False, mod_capacity=1.0))
    assert torch.equal(out, x + delta)
    model = HydraLM(cfg)
    xb, yb, _ = _batch(cfg)
    before = model(xb, yb).logits
    model.set_features(mor=True)
    assert torch.equal(model(xb, yb).logits, before)


@pytest.mark.parametrize("top_k", [1, 2])
def test_forced_routing_sends_every_token_of_a_domain_to_its_expert(small_model_cfg, top_k):
    cfg = small_model_cfg(moe=dict(top_k=top_k))
    model = HydraLM(cfg)
    model.set_features(mor=True, mod=True, moe=True, routing="forced")
    _randomize_routers(model)
    x, y, dom = _batch(cfg, B=4, T=32)
    out = model(x, y, dom, return_trace=True)
    mapped = torch.tensor(model.domain_to_expert)[dom]
    ran_any = False
    for exp_BTK, gate_BTK in out.trace.moe.values():
        ran = exp_BTK[..., 0] >= 0
        ran_any |= bool(ran.any())
        assert torch.equal(exp_BTK[..., 0][ran], mapped[ran])
        assert torch.all(gate_BTK[..., 0][ran] == 1.0)
        if top_k > 1:
            assert torch.all(exp_BTK[..., 1:][ran] == -1)
    assert ran_any
    assert out.trace.domain_expert_agreement(dom, model.domain_to_expert) == 1.0
    assert "teacher" in {k.removeprefix("moe_") for k in out.aux}  # the router learns the map meanwhile


# --------------------------------------------------------------------------- MoE losses and capacity
def _moe_2x2(capacity_factor=math.inf, top_k=1, E=2):
    moe = MoELayer(2, 8, MoEConfig(num_experts=E, top_k=top_k, capacity_factor=capacity_factor), [])
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(E, 2))
    moe.enabled = True
    return moe


def test_load_balance_and_z_loss_match_hand_computed_values():
    moe = _moe_2x2()
    l3 = math.log(3.0)
    # router logits = x: probabilities (3/4, 1/4), (1/4, 3/4), (3/4, 1/4); top-1 experts 0, 1, 0
    x = torch.tensor([[l3, 0.0], [0.0, l3], [l3, 0.0]])
    out = moe.train()(x)
    # f = (2/3, 1/3), P = (7/12, 5/12): lb = 2 * (2/3 * 7/12 + 1/3 * 5/12) = 19/18
    assert out.losses["lb"].item() == pytest.approx(19 / 18, rel=1e-6)
    # every token's logsumexp is log(3 + 1)
    assert out.losses["z"].item() == pytest.approx(math.log(4.0) ** 2, rel=1e-6)
    assert out.idx_NK[:, 0].tolist() == [0, 1, 0]
    # gates are probabilities relative to uniform: p * E / k
    assert out.gate_NK[:, 0].tolist() == pytest.approx([1.5, 1.5, 1.5])


def test_capacity_factor_drops_exactly_the_overflow_tokens():
    x = torch.tensor([[5.0, 0.0]] * 6)  # every token prefers expert 0
    moe = _moe_2x2(capacity_factor=1.0).train()  # capacity = ceil(1.0 * 6 * 1 / 2) = 3
    out = moe(x)
    assert out.idx_NK[:, 0].tolist() == [0, 0, 0, -1, -1, -1]
    assert torch.all(out.y_ND[3:] == 0) and torch.all(out.y_ND[:3].abs().sum(1) > 0)
    for cf in (2.0, math.inf):
        assert _moe_2x2(capacity_factor=cf).train()(x).idx_NK[:, 0].tolist() == [0] * 6
    # generation never drops (capacity would make a token depend on its neighbours)
    assert moe.eval()(x).idx_NK[:, 0].tolist() == [0] * 6


def test_capacity_queues_first_choices_before_second_choices():
    moe = _moe_2x2(capacity_factor=2 / 3, top_k=2).train()  # capacity = ceil(2/3 * 3 * 2 / 2) = 2
    x = torch.tensor([[2.0, 1.0], [2.0, 1.0], [1.0, 2.0]])  # preferences (0,1), (0,1), (1,0)
    assert moe(x).idx_NK.tolist() == [[0, 1], [0, -1], [1, -1]]


@pytest.mark.parametrize("counts", [[2, 0, 3], [0, 0, 4], [1, 1, 1]])
def test_grouped_experts_match_autograd_per_expert(counts):
    """Experts.forward's one-node grouped SwiGLU (output and weight gradients written in place)
    against the gradient checker in float64, and against per-expert autograd in float32 (the path
    autocast takes), experts without rows included."""
    from hydra_ray.models.moe import Experts, _GroupedSwiGLU, swiglu

    torch.manual_seed(0)
    E, D, F, A = 3, 5, 7, sum(counts)
    x = torch.randn(A, D, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in ((E, F, D), (E, F, D), (E, D, F))]
    assert torch.autograd.gradcheck(lambda x, a, b, c: _GroupedSwiGLU.apply(x, a, b, c, counts), (x, *ws))
    experts = Experts(E, D, F)
    x = torch.randn(A, D, requires_grad=True)
    y = experts(x, counts)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, experts.w1, experts.w3, experts.w2], gy)
    ref, start = [], 0
    for e, n in enumerate(counts):
        ref.append(swiglu(x[start:start + n], experts.w1[e], experts.w3[e], experts.w2[e]))
        start += n
    ref = torch.cat(ref)
    torch.testing.assert_close(y, ref)
    for g, r in zip(grads, torch.autograd.grad(ref, [x, experts.w1, experts.w3, experts.w2], gy)):
        torch.testing.assert_close(g, r)
    with torch.inference_mode():  # generation's path: no autograd node, the same output
        torch.testing.assert_close(experts(x, counts), ref)


def test_inference_forwards_skip_the_auxiliary_losses_and_keep_the_output(small_model_cfg):
    """Without grad (serving, evaluation) the MoE layers compute no auxiliary loss, which nothing
    could train on; logits and routing are those of the forward with grad."""
    cfg = small_model_cfg()
    torch.manual_seed(0)
    model = HydraLM(cfg)
    model.set_features(mor=True, mod=True, moe=True)
    model.eval()
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    with_grad = model(x, causal=True, return_trace=True)
    assert {"moe_lb", "moe_z"} <= set(with_grad.aux)
    with torch.inference_mode():
        without = model(x, causal=True, return_trace=True)
    assert without.aux == {}
    torch.testing.assert_close(without.logits, with_grad.logits)
    assert without.trace.tokens(0) == with_grad.trace.tokens(0)


def test_bias_balancing_raises_underloaded_experts():
    moe = MoELayer(2, 8, MoEConfig(num_experts=2, bias_balancing=True, bias_rate=0.1), [])
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(2))
    moe.enabled = True
    moe.train()(torch.tensor([[3.0, 0.0]] * 5))
    moe.balance_step()
    assert moe.expert_bias.tolist() == pytest.approx([-0.1, 0.1])
    assert moe.load_acc.sum() == 0
    # the bias steers the selection (never the gate)
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([-1.0, 1.0]))
    assert moe.eval()(torch.tensor([[3.0, 0.0]])).idx_NK.tolist() == [[1]]
    # a phase with bias_balancing: false clears the bias and holds it at zero
    moe.train()(torch.tensor([[3.0, 0.0]] * 5))
    moe.balance_step(on=False)
    assert moe.expert_bias.tolist() == [0.0, 0.0] and moe.load_acc.sum() == 0
    assert moe.eval()(torch.tensor([[3.0, 0.0]])).idx_NK.tolist() == [[0]]
    with pytest.raises(ValueError, match=r"phases.0.bias_balancing: needs model.moe.bias_balancing"):
        parse_config({"curriculum": {"phases": [{"name": "a", "until_step": 4, "moe": True,
                                                 "bias_balancing": False}]}})


# --------------------------------------------------------------------------- gradients
def test_gradients_reach_every_router_and_match_finite_differences(small_model_cfg):
    cfg = small_model_cfg(mod=dict(blocks="all"), mor=dict(recursions=3))
    model = HydraLM(cfg).double().train()
    model.set_features(mor=True, mod=True, moe=True, mod_capacity=0.5)
    _randomize_routers(model)
    x, y, dom = _batch(cfg, B=2, T=16)

    routers = {}
    for u in model.units:
        routers[f"mod{u.index}"] = u.mod_router.router.weight
        for r, m in enumerate(u.mor_routers, start=1):
            routers[f"mor{u.index}.{r}"] = m.router.weight
        routers[f"moe{u.index}"] = u.block.ffn.router.weight
    model.zero_grad()
    model(x, y, dom).ce.backward()
    eps = 1e-6
    for name, w in routers.items():
        assert w.grad is not None and w.grad.abs().sum() > 0, f"no gradient reaches router {name}"
        flat = w.view(-1)
        for i in torch.topk(w.grad.abs().view(-1), 2).indices.tolist():
            with torch.no_grad():
                old = flat[i].item()
                flat[i] = old + eps
                up = model(x, y, dom).ce.item()
                flat[i] = old - eps
                down = model(x, y, dom).ce.item()
                flat[i] = old
            numeric = (up - down) / (2 * eps)
            assert numeric == pytest.approx(w.grad.view(-1)[i].item(), rel=1e-4, abs=1e-9), name


# --------------------------------------------------------------------------- switch-on continuity
@pytest.mark.slow
def test_switching_each_feature_on_mid_run_keeps_the_loss_within_two_percent():
    cfg: HydraConfig = load_config("tiny")
    model = HydraLM(cfg.model)
    data = ByteBatches(cfg, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):  # a dense foundation phase, so the switches act on a trained network
        x, y, dom = data.batch(8, 128, None)
        loss = model(x, y, dom).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y, dom = data.batch(16, 128, None)

    def ce():
        with torch.no_grad():
            return model(x, y, dom).ce.item()

    before = ce()
    for step in (dict(mor=True), dict(mod=True, mod_capacity=1.0), dict(moe=True)):
        model.set_features(**step)
        after = ce()
        assert abs(after - before) / before < 0.02, (step, before, after)
        before = after


# --------------------------------------------------------------------------- generation
def _generate(model, cfg, prompt_BT, max_tokens, use_cache=True, tokenizer=None, **sampling):
    """The one decoder, the serving engine's, over each row of `prompt_BT` (the byte tokenizer
    decodes; its EOS lies outside this model's vocabulary unless `tokenizer` says otherwise):
    the new tokens [B, <= max_tokens] and the finish reasons."""
    from hydra_ray.config import HydraConfig
    from hydra_ray.serve.engine import Engine, GenRequest

    engine = Engine(model, HydraConfig(model=cfg))
    if tokenizer is not None:
        engine.tokenizer = tokenizer
    out = engine.complete([GenRequest(row.tolist(), max_tokens=max_tokens, **sampling) for row in prompt_BT],
                          use_cache)
    return torch.tensor([r["token_ids"] for r in out]), [r["finish_reason"] for r in out]


@pytest.mark.parametrize("mor,mod,moe", list(itertools.product([False, True], repeat=3)))
def test_cached_greedy_generation_equals_recomputing_the_prefix(small_model_cfg, mor, mod, moe):
    cfg = small_model_cfg(mod=dict(blocks="all"))
    model = HydraLM(cfg)
    model.set_features(mor=mor, mod=mod, moe=moe, mod_capacity=0.5)
    _randomize_routers(model)
    prompt, _, _ = _batch(cfg, B=2, T=7)
    cached, reasons = _generate(model, cfg, prompt, 20, temperature=0.0)
    recomputed, _ = _generate(model, cfg, prompt, 20, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 20) and reasons == ["length", "length"]
    assert torch.equal(cached, recomputed)
    if mod or mor:  # the causal decisions really vary per token
        tr = model.trace(torch.cat([prompt, cached], 1)).trace
        if mod:
            assert 0.0 < tr.mod_selected_frac() < 1.0
        if mor:
            depth = torch.cat([d.flatten() for d in tr.mor.values()])
            assert depth.max() > 1  # some tokens recursed
            assert depth.min() == (0 if mod else 1)  # MoD skips give depth 0


def test_forced_routing_generation_with_domain_is_cached_consistently(small_model_cfg):
    cfg = small_model_cfg()
    model = HydraLM(cfg)
    model.set_features(mor=True, mod=True, moe=True, routing="forced")
    _randomize_routers(model)
    prompt, _, _ = _batch(cfg, B=1, T=5)
    a, _ = _generate(model, cfg, prompt, 12, temperature=0.0, domain=cfg.domains[1])
    b, _ = _generate(model, cfg, prompt, 12, temperature=0.0, domain=cfg.domains[1], use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("per_token", [1 << 13, 0], ids=["per-token", "regrouped"])
def test_a_packed_forward_gives_every_sequence_the_logits_it_gets_alone(small_model_cfg, monkeypatch, per_token):
    """One packed forward holds a decoding sequence's next token, a newcomer's prompt in the row
    another sequence has just left, and a second prompt: each gets the logits of its own forward
    in a fresh cache, with MoD and MoR skipping blocks per token (a slot a token leaves unwritten
    must not show the row's previous occupant). Both ways a packed forward attends: each token
    against its own copy of its row (few slots in all), and regrouped by sequence (many)."""
    from hydra_ray.models.attention import KVCache, PackedLayer, pack_positions

    monkeypatch.setattr(PackedLayer, "PER_TOKEN", per_token)

    cfg = small_model_cfg(mod=dict(blocks="all"))
    model = HydraLM(cfg).eval()
    model.set_features(mor=True, mod=True, moe=True, mod_capacity=0.5)
    _randomize_routers(model)
    prompt, _, _ = _batch(cfg, B=4, T=9)
    a, old, b, c = (row.tolist() for row in prompt)
    b, c = b[:6], c[:3]

    def packed(cache, seqs):  # [(cache row, first position, tokens)]
        ids = [t for _, _, toks in seqs for t in toks]
        rows = torch.tensor([r for r, _, toks in seqs for _ in toks])
        pos = torch.tensor([p + i for _, p, toks in seqs for i in range(len(toks))])
        return model(torch.tensor([ids]), causal=True, cache=cache.packed(), start_pos=pack_positions(rows, pos)[None])

    def alone(toks):
        return model(torch.tensor([toks]), causal=True, cache=KVCache(1, 16)).logits[0]

    with torch.inference_mode():
        cache = KVCache(3, 16)
        packed(cache, [(0, 0, a[:-1]), (1, 0, old)])  # row 1: a sequence that then leaves
        cache.forget([1])
        logits = packed(cache, [(0, len(a) - 1, a[-1:]), (1, 0, b), (2, 0, c)]).logits[0]
        assert torch.allclose(logits[0], alone(a)[-1], atol=1e-5)
        assert torch.allclose(logits[1:7], alone(b), atol=1e-5)
        assert torch.allclose(logits[7:], alone(c), atol=1e-5)
        # a stopped forward's writes forgotten from each row's first new slot on (Decoder.step's
        # restart): the rows keep their older keys, and the rerun gives the same logits
        before = {key: layer.valid_BL.clone() for key, layer in cache.layers.items()}
        cache.forget([0, 1], [len(a) - 1, 0])
        for key, layer in cache.layers.items():
            assert torch.equal(layer.valid_BL[0, :len(a) - 1], before[key][0, :len(a) - 1])
            assert not layer.valid_BL[0, len(a) - 1:].any() and not layer.valid_BL[1].any()
            assert torch.equal(layer.valid_BL[2], before[key][2])
        rerun = packed(cache, [(0, len(a) - 1, a[-1:]), (1, 0, b)]).logits[0]
        assert torch.allclose(rerun[0], alone(a)[-1], atol=1e-5) and torch.allclose(rerun[1:], alone(b), atol=1e-5)
        # without clearing, the newcomer would see the previous occupant's keys
        stale = KVCache(3, 16)
        packed(stale, [(1, 0, old)])
        assert not torch.allclose(packed(stale, [(1, 0, b)]).logits[0], alone(b), atol=1e-5)


def test_sampling_is_seeded_and_filters_behave(small_model_cfg):
    cfg = small_model_cfg()
    model = HydraLM(cfg)
    prompt, _, _ = _batch(cfg, B=1, T=4)

    def gen(**kw):
        return _generate(model, cfg, prompt, 15, **kw)[0]

    a = gen(temperature=1.0, seed=7)
    b = gen(temperature=1.0, seed=7)
    c = gen(temperature=1.0, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = gen(temperature=0.0)
    assert torch.equal(gen(temperature=1.0, top_k=1, seed=3), greedy)
    assert torch.equal(gen(temperature=1.0, top_p=1e-6, seed=3), greedy)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, 1.0, 2, None, g)) for _ in range(200)}
    assert draws == {2, 3}
    # top_p keeps the smallest prefix whose mass reaches it: exactly 0.5 of four equal tokens is two
    for p, kept in ((0.5, 2), (0.25, 1), (0.51, 3)):
        assert len({int(sample(torch.zeros(1, 4), 1.0, None, p, g)) for _ in range(300)}) == kept, p


def test_a_token_no_block_took_asks_no_deeper_router(small_model_cfg):
    """Causal routing: when MoD skips every token of a forward in a block, that block's MoR routers
    are not run (nobody may go deeper), and the logits equal those of a model that runs them; in
    training (top-k) they still run."""
    cfg = small_model_cfg(mod=dict(blocks="all"))
    model = HydraLM(cfg).eval()
    model.set_features(mor=True, mod=True, moe=True, mod_capacity=0.5)
    _randomize_routers(model)
    unit = model.units[0]
    with torch.no_grad():
        unit.mod_router.predictor[2].bias.fill_(-100.0)  # MoD takes no token into block 0
    calls = []
    hooks = [r.register_forward_hook(lambda *_: calls.append(1)) for r in unit.mor_routers]
    idx, _, _ = _batch(cfg, B=1, T=1)
    with torch.no_grad():
        out = model(idx, causal=True, return_trace=True)
        assert calls == [] and out.trace.mor[0].eq(0).all()
        for h in hooks:
            h.remove()
        unit.mor_on = False  # no MoR in block 0 at all: the same logits
        assert torch.equal(model(idx, causal=True).logits, out.logits)
        unit.mor_on = True
        hooks = [r.register_forward_hook(lambda *_: calls.append(1)) for r in unit.mor_routers]
        model(*_batch(cfg, B=2, T=8)[:1], causal=False)
        assert len(calls) == len(unit.mor_routers)


def test_the_exponential_race_draws_each_row_from_its_own_distribution():
    """`race`, the draw behind every sampled token: frequencies within 4 sigma of the
    probabilities, never a zero-probability id, and a row's draws the same beside other rows."""
    from hydra_ray.models.hydra import race

    probs = torch.tensor([[0.6, 0.25, 0.15, 0.0], [0.0, 0.0, 0.5, 0.5]])
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    n = 4000
    draws = torch.stack([race(probs, [g1, g2]) for _ in range(n)])  # [n, 2]
    for row in range(2):
        freq = torch.bincount(draws[:, row], minlength=4).double() / n
        sigma = (probs[row].double() * (1 - probs[row].double()) / n).sqrt()
        assert ((freq - probs[row].double()).abs() <= 4 * sigma + 1e-12).all(), (row, freq)
    alone = torch.Generator().manual_seed(2)
    assert [int(race(probs[1:], [alone])) for _ in range(50)] == draws[:50, 1].tolist()


def test_generation_stops_at_eos(small_model_cfg):
    from hydra_ray.data.tokenizer import ByteTokenizer

    cfg = small_model_cfg()
    model = HydraLM(cfg)
    prompt, _, _ = _batch(cfg, B=1, T=4)
    first = int(_generate(model, cfg, prompt, 1, temperature=0.0)[0][0, 0])
    tok = ByteTokenizer()
    tok.eos_id = first  # this model's greedy first token ends the text
    out, reasons = _generate(model, cfg, prompt, 10, temperature=0.0, tokenizer=tok)
    assert out.tolist() == [[first]] and reasons == ["stop"]


# --------------------------------------------------------------------------- trace, state, upcycling
def test_trace_reports_every_router_per_token(small_model_cfg):
    cfg = small_model_cfg(moe=dict(top_k=2))
    model = HydraLM(cfg)
    model.set_features(mor=True, mod=True, moe=True, mod_capacity=0.5)
    _randomize_routers(model)
    x, y, dom = _batch(cfg, B=2, T=16)
    tr = model(x, y, dom, return_trace=True).trace
    util = tr.expert_util()
    assert len(util) == 4 and sum(util) == pytest.approx(1.0)
    assert set(tr.expert_util_by_layer()) == {f"b{b}r{r}" for b in range(2) for r in range(3)}
    assert tr.mod_selected_frac() == pytest.approx(0.5)  # top-k: exactly the capacity per sequence
    tokens = tr.tokens(0)
    assert len(tokens) == 16
    for t, rec in enumerate(tokens):
        depth = rec["mor"]["b1"]
        assert rec["mod"]["b1"]["selected"] == (depth > 0)
        assert len([k for k in rec["moe"] if k.startswith("b1")]) == depth  # one MoE layer per recursion run
        for layer in rec["moe"].values():
            assert 1 <= len(layer["experts"]) <= 2 and len(layer["gates"]) == len(layer["experts"])


def test_upcycling_copies_the_dense_ffn_once_and_state_round_trips(small_model_cfg):
    cfg = small_model_cfg()
    model = HydraLM(cfg)
    layer = model.moe_layers()[0]
    model.set_features(moe=True)
    rel = (layer.experts.w1 - layer.dense.w1[None]).norm() / layer.dense.w1[None].expand_as(layer.experts.w1).norm()
    assert 0 < rel < 0.05
    probs = layer.router(torch.randn(50, cfg.d_model)).softmax(-1)
    assert torch.allclose(probs, torch.full_like(probs, 0.25), atol=0.02)  # near-uniform router
    snapshot = layer.experts.w1.clone()
    model.set_features(moe=True)  # switching on again does not re-upcycle
    assert torch.equal(layer.experts.w1, snapshot)

    model.set_features(mor=True, mod=True, routing="teacher", mod_capacity=0.75)
    fresh = HydraLM(cfg)
    fresh.load_state_dict(model.state_dict())
    assert fresh.features == model.features
    x, y, dom = _batch(cfg)
    assert torch.equal(fresh(x, y, dom).logits, model(x, y, dom).logits)


def test_shared_expert_upcycling_keeps_the_layer_output(small_model_cfg):
    cfg = small_model_cfg(moe=dict(shared_expert=True, upcycle_noise=0.0, router_init_std=0.0))
    model = HydraLM(cfg)
    layer = model.moe_layers()[0]
    x = torch.randn(10, cfg.d_model)
    dense = layer(x).y_ND
    model.set_features(moe=True)
    assert torch.allclose(layer(x).y_ND, dense, atol=1e-6)


# --------------------------------------------------------------------------- learning
@pytest.mark.slow
def test_tiny_model_with_every_feature_overfits_one_batch():
    cfg = load_config("tiny")
    model = HydraLM(cfg.model)
    model.set_features(mor=True, mod=True, moe=True, mod_capacity=cfg.model.mod.capacity)
    x, y, dom = ByteBatches(cfg, seed=3).batch(8, 128, None)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    start, half_at = None, None
    for step in range(200):
        out = model(x, y, dom)
        start = start if start is not None else out.ce.item()
        if half_at is None and out.ce.item() < start / 2:
            half_at = step
        if out.ce.item() < start / 10:  # memorised, far past what byte statistics alone explain
            break
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert half_at is not None, (start, out.ce.item())
    assert out.ce.item() < start / 10, (start, out.ce.item(), step)


def test_model_code_imports_neither_ray_nor_process_groups():
    """The model is plain torch: its modules import no Ray and no torch.distributed (read from their
    import statements, not their text), and importing the package loads no Ray module. Expert
    parallelism reaches it only through the dispatcher that parallelize() swaps in."""
    import ast
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent / "hydra_ray" / "models"
    for f in root.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for n in names:
                assert n.split(".")[0] != "ray" and not n.startswith("torch.distributed"), (f.name, n)
                assert n not in ("hydra_ray.parallel.parallelize", "hydra_ray.train"), (f.name, n)
    probe = "import sys, hydra_ray.models; print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", r.stdout


@pytest.mark.parametrize("ragged", [False, True])
def test_gathered_subset_application_matches_a_per_row_loop(small_model_cfg, ragged):
    """The fast path (gather selected tokens into a padded sub-batch, one attention call, scatter
    back) against the naive one: each row's selected tokens run alone as a short sequence."""
    cfg = small_model_cfg()
    block = Block(cfg, moe=False, domain_to_expert=[])
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    unit = RecursiveBlock(0, block, cfg, is_mod=False)
    B, T = 3, 12
    x = torch.randn(B, T, cfg.d_model)
    pos = torch.arange(T).expand(B, T)
    g = torch.Generator().manual_seed(1)
    if ragged:
        sel = torch.rand(B, T, generator=g) < 0.5
        sel[:, 0] = True
    else:
        sel = torch.zeros(B, T, dtype=torch.bool)
        for b in range(B):
            sel[b, torch.randperm(T, generator=g)[:5]] = True
    gate = torch.rand(B, T, generator=g) + 0.5
    fast = unit._run(x, pos, sel, gate, 0, ForwardCtx(causal=False, mod_capacity=1.0))
    naive = x.clone()
    for b in range(B):
        cols = sel[b].nonzero().squeeze(1)
        delta, _ = block(x[b : b + 1, cols], pos[b : b + 1, cols], None, None, None)
        naive[b, cols] = x[b, cols] + gate[b, cols, None] * delta[0]
    assert torch.allclose(fast, naive, atol=1e-5)
    assert torch.equal(fast[~sel], x[~sel])  # unselected tokens ride the residual untouched


# --------------------------------------------------------------------------- regressions (review)
def test_bfloat16_autocast_generation_and_trace(small_model_cfg):
    cfg = small_model_cfg()
    model = HydraLM(cfg)
    model.set_features(mor=True, mod=True, moe=True, mod_capacity=0.5)
    _randomize_routers(model)
    prompt, _, _ = _batch(cfg, B=2, T=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = _generate(model, cfg, prompt, 4, temperature=0.0)
        tr = model.trace(prompt)
    assert out.shape == (2, 4) and tr.trace.mor


def test_mod_capacity_survives_a_checkpoint_round_trip_and_dtype_casts(small_model_cfg):
    cfg = small_model_cfg(mod=dict(blocks="all"))
    model = HydraLM(cfg)
    model.set_features(mod=True, mod_capacity=0.3)
    x, y, _ = _batch(cfg, B=2, T=10)
    before = model(x, y, return_trace=True).trace.mod_selected_frac()
    fresh = HydraLM(cfg)
    fresh.load_state_dict(model.state_dict())
    assert fresh.features["mod_capacity"] == 0.3
    assert fresh(x, y, return_trace=True).trace.mod_selected_frac() == before == pytest.approx(0.3)
    fresh.to(torch.bfloat16)
    assert fresh.features["mod_capacity"] == 0.3 and fresh.feature_state.dtype == torch.int64


def test_balance_loss_sees_the_overload_before_capacity_drops():
    x = torch.tensor([[5.0, 0.0]] * 8)  # a collapsed router: everything wants expert 0
    for cf in (math.inf, 1.0):
        moe = _moe_2x2(capacity_factor=cf).train()
        out = moe(x)
        assert out.losses["lb"].item() > 1.9  # ~E * p0 with f0 = 1, not the capped share
        assert moe.load_acc.tolist() == [8.0, 0.0]


def test_causal_forward_never_drops_even_in_training_mode():
    moe = _moe_2x2(capacity_factor=1.0).train()
    x = torch.tensor([[5.0, 0.0]] * 6)
    assert moe(x, causal=True).idx_NK[:, 0].tolist() == [0] * 6
    assert moe(x).idx_NK[:, 0].tolist() == [0, 0, 0, -1, -1, -1]


def test_switching_moe_off_after_a_shared_expert_upcycle_restores_the_dense_layer(small_model_cfg):
    cfg = small_model_cfg(moe=dict(shared_expert=True))
    model = HydraLM(cfg)
    layer = model.moe_layers()[0]
    x = torch.randn(10, cfg.d_model)
    dense = layer(x).y_ND
    model.set_features(moe=True)
    model.set_features(moe=False)
    assert torch.equal(layer(x).y_ND, dense)


def test_trace_counts_a_token_whose_first_choice_was_dropped():
    from hydra_ray.models.trace import RoutingTrace

    tr = RoutingTrace(num_experts=3)
    idx = torch.tensor([[0, 1], [0, 2], [-1, 2]])
    tr.record_moe((0, 0), (1, 3), torch.zeros(3, dtype=torch.long), torch.arange(3), idx, torch.ones(3, 2))
    assert tr.tokens(0)[2]["moe"]["b0r0"]["experts"] == [2]
    assert tr.expert_counts().tolist() == [2, 1, 2]


def test_meta_construction_then_materialisation_resets_buffers(small_model_cfg):
    cfg = small_model_cfg()
    with torch.device("meta"):
        model = HydraLM(cfg)
        model.set_features(moe=True)  # no data to upcycle on meta: a no-op, not a crash
    model.to_empty(device="cpu")
    model.reset_parameters()
    layer = model.moe_layers()[0]
    assert layer.domain_expert.tolist() == model.domain_to_expert
    assert not bool(layer.upcycled) and torch.all(layer.expert_bias == 0)
    assert model.features["moe"] and model.feature_state.tolist()[2] == 1


def test_whole_model_pickles(small_model_cfg, tmp_path):
    model = HydraLM(small_model_cfg())
    torch.save(model, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    assert again.features == model.features


def test_router_aux_loss_trains_the_router_scores_towards_its_own_top_k():
    """`router_aux_weight` adds the router's own BCE against its top-k to the predictor loss: the
    router weights then get a gradient from that loss alone, and off (0) they get none from it."""
    from hydra_ray.models.mod import TokenRouter

    torch.manual_seed(0)
    x = torch.randn(2, 16, 8)
    for aux, expect in ((0.0, False), (0.5, True)):
        r = TokenRouter(8, 4, "centered", router_aux=aux)
        torch.nn.init.normal_(r.router.weight, std=0.1)
        s = r(x, 0.5, causal=False)
        assert int(s.sel_BT.sum()) == 16
        s.bce.backward()
        got = r.router.weight.grad is not None and bool(r.router.weight.grad.abs().sum() > 0)
        assert got == expect


def test_flops_per_token_counts_the_token_selectors(small_model_cfg):
    """Each MoD block's selector and each extra recursion's score every token of the sequence:
    a router (d -> 1), and the causal predictor (d -> h -> 1) where they select (capacity < 1)."""
    cfg = small_model_cfg()
    with torch.device("meta"):
        model = HydraLM(cfg)
    d, sched = cfg.d_model, cfg.mor.schedule()
    assert len(cfg.mod_blocks()) >= 1 and len(sched) >= 2 and cfg.mod.capacity < 1

    def one(hidden, capacity):
        return 2 * d + (2 * (d * hidden + hidden) if capacity < 1 else 0)

    want = len(cfg.mod_blocks()) * one(cfg.mod.predictor_hidden, cfg.mod.capacity)
    want += cfg.n_blocks * sum(one(cfg.mor.predictor_hidden, c) for c in sched[1:])
    assert model.flops_per_token() - model.flops_per_token(selectors=False) == pytest.approx(want, abs=1)
