"""llama.cpp with experts streamed: the runtime's native side, the graph-evaluation hook, loading under a budget,
and `Llama`, the drop-in llama_cpp.Llama."""
