"""The console scripts run the same mains as `python -m ...`."""

import shutil
import subprocess
import sys

import pytest


@pytest.mark.parametrize("script, module", [("mmsa-search", "search.run"), ("mmsa-train", "mmsa.train"),
                                            ("mmsa-final", "mmsa.final"), ("mmsa-predict", "mmsa.predict")])
def test_console_scripts_are_installed_and_answer_help(script, module):
    path = shutil.which(script)
    assert path, f"{script} is not on PATH: pip install -e . installs it"
    out = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and f"python -m {module}" in out.stdout


def test_a_console_script_reports_bad_input_in_one_line(tmp_path):
    out = subprocess.run([shutil.which("mmsa-train"), "--data", str(tmp_path / "nowhere")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "nowhere" in out.stderr


def _imports(module):
    def main(argv):
        __import__(module)
    return main


def test_a_missing_dependency_is_one_line_naming_it_and_the_install_command(capsys):
    from mmsa.app.commands import INSTALL, run_main
    with pytest.raises(SystemExit) as ended:
        run_main(_imports("optuna_not_installed_here.samplers"), [])
    err = capsys.readouterr().err
    assert ended.value.code == 2 and err.count("\n") == 1
    assert "'optuna_not_installed_here'" in err and INSTALL in err


def test_a_missing_module_of_the_project_itself_stays_a_traceback():
    from mmsa.app.commands import run_main
    with pytest.raises(ModuleNotFoundError):
        run_main(_imports("mmsa.no_such_module"), [])


@pytest.mark.parametrize("module, package, args", [
    ("mmsa.final", "yaml", ["--run-id", "x", "--data", "nowhere"]), ("mmsa.train", "torch", ["--data", "nowhere"]),
    ("mmsa.predict", "mlflow", ["--model", "x", "--data", "nowhere"]),
    ("search.run", "yaml", ["--space", "spaces/smoke.yaml", "--data", "nowhere"])])
def test_a_package_missing_where_a_command_module_is_imported_is_one_line_too(module, package, args):
    # None in sys.modules makes `import package` raise ModuleNotFoundError, as an install without it would.
    code = (f"import runpy, sys; sys.modules[{package!r}] = None; sys.argv = {[module] + args!r}; "
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0 and f"'{package}' is not installed" in out.stderr, out.stderr
