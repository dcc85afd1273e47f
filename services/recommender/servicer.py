"""gRPC adapter of the recommender service: messages in, RecommenderService, messages out."""
from __future__ import annotations

from protos.recommender.v1 import recommender_pb2, recommender_pb2_grpc
from services.recommender.adapter import RecommenderService
from shared.ratelimit import caller_of
from shared.serving import ServedModel


class RecommenderServicer(recommender_pb2_grpc.RecommenderServicer):
    def __init__(self, service: RecommenderService) -> None:
        self.service = service

    async def Recommend(self, request, context):
        return await self.service.predict(request, ServedModel.deadline_of(context))

    async def ReportOutcome(self, request, context):
        # caller_of: the rate limit's key (certificate CN, else the peer's IP without its port)
        return await self.service.report_outcomes([request], caller_of(context))

    async def StreamOutcomes(self, request_iterator, context):
        return await self.service.accept_outcome_stream(request_iterator, caller_of(context))

    async def UpsertItems(self, request, context):
        # the deadline bounds the embedding; cancellation (client gone, server stopping) stops it too
        return await self.service.upsert(request, ServedModel.deadline_of(context))


def register(servicer: RecommenderServicer):
    def add(server) -> list[str]:
        recommender_pb2_grpc.add_RecommenderServicer_to_server(servicer, server)
        return [recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name]

    return add
