"""Benchmarks: measured timings of bcjax pipelines, side by side with a PyTorch oracle."""
