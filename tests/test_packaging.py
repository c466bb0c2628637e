"""The torch-free promise and the README/CI contract."""

import subprocess
import sys

from conftest import REPO


def test_cli_import_does_not_import_torch():
    code = (
        "import sys, retinacli.cli, retinacli.preprocess, retinacli.items; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'torchvision'))]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_help_lists_every_command():
    result = subprocess.run([sys.executable, "-m", "retinacli.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for command in ("synth", "inspect", "pair", "train", "export", "evaluate", "embed", "retrieve",
                    "predict", "models", "info", "demo"):
        assert command in result.stdout


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text().splitlines()
    commands = [line.strip() for line in readme if line.startswith("    python3 -m venv")]
    assert len(commands) >= 2, "README must start with the two set-up commands"
    test_command = commands[1].split("&& ", 2)[-1]  # after venv creation and activation
    assert test_command in (REPO / ".ci" / "run").read_text()


def test_cli_reference_documents_every_command():
    from retinacli.cli import COMMAND_MODULES

    reference = (REPO / "docs" / "cli.md").read_text()
    for name in COMMAND_MODULES:
        assert f"## retina {name}\n" in reference, f"regenerate docs/cli.md: `retina {name}` is missing"
