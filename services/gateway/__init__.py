"""The gateway: gRPC and HTTP classify with the shared preprocessing, a Redis result cache, A/B routing between
model versions, and Prometheus metrics. Upstream it speaks only the TF Serving API."""
