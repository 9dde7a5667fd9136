"""The library stays light: importing gem_kernels needs and loads none of the fine-tuning
harness's dependencies, and the harness loads its heavy ones only where they are used."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS_ONLY = ("tqdm", "matplotlib", "transformers", "peft", "gem_finetune")

# Watching sys.modules alone cannot work here: torch imports tqdm itself when it is installed
# (torch.hub, which falls back to a stub without it). So the listed modules are made to look
# uninstalled, the way Python documents: a None in sys.modules makes `import` raise
# ModuleNotFoundError and importlib.util.find_spec answer None. torch tolerates that; the code
# under test must too, and must leave no real module of those names behind.
BLOCK = """\
import json, sys
BLOCKED = {blocked!r}
sys.modules.update(dict.fromkeys(BLOCKED))
{code}
print(json.dumps(sorted({{name.split(".")[0] for name, module in sys.modules.items()
                         if module is not None}} & set(BLOCKED))))
"""


def run_blocking(blocked, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which the ``blocked`` modules cannot be imported."""
    return subprocess.run([sys.executable, "-c", BLOCK.format(blocked=tuple(blocked), code=code)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("code, blocked", [
    ("import gem_kernels", HARNESS_ONLY),
    ("from gem_kernels.integrations.transformers import param_groups", HARNESS_ONLY),
    # The command's modules import transformers, peft, matplotlib and tqdm inside the functions
    # that use them, so `gem-finetune --help` and a bad task directory answer at once.
    ("import gem_finetune.cli", ("tqdm", "matplotlib", "transformers", "peft")),
])
def test_imports_need_none_of_the_harness_modules(code, blocked):
    done = run_blocking(blocked, code)
    assert done.returncode == 0, f"`{code}` imported a module it must not:\n{done.stderr}"
    assert json.loads(done.stdout.splitlines()[-1]) == []  # none in sys.modules either


def test_the_check_fails_on_a_harness_import():
    # Without this, a block that never fired (a misspelt name, a stale sys.modules trick) would
    # let the test above pass however much gem_kernels imported.
    done = run_blocking(HARNESS_ONLY, "import gem_kernels\nimport tqdm")
    assert done.returncode != 0 and "import of tqdm halted" in done.stderr
    done = run_blocking(HARNESS_ONLY, "import gem_kernels\nfrom gem_finetune import data")
    assert done.returncode != 0 and "import of gem_finetune halted" in done.stderr
