"""The README's code examples run as written (except the full-length training run)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_usage_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    runnable = [b for b in blocks if "train_regretnet(" not in b]
    assert runnable, "README lost its usage example"
    for block in runnable:
        exec(compile(block, str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "0.833" in out  # item-wise Myerson on additive_2x2_uniform, as the comment says
    assert "(0.0, 0.0)" in out


def test_ci_runs_the_readme_test_command():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"```bash\n{ci}\n```" in text
