"""Test and set-up support: tiny random-weight GGUF models that llama.cpp
loads in seconds (`tinymodels`)."""
