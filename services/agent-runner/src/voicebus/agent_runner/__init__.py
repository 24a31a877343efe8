"""Runner pool: one pipecat PipelineWorker per call, fed from NATS."""
