"""Test and benchmark support: a faithful transcription of the reference Spikformer code.

Not part of the user-facing API; tests prove our models compute what it computes, and
bench/latency.py times ours against it.
"""
