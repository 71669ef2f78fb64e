"""The package imports without the optional extras, and the console script runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

OPTIONAL = ("deepspeed", "wandb", "flash_attn")


def test_imports_without_optional_dependencies() -> None:
    # Hide the optional packages as if they were not installed (whether or not they are):
    # import lookups and availability probes both see nothing.
    script = textwrap.dedent(
        f"""
        import importlib.abc, importlib.util, sys
        BLOCKED = {OPTIONAL!r}
        real_find_spec = importlib.util.find_spec
        def find_spec(name, package=None):
            return None if name.split(".")[0] in BLOCKED else real_find_spec(name, package)
        importlib.util.find_spec = find_spec
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (hidden by the test)")
        sys.meta_path.insert(0, Block())
        import tokenpacker_llava
        from tokenpacker_llava import TokenPackerLlavaConfig, TokenPackerLlavaForConditionalGeneration
        from tokenpacker_llava.models.projectors import build_projector
        import tokenpacker_llava.cli, tokenpacker_llava.conversion
        TokenPackerLlavaConfig()
        assert not any(name.split(".")[0] in BLOCKED for name in sys.modules)
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_console_script() -> None:
    exe = shutil.which("tokenpacker-llava") or str(
        __import__("pathlib").Path(sys.executable).with_name("tokenpacker-llava")
    )
    result = subprocess.run([exe, "projectors"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "tokenpacker" in result.stdout and "s=2: 144, s=3: 64, s=4: 36" in result.stdout
    bad = subprocess.run([exe, "no-such-command"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
