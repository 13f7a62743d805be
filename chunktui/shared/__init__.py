"""Torch-free floor: what the UI process, the CLI and the engine all import (never torch, transformers or textual)."""
