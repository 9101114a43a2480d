"""Regenerate the queue-dependent manifests of k8s/ from shared/sparkle/queues.py.

    .venv/bin/python k8s/generate.py            # write k8s/base/generated, k8s/overlays/*/generated
    .venv/bin/python k8s/generate.py --check    # exit 1 if a committed file differs (CI: tests/test_k8s.py)

Same as ``sparkle k8s-render`` (sparkle.k8s_render.k8s_render_command).
"""

from pathlib import Path

import typer

from sparkle.k8s_render import k8s_render_command


def main(check: bool = typer.Option(False, "--check")) -> None:
    k8s_render_command(out=Path(__file__).resolve().parent, check=check)


if __name__ == "__main__":
    typer.run(main)
