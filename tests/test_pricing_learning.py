"""Pricing learns from outcomes: the Ta Feng bootstrap, examples from joined quotes, an
incremental round that publishes, replay not counted twice, and end to end a real trainer
and a real pricing service (processes) learning from reported sales."""

import grpc
import numpy as np
import pytest
import torch

from protos.feedback.v1 import feedback_pb2
from protos.pricing.v1 import pricing_pb2, pricing_pb2_grpc
from services.pricing.adapter import PricingService
from shared.feedback import fill_tensor
from shared.feedback.records import feedback_outcome
from shared.runtime.model import ModelLoader
from tests.loop_harness import wait_until
from tests.pricing_fixtures import quote, small_world
from trainer.domains import pricing
from trainer.joiner import JoinedExample
from trainer.learner import LearnerConfig
from trainer.plugins import default_domains


def served_quotes(world, product: str, n: int, buy_rate: float, seed: int = 0, first_offset: int = 100):
    """Quotes of `product` through the adapter and the published model, each joined to an
    outcome (sold with probability buy_rate), as the joiner hands them to the learner."""
    from services.pricing.adapter import SIGNATURE, check_manifest, check_outputs

    loader = ModelLoader(expected=SIGNATURE, output_check=check_outputs, manifest_check=check_manifest)
    model = loader.from_registry(world.registry, "pricing", world.registry.current_version("pricing"))
    service = PricingService(None, exploration_share=1.0, max_step_pct=40.0, seed=seed)
    rng = np.random.default_rng(seed)
    ref = world.references[product]
    joined, responses = [], []
    for i in range(n):
        req = quote(product, ref, pct=30.0, context=pricing_pb2.Context(segment="35-39", hour_of_day=int(rng.integers(24))))
        prepared = service.preprocess(req, model)
        outputs = dict(zip(model.output_names, model.run(prepared.feeds)))
        resp = service.postprocess(req, prepared, outputs, model, f"pid-{seed}-{i}")
        served = feedback_pb2.ServedPrediction(prediction_id=resp.prediction_id, served_at=1.7e9 + i)
        served.model.name, served.model.version = model.name, model.version
        for name, value in prepared.feeds.items():
            fill_tensor(served.inputs.add(), name, value)
        for name, value in outputs.items():
            fill_tensor(served.outputs.add(), name, value)
        served.request.Pack(req)
        served.response.Pack(resp)
        sold = bool(rng.random() < buy_rate)
        _, outcome = service.outcome_to_feedback(pricing_pb2.PricingOutcome(
            prediction_id=resp.prediction_id, sold=sold, units=1 if sold else 0, price=resp.price if sold else 0.0,
            occurred_at=1.7e9 + i + 5), now=1.7e9 + n + 10)
        label = pricing_pb2.PricingOutcome()
        assert outcome.domain_outcome.Unpack(label)
        joined.append(JoinedExample(domain="pricing", prediction_id=resp.prediction_id, offset=first_offset + 2 * i,
                                    served_offset=first_offset + 2 * i - 1, served=served, outcome=outcome,
                                    model_name=model.name, model_version=model.version, label_delay_s=5.0,
                                    label=label))
        responses.append(resp)
    return joined, responses


@pytest.fixture
def world(tmp_path):
    return small_world(tmp_path, LearnerConfig(min_events=100, epochs=1))


def test_registered_with_the_trainer():
    plugin = default_domains()["pricing"]
    assert isinstance(plugin.model(None), pricing.PricingModel)
    assert plugin.bootstrap is not None and plugin.outcome_type is pricing_pb2.PricingOutcome


def test_bootstrap_learned_real_price_sensitivity(world):
    m = world.registry.manifest("pricing", "1")
    assert m.extra["segments"][0] == "other" and len(m.extra["products"]) > 10_000
    net = world.learner.net
    codes = torch.from_numpy(net.vocab.product_codes(world.products))
    with torch.no_grad():
        slope = torch.nn.functional.softplus(net.b0 + net.b_cat[net.product_category[codes]] + net.b_prod[codes])
    # Ta Feng demand falls when prices rise (promotions sell): every learned slope is positive,
    # and the posterior is tighter for products with data than the prior: much tighter on the
    # conversion level, a little on the price sensitivity (most days sell at the reference price,
    # where a sale says nothing about the slope; the subclass carries most of it)
    assert float(slope.min()) > 0 and float(slope.median()) > 1.0
    assert float(net.prec_a_prod[codes].median()) > 2 * pricing.PRIOR_PRECISION["a_prod"]
    assert bool((net.prec_b_prod[codes] >= pricing.PRIOR_PRECISION["b_prod"]).all())
    assert float(net.prec_b_prod[codes].median()) > pricing.PRIOR_PRECISION["b_prod"]
    # a product the model never saw has prior precision: Thompson samples spread widest there
    unseen = len(net.vocab.products) - 1
    assert float(net.prec_b_prod[unseen]) == pricing.PRIOR_PRECISION["b_prod"]


def test_examples_are_the_served_quotes_and_their_sales(world):
    product = world.products[3]
    joined, responses = served_quotes(world, product, 40, buy_rate=0.5)
    ex = world.learner.model.examples(joined)
    assert len(ex) == 40 and ex.X.shape == (40, pricing.WIDTH)
    code = world.learner.net.vocab.product_codes([product])[0]
    assert (ex.X[:, pricing.COL_PRODUCT] == code).all() and (ex.X[:, pricing.COL_SEGMENT] == 4).all()
    ref = world.references[product]
    np.testing.assert_allclose(ex.X[:, pricing.COL_X], np.log([r.price / ref for r in responses]), atol=1e-6)
    assert set(ex.y) <= {0.0, 1.0} and (ex.offsets == [j.offset for j in joined]).all()
    np.testing.assert_allclose(ex.served_p, [r.expected_conversion for r in responses], rtol=1e-6)


def test_a_round_from_joined_outcomes_publishes_a_model_that_learned_them(world):
    product = world.products[5]
    learner = world.learner
    code = int(learner.net.vocab.product_codes([product])[0])
    prec_before = float(learner.net.prec_a_prod[code])
    joined, _ = served_quotes(world, product, 300, buy_rate=0.95)
    examples = learner.model.examples(joined)
    before = float(learner.model.predict(learner.net, examples.X).mean())
    learner.add(examples)
    assert learner.due()
    entry = learner.round({"offset": joined[-1].offset, "pending": []})
    assert entry["decision"] == "published" and entry["version"] == "2", entry
    m = world.registry.manifest("pricing", "2")
    assert m.learned_up_to == joined[-1].offset and len(m.extra["products"]) == len(learner.net.vocab.products)
    assert m.extra["vocabulary_id"] == world.registry.manifest("pricing", "1").extra["vocabulary_id"]
    # customers bought 95 % of these quotes: at the prices quoted, the product now converts far
    # better than the bootstrap believed (the holdout fifth was not trained on yet)
    after = float(learner.model.predict(learner.net, examples.X).mean())
    assert before < 0.5 and after > max(0.75, before + 0.3), (before, after)
    assert float(learner.net.prec_a_prod[code]) > prec_before  # and the posterior got tighter
    # the calibration check per segment: what v1 served (predicted conversion at the quoted
    # price) against the 95 % sold, in the round's prequential figures; the candidate's
    # predictions against the labels it was judged on, in its manifest and metrics
    served_p = np.array([float(r) for r in examples.served_p])
    assert entry["prequential"]["served_calibration_gap[35-39]"] == pytest.approx(
        served_p.mean() - examples.y.mean(), abs=1e-6)
    assert entry["prequential"]["served_calibration_max_abs_gap"] > 0.3
    cal = m.extra["calibration"]
    assert cal["rows"] == "storefront quotes" and cal["segments"]["35-39"]["quotes"] > 0
    assert abs(cal["segments"]["35-39"]["gap"]) < 0.2  # the candidate learned the level
    assert m.metrics["calibration_max_abs_gap"] == pytest.approx(abs(cal["segments"]["35-39"]["gap"]))
    # replayed rows are in the posterior already: absorbing them again is a no-op
    state = {k: v.clone() for k, v in learner.net.state_dict().items() if isinstance(v, torch.Tensor)}
    assert pricing.absorb(learner.net, learner.replay.X, learner.replay.y) == 0
    assert all(torch.equal(state[k], v) for k, v in learner.net.state_dict().items() if isinstance(v, torch.Tensor))


# ---------------------------------------------------------------- end to end, real processes
@pytest.mark.long
def test_live_trainer_and_service_learn_from_reported_sales(tmp_path):
    from bench.eval_pricing import PricingLoop
    from trainer.eventlog import SqliteEventLog

    world = small_world(tmp_path)
    # direct delivery: this test is about learning from sales; canary delivery is test_canary's
    loop = PricingLoop(tmp_path, ["--bootstrap", "0", "--poll-interval-s", "0.2", "--min-events", "150",
                                  "--max-interval-s", "2", "--epochs", "1", "--delivery", "direct"],
                       ["--poll-interval-s", "0.2", "--exploration-seed", "1"])
    loop.start(timeout=120)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{loop.port}")
        stub = pricing_pb2_grpc.PricingStub(channel)
        product = world.products[7]
        req = quote(product, world.references[product], pct=30.0)
        pinned = quote(product, world.references[product], pct=0.0)  # priced at the reference: comparable
        first = stub.Quote(pinned, timeout=10)
        assert first.model.version == "1"
        rng = np.random.default_rng(0)
        quotes = outcomes = 0
        for _ in range(300):
            resp = stub.Quote(req, timeout=10)
            quotes += 1
            sold = bool(rng.random() < 0.95)
            stub.ReportOutcome(pricing_pb2.PricingOutcome(prediction_id=resp.prediction_id, sold=sold,
                                                          units=1 if sold else 0, price=resp.price), timeout=10)
            outcomes += 1
        latest = {}

        def learned_version() -> bool:
            # Rounds start every 2 s with whatever labels arrived (the feedback stream may lag on
            # a busy machine, so the first new version may have seen only part of the sales); a
            # later round learns the rest: wait for the version that believes this product
            # converts far better than the bootstrap did.
            latest["resp"] = stub.Quote(pinned, timeout=10)
            return (latest["resp"].model.version != "1"
                    and latest["resp"].expected_conversion > first.expected_conversion + 0.1)

        wait_until(learned_version, 120, "a quote from a version that learned the sales")
        with SqliteEventLog(loop.workdir / "events.db") as log:
            wait_until(lambda: log.count("pricing", "outcome") == outcomes, 30, "every outcome in the log")
            assert log.count("pricing", "served") >= quotes
        assert any(d["decision"] == "published" for d in loop.decisions())
        channel.close()
    finally:
        codes = loop.stop()
    assert codes == (0, 0), (loop.service.tail(), loop.trainer.tail())


def test_the_latest_outcome_of_a_quote_counts(world):
    joined, _ = served_quotes(world, world.products[2], 3, buy_rate=0.0)
    first = joined[0]
    corrected = pricing_pb2.PricingOutcome()
    corrected.CopyFrom(first.label)
    corrected.sold, corrected.units, corrected.price = True, 1, 9.99
    corrected.occurred_at = first.label.occurred_at + 60
    later = JoinedExample(domain="pricing", prediction_id=first.prediction_id, offset=joined[-1].offset + 2,
                          served_offset=first.served_offset, served=first.served,
                          outcome=feedback_outcome(corrected, corrected.occurred_at, corrected.occurred_at),
                          model_name=first.model_name, model_version=first.model_version, label_delay_s=65.0,
                          label=corrected)
    ex = world.learner.model.examples(joined + [later])
    assert len(ex) == 3 and ex.y.tolist() == [0.0, 0.0, 1.0]
    assert ex.offsets.tolist() == [joined[1].offset, joined[2].offset, later.offset]
