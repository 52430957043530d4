"""The expert cache: which experts are in memory (ledger), how they get there and go (storage), which goes first
(policies), what comes next (predict), and its options (config). No llama.cpp."""
