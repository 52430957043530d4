"""GGUF files as edgemoe reads them: the header, the MoE layout (every expert's byte ranges, per file of a split
model), quantization types. No llama.cpp."""
