"""examples/many_tasks.py runs end to end (few steps): the mixed batch equals each task's own model."""
import runpy
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "many_tasks.py"


def test_many_tasks_example_runs(capsys):
    main = runpy.run_path(str(EXAMPLE))["main"]
    result = main(["--tasks", "3", "--steps", "20"])
    assert result["max_abs_diff"] < 1e-5
    assert all(result["mse_task"][n] < result["mse_base"][n] for n in result["mse_task"])
    assert "one mixed batch of 12 samples over 3 tasks" in capsys.readouterr().out
