"""gRPC adapter of the pricing service: messages in, PricingService, messages out."""
from __future__ import annotations

from protos.pricing.v1 import pricing_pb2, pricing_pb2_grpc
from services.pricing.adapter import PricingService
from shared.serving import ServedModel


class PricingServicer(pricing_pb2_grpc.PricingServicer):
    def __init__(self, service: PricingService) -> None:
        self.service = service

    async def Quote(self, request, context):
        return await self.service.predict(request, ServedModel.deadline_of(context))

    async def ReportOutcome(self, request, context):
        return self.service.accept_outcomes([request])

    async def StreamOutcomes(self, request_iterator, context):
        return await self.service.accept_outcome_stream(request_iterator)


def register(servicer: PricingServicer):
    def add(server) -> list[str]:
        pricing_pb2_grpc.add_PricingServicer_to_server(servicer, server)
        return [pricing_pb2.DESCRIPTOR.services_by_name["Pricing"].full_name]

    return add
