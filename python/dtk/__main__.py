"""``python -m dtk``: print the install report of :func:`dtk.info` (``--json`` for the raw facts)."""
import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dtk", description=__doc__)
    p.add_argument("--json", action="store_true", help="print the facts as JSON instead of the report")
    a = p.parse_args(argv)
    from ._info import info
    d = info(quiet=a.json)
    if a.json:
        json.dump(d, sys.stdout, indent=1, default=str)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
