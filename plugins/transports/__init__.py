"""Transports: how the coordinator reaches the rpc-servers of a cluster."""
