"""File layout of a cohort: ``<format>/<patient pseudonym>/<eye>_v<visit>_{oct,fundus}.<ext>``."""

from __future__ import annotations

from pathlib import Path

from retinacli.synth import png_writer


def visit_stem(record) -> str:
    return f"{record.identity.pseudonym}/{record.eye.eye}_v{record.state.visit:02d}"


def write_visit(out: Path, fmt: str, record) -> tuple[str, str]:
    """Write one visit in ``fmt``; return the OCT and fundus paths relative to ``out`` (POSIX)."""
    stem = f"{fmt}/{visit_stem(record)}"
    if fmt == "png":
        oct_rel, fundus_rel = f"{stem}_oct", f"{stem}_fundus.png"
        png_writer.write_oct_pngs(out / oct_rel, record.oct_pixels)
        png_writer.write_fundus_png(out / fundus_rel, record.fundus_pixels)
    elif fmt == "dicom":
        from retinacli.synth import dicom_writer

        oct_rel, fundus_rel = f"{stem}_oct.dcm", f"{stem}_fundus.dcm"
        dicom_writer.write_visit(out / oct_rel, out / fundus_rel, record)
    else:  # validated earlier; kept as a guard
        raise ValueError(f"unknown format {fmt!r}")
    return oct_rel, fundus_rel
