"""grpc.health.v1 for our servers: grpc_health's asyncio servicer plus what it lacks.

- List: the asyncio reference servicer (grpcio-health-checking 1.85) does not implement it,
  so the generated base raised NotImplementedError and every process answered INTERNAL.
  Here it returns the status of every service this process reports on.
- Watch ends when the server shuts down: the reference Watch loops until the client goes
  away, and an open stream would hold server.stop() for its whole grace and then be
  cancelled. Watchers get NOT_SERVING first (during the drain window), then the stream
  ends with OK, which tells a load balancer to reconnect elsewhere.
- `polled`: whether anyone ever asked (Check, Watch or List). A process nobody health-checks
  has no poller that needs the drain window to notice NOT_SERVING.
"""
from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer as _AsyncHealthServicer

SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(_AsyncHealthServicer):
    def __init__(self) -> None:
        super().__init__()
        self.polled = False
        self._closed = False

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext):
        self.polled = True
        return await super().Check(request, context)

    async def List(self, request: health_pb2.HealthListRequest,
                   context: grpc.aio.ServicerContext) -> health_pb2.HealthListResponse:
        self.polled = True
        resp = health_pb2.HealthListResponse()
        for service, status in list(self._server_status.items()):
            resp.statuses[service].status = status
        return resp

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        self.polled = True
        condition = self._server_watchers[request.service]
        self._watcher_count_by_service[request.service] += 1
        last_status = None
        try:
            async with condition:
                while True:
                    status = self._server_status.get(request.service, SERVICE_UNKNOWN)
                    if status != last_status:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                        last_status = status
                    if self._closed:
                        return
                    await condition.wait()
        finally:
            # The reference servicer's bookkeeping, so its _set() keeps notifying the others.
            self._watcher_count_by_service[request.service] -= 1
            if self._watcher_count_by_service[request.service] == 0:
                del self._server_watchers[request.service]
                del self._watcher_count_by_service[request.service]

    async def close_watches(self) -> None:
        """End every open Watch stream (after it has been sent the current status)."""
        self._closed = True
        for condition in list(self._server_watchers.values()):
            async with condition:
                condition.notify_all()
