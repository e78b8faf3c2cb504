"""``kiln bench``: a load generator for any KServe v2 gRPC endpoint (Kiln, Triton, the gateway)."""

from server.bench.loadgen import BenchConfig, run_bench
from server.bench.stats import BenchResult, LoadPoint

__all__ = ["BenchConfig", "BenchResult", "LoadPoint", "run_bench"]
