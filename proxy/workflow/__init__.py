"""Workflow jobs: pipelines run by `llm-proxy worker`, streamed back through NATS.

- `job`: the job envelope and NATS names; `view`: the bus events and what a client sees;
- `pipelines`: the pipeline contract and registry; `fanout`: the built-in fan-out pipeline;
- `emitter`, `llm`, `runner`, `store`: what runs a job inside a worker;
- `worker`, `command`: the worker process; `launchers`: how the gateway hands jobs over.

The gateway's side is `proxy.services.workflow.WorkflowRoute`.
"""
