"""``python -m iommupt_store.kernel_oracle``: check the engine against a real Linux kernel."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn, cast

import click
from pydantic import ValidationError

from ..errors import BadData, IommuptError
from .capture import Capture, ScenarioCapture, Vendor
from .compare import ScenarioReport, compare
from .guest_run import run_batch
from .replay import replay
from .report import RunReport, VendorRun, render, summarize
from .scenario import load_scenario, shipped_scenarios
from .setup import KERNEL_ABI, default_cache, ready, setup

EXIT_DIFFERENT = 1
VENDOR_SETS: dict[str, list[Vendor]] = {"both": ["intel", "amd"], "all": ["intel", "amd", "intel-fs"]}


def _fail(err: IommuptError) -> NoReturn:
    click.echo(f"error: {err}", err=True)
    sys.exit(65 if isinstance(err, BadData) else 1)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """One line on stderr instead of a traceback, with the documented exit code."""
    try:
        yield
    except IommuptError as e:
        _fail(e)
    except OSError as e:
        _fail(IommuptError(f"{e.filename or 'I/O'}: {e.strerror or e}"))
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)


def _emit(report: RunReport, as_json: bool) -> None:
    if as_json:
        click.echo(report.model_dump_json(indent=1))
    else:
        click.echo(render(report), err=True)
    if not report.matches:
        sys.exit(EXIT_DIFFERENT)


cache_option = click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the kernel and guest program live "
    "(default $IOMMUPT_ORACLE_CACHE or ~/.cache/iommupt-store/kernel-oracle).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Check iommupt-store's page tables against a real Linux kernel booted under QEMU.

    The kernel (Debian's 7.3.4) maps DMA through VFIO type1 behind an emulated Intel (vtdss) or AMD
    (amdv1) IOMMU; its tables are dumped from guest memory and compared, word for word, with what
    our engine builds for the same calls. Exit status: 0 all match, 1 a difference (or the oracle
    could not run), 2 usage, 65 a bad scenario or capture file.
    """


@main.command("setup")
@click.option("--with-qemu10", is_flag=True, help="Also fetch QEMU 10 (about 40 MB) for --vendor intel-fs.")
@cache_option
def setup_cmd(with_qemu10: bool, cache: Path | None) -> None:
    """Fetch the kernel (about 120 MB, once) and build the guest program."""
    with _errors():
        for line in setup(cache or default_cache(), qemu10=with_qemu10):
            click.echo(line, err=True)


@main.command("list")
def list_cmd() -> None:
    """The scenarios shipped with iommupt-store."""
    with _errors():
        for path in shipped_scenarios():
            s = load_scenario(str(path))
            click.echo(f"{s.name:16} {len(s.calls):3} calls  {s.description}")


@main.command("run")
@click.argument("scenarios", nargs=-1)
@click.option(
    "--vendor",
    type=click.Choice(["intel", "amd", "intel-fs", "both", "all"]),
    default="both",
    show_default=True,
    help="intel: second stage (vtdss); amd: v1 (amdv1); intel-fs: first stage (x86_64, needs setup "
    "--with-qemu10); both: intel and amd; all: the three.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.option("--save-capture", type=click.Path(dir_okay=False, path_type=Path), help="Keep what the kernel did.")
@cache_option
def run_cmd(
    scenarios: tuple[str, ...], vendor: str, as_json: bool, save_capture: Path | None, cache: Path | None
) -> None:
    """Run SCENARIOS (files or shipped names; all shipped ones by default) in the real kernel and compare.

    The guest has 512 MiB of memory and 64 huge pages of 2 MiB for a batch's buffers at any one time.
    """
    with _errors():
        loaded = [load_scenario(s) for s in scenarios] or [load_scenario(str(p)) for p in shipped_scenarios()]
        names = [s.name for s in loaded]
        if len(set(names)) != len(names):
            raise BadData(f"scenario names must be unique in one run: {names}")
        files = ready(cache or default_cache())
        vendors = VENDOR_SETS.get(vendor) or [cast(Vendor, vendor)]
        runs: list[VendorRun] = []
        reports: list[ScenarioReport] = []
        captured: list[ScenarioCapture] = []
        for v in vendors:
            capture, seconds = run_batch(files, loaded, v)
            runs.append(VendorRun(vendor=v, seconds=round(seconds, 1)))
            captured.extend(capture.scenarios)
            for kernel, scenario in zip(capture.scenarios, loaded, strict=True):
                # expectations are written for the 48-bit tables; intel-fs offers only the lower 47 bits
                expected = None if v == "intel-fs" else [c.expect for c in scenario.calls]
                reports.append(compare(kernel, replay(kernel), expected))
        if save_capture is not None:
            save_capture.write_text(Capture(scenarios=captured).model_dump_json() + "\n")
    _emit(summarize(KERNEL_ABI, runs, reports), as_json)


@main.command("compare")
@click.argument("capture", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def compare_cmd(capture: Path, as_json: bool) -> None:
    """Compare a saved capture (run --save-capture) with the engine again, without QEMU."""
    with _errors():
        try:
            data = Capture.model_validate_json(capture.read_bytes())
        except ValidationError as e:
            err = e.errors()[0]
            raise BadData(f"{capture}: {'.'.join(map(str, err['loc'])) or 'capture'}: {err['msg']}") from None
        reports = [compare(k, replay(k)) for k in data.scenarios]
    kernels = sorted({k.kernel for k in data.scenarios}) or [KERNEL_ABI]
    _emit(summarize(", ".join(kernels), [], reports), as_json)


if __name__ == "__main__":
    main(prog_name="python -m iommupt_store.kernel_oracle")
