"""Writes docs/configuration.md from the config schema (gte_jax/docs_gen.py).

python3 tools/gen_config_docs.py           # regenerate the page
python3 tools/gen_config_docs.py --check   # exit 1 if the page is stale
"""

from __future__ import annotations

import argparse
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's gte_jax, not an installed one

from gte_jax import docs_gen  # noqa: E402  (after the path fix above)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is stale")
    parser.add_argument("--page", default=str(REPO / docs_gen.PAGE), help="the page to write")
    args = parser.parse_args()
    page, text = pathlib.Path(args.page), docs_gen.render()
    if args.check:
        if not page.exists() or page.read_text(encoding="utf-8") != text:
            print(f"{docs_gen.PAGE} is stale: run `{docs_gen.COMMAND}`", file=sys.stderr)
            return 1
        return 0
    page.write_text(text, encoding="utf-8")
    print(f"wrote {docs_gen.PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
