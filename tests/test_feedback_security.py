"""Nobody poisons training (issue 11, item 2), over real gRPC servers on loopback:

- the collector names every feedback stream (per-service token, or mTLS client certificate CN,
  else loopback only) and refuses, and counts, anything else or another service's records;
- the fraud service delivers to an mTLS trainer through its settings;
- prediction ids are unguessable and signed: a guessed or forged id is NOT_FOUND at the service,
  an id issued before a restart still verifies;
- outcome RPCs are rate limited per caller (RESOURCE_EXHAUSTED);
- outcome_ack_durable: an answered outcome is already in the spool on disk.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from bench.ingest import fraud_outcome, fraud_served
from ops.up import SERVICES, TRAINER, Suite
from protos.feedback.v1 import feedback_pb2 as fb
from shared.feedback.records import feedback_outcome
from protos.fraud.v1 import fraud_pb2
from protos.pricing.v1 import pricing_pb2
from services.fraud.main import FraudSettings
from shared.domain import PREDICTION_ID_LEN, PredictionIds, load_prediction_id_keys
from shared.feedback import TOKEN_METADATA, FeedbackClient, client_credentials, read_spool
from shared.ratelimit import RateLimiter, is_loopback_peer, peer_host
from tests.conftest import free_port, make_pki
from tests.fake_trainer import FakeTrainer
from tests.test_feedback_client import wait_for
from tests.test_collector import Harness
from tests.test_fraud_service import fraud_world, request_for, settings, started  # noqa: F401 (fixture)
from trainer.collector import parse_tokens, record_head
from trainer.service import TrainerSettings

T = 1.7e9
FRAUD_TOKEN = "f" * 8 + secrets.token_urlsafe(24)
PRICING_TOKEN = "p" * 8 + secrets.token_urlsafe(24)


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Collector(Harness):
    """The collector harness with identity options: tokens, or mTLS from a pki folder."""

    def __init__(self, path: Path, tokens=None, pki: Path | None = None) -> None:
        creds = None if pki is None else grpc.ssl_server_credentials(
            [((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())],
            root_certificates=(pki / "ca.pem").read_bytes(), require_client_auth=True)
        super().__init__(path, creds, tokens=tokens)

    async def send(self, records, metadata=()) -> list[fb.Ack]:
        call = self.stub.Stream(metadata=metadata or None)
        await call.write(fb.FeedbackBatch(records=records))
        await call.done_writing()
        acks = [a for message in [m async for m in call] for a in message.acks]
        assert await call.code() == grpc.StatusCode.OK
        return acks


def pricing_outcome(rid: str, pid: str) -> fb.FeedbackRecord:
    o = feedback_outcome(pricing_pb2.PricingOutcome(prediction_id=pid, sold=True, units=1, price=9.0, occurred_at=T), T, T)
    return fb.FeedbackRecord(record_id=rid, domain="pricing", outcome=o)


# ---------------------------------------------------------------- the collector names its clients

async def test_fabricated_feedback_without_identity_is_refused_and_counted(tmp_path):
    tokens = {"fraud": FRAUD_TOKEN, "pricing": PRICING_TOKEN}
    async with Collector(tmp_path / "events.db", tokens=tokens) as c:
        fabricated = [fraud_served("x-1", "p1", T), fraud_outcome("x-2", "p1", T + 1, is_fraud=True)]
        for metadata, reason in (((), "missing_token"), (((TOKEN_METADATA, "not-a-token-" * 3),), "bad_token")):
            before = metric("storefront_trainer_feedback_refused_total", reason=reason)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.send(fabricated, metadata)
            # the collector refuses on the call's metadata; when that status beats the batch onto
            # the wire, grpc fails the client's write with a local INTERNAL instead (seen once under
            # load); the collector's count by reason is what says it refused, and why
            raced = e.value.code() == grpc.StatusCode.INTERNAL and "SendMessageOperation" in e.value.debug_error_string()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED or raced, (reason, e.value)
            assert metric("storefront_trainer_feedback_refused_total", reason=reason) == before + 1
        assert c.log.count() == 0 and c.collector.refused == 2


async def test_a_service_may_send_only_its_own_domain(tmp_path):
    async with Collector(tmp_path / "events.db", tokens={"fraud": FRAUD_TOKEN, "pricing": PRICING_TOKEN}) as c:
        before = metric("storefront_trainer_feedback_refused_total", reason="wrong_domain")
        acks = await c.send([fraud_served("f-1", "p1", T), pricing_outcome("f-2", "z1")],
                            metadata=((TOKEN_METADATA, FRAUD_TOKEN),))
        status = {a.record_id: a for a in acks}
        assert status["f-1"].status == fb.ACK_STATUS_STORED
        assert status["f-2"].status == fb.ACK_STATUS_REJECTED and "authenticated for fraud" in status["f-2"].message
        assert metric("storefront_trainer_feedback_refused_total", reason="wrong_domain") == before + 1
        assert [e.record_id for e in c.log.read(0, 10)] == ["f-1"]
        # The pricing token may send pricing records.
        acks = await c.send([pricing_outcome("p-1", "z1")], metadata=((TOKEN_METADATA, PRICING_TOKEN),))
        assert [a.status for a in acks] == [fb.ACK_STATUS_STORED]


async def test_feedback_client_with_its_token_delivers_and_without_it_spools(tmp_path):
    async with Collector(tmp_path / "events.db", tokens={"fraud": FRAUD_TOKEN}) as c:
        x = np.zeros((1, 30), np.float32)
        good = FeedbackClient(c.address, domain="fraud", spool_dir=tmp_path / "good",
                              metadata=[(TOKEN_METADATA, FRAUD_TOKEN)], reconnect_backoff_s=(0.02, 0.1))
        bad = FeedbackClient(c.address, domain="fraud", spool_dir=tmp_path / "bad", reconnect_backoff_s=(0.02, 0.1))
        for client, pid in ((good, "good-1"), (bad, "bad-1")):
            assert client.record_served(pid, "fraud", "v1", {"features": x}, {"probability": x[:, :1]}, served_at=T)
            client.start()
        assert await good.flush(15)
        await wait_for(lambda: bad.n_stream_failures >= 1 and bad.spool.pending == 1, what="the refused client spools")
        assert [e.prediction_id for e in c.log.read(0, 10)] == ["good-1"]
        await good.stop()
        await bad.stop(0.1)


def test_loopback_only_without_tokens():
    assert is_loopback_peer("ipv4:127.0.0.1:5000") and is_loopback_peer("ipv6:[::1]:5000")
    assert is_loopback_peer("ipv6:[::ffff:127.0.0.1]:5000") and is_loopback_peer("unix:/tmp/s")
    assert not is_loopback_peer("ipv4:10.1.2.3:5000") and not is_loopback_peer("ipv6:[2001:db8::1]:443")
    assert peer_host("ipv4:10.1.2.3:5000") == "10.1.2.3" and peer_host("ipv6:[::1]:7") == "::1"


def test_record_head_reads_id_and_domain_like_protobuf():
    rec = fraud_served("r-1", "p1", T)
    assert record_head(rec.SerializeToString()) == ("r-1", "fraud")
    # The last occurrence of a field wins, as when the log parses it: no smuggling a second domain.
    twice = rec.SerializeToString() + fb.FeedbackRecord(domain="pricing").SerializeToString()
    assert record_head(twice) == ("r-1", "pricing") and fb.FeedbackRecord.FromString(twice).domain == "pricing"
    assert record_head(b"\x0a\xff") is None


def test_tokens_setting_parses_and_validates(tmp_path):
    assert parse_tokens(f"fraud={FRAUD_TOKEN}, pricing={PRICING_TOKEN}") == {"fraud": FRAUD_TOKEN,
                                                                            "pricing": PRICING_TOKEN}
    for bad in ("fraud=short", "nope=" + FRAUD_TOKEN, f"fraud={FRAUD_TOKEN},fraud={FRAUD_TOKEN}"):
        with pytest.raises(ValueError):
            parse_tokens(bad)
    f = tmp_path / "tokens"
    f.write_text(f"fraud={FRAUD_TOKEN}\n")
    assert TrainerSettings(feedback_tokens=f"@{f}").tokens() == {"fraud": FRAUD_TOKEN}


def test_make_up_gives_each_service_its_own_token_and_the_trainer_all(tmp_path, monkeypatch):
    monkeypatch.delenv("STOREFRONT_FEEDBACK_TOKEN", raising=False)
    monkeypatch.delenv("STOREFRONT_FEEDBACK_TOKENS", raising=False)
    suite = Suite(tmp_path, "127.0.0.1")
    tokens = TrainerSettings(feedback_tokens=suite.env(TRAINER)["STOREFRONT_FEEDBACK_TOKENS"]).tokens()
    assert set(tokens) == {s.domain for s in SERVICES}
    for s in SERVICES:
        assert suite.env(s)["STOREFRONT_FEEDBACK_TOKEN"] == tokens[s.domain]
    assert len(set(tokens.values())) == len(tokens)
    assert all(t not in " ".join(suite.args(c)) for c in [TRAINER, *SERVICES] for t in tokens.values())


# ---------------------------------------------------------------- mTLS to the trainer

@pytest.fixture
def pki(tmp_path):
    """A CA, the trainer's server certificate, and client certificates named fraud and stranger."""
    return make_pki(tmp_path / "pki", ("server", "fraud", "stranger"))


async def test_fraud_service_delivers_to_an_mtls_trainer(fraud_world, pki, tmp_path):  # noqa: F811
    root, registry, data = fraud_world
    async with Collector(tmp_path / "events.db", pki=pki) as c:
        s = settings(root, registry, trainer_target=c.address, spool_dir=str(tmp_path / "spool"),
                     trainer_tls_ca=str(pki / "ca.pem"), trainer_tls_cert=str(pki / "fraud.pem"),
                     trainer_tls_key=str(pki / "fraud.key"))
        app, channel, stub = await started(s)
        try:
            resp = await stub.ScoreTransaction(request_for(data, 1))
            await stub.ReportOutcome(fraud_pb2.FraudOutcome(prediction_id=resp.prediction_id, is_fraud=True))
            await wait_for(lambda: c.log.count() == 2, what="served + outcome stored over mTLS")
            assert {(e.kind, e.prediction_id) for e in c.log.read(0, 10)} == {("served", resp.prediction_id),
                                                                             ("outcome", resp.prediction_id)}
        finally:
            await channel.close()
            await app.stop()
        # A certificate that names no service is refused (PERMISSION_DENIED): nothing stored, it spools.
        before = metric("storefront_trainer_feedback_refused_total", reason="unknown_certificate")
        stranger = FeedbackClient(c.address, domain="fraud", spool_dir=tmp_path / "stranger",
                                  channel_credentials=client_credentials(str(pki / "ca.pem"), str(pki / "stranger.pem"),
                                                                         str(pki / "stranger.key")),
                                  reconnect_backoff_s=(0.02, 0.1))
        x = np.zeros((1, 30), np.float32)
        stranger.record_served("s-1", "fraud", "v1", {"features": x}, {"probability": x[:, :1]}, served_at=T)
        stranger.start()
        await wait_for(lambda: metric("storefront_trainer_feedback_refused_total", reason="unknown_certificate") > before,
                       what="the stranger's stream refused")
        assert c.log.count() == 2
        await stranger.stop(0.1)


# ---------------------------------------------------------------- outcomes at the service

def test_prediction_ids_are_random_signed_and_short():
    ids = PredictionIds(domain="fraud")
    a, b = ids.next(), ids.next()
    assert a != b and len(a) == PREDICTION_ID_LEN <= 64 and a.isascii()
    assert ids.verify(a) and not ids.verify(a[:-1] + ("A" if a[-1] != "A" else "B"))
    assert not PredictionIds(ids.keys, domain="pricing").verify(a)  # a fraud id is no pricing id
    rotated = PredictionIds([os.urandom(32), *ids.keys], domain="fraud")
    assert rotated.verify(a) and rotated.verify(rotated.next()) and not ids.verify(rotated.next())


def test_prediction_ids_issued_before_domains_were_named_still_verify():
    """Ids were signed with the retired feedback.proto enum number of their domain; a service that
    declares that number (prediction_id_legacy_domain) still admits their outcomes (chargebacks
    come weeks later), and no other domain's service does."""
    import base64
    import hashlib
    import hmac

    key = os.urandom(32)
    nonce = os.urandom(16)
    mac = hmac.new(key, b"storefront-prediction-id\x001\x00" + nonce, hashlib.sha256).digest()[:16]  # 1: DOMAIN_FRAUD
    old_fraud_id = ".".join(base64.urlsafe_b64encode(b).rstrip(b"=").decode() for b in (nonce, mac))
    assert PredictionIds([key], domain="fraud", legacy_domain=1).verify(old_fraud_id)
    assert not PredictionIds([key], domain="fraud").verify(old_fraud_id)
    assert not PredictionIds([key], domain="pricing", legacy_domain=3).verify(old_fraud_id)
    from services.fraud.adapter import FraudService
    from services.pricing.adapter import PricingService
    from services.recommender.adapter import RecommenderService

    assert [c.prediction_id_legacy_domain for c in (FraudService, RecommenderService, PricingService)] == [1, 2, 3]


def test_key_file_is_created_once_and_private(tmp_path):
    path = tmp_path / "secrets" / "ids.key"
    keys = load_prediction_id_keys(path)
    assert load_prediction_id_keys(path) == keys and len(keys[0]) == 32
    assert path.stat().st_mode & 0o077 == 0


async def test_guessed_prediction_ids_are_rejected_at_the_service(fraud_world):  # noqa: F811
    root, registry, data = fraud_world
    app, channel, stub = await started(settings(root, registry))
    try:
        resp = await stub.ScoreTransaction(request_for(data, 5))
        pid = resp.prediction_id
        other_deployment = PredictionIds(domain="fraud").next()
        guesses = [pid[:-2] + ("AA" if pid[-2:] != "AA" else "BB"),  # tampered signature
                   other_deployment,                                 # signed with another key
                   "0123456789abcdef-2", pid.split(".")[0]]          # the old <instance>-<counter> form, no MAC
        before = metric("storefront_outcomes_rejected_total", domain="fraud", reason="unknown_prediction")
        for guess in guesses:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.ReportOutcome(fraud_pb2.FraudOutcome(prediction_id=guess, is_fraud=True))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND and "prediction_id" in e.value.details(), guess

        async def stream():
            yield fraud_pb2.FraudOutcome(prediction_id=pid, is_fraud=False)
            yield fraud_pb2.FraudOutcome(prediction_id=guesses[0], is_fraud=True)

        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.StreamOutcomes(stream())
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "outcome 1" in e.value.details()
        assert metric("storefront_outcomes_rejected_total", domain="fraud",
                      reason="unknown_prediction") == before + len(guesses) + 1
        # the real id was accepted by the stream (before the refused one): now a duplicate
        assert (await stub.ReportOutcome(fraud_pb2.FraudOutcome(prediction_id=pid, is_fraud=False))).duplicates == 1
    finally:
        await channel.close()
        await app.stop()
    # A restarted service (same deployment key, empty memory) still takes the outcome: weeks-late
    # chargebacks verify without state.
    app, channel, stub = await started(settings(root, registry))
    try:
        ok = await stub.ReportOutcome(fraud_pb2.FraudOutcome(prediction_id=pid, is_fraud=True))
        assert ok.accepted == 1
    finally:
        await channel.close()
        await app.stop()


async def test_outcome_rate_limit_per_caller(fraud_world):  # noqa: F811
    root, registry, data = fraud_world
    app, channel, stub = await started(settings(root, registry, outcome_rate_per_s=0.001, outcome_burst=2))
    try:
        pids = [(await stub.ScoreTransaction(request_for(data, 20 + i))).prediction_id for i in range(3)]
        before = metric("storefront_outcomes_rejected_total", domain="fraud", reason="rate_limited")
        for pid in pids[:2]:
            assert (await stub.ReportOutcome(fraud_pb2.FraudOutcome(prediction_id=pid, is_fraud=False))).accepted == 1
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.ReportOutcome(fraud_pb2.FraudOutcome(prediction_id=pids[2], is_fraud=False))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in e.value.details()

        async def stream():
            yield fraud_pb2.FraudOutcome(prediction_id=pids[2], is_fraud=False)

        with pytest.raises(grpc.aio.AioRpcError) as e:  # a new connection is the same caller
            other = grpc.aio.insecure_channel(app.address)
            try:
                from protos.fraud.v1 import fraud_pb2_grpc

                await fraud_pb2_grpc.FraudStub(other).StreamOutcomes(stream())
            finally:
                await other.close()
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "outcome 0" in e.value.details()
        assert metric("storefront_outcomes_rejected_total", domain="fraud", reason="rate_limited") == before + 2
    finally:
        await channel.close()
        await app.stop()


def test_token_bucket_refills():
    now = [0.0]
    rl = RateLimiter(10.0, 5, clock=lambda: now[0])
    assert all(rl.allow("a") for _ in range(5)) and not rl.allow("a") and rl.allow("b")
    now[0] += 0.1  # one token back
    assert rl.allow("a") and not rl.allow("a")
    assert RateLimiter(0, 1).allow("anyone", 1e9)


async def test_durable_ack_outcome_is_in_the_spool_when_the_rpc_returns(fraud_world, tmp_path):  # noqa: F811
    root, registry, data = fraud_world
    trainer = FakeTrainer(free_port())
    trainer.silent = True  # reads and never acks: nothing leaves memory unless written to the spool
    await trainer.start()
    spool = tmp_path / "spool"
    app, channel, stub = await started(settings(root, registry, trainer_target=trainer.address,
                                                spool_dir=str(spool), outcome_ack_durable=True))
    try:
        pid = (await stub.ScoreTransaction(request_for(data, 7))).prediction_id
        ack = await stub.ReportOutcome(fraud_pb2.FraudOutcome(prediction_id=pid, is_fraud=True))
        assert ack.accepted == 1
        # At once, no waiting: the outcome is in a spool segment on disk (the served record is in
        # flight to the silent trainer, in memory only).
        on_disk = spooled_records(spool)
        assert [(r.WhichOneof("payload"), r.outcome.prediction_id) for r in on_disk] == [("outcome", pid)]
    finally:
        await trainer.stop(0)
        await channel.close()
        await app.stop()


def spooled_records(spool: Path) -> list[fb.FeedbackRecord]:
    """Every record in the spool databases on disk under spool (one per worker), read beside the
    running client (shared.feedback.read_spool)."""
    return [fb.FeedbackRecord.FromString(payload) for db in sorted(spool.rglob("spool.sqlite3"))
            for _, payload in read_spool(db.parent)]


def test_domain_settings_validate_trainer_tls():
    base = dict(registry_dir="r", trainer_target="")
    assert "go together" in " ".join(FraudSettings(**base, trainer_tls_cert="c").validate())
    assert "needs trainer_tls_ca" in " ".join(FraudSettings(**base, trainer_tls_cert="c", trainer_tls_key="k").validate())
    assert FraudSettings(**dataclasses.asdict(FraudSettings(**base))).validate() == []
