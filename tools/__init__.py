"""Developer scripts: fixture makers, golden-logit makers, benchmarks (not part of the runtime)."""
