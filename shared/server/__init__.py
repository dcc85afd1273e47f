"""Server bootstrap shared by every service: grpc.aio server, health, reflection, metrics,
interceptors, TLS, graceful shutdown and multi-process workers."""
from shared.server.bootstrap import ServerApp, run_app
from shared.server.interceptors import ServingInterceptor

__all__ = ["ServerApp", "ServingInterceptor", "run_app"]
