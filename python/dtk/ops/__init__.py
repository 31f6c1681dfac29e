"""dtk op families: one sub-package per family (wrapper, reference, kernels, registrations)."""
