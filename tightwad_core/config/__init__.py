"""Typed TOML profiles: the schema (`schema`), loading and validation
(`profiles`), and where the shipped profiles live (`shipped`)."""
