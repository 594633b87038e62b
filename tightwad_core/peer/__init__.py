"""The peer agent: a small authenticated REST service on every machine of a
pool (`tightwad peer start`) that says what the machine is (version,
devices, models), starts and stops its `tightwad rpc-worker`, serves its
swarm pieces and announces itself on the local network."""
