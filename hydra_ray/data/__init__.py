"""Data: corpus listing and record checks (corpus.py), the built-in corpus (builtin.py),
tokenizers (tokenizer.py), packing into token shards (pack.py, shards.py, packing.py), the
training order over domains (mixture.py, pipeline.py) and each worker's reader (reader.py)."""
