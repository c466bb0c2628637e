"""`--device auto|cpu|cuda` and the providers really used (issue 16, part D).

The selection logic is tested on the CPU: which providers are asked for given what onnxruntime offers
(`available=`, as onnxruntime-gpu would list them), and what happens when a session asked for CUDA
really runs on the CPU — onnxruntime itself drops a provider it cannot start, which is exactly what a
CPU-only onnxruntime does with CUDAExecutionProvider, so that fall-back is real here, not simulated.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures_cli import one_error_line
from PIL import Image
from typer.testing import CliRunner

from retinacli.backends import choose_variant
from retinacli.cli import app
from retinacli.engine import CPU, CUDA, DEVICES, Engine, choose_providers, engine_line
from retinacli.errors import EXIT_USAGE, UsageError
from retinacli.package import verify_package

pytest.importorskip("onnx")  # the toy package is written with onnx

runner = CliRunner()
INSTALL = "pip uninstall onnxruntime && pip install onnxruntime-gpu"
ORT_HAS_CUDA = CUDA in __import__("onnxruntime").get_available_providers()
needs_cpu_only_ort = pytest.mark.skipif(ORT_HAS_CUDA, reason="this onnxruntime has the CUDA provider")
try:
    import openvino  # noqa: F401

    HAVE_OPENVINO = True
except ImportError:
    HAVE_OPENVINO = False


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def data(private_home) -> Path:
    """Two OCT volumes (.npy) and two fundus photos (.png) in ./data."""
    folder = private_home / "work" / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        np.save(folder / f"oct_{i}.npy", rng.integers(0, 255, size=(5, 20, 24), dtype=np.uint8))
        photo = rng.integers(0, 255, size=(30, 40, 3), dtype=np.uint8)
        Image.fromarray(photo).save(folder / f"fundus_{i}.png")
    return folder


def _engine(package: Path, providers: list[str], device: str | None, backend: str = "auto") -> Engine:
    """An engine asking onnxruntime for exactly `providers` (as Engine.load would on a machine whose
    onnxruntime lists them), with the package verified as load does."""
    descriptor, blobs = verify_package(package)
    return Engine(package, descriptor, blobs, providers, 1, backend, "auto", device)


# --- selection ---------------------------------------------------------------------------------------


def test_auto_takes_cuda_only_where_onnxruntime_offers_it():
    assert DEVICES == ("auto", "cpu", "cuda")
    gpu_build, cpu_build = [CUDA, CPU], ["AzureExecutionProvider", CPU]
    assert choose_providers("auto", available=gpu_build) == [CUDA, CPU]
    assert choose_providers("auto", available=cpu_build) == [CPU]
    assert choose_providers("cuda", available=gpu_build) == [CUDA, CPU]
    assert choose_providers("cpu", available=gpu_build) == [CPU]
    assert choose_providers(None, available=gpu_build) == [CPU]  # the library default stays the CPU
    # --engine openvino is a CPU runtime: auto does not ask onnxruntime for a GPU it will not use
    assert choose_providers("auto", "openvino", available=gpu_build) == [CPU]


def test_cuda_without_the_provider_says_why_and_how_to_install_it():
    with pytest.raises(UsageError) as caught:
        choose_providers("cuda", available=["AzureExecutionProvider", CPU])
    message = str(caught.value)
    assert "\n" not in message and caught.value.exit_code == EXIT_USAGE
    assert "no CUDAExecutionProvider" in message and INSTALL in message and "--device cpu" in message
    assert "available: AzureExecutionProvider, CPUExecutionProvider" in message
    with pytest.raises(UsageError, match="unknown device 'gpu'"):
        choose_providers("gpu", available=[CPU])


def test_with_cuda_the_encoders_run_on_onnxruntime_fp32(toy_package):
    """auto on a machine whose onnxruntime has CUDA: onnxruntime (the GPU runtime), never OpenVINO."""
    providers = choose_providers("auto", available=[CUDA, CPU])
    engine = _engine(toy_package, providers, "auto")
    assert {m: v.label for m, v in engine.variants.items()} == {"fundus": "onnxruntime/fp32",
                                                                "oct": "onnxruntime/fp32"}
    cpu_engine = _engine(toy_package, [CPU], "cpu")
    fastest = "openvino/fp32" if HAVE_OPENVINO else "onnxruntime/fp32"
    assert {v.label for v in cpu_engine.variants.values()} == {fastest}
    # without OpenVINO installed, auto is onnxruntime (retinacli works without it)
    descriptor = json.loads((toy_package / "retina.json").read_text())
    absent = {"onnxruntime": True, "openvino": False}
    assert choose_variant(descriptor, "oct", installed=absent).label == "onnxruntime/fp32"
    with pytest.raises(UsageError, match=r"openvino is not installed \(pip install openvino"):
        choose_variant(descriptor, "oct", "openvino", installed=absent)


# --- the providers really used -----------------------------------------------------------------------


@needs_cpu_only_ort
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available")
def test_a_silent_fall_back_to_the_cpu_is_visible_and_refused_for_cuda(toy_package):
    """A session asked for CUDA that onnxruntime starts on the CPU (real onnxruntime behaviour)."""
    x = np.zeros((1, *_engine(toy_package, [CPU], "cpu").input_shape("oct")), np.float32)
    auto = _engine(toy_package, [CUDA, CPU], "auto")
    assert auto.embed("oct", x).shape == (1, auto.embed_dim)  # auto: runs, on the CPU
    assert auto.providers_used() == {"oct": [CPU]}  # what the session reports, not what was asked
    assert engine_line(auto, ["oct"]) == \
        "oct onnxruntime/fp32 on CPUExecutionProvider (CUDA asked for but could not start)"
    cuda = _engine(toy_package, [CUDA, CPU], "cuda")
    with pytest.raises(UsageError) as caught:
        cuda.embed("oct", x)
    message = str(caught.value)
    assert caught.value.exit_code == EXIT_USAGE and "\n" not in message
    assert "could not start CUDA for" in message and "oct_encoder.onnx" in message \
        and "fell back to CPUExecutionProvider" in message
    with pytest.raises(UsageError, match="could not start CUDA"):  # the task heads too
        cuda.predict_raw("cst", np.zeros((1, cuda.embed_dim), np.float32))


def test_providers_used_come_from_the_built_sessions(toy_package):
    engine = _engine(toy_package, [CPU], "cpu", backend="onnxruntime")
    assert engine.providers_used() == {}  # nothing built yet: nothing claimed
    assert engine.providers_used(["fundus"]) == {"fundus": [CPU]}
    assert engine.describe()["providers"] == {"fundus": [CPU]}
    assert engine.describe()["providers_requested"] == [CPU]
    if HAVE_OPENVINO:
        ov = _engine(toy_package, [CPU], "cpu", backend="openvino")
        assert ov.providers_used(["oct", "fundus"]) == {"fundus": ["OpenVINO CPU"], "oct": ["OpenVINO CPU"]}
        assert engine_line(ov, ["fundus", "oct"]) == \
            "fundus openvino/fp32 on OpenVINO CPU, oct openvino/fp32 on OpenVINO CPU"


# --- the commands ------------------------------------------------------------------------------------


def test_embed_reports_the_providers_it_really_used(data, toy_package):
    result = run("embed", data, "--model", toy_package, "--store", "store", "--json", "--device", "cpu",
                 "--engine", "onnxruntime")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["embedded"] == 4
    assert summary["providers"] == {"fundus": [CPU], "oct": [CPU]}
    assert "engine: fundus onnxruntime/fp32 on CPUExecutionProvider, oct onnxruntime/fp32 on " \
           "CPUExecutionProvider" in result.stderr
    default = run("embed", data, "--model", toy_package, "--store", "store2", "--json", "--modality", "oct")
    assert default.exit_code == 0, default.output
    used = json.loads(default.stdout)["providers"]
    assert used == {"oct": ["OpenVINO CPU"] if HAVE_OPENVINO else [CPU]}  # only the encoder it needed


@needs_cpu_only_ort
def test_cuda_without_the_provider_exits_2_before_any_work(data, toy_package):
    result = run("embed", data, "--model", toy_package, "--store", "store", "--device", "cuda")
    assert result.exit_code == EXIT_USAGE
    line = one_error_line(result)
    assert "no CUDAExecutionProvider" in line and INSTALL in line
    assert not Path("store").exists()  # nothing created
    query = data / "oct_0.npy"
    assert run("embed", data, "--model", toy_package, "--store", "store").exit_code == 0
    for args in (("retrieve", query, "--store", "store"), ("predict", query, "--task", "cst", "--model",
                                                              toy_package)):
        result = run(*args, "--device", "cuda")
        assert result.exit_code == EXIT_USAGE, result.output
        assert INSTALL in one_error_line(result)


def test_retrieve_and_predict_say_which_engine_embedded_the_query(data, toy_package):
    assert run("embed", data, "--model", toy_package, "--store", "store").exit_code == 0
    where = "OpenVINO CPU" if HAVE_OPENVINO else CPU
    result = run("retrieve", data / "oct_0.npy", "--store", "store", "--json", "--device", "auto")
    assert result.exit_code == 0, result.output
    assert [line for line in result.stderr.splitlines() if line.startswith("engine:")] == \
        [f"engine: oct {'openvino' if HAVE_OPENVINO else 'onnxruntime'}/fp32 on {where}"]
    result = run("predict", data / "oct_1.npy", "--task", "cst", "--model", toy_package, "--json",
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["predictions"]) == 1
    assert f"engine: oct {'openvino' if HAVE_OPENVINO else 'onnxruntime'}/fp32 on {where}" in result.stderr


def test_an_unknown_device_is_a_usage_error(data, toy_package):
    for command in ("embed", "retrieve", "predict", "info"):
        result = run(command, "--device", "gpu", data)
        assert result.exit_code == EXIT_USAGE
        assert "must be one of auto, cpu, cuda, not 'gpu'" in result.output


def test_info_reports_the_default_models_engine(toy_packages_home):
    result = run("info", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    where = ["OpenVINO CPU"] if HAVE_OPENVINO else [CPU]
    label = "openvino/fp32" if HAVE_OPENVINO else "onnxruntime/fp32"
    assert info["engine"] == {"device": "cpu", "encoders": {
        "fundus": {"engine": label, "providers": where}, "oct": {"engine": label, "providers": where}}}
    assert CPU in info["providers"]  # what this onnxruntime offers, beside what is used
    if not ORT_HAS_CUDA:
        cuda = json.loads(run("info", "--json", "--device", "cuda").stdout)["engine"]
        assert cuda["device"] == "cuda" and INSTALL in cuda["problem"]  # reported, info still answers


# --- OpenVINO as a base dependency -------------------------------------------------------------------


def test_openvino_is_a_base_dependency_on_x86_64():
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    (openvino,) = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "openvino"]
    assert openvino.specifier.contains("2026.4.1")  # the version measured and documented
    assert openvino.marker.evaluate({"platform_machine": "x86_64"})
    assert openvino.marker.evaluate({"platform_machine": "AMD64"})  # Windows
    assert not openvino.marker.evaluate({"platform_machine": "aarch64"})  # not measured there
    assert project["optional-dependencies"]["openvino"] == []  # old `retina[openvino]` lines still install


@pytest.mark.skipif(not HAVE_OPENVINO, reason="OpenVINO is not installed")
def test_openvino_runs_without_its_telemetry(toy_package, tmp_path):
    """retina imports the OpenVINO runtime without its model converter, whose import would send a usage
    event and write a client id under ~/intel (opt-out telemetry): no module of it, no file, in a fresh
    process whose home is empty (and without $CI, which would silence it anyway)."""
    import os
    import subprocess

    home = tmp_path / "home"
    home.mkdir()
    code = (
        "import sys, numpy as np; from retinacli.engine import Engine; "
        f"e = Engine.load({str(toy_package)!r}, backend='openvino'); "
        "v = e.embed('oct', np.zeros((1, *e.input_shape('oct')), np.float32)); "
        "print(e.providers_used(), v.shape, sorted(m for m in sys.modules if 'telemetry' in m or 'ovc' in m))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}
    done = subprocess.run([sys.executable, "-c", code], env={**env, "HOME": str(home)}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "{'oct': ['OpenVINO CPU']} (1, 4) []"
    assert not (home / "intel").exists()  # no ~/intel/openvino_ga_cid, no usage stats
