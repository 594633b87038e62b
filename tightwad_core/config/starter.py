"""The commented starter config that `tightwad init` writes."""

STARTER = '''\
# Tightwad configuration. Reference: docs/config.md
# `tightwad config check` validates this file; `tightwad run` serves a profile.

default_profile = "local"

# Serve the models that `tightwad setup` fetched, launched on this machine.
[profiles.local]
description = "Qwen2.5-Coder 1.5B launched from the set-up cache"
mode = "direct"
listen = "127.0.0.1:8088"      # off loopback you must also set api_key or api_key_env
max_tokens_limit = 4096

[profiles.local.target]
backend = "llama-server"
model_path = "@qwen2.5-coder-1.5b"   # "@name": a model from `tightwad setup`; or a path to a .gguf
ctx_size = 4096
parallel = 2

# Relay to a llama-server you already run elsewhere.
[profiles.remote]
description = "a llama-server already running on another machine"
[profiles.remote.target]
backend = "llama-server"
url = "http://192.0.2.10:8080"
'''
