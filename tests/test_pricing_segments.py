"""Pricing that keeps learning on a market it does not assume (issue 17): price sensitivity per
segment with shrinkage, Thompson samples over every term, exploration that reaches the whole
guardrail range with the share the setting says, and the per-segment calibration check."""
import math

import numpy as np
import pytest
import torch

from protos.pricing.v1 import pricing_pb2
from services.pricing.adapter import PricingService
from tests.pricing_fixtures import quote, small_world
from trainer.domains import pricing
from trainer.domains.pricing_data import SEGMENTS


# ---------------------------------------------------------------- per-segment sensitivity
def synthetic_stream(rng, n, products, slopes, levels, hours=False, offset0=1):
    """Quotes at random prices within +-20 % of the reference, sold with a probability that is
    NOT the model's form (a probit curve: each segment's true sensitivity is its own), as
    training rows with increasing log offsets."""
    from scipy.special import ndtr

    seg_codes = np.array(list(slopes))
    product = rng.choice(products, n)
    segment = rng.choice(seg_codes, n)
    x = rng.uniform(-0.2, 0.2, n)
    slope = np.array([slopes[s] for s in segment])
    level = np.array([levels[s] for s in segment])
    p = ndtr(level - slope * x)
    y = (rng.random(n) < p).astype(np.float32)
    hour = rng.integers(0, 24, n) if hours else np.full(n, 12)
    X = pricing.rows(product, segment, hour, x, 1.0, np.arange(offset0, offset0 + n))
    return X, y


def learned_slope(net, product, segment, hour=12):
    """The model's mean price sensitivity over +-20 %: the drop of its logit from x = -0.2 to
    x = 0.2, per unit of x (the logistic slope and the segment's curve shape together: either
    can carry the segment's response to price)."""
    t = lambda v: torch.tensor([v])
    with torch.no_grad():
        lo, hi = (float(net.logit(t(product), t(segment), t(hour), torch.tensor([x]))[0]) for x in (-0.2, 0.2))
    return (lo - hi) / 0.4


def test_segments_with_different_true_slopes_are_learned_in_order():
    rng = np.random.default_rng(0)
    net = pricing.PricingNet()
    seg = {SEGMENTS.index("<25"): 6.0, SEGMENTS.index("30-34"): 2.0, SEGMENTS.index("45-49"): 0.3}
    products = np.array([11, 12, 13, 14])
    offset = 1
    for _ in range(4):  # absorbed in rounds, as the learner does (each round's posterior is the next prior)
        X, y = synthetic_stream(rng, 3000, products, seg, {s: -0.3 for s in seg}, offset0=offset)
        offset += len(y)
        assert pricing.absorb(net, X, y, max_iter=40) == len(y)
    for product in products:
        s = [learned_slope(net, int(product), code) for code in seg]  # in the order of the true slopes
        assert s[0] > s[1] > s[2], (product, s)
    # the store-wide segment terms carry the difference: a product this stream never quoted
    # borrows it (its own cell terms are still at their prior)
    unseen = [learned_slope(net, 99, code) for code in seg]
    assert unseen[0] > unseen[1] > unseen[2], unseen
    assert float(net.prec_b_cell[99 * pricing.N_SEGMENTS + SEGMENTS.index("<25")]) == pricing.PRIOR_PRECISION["b_cell"]


def test_a_segment_with_little_data_borrows_the_store_and_product_sensitivity():
    """A cell with a handful of quotes stays near product + segment (shrinkage); its own few
    noisy rows do not swing it."""
    rng = np.random.default_rng(1)
    net = pricing.PricingNet()
    young, mid = SEGMENTS.index("<25"), SEGMENTS.index("30-34")
    X, y = synthetic_stream(rng, 8000, np.array([21, 22, 23]), {young: 5.0, mid: 1.0}, {young: 0.0, mid: 0.0})
    pricing.absorb(net, X, y, max_iter=40)
    # product 24: plenty of mid-segment quotes, three young-segment ones that all sold at the top price
    X2, y2 = synthetic_stream(rng, 2000, np.array([24]), {mid: 1.0}, {mid: 0.0}, offset0=10_000)
    few = pricing.rows(np.full(3, 24), np.full(3, young), np.full(3, 12), np.full(3, 0.2), 1.0,
                       np.arange(20_000, 20_003))
    pricing.absorb(net, np.concatenate([X2, few]), np.concatenate([y2, np.ones(3, np.float32)]), max_iter=40)
    s_young, s_mid = learned_slope(net, 24, young), learned_slope(net, 24, mid)
    assert s_young > 2.0 * s_mid, (s_young, s_mid)  # priced like the store's young customers, not like 3 sales


def test_hour_terms_learn_only_what_the_data_supports():
    rng = np.random.default_rng(2)
    net = pricing.PricingNet()
    X, y = synthetic_stream(rng, 6000, np.array([31, 32]), {SEGMENTS.index("30-34"): 2.0},
                            {SEGMENTS.index("30-34"): 0.0}, hours=True)
    pricing.absorb(net, X, y, max_iter=40)
    # hour has no effect in this stream: the hours' sensitivity factors stay near 1
    factors = net.b_hour.detach()[:24].abs()
    assert float(factors.mean()) < 0.12 and float(factors.max()) < 0.3, factors
    assert float(net.prec_b_hour[:24].min()) > pricing.PRIOR_PRECISION["b_hour"]  # but they did see the data


# ---------------------------------------------------------------- Thompson samples
def test_thompson_samples_vary_the_segment_and_hour_terms():
    net = pricing.PricingNet()
    with torch.no_grad():
        for name in pricing.SAMPLED:  # everything certain ...
            getattr(net, f"prec_{name}").fill_(1e12)
    feeds = (torch.tensor([5]), torch.tensor([3]), torch.tensor([7]), torch.tensor([[-0.2, 0.0, 0.2]]))

    def spread():
        with torch.no_grad():
            _, sampled = net(*feeds)
        return float(sampled.std(dim=1).max())

    assert spread() < 1e-4
    for name in ("b_seg", "a_seg", "b_hour", "a_hour", "b_cell", "a_cell", "c_seg"):
        with torch.no_grad():
            getattr(net, f"prec_{name}").fill_(1.0)  # ... but this group
        assert spread() > 0.01, name
        with torch.no_grad():
            getattr(net, f"prec_{name}").fill_(1e12)


def test_export_keeps_one_call_and_matches_pytorch(tmp_path):
    import onnxruntime as ort

    rng = np.random.default_rng(3)
    net = pricing.PricingNet()
    X, y = synthetic_stream(rng, 2000, np.array([1, 2, 30000]), {1: 3.0, 7: 0.5}, {1: 0.0, 7: 0.0}, hours=True)
    pricing.absorb(net, X, y, max_iter=20)
    path = pricing.export_pricing(net, tmp_path / "m.onnx")
    feeds = {"product": np.array([1, 2, 30000, 0], np.int64), "segment": np.array([1, 7, 10, 0], np.int64),
             "hour": np.array([0, 23, 5, 12], np.int64), "log_price_ratio": rng.uniform(-0.3, 0.3, (4, 9)).astype(np.float32)}
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    with torch.no_grad():
        want = net(*(torch.from_numpy(v) for v in feeds.values()))
    for g, w in zip(got, want):
        assert g.shape == tuple(w.shape) and np.max(np.abs(g - w.numpy())) < 1e-5


# ---------------------------------------------------------------- exploration
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return small_world(tmp_path_factory.mktemp("segments"))


@pytest.fixture(scope="module")
def model(world):
    from services.pricing.adapter import SIGNATURE, check_manifest, check_outputs
    from shared.runtime.model import ModelLoader

    loader = ModelLoader(expected=SIGNATURE, output_check=check_outputs, manifest_check=check_manifest)
    return loader.from_registry(world.registry, "pricing", world.registry.current_version("pricing"))


def quotes_at_the_lower_edge(service, model, world, n=400, seed=0):
    """Quotes (+-20 %) whose greedy price is the lower guardrail (most Ta Feng products: their
    elasticity pushes revenue down), and the prices the service chose."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        product = world.products[int(rng.integers(len(world.products)))]
        ref = world.references[product]
        req = quote(product, ref, pct=20.0, context=pricing_pb2.Context(segment="30-34", hour_of_day=int(rng.integers(24))))
        prepared = service.preprocess(req, model)
        outputs = dict(zip(model.output_names, model.run(prepared.feeds)))
        grid, lo, hi = prepared.extra[:3]
        greedy = float(grid[int(np.argmax(grid * outputs["conversion"][0]))])
        if greedy != lo:
            continue
        resp = service.postprocess(req, prepared, outputs, model, "p")
        out.append((resp, lo, hi))
    return out


def test_exploration_reaches_the_upper_part_of_the_range_from_the_lower_edge(world, model):
    def upper_share(service):
        served = quotes_at_the_lower_edge(service, model, world, n=1000)
        return np.mean([r.price >= lo + 2.0 / 3.0 * (hi - lo) for r, lo, hi in served])

    # step-limited exploration alone (10 % of the greedy price) never leaves the lower third of a +-20 % range
    assert upper_share(PricingService(None, exploration_share=0.2, max_step_pct=10.0, wide_step_share=0.0,
                                      exploration_gain_scale=0.0, seed=4)) == 0
    # with wide steps (a Thompson sample's best price anywhere in the range), the upper third is
    # quoted within 1,000 quotes, by the samples that rate it best, and never more often than the
    # exploring quotes (a fifth)
    share = upper_share(PricingService(None, exploration_share=0.2, max_step_pct=10.0, wide_step_share=1.0,
                                       uniform_step_share=0.0, exploration_gain_scale=0.0, seed=4))
    assert 0 < share < 0.2, share


def test_uniform_wide_steps_cover_the_whole_range_where_the_samples_agree(world, model):
    """Uniform wide steps try every other candidate about equally often, whatever the posterior
    says (a posterior wrongly sure that high prices never sell would keep its samples away)."""
    service = PricingService(None, exploration_share=1.0, wide_step_share=1.0, uniform_step_share=1.0,
                             exploration_gain_scale=0.0, seed=7)
    served = quotes_at_the_lower_edge(service, model, world, n=600, seed=3)
    position = np.array([(r.price - lo) / (hi - lo) for r, lo, hi in served])
    assert all(r.exploratory for r, _, _ in served)  # every quote explored, none at the greedy (lower) edge
    counts = np.histogram(position, bins=4, range=(0.0, 1.0))[0]
    # 20 other grid prices (plus the reference) spread over the range: each quarter gets about a quarter
    assert counts.min() >= 0.15 * len(served), counts
    with pytest.raises(ValueError):
        PricingService(None, uniform_step_share=1.5)


@pytest.mark.parametrize("setting", [0.05, 0.2, 0.5])
def test_realised_exploration_share_is_the_setting(world, model, setting):
    service = PricingService(None, exploration_share=setting, max_step_pct=10.0, wide_step_share=0.2,
                             exploration_gain_scale=0.0, seed=11)
    served = quotes_at_the_lower_edge(service, model, world, n=1500, seed=5)
    realised = np.mean([r.exploratory for r, _, _ in served])
    sd = math.sqrt(setting * (1 - setting) / len(served))
    assert abs(realised - setting) < 4 * sd, (realised, setting)


def test_exploration_decays_as_the_posterior_narrows(model):
    """A quote explores with the full share while its Thompson samples disagree about the best
    price by at least the gain scale, less as they agree, never less than the floor; the
    realised share follows that probability."""
    grid = np.linspace(80.0, 120.0, 21)
    mean = 0.5 - 0.01 * (grid - 80.0)  # greedy: the lower edge (value 40 there)
    service = PricingService(None, exploration_share=0.4, exploration_gain_scale=0.05, exploration_floor=0.25, seed=3)
    greedy = int(np.argmax(grid * mean))

    def probability(samples):
        return service.exploring_probability(grid, samples, greedy, float(grid[greedy] * mean[greedy]))

    agree = np.tile(mean, (16, 1))  # a posterior sure of the mean model: nothing to gain
    assert probability(agree) == pytest.approx(0.4 * 0.25)
    rng = np.random.default_rng(0)
    unsure = np.clip(mean + rng.normal(0.0, 0.2, (16, 21)), 0.0, 1.0)  # samples far apart: the full share
    assert probability(unsure) == pytest.approx(0.4)
    # in between: in proportion to the samples' expected gain over the greedy price
    half = agree.copy()
    half[:8, -1] = (40.0 * (1 + 0.05)) / grid[-1]  # half the samples gain 5 % at the top price: mean gain 2.5 %
    assert probability(half) == pytest.approx(0.4 * 0.5)
    assert PricingService(None, exploration_share=0.4, exploration_gain_scale=0.0).exploring_probability(
        grid, agree, greedy, 40.0) == 0.4  # scale 0: the setting, always
    with pytest.raises(ValueError):
        PricingService(None, exploration_floor=1.5)
    with pytest.raises(ValueError):
        PricingService(None, exploration_gain_scale=-1.0)
    # the realised share is that probability: quotes whose samples agree explore at share x floor
    outputs = {"conversion": mean[None, :].astype(np.float32), "sampled_conversion": agree[None].astype(np.float32)}
    from shared.domain import Prepared

    prepared = Prepared({}, 1, (grid, 80.0, 120.0, 100.0, None))
    explored = [service.postprocess(None, prepared, outputs, model, "p").exploratory for _ in range(2000)]
    sd = math.sqrt(0.1 * 0.9 / 2000)
    assert abs(np.mean(explored) - 0.1) < 4 * sd


def test_exploratory_metric_counts_the_realised_share(world, model):
    from prometheus_client import REGISTRY

    def count(metric, labels):
        return REGISTRY.get_sample_value(metric, labels) or 0.0

    def totals():
        quotes = sum(count("storefront_pricing_quotes_total", {"model": "pricing", "objective": "revenue",
                                                                "exploratory": f}) for f in ("true", "false"))
        explored = sum(count("storefront_pricing_exploratory_total", {"model": "pricing", "step": s})
                       for s in ("local", "wide", "uniform"))
        return quotes, explored

    q0, e0 = totals()
    service = PricingService(None, exploration_share=0.3, wide_step_share=0.5, exploration_gain_scale=0.0, seed=12)
    served = quotes_at_the_lower_edge(service, model, world, n=300, seed=6)
    q1, e1 = totals()
    assert q1 - q0 == 300 and e1 - e0 == sum(r.exploratory for r, _, _ in served)
    assert count("storefront_pricing_exploratory_total", {"model": "pricing", "step": "wide"}) > 0


def test_pinned_price_never_explores(world, model):
    service = PricingService(None, exploration_share=1.0, wide_step_share=1.0, seed=1)
    product = world.products[0]
    req = quote(product, 42.5, pct=0.0)
    prepared = service.preprocess(req, model)
    outputs = dict(zip(model.output_names, model.run(prepared.feeds)))
    resp = service.postprocess(req, prepared, outputs, model, "p")
    assert resp.price == 42.5 and not resp.exploratory


# ---------------------------------------------------------------- calibration
def test_segment_calibration_figures():
    seg = np.array([1, 1, 1, 1, 2, 2, 2, 2, 3])
    y = np.array([1, 0, 0, 0, 1, 1, 1, 0, 1], float)
    p = np.array([0.25, 0.25, 0.25, 0.25, 0.5, 0.5, 0.5, 0.5, 0.9])
    cal = pricing.segment_calibration(seg, y, p, min_quotes=2)
    a, b, c = (cal["segments"][SEGMENTS[i]] for i in (1, 2, 3))
    assert (a["quotes"], a["observed"], a["predicted"], a["gap"]) == (4, 0.25, 0.25, 0.0)
    assert b["observed"] == 0.75 and b["gap"] == pytest.approx(-0.25)
    assert b["z"] == pytest.approx(-0.25 / (math.sqrt(4 * 0.25) / 4))
    assert c["quotes"] == 1  # listed, but below min_quotes: not judged
    assert cal["max_abs_gap"] == pytest.approx(0.25) and cal["worst"] == SEGMENTS[2]
    # weights count as quotes (aggregated rows)
    w = pricing.segment_calibration(np.array([1, 1]), np.array([1.0, 0.0]), np.array([0.5, 0.5]), np.array([3.0, 1.0]),
                                    min_quotes=1)
    assert w["segments"][SEGMENTS[1]]["observed"] == 0.75 and w["segments"][SEGMENTS[1]]["quotes"] == 4
    with pytest.raises(ValueError):
        pricing.segment_calibration(seg, y[:3], p)


def test_calibration_of_rows_judges_storefront_quotes_apart_from_ta_feng_rows():
    quotes_ = pricing.rows(np.array([5, 5]), np.array([1, 2]), np.array([3, 4]), np.zeros(2), 1.0, np.array([1, 2]))
    tafeng = pricing.rows(np.array([5]), np.array([1]), np.array([pricing.NO_HOUR]), np.zeros(1), 500.0, 0)
    X = np.concatenate([quotes_, tafeng])
    cal = pricing.calibration_of_rows(X, np.array([1.0, 0.0, 0.02]), np.array([0.6, 0.3, 0.05]), min_quotes=1)
    assert cal["rows"] == "storefront quotes" and cal["segments"][SEGMENTS[1]]["quotes"] == 1
    only = pricing.calibration_of_rows(tafeng, np.array([0.02]), np.array([0.05]), min_quotes=1)
    assert only["rows"] == "ta feng exposures" and only["segments"][SEGMENTS[1]]["quotes"] == 500
    figures = pricing.calibration_figures(cal)
    assert figures["calibration_max_abs_gap"] == pytest.approx(0.4)
    assert figures[f"calibration_gap[{SEGMENTS[1]}]"] == pytest.approx(-0.4)


def test_a_checkpoint_from_before_segment_sensitivities_still_loads():
    """A deployment's checkpoint without the segment-slope, cell and hour-slope groups (and
    their noise) restores with those at their prior, the rest as saved."""
    old = pricing.PricingNet()
    with torch.no_grad():
        old.a_prod[7] = 0.5
        old.prec_b_prod[7] = 9.0
    state = {k: v for k, v in old.state_dict().items()
             if not any(k.endswith(g) for g in ("b_seg", "a_cell", "b_cell", "b_hour")) and not k.startswith("noise_")}
    net = pricing.PricingNet()
    net.load_state_dict(state)
    assert float(net.a_prod[7]) == 0.5 and float(net.prec_b_prod[7]) == 9.0
    assert float(net.prec_b_cell[77]) == pricing.PRIOR_PRECISION["b_cell"] and float(net.b_seg.abs().max()) == 0.0


# ---------------------------------------------------------------- what the posterior may claim
def test_quotes_at_one_price_add_no_sensitivity_precision():
    """Quotes of a cell at a single price tell the conversion there (its level), not how it
    changes with the price: the sensitivity terms' precision grows only with the price
    variation within a (product, segment) cell, the levels' with every quote."""
    net = pricing.PricingNet()
    before = {n: getattr(net, f"prec_{n}").clone() for n in ("a_seg", "b_seg", "b_prod", "b_cell")}
    n = 400
    X = pricing.rows(np.full(n, 5), np.full(n, 3), np.full(n, 12), np.full(n, -0.2), 1.0, np.arange(1, n + 1))
    pricing.absorb(net, X, (np.arange(n) % 3 == 0).astype(np.float32), max_iter=20)
    assert float(net.prec_a_seg[3]) > float(before["a_seg"][3]) + 10
    for name in ("b_seg", "b_prod", "b_cell"):
        assert torch.allclose(getattr(net, f"prec_{name}"), before[name], atol=1e-4), name
    # the same quotes spread over the range do inform the sensitivity
    net2 = pricing.PricingNet()
    X2 = pricing.rows(np.full(n, 5), np.full(n, 3), np.full(n, 12), np.linspace(-0.2, 0.2, n), 1.0,
                      np.arange(1, n + 1))
    sold = (np.random.default_rng(0).random(n) < 1 / (1 + np.exp(1 + 3 * np.linspace(-0.2, 0.2, n)))).astype(np.float32)
    pricing.absorb(net2, X2, sold, max_iter=20)
    assert float(net2.prec_b_seg[3]) > float(before["b_seg"][3]) + 1


def test_bootstrap_keeps_segment_sensitivities_at_their_prior_precision():
    net = pricing.PricingNet()
    with torch.no_grad():
        for name in pricing.PricingNet.SHAPES:
            getattr(net, f"prec_{name}").fill_(1e4)
    pricing.cap_precision(net)
    assert float(net.prec_a0) == pricing.BOOTSTRAP_PRECISION_CAP["level"]
    assert float(net.prec_b_prod.max()) == pricing.BOOTSTRAP_PRECISION_CAP["slope"]
    for name in pricing.SLOPE_MULT:
        assert float(getattr(net, f"prec_{name}").max()) == pricing.PRIOR_PRECISION[name], name


def test_rounds_refit_every_storefront_quote_under_the_bootstrap_anchor():
    """After the bootstrap, each round refits all storefront rows since (replayed rows are not
    counted twice) under the bootstrap's posterior; the result is the joint fit of the rows,
    whichever rounds they came in; the anchor and the rows travel in the checkpoint."""
    rng = np.random.default_rng(3)
    model = pricing.PricingModel()
    net = pricing.PricingNet()
    boot = pricing.rows(np.array([1, 2] * 50), np.array([3, 6] * 50), np.full(100, pricing.NO_HOUR),
                        rng.uniform(-0.2, 0.2, 100), 5.0, 0)
    model.train(net, None, boot, (rng.random(100) < 0.3).astype(np.float32), 1, 0)
    anchor_state = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("_")}
    X, y = synthetic_stream(rng, 600, [1, 2], {3: 6.0, 6: 0.5}, {3: -0.3, 6: -0.3})
    in_rounds = pricing.PricingNet()
    in_rounds.load_state_dict(net.state_dict())
    model.train(in_rounds, None, X[:300], y[:300], 3, 0)
    # round 2: its new rows plus a replay of round 1's
    model.train(in_rounds, None, np.concatenate([X[300:], X[:100]]), np.concatenate([y[300:], y[:100]]), 3, 0)
    assert len(model._history[0]) == 600
    at_once = pricing.PricingNet()
    at_once.load_state_dict(net.state_dict())
    fresh = pricing.PricingModel()
    fresh.load_domain_state(model.domain_state())
    fresh._history = (np.zeros((0, pricing.WIDTH), np.float32), np.zeros(0, np.float32))
    fresh.train(at_once, None, X, y, 30, 0)
    # the same fitted demand curves (compared as curves: the segment's sensitivity factor and its
    # curve shape can trade along a flat direction of the likelihood, which the solves' different
    # iteration counts leave at different points)
    product, segment = torch.tensor([1, 1, 2, 2]), torch.tensor([3, 6, 3, 6])
    grid = torch.linspace(-0.2, 0.2, 9).expand(4, 9)
    with torch.no_grad():
        curves = [net_(product, segment, torch.full((4,), 12), grid)[0] for net_ in (in_rounds, at_once)]
    assert torch.allclose(curves[0], curves[1], atol=0.01), (curves[0] - curves[1]).abs().max()
    # the segments' sensitivities came apart in the data's direction
    assert learned_slope(in_rounds, 1, 3) > 2 * learned_slope(in_rounds, 1, 6)
    # the anchor is the bootstrap's posterior, untouched by the rounds
    restored = pricing.PricingModel()
    restored.load_domain_state(model.domain_state())
    for k in ("b_seg", "prec_b_seg", "a_prod"):
        assert torch.equal(getattr(restored._anchor, k), anchor_state[k]), k
