"""Cluster mode: a pool of llama.cpp rpc-servers the target's layers are
placed on, reached through transport plugins and split by placement plugins."""
