"""What operators see: Prometheus metrics (convserve's and Triton's), per-version statistics, request ids
and log lines."""
