"""`retina export RUN --out PKG`: a training run (and its probed heads) -> an ONNX model package."""

from __future__ import annotations

from pathlib import Path

import typer

from retinacli.commands import options


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export(
        run_dir: Path = options.run_dir_argument(),
        out: Path = typer.Option(
            None, "--out", "-o", help="Package folder to write. Default: ./exported/<NAME>."
        ),
        name: str = typer.Option(None, "--name", help="Package name. Default: the run folder's name."),
        version: str = typer.Option("0.1.0", "--version", help="Package version (semver)."),
        opset: int = typer.Option(18, "--opset", help="ONNX opset for all graphs."),
        exporter: str = typer.Option(
            "dynamo", "--exporter", help="torch.onnx exporter: dynamo (default) or torchscript."
        ),
        tolerance: float = typer.Option(
            1e-4, "--tolerance", help="Max |onnxruntime - torch| allowed by the parity check."
        ),
        manifest: Path = options.manifest_option(
            "Cohort manifest for parity samples. Default: the run's manifest."
        ),
        changelog: str = typer.Option(None, "--changelog", help="One line describing this version."),
        quantize: str = typer.Option(
            None, "--quantize",
            help="Also write int8 encoders (static QDQ, per-channel, calibrated on the run's cohort) "
            "and record their accuracy gate; 'retina embed' uses them when they pass it.",
        ),
        calibration_items: int = typer.Option(
            32, "--calibration-items", min=1, help="Cohort items used to calibrate --quantize int8."
        ),
        card_file: Path = typer.Option(
            None, "--card", help="Model card file (.toml or .json) with the keys licence, intended_use, "
            "out_of_scope_use, training_data, validation, authors, contact, limitations.",
        ),
        licence: str = typer.Option(
            None, "--licence", help="Model card: licence (SPDX identifier such as Apache-2.0, or text); "
            "overrides the --card file.",
        ),
        intended_use: str = typer.Option(
            None, "--intended-use", help="Model card: what the model is for; overrides the --card file."
        ),
        training_data: str = typer.Option(
            None, "--training-data", help="Model card: what it was trained on; overrides the --card file."
        ),
        force: bool = typer.Option(False, "--force", help="Replace an existing package folder."),
        as_json: bool = options.json_option("Print the package descriptor (retina.json) as JSON."),
    ) -> None:
        """Export the run's encoders and task heads to ONNX, check parity, write retina.json."""
        from retinacli.commands.common import require_run_dir, require_training
        from retinacli.console import err, print_json, safe, styled
        from retinacli.console import out as stdout
        from retinacli.errors import RetinaError, UsageError
        from retinacli.modelcard import assemble_card

        require_training("retina export", "torch", "onnx")
        from training.export import export_run, package_name_for

        if quantize is not None and quantize != "int8":
            raise UsageError(f"--quantize must be int8, not {quantize!r}")
        require_run_dir(run_dir)
        # checked before the (slow) export: a card problem is a usage error naming the file or field
        card = assemble_card(card_file, licence=licence, intended_use=intended_use,
                             training_data=training_data)
        name = name or package_name_for(run_dir)
        target = out or Path("exported") / name
        if target.exists() and not force and (not target.is_dir() or any(target.iterdir())):
            raise UsageError(f"{safe(target)}: already exists and is not empty (use --force to replace it)")
        err.print(safe(f"exporting {run_dir} -> {target} ({name}@{version}, opset {opset}, "
                       f"{exporter} exporter)"))
        try:
            result = export_run(
                run_dir,
                target,
                name=name,
                version=version,
                opset=opset,
                exporter=exporter,
                tolerance=tolerance,
                manifest=manifest,
                changelog=changelog,
                overwrite=force,
                quantize=quantize,
                calibration_items=calibration_items,
                card=card,
                log=lambda message: err.print(f"  {safe(message)}", highlight=False),
            )
        except RetinaError:
            raise  # with its own exit code
        except (ValueError, FileNotFoundError) as exc:
            raise RetinaError(str(exc)) from None
        m = result.descriptor
        if as_json:
            print_json({"package": str(result.package_dir), **m})
            return
        parity = m["parity"]
        stdout.print(styled("package ", (f"{m['name']}@{m['version']}", "bold"),
                            f" written to {result.package_dir}"))
        for modality in ("fundus", "oct"):
            p = parity[modality]
            stdout.print(
                f"  {modality} encoder: parity on {p['n']} items: max |Δ| {p['max_abs_diff']:.2e}, "
                f"min cosine {p['min_cosine']:.8f}",
                highlight=False,
            )
        for modality, entry in (m.get("quantized", {}).get("int8", {}).get("encoders") or {}).items():
            for backend, g in entry["gate"].items():
                verdict = "passed" if g["passed"] else "failed (not used automatically)"
                stdout.print(
                    f"  {modality} int8 on {backend}: min cosine {g['min_cosine']:.5f}, top-5 agreement "
                    f"{g['top5_agreement']:.3f}: gate {verdict}",
                    highlight=False,
                )
        for task, p in parity["heads"].items():
            stdout.print(f"  head {task}: max |Δ| {p['max_abs_diff']:.2e}", highlight=False)
        if not m["heads"]:
            stdout.print(f"  no task heads (run 'retina probe {safe(run_dir)}' before exporting to "
                         "include them)")
        stdout.print(safe(f"  model card: licence {card['licence']}") if card else
                     "  no model card (add one with --card FILE or --licence/--intended-use/--training-data)")
        took = f"{result.seconds:.1f} s"
        stdout.print(f"  parity inputs: {parity['inputs']}; export took {took}", highlight=False)
