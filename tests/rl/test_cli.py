"""`alignkit rl` through the real command-line entry point."""

import subprocess
import sys

import pytest

from alignkit.cli import main

PNG = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_value_iteration_prints_the_maps_and_writes_the_pngs(tmp_path, capsys):
    assert main(["rl", "--env", "cat", "--algo", "value_iteration", "--output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "V*(start) = 4.127" in out
    assert "→ → → → ↓" in out  # the optimal policy's row through the door, as arrows
    assert "100.0% of optimal" in out and "bathtub 0%" in out
    for name in ("learning_curve.png", "values.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5_000


def test_q_learning_prints_returns_against_the_optimum(tmp_path, capsys):
    argv = ["rl", "--env", "cat", "--algo", "q_learning", "--episodes", "300", "--exploration", "epsilon",
            "--seed", "3", "--output_dir", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    progress = [line for line in out.splitlines() if line.startswith("episode")]
    assert len(progress) == 10 and all(line.endswith("optimal 4.127") for line in progress)  # every 30 episodes
    assert progress[-1].startswith("episode    300") and "rl q_learning finished: 300 episodes" in out
    assert (tmp_path / "learning_curve.png").read_bytes().startswith(PNG)


def test_a_bad_room_file_is_a_one_line_error(tmp_path, capsys):
    room = tmp_path / "room.txt"
    room.write_text("C . X\n. . M\n")
    assert main(["rl", "--algo", "value_iteration", "--room", str(room), "--output_dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "room.txt" in err and "unknown symbol 'X'" in err and "Traceback" not in err


def test_importing_the_rl_package_does_not_import_matplotlib():
    code = "import sys, alignkit.rl, alignkit.rl.cli, alignkit.rl.learners; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
