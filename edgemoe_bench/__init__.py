"""edgemoe's benchmarks and research: runs under a cgroup memory limit against stock llama-cpp-python, routing
traces (recorded, generated, injected, replayed), and the reports in BENCHMARKS.md. The product never imports it."""
