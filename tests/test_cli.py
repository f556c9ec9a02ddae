"""The ``mlflow-ema`` command starts without importing torch or mlflow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner
from mlflow_ema.cli import main


def test_help_lists_the_program():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "Usage: main" in result.output or "Usage: mlflow-ema" in result.output
    assert "Weight averaging" in result.output


def test_startup_imports_neither_torch_nor_mlflow():
    code = "import sys, mlflow_ema.cli; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'mlflow'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "mlflow-ema"
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("mlflow-ema, version ")


def test_package_import_is_lazy_but_exports_the_api():
    code = (
        "import sys, mlflow_ema; assert 'torch' not in sys.modules; "
        "from mlflow_ema import EMA, save_checkpoint; assert 'torch' in sys.modules; "
        "assert set(mlflow_ema.__all__) <= set(dir(mlflow_ema))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_subcommand_help_imports_neither_torch_nor_mlflow():
    code = (
        "import sys\nfrom mlflow_ema.cli import main\n"
        "for cmd in ('average', 'promote', 'ls', 'inspect'):\n"
        "    try:\n        main([cmd, '--help'])\n    except SystemExit as e:\n        assert e.code == 0\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'mlflow'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "--register-as" in out.stdout and "--if-better" in out.stdout


def test_no_module_of_the_package_hides_an_exported_name():
    """Importing ``mlflow_ema.<module>`` sets that attribute on the package: a module named
    like an export (``resume``) would replace the function."""
    import pkgutil

    import mlflow_ema

    modules = {m.name for m in pkgutil.iter_modules(mlflow_ema.__path__)}
    assert not modules & set(mlflow_ema.__all__)
