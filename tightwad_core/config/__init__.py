"""Typed TOML profiles: the schema and loading (`profiles`), and where the
shipped profiles live (`shipped`)."""
