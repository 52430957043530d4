"""The GGUF rewriter: profiles, importance, the per-expert plan, the rewrite and its check. Runs without llama_cpp
(only profiling and layer calibration run the model)."""
