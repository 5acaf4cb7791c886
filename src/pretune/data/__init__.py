"""Data: read corpora, train tokenizers, pack token blocks; the embedded default corpus."""
