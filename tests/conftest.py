"""Shared test set-up. Helpers live in tests/helpers.py (this directory is on sys.path)."""

import torch

torch.set_num_threads(min(2, torch.get_num_threads()))
