"""The runtime every service shares: registry, model runtime, hot reload, batching, server.

Services under services/<domain>/ add only what is particular to their domain.
"""
