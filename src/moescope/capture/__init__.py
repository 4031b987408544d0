"""Capture: run a transformers MoE model over texts and record the routing it really used."""
