"""`retina info`: versions, onnxruntime providers, the engine the default model really runs on, threads,
model and store locations."""

from __future__ import annotations

import typer

from retinacli.commands import options


def collect_info(device: str = "auto") -> dict:
    import os
    import platform
    import sys
    from importlib import metadata

    import numpy as np
    import onnxruntime as ort

    from retinacli import __version__
    from retinacli.commands.common import default_model_marker
    from retinacli.engine import physical_cores
    from retinacli.package import config_path, get_default_model, models_dir, retina_home, search_dirs
    from retinacli.store import default_store_path

    used, why = default_model_marker()
    try:
        default_model = get_default_model()
    except Exception as exc:  # a broken config file is reported, not fatal here
        default_model = f"(unreadable: {exc})"
    return {
        "retina": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "pydicom": _version(metadata, "pydicom"),
        "torch": _version(metadata, "torch") or "not installed (only needed for train/probe/export)",
        "openvino": _version(metadata, "openvino") or "not installed (onnxruntime runs the encoders)",
        "providers": list(ort.get_available_providers()),
        "engine": _engine_info(used, device),
        "threads": physical_cores(),
        "logical_cpus": os.cpu_count(),
        "retina_home": str(retina_home()),
        "retina_home_source": "$RETINA_HOME" if os.environ.get("RETINA_HOME") else "default (~/.retina)",
        "config_file": str(config_path()),
        "model_store": str(models_dir()),
        "model_search_dirs": [str(d) for d in search_dirs()],
        "retina_model_env": os.environ.get("RETINA_MODEL"),
        "default_model": default_model,
        "model_used_by_default": used,
        "model_problem": why,
        "model_card": _model_card(used),
        "default_embedding_store": str(default_store_path().absolute()),
        "executable": sys.executable,
    }


def _engine_info(package: str | None, device: str) -> dict | None:
    """How the default model's encoders run with ``--device``: backend/precision and the providers
    their built sessions really use (so a fall-back from CUDA to the CPU is visible); or the problem."""
    if package is None:
        return None
    from retinacli.engine import Engine
    from retinacli.errors import RetinaError

    try:
        engine = Engine.load(package, providers=device)
        used = engine.providers_used(list(engine.variants))
    except RetinaError as exc:  # reported, not fatal here
        return {"device": device, "problem": str(exc)}
    return {"device": device, "encoders": {m: {"engine": v.label, "providers": used[m]}
                                            for m, v in engine.variants.items()}}


def _model_card(package: str | None) -> dict | None:
    """The model used by default: its ref and card (None: it has none), or why it cannot be read."""
    if package is None:
        return None
    from pathlib import Path

    from retinacli.errors import ModelPackageError
    from retinacli.modelcard import card_fields
    from retinacli.package import validated_descriptor

    try:
        m = validated_descriptor(Path(package))
    except ModelPackageError as exc:  # reported, not fatal here
        return {"package": package, "problem": str(exc)}
    return {"package": f"{m['name']}@{m['version']}", "card": m.get("card"),
            "fields": card_fields(m)}


def _engine_text(engine: dict | None) -> str:
    if engine is None:
        return "none (no default model)"
    if "problem" in engine:
        return str(engine["problem"])
    encoders = engine["encoders"].items()
    return "; ".join(f"{m} {e['engine']} on {', '.join(e['providers'])}" for m, e in encoders)


def _version(metadata, dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def register(app: typer.Typer) -> None:
    @app.command("info")
    def info(
        as_json: bool = options.json_option("Print the information as JSON."),
        device: str = options.device_option(
            "Device to try the default model's encoders on: auto, cpu or cuda (see 'retina embed "
            "--device'). The engine line shows the providers their sessions really use."),
    ) -> None:
        """Show versions, onnxruntime providers, threads, the default model (with its model card) and
        where things are stored."""
        from retinacli.console import out, print_fields, print_json

        data = collect_info(device)
        card = data["model_card"]
        card_rows = card.pop("fields", []) if card else []  # display rows: not part of the JSON
        if as_json:
            print_json(data)
            return
        labels = {
            "retina": "retina",
            "python": "python",
            "numpy": "numpy",
            "onnxruntime": "onnxruntime",
            "pydicom": "pydicom",
            "torch": "torch",
            "openvino": "openvino",
            "providers": "onnxruntime providers",
            "engine": "engine (default model)",
            "threads": "threads (physical cores)",
            "retina_home": "RETINA_HOME",
            "model_store": "model store",
            "model_search_dirs": "model search",
            "retina_model_env": "RETINA_MODEL",
            "default_model": "default model",
            "model_used_by_default": "model used",
            "default_embedding_store": "embedding store",
        }
        fields = []
        for key, label in labels.items():
            value = data[key]
            if isinstance(value, list):
                value = ", ".join(value)
            if key == "retina_home":
                value = f"{value} ({data['retina_home_source']})"
            if key == "engine":
                value = _engine_text(value)
            if key == "model_used_by_default" and value is None:
                value = f"none ({data['model_problem']})"
            fields.append((label, value))
        if card and card.get("problem"):
            fields.append(("model card", f"unreadable ({card['problem']})"))
        elif card:  # the card of the model used, or "no model card"
            if card["card"] is None:
                fields.append(("model card", f"no model card ({card['package']})"))
            else:
                fields.append(("model card", card["package"]))
                fields += card_rows
        print_fields(out, fields, key_width=24, right=True, gap=2, key_style="bold")
