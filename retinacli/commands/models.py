"""`retina models list|show|verify|default`: the model packages this machine knows about."""

from __future__ import annotations

import typer

from retinacli.commands import options
from retinacli.commands.common import default_model_marker
from retinacli.errors import EXIT_MODEL_INVALID

NAME_HELP = "Package name (name or name@version) or folder. Default: the default package."


def _metric_summary(head: dict) -> str:
    metrics = head.get("metrics") or {}
    m = metrics.get("cv") or metrics.get("train") or {}
    split = "cv" if metrics.get("cv") else "train"
    if head["kind"] == "regression" and m.get("mae") is not None:
        r2 = "-" if m.get("r2") is None else f"{m['r2']:.3f}"
        return f"{split} MAE {m['mae']:.1f} {head.get('units') or ''}, R² {r2}"
    if m.get("auroc") is not None:
        return f"{split} AUROC {m['auroc']:.3f}"
    return "-"


def _install_url(url: str, sha256: str | None, model_id: str | None, force: bool, console):
    """install_from_url with a download bar on stderr (shown only on a terminal)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from retinacli.package_install import install_from_url

    with Progress(TextColumn("downloading"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("download", total=None)
        return install_from_url(url, sha256=sha256, model_id=model_id, force=force,
                                on_progress=lambda done, total: progress.update(task, completed=done,
                                                                                total=total))


def register(app: typer.Typer) -> None:
    models = typer.Typer(
        help="List, inspect, verify model packages and choose the default one.", no_args_is_help=True
    )
    app.add_typer(models, name="models")

    @models.command("list")
    def list_(
        as_json: bool = options.json_option("Print the list as JSON."),
    ) -> None:
        """Packages in ./exported and $RETINA_HOME/models (reads descriptors only; 'verify' checks files)."""
        from retinacli.console import err, out, print_json, safe, styled
        from retinacli.package import list_packages, search_dirs

        packages = list_packages()
        default_path, _ = default_model_marker()
        records = [
            {
                "name": p.name,
                "version": p.version,
                "objective": p.objective,
                "embed_dim": p.embed_dim,
                "tasks": list(p.tasks),
                "created": p.created,
                "path": str(p.path),
                "default": default_path is not None and str(p.path.resolve()) == default_path,
                "problem": p.problem,
            }
            for p in packages
        ]
        if as_json:
            print_json({"search_dirs": [str(d) for d in search_dirs()], "packages": records})
            return
        if not records:
            where = ", ".join(str(d) for d in search_dirs())
            err.print(f"no model packages found (searched {safe(where)}); "
                      "create one with 'retina export RUN'")
            return
        from retinacli.console import print_table

        columns = [("", "short"), ("name", "short"), ("version", "short"), ("objective", "short"),
                   ("dim", "short"), ("tasks", "text"), ("created", "short"), ("path", "path")]
        problems = any(r["problem"] for r in records)
        columns += [("problem", "text")] * problems
        # Names, versions and problems come from each package's retina.json: data, never markup
        # (print_table passes every cell through safe). Dates show as YYYY-MM-DD, like every date.
        rows = [["*" if r["default"] else "", r["name"], r["version"], r["objective"] or "-",
                 str(r["embed_dim"] or "-"), ", ".join(r["tasks"]) or "-", (r["created"] or "-")[:10],
                 r["path"]] + [styled((r["problem"] or "", "red"))] * problems for r in records]
        print_table(out, columns, rows, title=f"{len(records)} model package(s)")
        if default_path:
            err.print("* = used when no --model is given")

    @models.command("show")
    def show(
        name: str = typer.Argument(None, help=NAME_HELP, show_default=False),
        as_json: bool = options.json_option("Print the whole package descriptor (retina.json) as JSON."),
    ) -> None:
        """Show a package's retina.json: inputs, heads and their metrics, training provenance, parity,
        and its model card (licence, intended use, training data, validation) or "no model card".

        Each head is listed with its cross-validated quality and a reliability mark (unreliable below
        AUROC 0.6 / R² 0.1, or without a cross-validated result). Predictions are for research use
        only, not for diagnosis or treatment decisions.
        """
        from retinacli.console import out, print_fields, print_json, styled
        from retinacli.headinfo import RESEARCH_USE, range_text, reliability_text
        from retinacli.modelcard import card_fields
        from retinacli.package import model_id_for, resolve_package, validated_descriptor

        path = resolve_package(name)
        m = validated_descriptor(path)
        model_id = model_id_for(m)
        if as_json:
            print_json({"path": str(path), "model_id": model_id, "card": None, **m})  # card: null = none
            return
        out.print(styled((f"{m['name']}@{m['version']}", "bold"), f"  ({model_id})"))
        rows = [
            ("path", str(path)),
            ("created", m["created"]),
            ("changelog", m["changelog"]),
            ("objective", m["objective"]),
            ("architectures", f"fundus {m['architectures']['fundus']}, oct {m['architectures']['oct']}"),
            ("embedding", f"{m['embed_dim']}-d, L2-normalised"),
        ]
        for modality, spec in m["inputs"].items():
            shape = "x".join(str(s) for s in spec["shape"])
            rows.append((f"input {modality}", f"{shape} {spec['dtype']} ({spec['value_range']})"))
        for task, head in m["heads"].items():
            threshold = "" if head["threshold"] is None else f", threshold {head['threshold']:.3f}"
            rows.append(
                (f"head {task}", f"{head['kind']} on {head['input_modality']} embeddings, n={head['n_train']}"
                 f"{threshold}; {_metric_summary(head)}; {reliability_text(head)}; {head['label_meaning']}"
                 + (f"; training range {range_text(head)}" if range_text(head) else ""))
            )
        if not m["heads"]:
            rows.append(("heads", "none"))
        t = m["training"]
        data_sha = (t["data_manifest_sha256"] or "-")[:12]
        rows.append(
            ("training", f"preset {t.get('preset')}, seed {t['seed']}, {t['epochs']} epochs, "
             f"config sha256 {t['config_sha256'][:12]}, data sha256 {data_sha}")
        )
        p = m["parity"]
        fundus_diff, oct_diff = p["fundus"]["max_abs_diff"], p["oct"]["max_abs_diff"]
        rows.append(
            ("parity", f"max |Δ| fundus {fundus_diff:.1e}, oct {oct_diff:.1e} "
             f"(tolerance {p['tolerance_abs']:g}; {p.get('inputs', '')})")
        )
        for modality, entry in ((m.get("quantized") or {}).get("int8", {}).get("encoders") or {}).items():
            gates = ", ".join(
                f"{backend} {'passed' if g['passed'] else 'failed'} (cos {g['min_cosine']:.5f}, "
                f"top-5 {g['top5_agreement']:.2f})" for backend, g in entry["gate"].items()
            )
            rows.append((f"int8 {modality}", f"{entry['file']}: gate {gates}"))
        ood = m.get("ood")  # retinacli.ood: the out-of-distribution reference, when the export made one
        rows.append(("out of distribution", "; ".join(
            f"{modality}: flagged below {s['threshold']:.3f} (k={s['k']}, {s['items']} training items)"
            for modality, s in ood["modalities"].items()) if ood else "no check in this package"))
        rows.append(("exporter", f"{m['export']['exporter']}, opset {m['export']['opset']}"))
        rows.append(("packages", ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v)))
        size = sum(f["bytes"] for f in m["files"])
        rows.append(("files", f"{len(m['files'])} files, {size / 1e6:.1f} MB"))
        rows += card_fields(m)  # the model card, or "no model card"
        rows.append(("use", RESEARCH_USE))
        print_fields(out, [(f"  {key}", value) for key, value in rows], key_width=15, right=True, gap=2,
                     key_style="bold")

    @models.command("verify")
    def verify(
        name: str = typer.Argument(None, help=NAME_HELP, show_default=False),
        as_json: bool = options.json_option("Print the result as JSON."),
    ) -> None:
        """Check the descriptor (schema, finite in-range values), every file's size and sha256, and
        each ONNX graph (fp32, int8, heads) against it: input/output names, shapes, embedding size.

        Exit code 3 when the package is invalid, with one line naming the file and the field.
        """
        from retinacli.console import out, print_json, styled
        from retinacli.engine import Engine
        from retinacli.errors import ModelPackageError
        from retinacli.package import resolve_package

        path = None
        try:
            path = resolve_package(name)
            engine = Engine.load(path, threads=1)
            engine.check_graphs()
        except ModelPackageError as exc:
            if as_json:
                print_json({"path": str(path) if path else name, "ok": False, "error": str(exc)})
                raise typer.Exit(EXIT_MODEL_INVALID) from None
            raise
        files = engine.descriptor["files"]
        if as_json:
            print_json({"path": str(path), "ok": True, "model_id": engine.model_id,
                        "files": [{"path": f["path"], "sha256": f["sha256"]} for f in files]})
            return
        out.print(styled(("ok", "green"), f" {engine.model_id}: {len(files)} files verified (sha256), "
                         f"{len(files)} graphs match the descriptor ({path})"))

    @models.command("install")
    def install(
        source: str = typer.Argument(
            ..., help="Package folder (or name), or an https:// / http:// URL of a .tar.gz or .zip package "
            "archive, to install into the model store.", show_default=False),
        sha256: str = typer.Option(None, "--sha256", metavar="HEX", show_default=False,
                                   help="URL only: the archive's sha256 as its publisher gives it; "
                                   "a different archive is refused (exit 3)."),
        model_id: str = typer.Option(None, "--model-id", metavar="ID", show_default=False,
                                     help="The package's model id (as 'retina models show' prints it); "
                                     "a different package is refused (exit 3)."),
        force: bool = typer.Option(False, "--force", help="Replace an installed copy of this version."),
        as_json: bool = options.json_option("Print the result as JSON."),
    ) -> None:
        """Verify a package and copy it to $RETINA_HOME/models/<name>-<version> (usable from any folder).

        A URL is downloaded (at most 2 GiB, $RETINA_INSTALL_MAX_DOWNLOAD_BYTES; 60 s timeout per read)
        and extracted safely (no absolute paths, '..', links or devices; at most 1000 entries and
        4 GiB, $RETINA_INSTALL_MAX_ENTRIES / $RETINA_INSTALL_MAX_EXTRACT_BYTES) into a temp folder;
        every file is verified against the package's retina.json before anything is written into the
        models folder. The descriptor travels inside the archive, so pin --sha256 or --model-id (a warning
        says so when neither is given). Exit 2 for a URL that cannot be fetched, 3 for a refused
        archive or package; either way the models folder is unchanged.
        """
        from retinacli.console import err, out, print_json, safe
        from retinacli.errors import UsageError
        from retinacli.package import install_package, resolve_package
        from retinacli.package_install import (
            NO_PIN_WARNING,
            check_model_id,
            check_sha256_pin,
            is_url,
        )

        if is_url(source):
            pin = check_sha256_pin(sha256)
            if pin is None and model_id is None:
                err.print(safe(NO_PIN_WARNING))
            target = _install_url(source, pin, model_id, force, err)
        else:
            if sha256 is not None:
                raise UsageError("--sha256 pins a downloaded archive; give a URL, or use --model-id")
            package = resolve_package(source)
            if model_id is not None:
                check_model_id(package, model_id, str(package))
            target = install_package(package, force=force)
        if as_json:
            print_json({"installed": str(target)})
        else:
            out.print(f"installed {safe(target)}")

    @models.command("default")
    def default(
        name: str = typer.Argument(None, help="Package name or folder to use when no --model is given.",
                                   show_default=False),
        clear: bool = typer.Option(False, "--clear", help="Forget the default."),
        as_json: bool = options.json_option("Print the result as JSON."),
    ) -> None:
        """Set (or show, without NAME) the default package, stored in $RETINA_HOME/config.json."""
        from pathlib import Path

        from retinacli.console import err, out, print_json, safe
        from retinacli.package import (
            _looks_like_path,
            get_default_model,
            resolve_package,
            set_default_model,
            validated_descriptor,
        )

        if clear:
            config = set_default_model(None)
            err.print(f"default model cleared ({safe(config)})")
            return
        if name is None:
            current = get_default_model()
            used, why = default_model_marker()
            if as_json:
                print_json({"default": current, "resolved": used, "problem": why})
            else:
                out.print(safe(f"default: {current or '(not set)'}; "
                               f"used when no --model is given: {used or why}"))
            return
        path = resolve_package(name)
        m = validated_descriptor(path)
        # A folder is remembered as an absolute path, a name as the name (it follows new versions).
        is_folder = _looks_like_path(name) or Path(name).is_dir()
        value = str(Path(name).expanduser().resolve()) if is_folder else name
        config = set_default_model(value)
        if as_json:
            print_json({"default": value, "resolved": str(path), "config": str(config)})
        else:
            out.print(safe(f"default model: {value} -> {m['name']}@{m['version']} ({path}); "
                           f"saved in {config}"))

    @models.command("remove")
    def remove(
        name: str = typer.Argument(..., help="Installed package: name, or name@version when several "
                                   "versions are installed.", show_default=False),
        as_json: bool = options.json_option("Print what was removed as JSON."),
    ) -> None:
        """Remove a package installed in $RETINA_HOME/models (only there: a folder elsewhere, such as
        ./exported/NAME, is refused). The folder is renamed aside, then deleted, so a package is never
        left half there; the default model is cleared when it was this package. Stores keep their
        vectors. Exit 2 for a name that is not installed.
        """
        import os
        import shutil
        from pathlib import Path

        from retinacli.console import out, print_json, safe
        from retinacli.errors import ModelPackageError, UsageError
        from retinacli.package import (
            DESCRIPTOR_FILE,
            get_default_model,
            list_packages,
            models_dir,
            resolve_package,
            search_dirs,
            set_default_model,
        )

        installed = list_packages([models_dir()])
        ref, _, version = name.partition("@")
        folder = Path(name).expanduser().resolve() if os.sep in name else None
        matches = [p for p in installed if (p.name == ref and (not version or p.version == version))
                   or p.path.name == name or p.path.resolve() == folder]
        if not matches:
            elsewhere = [p for p in list_packages([d for d in search_dirs() if d != models_dir()])
                         if (p.name == ref and (not version or p.version == version)) or p.path.name == name]
            if elsewhere or os.sep in name:
                where = elsewhere[0].path if elsewhere else Path(name)
                raise UsageError(f"{where}: not an installed package (only packages in {models_dir()} are "
                                 "removed; delete that folder yourself if you mean to)")
            known = ", ".join(sorted(f"{p.name}@{p.version}" for p in installed)) or "none"
            raise UsageError(f"{name}: no such installed package in {models_dir()}; installed: {known}")
        if len(matches) > 1:
            versions = ", ".join(sorted(f"{p.name}@{p.version}" for p in matches))
            raise UsageError(f"{name}: several versions are installed ({versions}); name one as NAME@VERSION")
        target = matches[0].path
        default = get_default_model()
        try:
            default_here = bool(default) and resolve_package(default).resolve() == target.resolve()
        except ModelPackageError:
            default_here = False
        aside = target.with_name(f".{target.name}.removing-{os.getpid()}")
        target.rename(aside)  # gone from every listing at once; the delete below may take a while
        (aside / DESCRIPTOR_FILE).unlink(missing_ok=True)  # a delete cut short leaves no package behind
        shutil.rmtree(aside, ignore_errors=True)
        if default_here:
            set_default_model(None)
        record = {"removed": f"{matches[0].name}@{matches[0].version}", "path": str(target),
                  "default_cleared": default_here}
        if as_json:
            print_json(record)
            return
        out.print(safe(f"removed {record['removed']} ({target})"), highlight=False, soft_wrap=True)
        if default_here:
            out.print(safe(f"default model cleared (it was {default})"), highlight=False, soft_wrap=True)
