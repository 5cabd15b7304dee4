"""The console scripts run the same mains as `python -m ...`."""

import shutil
import subprocess

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
