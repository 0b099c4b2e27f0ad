"""Talking to models: sampling, the pairwise judge, parsing and cleaning model text."""
