"""gRPC adapter of the fraud service: messages in, FraudService, messages out."""
from __future__ import annotations

from protos.fraud.v1 import fraud_pb2, fraud_pb2_grpc
from services.fraud.adapter import FraudService
from shared.ratelimit import caller_of
from shared.serving import ServedModel


class FraudServicer(fraud_pb2_grpc.FraudServicer):
    def __init__(self, service: FraudService) -> None:
        self.service = service

    async def ScoreTransaction(self, request, context):
        return await self.service.predict(request, ServedModel.deadline_of(context))

    async def ReportOutcome(self, request, context):
        # caller_of: the rate limit's key (certificate CN, else the peer's IP without its port)
        return await self.service.report_outcomes([request], caller_of(context))

    async def StreamOutcomes(self, request_iterator, context):
        return await self.service.accept_outcome_stream(request_iterator, caller_of(context))


def register(servicer: FraudServicer):
    def add(server) -> list[str]:
        fraud_pb2_grpc.add_FraudServicer_to_server(servicer, server)
        return [fraud_pb2.DESCRIPTOR.services_by_name["Fraud"].full_name]

    return add
