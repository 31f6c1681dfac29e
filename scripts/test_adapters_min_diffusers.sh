#!/usr/bin/env bash
# The adapter tests against the oldest diffusers dtk supports (0.35.2), beside the newest that
# scripts/test.sh runs: 0.35.2 goes into a side folder put first on PYTHONPATH (no second venv).
source "$(dirname "$0")/env.sh"
MIN_DIFFUSERS="${MIN_DIFFUSERS:-0.35.2}"
SIDE=".venv/diffusers-$MIN_DIFFUSERS"
if [ ! -f "$SIDE/diffusers/__init__.py" ]; then
  python -m pip install -q --no-deps --target "$SIDE" "diffusers==$MIN_DIFFUSERS"
fi
PYTHONPATH="$PWD/$SIDE${PYTHONPATH:+:$PYTHONPATH}" python - <<PY
import diffusers
assert diffusers.__version__ == "$MIN_DIFFUSERS", diffusers.__version__
PY
PYTHONPATH="$PWD/$SIDE${PYTHONPATH:+:$PYTHONPATH}" python -m pytest tests/adapters -q -n "${PYTEST_WORKERS:-2}" "$@"
