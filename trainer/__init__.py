"""The trainer process: collector -> durable event log -> joiner -> learner -> gate -> export.

- `trainer.eventlog`: the durable event log (`EventLog` interface, `SqliteEventLog` default).
- `trainer.collector`: the gRPC endpoint (storefront.feedback.v1.Feedback) services stream to;
  it appends every record to the log (group commit) before it acknowledges it.
- `trainer.joiner`: matches outcomes to the predictions that were served, per-domain windows.
"""
