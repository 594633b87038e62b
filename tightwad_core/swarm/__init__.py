"""Piece-verified file distribution between Tightwad nodes: manifests
(`manifest`), the files a node serves (`store`), the HTTP routes that serve
their pieces (`routes`) and the downloader that pulls from every peer at
once (`pull`, with `partial` for the file being written and `peers` for
talking to one peer)."""
