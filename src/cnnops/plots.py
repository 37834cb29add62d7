"""Offline `dvc plots show` / `dvc plots diff`: an HTML template that carries its own Vega.

DVC's default page loads vega, vega-lite and vega-embed from a CDN, so the plots stay blank
without network. `python -m cnnops.plots` (run by `make install`) writes a template with those
libraries inlined (the bundle that `vl-convert-python` ships) and points `plots.html_template`
at it in the `.dvc/config.local` of every DVC project of the checkout: the root one and each
variant under `pipelines/`. The template leaves out DVC's `{scripts}` placeholder, which is
where DVC would put the CDN `<script src=...>` tags.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

TEMPLATE_NAME = "plots_offline.html"
"""The template's file name, under the root project's `.dvc/` folder (git-ignored there)."""

VEGA_LITE_MAJOR = "5"
"""DVC's plot templates declare the Vega-Lite v5 schema: bundle the newest v5 release."""

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <script type="text/javascript">
__BUNDLE__
    </script>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""

GLOBALS = "window.vegaEmbed = vegaEmbed; window.vega = vega; window.vegaLite = vegaLite;"
"""The bundle's entry: DVC's plot divs call the global `vegaEmbed(...)` inline."""

PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")
"""What dvc-render replaces in the page; the bundle must contain none of them."""


def vega_lite_version(available: list[str]) -> str:
    """The newest `major.minor` of VEGA_LITE_MAJOR among the bundler's versions."""
    ours = [v for v in available if v.split(".")[0] == VEGA_LITE_MAJOR]
    if not ours:
        raise SystemExit(f"vl-convert bundles no Vega-Lite {VEGA_LITE_MAJOR}.x: {available}")
    return max(ours, key=lambda v: tuple(int(p) for p in v.split(".")))


def javascript_bundle() -> str:
    """vega, vega-lite and vega-embed in one classic script that sets `window.vegaEmbed`."""
    import vl_convert

    version = vega_lite_version(list(vl_convert.get_vegalite_versions()))
    return str(vl_convert.javascript_bundle(GLOBALS, vl_version=version))


def render_template(bundle: str) -> str:
    """The page, with `bundle` inlined; keeps dvc-render's `{plot_divs}` and `{refresh_tag}`."""
    found = [p for p in PLACEHOLDERS if p in bundle]
    if found:
        raise ValueError(f"the JavaScript bundle contains dvc-render placeholders {found}")
    # An inline script ends at the first `</script`, wherever it appears.
    safe = bundle.replace("</script", "<\\/script").replace("</SCRIPT", "<\\/SCRIPT")
    return PAGE.replace("__BUNDLE__", safe)


def dvc_projects(root: Path) -> list[Path]:
    """The root DVC project and every variant under `pipelines/` that is one (has a `.dvc/`)."""
    variants = sorted(p.parent for p in (root / "pipelines").glob("*/.dvc") if p.is_dir())
    return [root, *variants]


def configure(root: Path) -> Path:
    """Write the template under `root/.dvc/` and point each project's local config at it."""
    template = root / ".dvc" / TEMPLATE_NAME
    template.write_text(render_template(javascript_bundle()), encoding="utf-8")
    for project in dvc_projects(root):
        # DVC reads a relative plots.html_template from the project's own .dvc/ folder.
        relative = os.path.relpath(template, project / ".dvc")
        subprocess.run(
            [sys.executable, "-m", "dvc", "config", "--local", "plots.html_template", relative],
            cwd=project,
            check=True,
        )
    return template


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cnnops.plots",
        description="Make `dvc plots show/diff` pages work offline in this checkout.",
    )
    parser.add_argument(
        "root",
        nargs="?",
        type=Path,
        default=Path.cwd(),
        help="the checkout's root (holding .dvc/); default: the current folder",
    )
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if not (root / ".dvc").is_dir():
        parser.error(f"{root} is not a DVC project (no .dvc/ folder)")
    template = configure(root)
    print(f"offline plots template: {template}")
    for project in dvc_projects(root):
        print(f"  plots.html_template set in {project / '.dvc' / 'config.local'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
