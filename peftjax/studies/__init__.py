"""Studies over many runs: sweeps, reports and paper tables, memory estimates, benchmarks, quantization reports."""
