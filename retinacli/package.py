"""Model packages on disk: finding them by name or path, reading and verifying their descriptor.

A package is a folder holding ``retina.json`` plus the ONNX files it lists (docs/model-package.md).
Packages are looked up in ``./exported/`` (next to a checkout or project) and in the model store
``$RETINA_HOME/models`` (default ``~/.retina/models``). Which package a command uses when none is
named: ``$RETINA_MODEL``, else the default set with ``retina models default NAME`` (kept in
``$RETINA_HOME/config.json``), else the only package found, else the newest one.

numpy-free and torch-free: importing this module costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retinacli.errors import ModelPackageError
from retinacli.fsutil import atomic_write_json, building_dir

DESCRIPTOR_FILE = "retina.json"
# A descriptor is a few KB; these bound what reading a hand-edited or hostile one can cost.
MAX_DESCRIPTOR_BYTES = 1 << 20
MAX_DESCRIPTOR_DEPTH = 32
CONFIG_FILE = "config.json"
ALLOWED_SUFFIXES = (".onnx", ".json")
# Files that must never sit unlisted in a package: they could be loaded by other tools (pickle).
_SUSPECT_SUFFIXES = (".onnx", ".pt", ".pth", ".pkl", ".pickle", ".bin", ".npy", ".npz", ".ckpt", ".data")


# --- locations ----------------------------------------------------------------------------------


def retina_home() -> Path:
    """``$RETINA_HOME`` or ``~/.retina``."""
    return Path(os.environ.get("RETINA_HOME") or Path.home() / ".retina").expanduser()


def models_dir() -> Path:
    """The per-user model store: ``$RETINA_HOME/models``."""
    return retina_home() / "models"


def search_dirs() -> list[Path]:
    """Where package names are looked up, in order."""
    return [Path.cwd() / "exported", models_dir()]


def config_path() -> Path:
    return retina_home() / CONFIG_FILE


def read_config() -> dict[str, Any]:
    path = config_path()
    if not path.exists():
        return {}
    from retinacli.jsonutil import loads_bounded

    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_DESCRIPTOR_BYTES + 1)
    except OSError as exc:
        raise ModelPackageError(f"{path}: cannot read retina config ({exc.strerror or exc})") from None
    try:
        data = loads_bounded(raw, MAX_DESCRIPTOR_BYTES, MAX_DESCRIPTOR_DEPTH)
    except ValueError as exc:
        raise ModelPackageError(f"{path}: cannot read retina config: it {exc}") from None
    return data if isinstance(data, dict) else {}


def get_default_model() -> str | None:
    """The name set with ``retina models default NAME`` (None when unset)."""
    return read_config().get("default_model")


def set_default_model(name: str | None) -> Path:
    """Record (or clear, with None) the default model in ``$RETINA_HOME/config.json``."""
    config = read_config()
    if name is None:
        config.pop("default_model", None)
    else:
        config["default_model"] = name
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, config)
    return path


# --- listing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackageInfo:
    """What listing needs from a package, read without hashing its files."""

    path: Path
    name: str
    version: str
    created: str
    objective: str
    embed_dim: int | None
    tasks: tuple[str, ...]
    problem: str | None = None  # why the descriptor could not be read (listed, not hidden)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def read_descriptor(package_dir: Path) -> dict[str, Any]:
    """Parse ``retina.json`` (no validation); ModelPackageError names the file on failure."""
    path = Path(package_dir) / DESCRIPTOR_FILE
    if not path.is_file():
        raise ModelPackageError(f"{path}: missing package descriptor (not a retina model package)")
    from retinacli.jsonutil import loads_bounded

    try:
        size = path.stat().st_size
        if size > MAX_DESCRIPTOR_BYTES:  # refused before reading it: a descriptor is a few KB
            raise ValueError(f"is {size} bytes, more than the {MAX_DESCRIPTOR_BYTES} a descriptor may have")
        with open(path, "rb") as fh:
            raw = fh.read(MAX_DESCRIPTOR_BYTES + 1)
        # NaN/Infinity literals parse to floats here so that validation names their field
        data = loads_bounded(raw, MAX_DESCRIPTOR_BYTES, MAX_DESCRIPTOR_DEPTH, constants=True)
    except OSError as exc:
        raise ModelPackageError(f"{path}: cannot read the descriptor ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ModelPackageError(f"{path}: descriptor {exc}") from None
    if not isinstance(data, dict):
        raise ModelPackageError(f"{path}: descriptor must be a JSON object")
    return data


def package_info(package_dir: Path) -> PackageInfo:
    package_dir = Path(package_dir)
    try:
        m = read_descriptor(package_dir)
    except ModelPackageError as exc:
        return PackageInfo(package_dir, package_dir.name, "?", "", "", None, (), problem=str(exc))
    heads = m.get("heads") if isinstance(m.get("heads"), dict) else {}
    return PackageInfo(
        path=package_dir,
        name=str(m.get("name") or package_dir.name),
        version=str(m.get("version") or "?"),
        created=str(m.get("created") or ""),
        objective=str(m.get("objective") or ""),
        embed_dim=m.get("embed_dim") if isinstance(m.get("embed_dim"), int) else None,
        tasks=tuple(sorted(heads)),
    )


def list_packages(dirs: list[Path] | None = None) -> list[PackageInfo]:
    """Every package folder (one holding retina.json) directly inside the search dirs."""
    found: list[PackageInfo] = []
    seen: set[Path] = set()
    for base in dirs if dirs is not None else search_dirs():
        if not base.is_dir():
            continue
        for child in sorted(base.iterdir()):
            if child.is_dir() and (child / DESCRIPTOR_FILE).is_file():
                real = child.resolve()
                if real not in seen:
                    seen.add(real)
                    found.append(package_info(child))
    return found


def _semver_key(version: str) -> tuple:
    m = re.match(r"^(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?", version)
    if not m:
        return (-1, -1, -1, 0, "")
    # a release sorts after its pre-releases
    return (int(m[1]), int(m[2]), int(m[3]), 0 if m[4] else 1, m[4] or "")


def _newest(infos: list[PackageInfo]) -> PackageInfo:
    return max(infos, key=lambda i: (_semver_key(i.version), i.created))


def _lookup_name(ref: str, dirs: list[Path]) -> Path | None:
    """``name``, ``name@version`` or a folder name inside the search dirs."""
    name, _, version = ref.partition("@")
    infos = [i for i in list_packages(dirs) if i.problem is None]
    matches = [i for i in infos if i.name == name and (not version or i.version == version)]
    if not matches:
        matches = [i for i in infos if i.path.name == ref]
    return _newest(matches).path if matches else None


def _explicit_path(ref: str) -> Path | None:
    path = Path(ref).expanduser()
    if path.is_file() and path.name == DESCRIPTOR_FILE:
        return path.parent
    if path.is_dir():
        if not (path / DESCRIPTOR_FILE).is_file():
            raise ModelPackageError(f"{path}: no {DESCRIPTOR_FILE} here (not a retina model package)")
        return path
    return None


def _looks_like_path(ref: str) -> bool:
    return os.sep in ref or ref.startswith((".", "~")) or ref.endswith(DESCRIPTOR_FILE)


def resolve_package(name_or_path: str | os.PathLike | None = None) -> Path:
    """The package folder for an explicit path or name, or the default package.

    Order: explicit path; name (``name`` / ``name@version`` / folder name) under ``./exported`` and
    ``$RETINA_HOME/models``; with nothing given, ``$RETINA_MODEL``, then the default from
    ``retina models default``, then the only (or newest) package found.
    """
    dirs = search_dirs()
    if name_or_path is None:
        env = os.environ.get("RETINA_MODEL")
        if env:
            return _resolve_ref(env, dirs, source="$RETINA_MODEL")
        default = get_default_model()
        if default:
            return _resolve_ref(default, dirs, source=f"default model in {config_path()}")
        infos = [i for i in list_packages(dirs) if i.problem is None]
        if not infos:
            where = ", ".join(str(d) for d in dirs)
            raise ModelPackageError(
                f"no model package found (searched {where}); export one with "
                "'retina export RUN --out exported/NAME' or pass --model PATH"
            )
        return _newest(infos).path
    return _resolve_ref(str(name_or_path), dirs, source=None)


def _resolve_ref(ref: str, dirs: list[Path], source: str | None) -> Path:
    path = _explicit_path(ref)
    if path is not None:
        return path
    if not _looks_like_path(ref):
        found = _lookup_name(ref, dirs)
        if found is not None:
            return found
    origin = f" (from {source})" if source else ""
    where = ", ".join(str(d) for d in dirs)
    raise ModelPackageError(
        f"{ref}: no such model package{origin}; searched {where} (see 'retina models list')"
    )


def find_package_by_model_id(model_id: str, dirs: list[Path] | None = None) -> Path | None:
    """The known package whose ``model_id`` (name@version+hash) matches, e.g. to reopen a store."""
    for info in list_packages(dirs):
        # either of the package's ids: a store of the older id rule too
        if info.problem is None and model_id.startswith(f"{info.ref}+") and model_id in package_model_ids(
                info.path):
            return info.path
    return None


def package_model_ids(package_dir: Path) -> tuple[str, ...]:
    """The (current, legacy) model ids of the package in `package_dir` (from its retina.json alone),
    or () when the folder is gone or holds no readable package."""
    try:
        return model_ids_for(read_descriptor(Path(package_dir)))
    except (ModelPackageError, KeyError, TypeError, AttributeError, ValueError, OSError):
        return ()


def package_model_id(package_dir: Path) -> str | None:
    """The current model_id of the package in `package_dir` (from its retina.json alone), or None
    when the folder is gone or holds no readable package."""
    ids = package_model_ids(package_dir)
    return ids[0] if ids else None


def locate_store_package(model_id: str, recorded: str | None) -> tuple[Path | None, str]:
    """The package that made a store's vectors, and how it was found (for messages).

    The folder recorded in store.json when it still holds `model_id`, else the known package with
    that id (search dirs), else (None, why not). Never the default package: exporting another
    package must not change which model an existing store expects.
    """
    if recorded and model_id in package_model_ids(Path(recorded)):
        return Path(recorded), "recorded in the store"
    found = find_package_by_model_id(model_id)
    searched = ", ".join(str(d) for d in search_dirs())
    if recorded:
        if found is not None:
            return found, f"found by model id; the recorded {recorded} no longer holds it"
        return None, (f"the recorded package folder {recorded} is missing or holds another model, "
                      f"and none with this id is in {searched}")
    if found is not None:
        return found, "found by model id"
    return None, f"the store records no package folder, and none with this id is in {searched}"


# --- identity and verification -----------------------------------------------------------------


MODEL_ID_RULE = 2  # docs/model-package.md "Model id"; rule 1 ids (legacy) still match their stores


def model_ids_for(descriptor: dict[str, Any]) -> tuple[str, str]:
    """``(current, legacy)`` model ids, each ``name@version+<12 hex>``.

    current (rule 2): the hash covers the fp32 encoder graphs, the int8 encoder graphs when the
    package has them, the embedding size and the preprocessing spec. legacy (rule 1, retina 0.1):
    the fp32 encoder graphs and the preprocessing spec only; stores made then record it, and a
    package whose legacy id equals a store's id made that store's vectors.

    Two packages with the same id produce the same embeddings; refitting heads keeps the id, so
    an embedding store stays valid after a new ``retina probe`` + export.
    """
    digests = {f["path"]: f["sha256"] for f in descriptor["files"]}
    legacy = [digests[descriptor["inputs"][m]["file"]] for m in ("fundus", "oct")]
    legacy.append(json.dumps(descriptor["preprocessing"], sort_keys=True, separators=(",", ":")))
    current = [f"rule={MODEL_ID_RULE}", *legacy, f"embed_dim={int(descriptor['embed_dim'])}"]
    for precision, quantized in sorted((descriptor.get("quantized") or {}).items()):
        for modality, entry in sorted((quantized.get("encoders") or {}).items()):
            current.append(f"{precision}.{modality}={digests[entry['file']]}")
    prefix = f"{descriptor['name']}@{descriptor['version']}+"
    return tuple(prefix + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]
                 for parts in (current, legacy))


def model_id_for(descriptor: dict[str, Any]) -> str:
    """The current model id of a package descriptor (see :func:`model_ids_for`)."""
    return model_ids_for(descriptor)[0]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def validated_descriptor(package_dir: Path) -> dict[str, Any]:
    """Read and schema-check ``retina.json``; also check that every referenced file is listed."""
    from retinacli.descriptor_schema import descriptor_errors

    package_dir = Path(package_dir)
    descriptor = read_descriptor(package_dir)
    errors = descriptor_errors(descriptor)
    if errors:
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ModelPackageError(f"{package_dir / DESCRIPTOR_FILE}: {errors[0]}{more}")
    listed = {f["path"] for f in descriptor["files"]}
    referenced = [("inputs." + m, spec["file"]) for m, spec in descriptor["inputs"].items()]
    referenced += [("heads." + t, h["file"]) for t, h in descriptor["heads"].items()]
    for precision, quantized in (descriptor.get("quantized") or {}).items():
        for m, entry in (quantized.get("encoders") or {}).items():
            referenced.append((f"quantized.{precision}.encoders.{m}", entry["file"]))
    if descriptor.get("ood") is not None:
        referenced.append(("ood", descriptor["ood"]["file"]))
    for field_name, file_name in referenced:
        if file_name not in listed:
            raise ModelPackageError(
                f"{package_dir / DESCRIPTOR_FILE}: {field_name}.file '{file_name}' is not in the files list"
            )
    return descriptor


def verify_package(package_dir: Path, read: bool = True) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Validate the descriptor, check every listed file's size and sha256 and (when ``read``) that
    each ONNX graph's inputs, outputs and sizes are the ones the descriptor declares (graph_errors).

    Returns the descriptor and (when ``read``) the verified bytes of every ONNX file, so callers
    build sessions from exactly the bytes that were checked. Raises ModelPackageError naming the
    file and the reason: missing, wrong size, sha256 mismatch, file type not allowed, or an
    unlisted model/pickle file inside the package.
    """
    package_dir = Path(package_dir)
    descriptor = validated_descriptor(package_dir)
    blobs: dict[str, bytes] = {}
    listed = set()
    for entry in descriptor["files"]:
        rel = entry["path"]
        listed.add(rel)
        path = package_dir / rel
        if Path(rel).suffix not in ALLOWED_SUFFIXES:
            raise ModelPackageError(f"{path}: file type not allowed in a package (only .onnx and .json)")
        if not path.is_file():
            raise ModelPackageError(f"{path}: missing (listed in {DESCRIPTOR_FILE})")
        data = path.read_bytes()
        if len(data) != entry["bytes"]:
            raise ModelPackageError(
                f"{path}: size {len(data)} bytes differs from the descriptor ({entry['bytes']}); corrupt file"
            )
        if sha256_bytes(data) != entry["sha256"]:
            raise ModelPackageError(f"{path}: sha256 mismatch with the descriptor (corrupt or modified file)")
        if read and (rel.endswith(".onnx") or rel == (descriptor.get("ood") or {}).get("file")):
            blobs[rel] = data
    for child in sorted(package_dir.iterdir()):
        if child.name == DESCRIPTOR_FILE or child.name.startswith(".") or child.name in listed:
            continue
        if child.suffix.lower() in _SUSPECT_SUFFIXES:
            raise ModelPackageError(f"{child}: not listed in {DESCRIPTOR_FILE} (unlisted model file)")
    if read:
        check_graphs(package_dir, descriptor, blobs)
        check_ood_reference(package_dir, descriptor, blobs)
    return descriptor, blobs


def check_ood_reference(package_dir: Path, descriptor: dict[str, Any], blobs: dict[str, bytes]) -> None:
    """Raise ModelPackageError when the package's out-of-distribution reference file does not fit its
    descriptor (format, a k x embed_dim matrix of finite numbers per modality: retinacli.ood)."""
    ood = descriptor.get("ood")
    if ood is None:
        return
    from retinacli.ood import parse_reference

    try:
        parse_reference(blobs[ood["file"]], descriptor)
    except ValueError as exc:
        raise ModelPackageError(f"{Path(package_dir) / ood['file']}: {exc}") from None


def _graph_signature(data: bytes) -> tuple[list[tuple[str, str, list]], dict[str, list], Any]:
    """(inputs as (name, type, shape), outputs {name: shape}, session) of an ONNX graph's bytes.

    Built without graph optimisation: only the declared I/O is read (and, for a symbolic dimension,
    one zero batch run)."""
    from retinacli.onnx_session import create_session

    session = create_session(data, threads=1, optimize=False)
    inputs = [(i.name, i.type, list(i.shape)) for i in session.get_inputs()]
    outputs = {o.name: list(o.shape) for o in session.get_outputs()}
    return inputs, outputs, session


def _static(dim: Any) -> bool:
    return isinstance(dim, int) and dim > 0  # onnxruntime reports symbolic dims as str or None


def graph_errors(descriptor: dict[str, Any], blobs: dict[str, bytes]) -> list[str]:
    """Where the descriptor and the ONNX graphs themselves disagree, one line each naming the
    descriptor field: input names, input dtype and static dims of every encoder graph (fp32 and
    int8) against ``inputs.<m>``, their embedding output against ``embed_dim``, and every head's
    input size against ``embed_dim``. A dimension the graph leaves symbolic is checked by running
    one zero batch."""
    dim = int(descriptor["embed_dim"])
    graphs = [(f"inputs.{m}", e["file"], e["input_name"], e["output_name"], e["shape"], ["batch", dim])
              for m, e in descriptor["inputs"].items()]
    for precision, quantized in (descriptor.get("quantized") or {}).items():
        for m, entry in (quantized.get("encoders") or {}).items():
            spec = descriptor["inputs"][m]
            graphs.append((f"quantized.{precision}.encoders.{m}", entry["file"], spec["input_name"],
                           spec["output_name"], spec["shape"], ["batch", dim]))
    for task, head in descriptor["heads"].items():
        graphs.append((f"heads.{task}", head["file"], head["input_name"], head["output_name"],
                       ["batch", dim], None))
    digests = {f["path"]: f["sha256"] for f in descriptor["files"]}
    errors: list[str] = []
    for field, file_name, input_name, output_name, shape, out_shape in graphs:
        # verified bytes of the same sha256 checked the same way: once per process (repeated loads)
        key = (digests.get(file_name), field, file_name, input_name, output_name, json.dumps(shape),
               json.dumps(out_shape))
        if key not in _GRAPH_CHECKS:
            if len(_GRAPH_CHECKS) > 256:
                _GRAPH_CHECKS.clear()
            _GRAPH_CHECKS[key] = _one_graph_errors(field, file_name, blobs[file_name], input_name,
                                                   output_name, shape, out_shape, dim)
        errors += _GRAPH_CHECKS[key]
    return errors


# A zero item is run only when a graph leaves an input dimension symbolic; above this many values
# (256 MB of float32) the run is skipped rather than allocate it.
_MAX_PROBE_VALUES = 1 << 26
_GRAPH_CHECKS: dict[tuple, list[str]] = {}


def _one_graph_errors(field: str, graph: str, data: bytes, input_name: str, output_name: str, shape: list,
                      out_shape: list | None, dim: int) -> list[str]:
    """graph_errors for one graph (see there)."""
    import numpy as np

    where = field
    errors: list[str] = []
    try:
        inputs, outputs, session = _graph_signature(data)
    except Exception as exc:  # onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return [f"{where}.file: onnxruntime cannot load {graph} ({first})"]
    if [i[0] for i in inputs] != [input_name]:
        names = [i[0] for i in inputs][:4]
        errors.append(f"{where}.input_name: {graph} has inputs {names}, the descriptor says "
                      f"[{input_name!r}]")
        return errors
    _, dtype, got = inputs[0]
    if dtype != "tensor(float)":
        errors.append(f"{where}.dtype: {graph} input {input_name!r} is {dtype}, not float32")
    bad = len(got) != len(shape) or any(
        _static(g) and isinstance(s, int) and g != s for g, s in zip(got[1:], shape[1:], strict=False))
    if bad:
        field_name = "shape" if field.startswith(("inputs", "quantized")) else "input size, embed_dim"
        errors.append(f"{where}.{field_name.split(',')[0].replace(' ', '_')}: {graph} input shape {got} "
                      f"differs from the descriptor's {field_name} {shape}")
        return errors
    if output_name not in outputs:
        errors.append(f"{where}.output_name: {graph} has no output {output_name!r} "
                      f"(has {list(outputs)[:4]})")
        return errors
    want = out_shape
    got_out = outputs[output_name]
    if want is not None and (len(got_out) != 2 or (_static(got_out[1]) and got_out[1] != dim)):
        errors.append(f"embed_dim: {graph} ({where}) outputs shape {got_out}, not (batch, {dim})")
        return errors
    symbolic = any(not _static(g) for g in got[1:]) or (want is not None and not _static(got_out[1]))
    if symbolic and int(np.prod([int(s) for s in shape[1:]])) <= _MAX_PROBE_VALUES:
        # the graph does not say: run one zero item of the declared shape
        x = np.zeros([1, *(int(s) for s in shape[1:])], dtype=np.float32)
        try:
            (y,) = session.run([output_name], {input_name: x})
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            errors.append(f"{where}.shape: {graph} does not accept input shape {shape} ({first})")
            return errors
        if want is not None and tuple(np.shape(y)) != (1, dim):
            errors.append(f"embed_dim: {graph} ({where}) outputs {list(np.shape(y))[1:]} per item, "
                          f"not [{dim}]")
    return errors


def check_graphs(package_dir: Path, descriptor: dict[str, Any], blobs: dict[str, bytes]) -> None:
    """Raise ModelPackageError with the first of :func:`graph_errors` (and how many more)."""
    errors = graph_errors(descriptor, blobs)
    if errors:
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ModelPackageError(f"{Path(package_dir) / DESCRIPTOR_FILE}: {errors[0]}{more}")


def install_package(source: Path, force: bool = False) -> Path:
    """Verify a package and copy it into the model store as ``$RETINA_HOME/models/<name>-<version>``."""
    import shutil

    descriptor, _ = verify_package(Path(source), read=False)
    target = models_dir() / f"{descriptor['name']}-{descriptor['version']}"
    if Path(source).resolve() == target.resolve():
        return target
    if target.exists() and not force:
        raise ModelPackageError(f"{target}: already installed (use --force to replace it)")
    with building_dir(target) as staging:  # swapped in whole, only once the copy verified
        for name in [DESCRIPTOR_FILE, *(f["path"] for f in descriptor["files"])]:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(source) / name, staging / name)
        verify_package(staging, read=False)  # the copy is what will be used: check it too
    return target
