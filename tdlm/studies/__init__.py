"""Studies of trained runs: sweeps, reports, generation metrics, benchmarks, FLOPs, lm-eval."""
