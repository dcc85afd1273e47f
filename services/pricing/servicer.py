"""gRPC adapter of the pricing service: messages in, PricingService, messages out."""
from __future__ import annotations

from protos.pricing.v1 import pricing_pb2, pricing_pb2_grpc
from services.pricing.adapter import PricingService
from shared.ratelimit import caller_of
from shared.serving import ServedModel


class PricingServicer(pricing_pb2_grpc.PricingServicer):
    def __init__(self, service: PricingService) -> None:
        self.service = service

    async def Quote(self, request, context):
        return await self.service.predict(request, ServedModel.deadline_of(context))

    async def ReportOutcome(self, request, context):
        # caller_of: the rate limit's key (certificate CN, else the peer's IP without its port)
        return await self.service.report_outcomes([request], caller_of(context))

    async def StreamOutcomes(self, request_iterator, context):
        return await self.service.accept_outcome_stream(request_iterator, caller_of(context))


def register(servicer: PricingServicer):
    def add(server) -> list[str]:
        pricing_pb2_grpc.add_PricingServicer_to_server(servicer, server)
        return [pricing_pb2.DESCRIPTOR.services_by_name["Pricing"].full_name]

    return add
