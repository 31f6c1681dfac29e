"""Pieces the attention families share (docs/architecture.md): the Triton attention core
(`triton.py`) and the dense kernel with its side streams (`dense.py`). No family's private code:
window and sparse both import from here, never from each other."""
