"""What Tightwad runs on: the pinned engine and model catalog (`catalog`),
`tightwad setup` split by step, and supervised engine processes (`procs`)."""
