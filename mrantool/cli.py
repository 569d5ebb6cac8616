"""The `mrantool` command line: parses options, calls the Python API, renders results with rich. No logic here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console

from mrantool.errors import MrantoolError

app = typer.Typer(
    name="mrantool",
    help="Cache multi-scale WSI features once; train MRAN and other MIL heads on the cache.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)
T = TypeVar("T")


def run_api(fn: Callable[[], T]) -> T:
    """Call the API; a user error becomes one red sentence and exit code 1, never a traceback."""
    try:
        return fn()
    except MrantoolError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        raise typer.Exit(1) from None


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Argument(help="Folder for the generated slides and labels.csv.")],
    slides: Annotated[int, typer.Option("--slides", help="Number of slides (half tumour, half normal).")] = 12,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same pixels.")] = 0,
) -> None:
    """Generate a small cohort of pyramidal TIFF slides (0.5 mpp) whose class signal lives at the cell scale.

    Example: mrantool demo-data demo/ --slides 12
    """
    from mrantool.slides.synthetic import make_cohort

    labels = run_api(lambda: make_cohort(out, n_slides=slides, seed=seed))
    console.print(f"wrote {slides} slides and {labels}")


@app.command()
def preview(
    slide: Annotated[Path, typer.Argument(help="A slide file (SVS, NDPI, MRXS, TIFF...).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path("preview.png"),
    preset: Annotated[str, typer.Option(help="Preset: mran, resnet50-trunc, vit-s16, uni, tiny.")] = "mran",
    mpp: Annotated[float | None, typer.Option(help="Scan resolution (microns/px) where the metadata lacks it.")] = None,
    target_mpp: Annotated[float | None, typer.Option(help="Override the preset's target resolution.")] = None,
    min_tissue: Annotated[float, typer.Option(help="Keep bags with at least this tissue fraction.")] = 0.1,
) -> None:
    """Draw the tissue outline and the bag/patch grid on the slide's thumbnail.

    Example: mrantool preview CMU-1-Small-Region.svs --preset mran --out preview.png
    """
    from mrantool.tiling.presets import get_preset
    from mrantool.viz.preview import draw_preview

    def go():
        p = get_preset(preset).with_overrides(mpp=target_mpp)
        return draw_preview(slide, p, out, mpp=mpp, min_tissue=min_tissue)

    summary = run_api(go)
    console.print(summary.line(), soft_wrap=True)
    console.print(f"wrote {summary.out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
