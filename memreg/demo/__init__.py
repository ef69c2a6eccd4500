"""The demo: memorization appears, is detected, and the guard prevents it (see scripts/demo.py)."""
