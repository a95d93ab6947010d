"""The `pagedllm generate` command, run as a user runs it."""
import subprocess
import sys

import pytest

from tests.test_hf_equivalence import STORIES_REFERENCE


@pytest.mark.parametrize("flags", [[], ["--async-scheduling"]])
def test_generate_cli_on_stories(stories_path, flags):
    result = subprocess.run(
        [sys.executable, "-m", "pagedllm.cli", "generate", "--model", stories_path, "--prompt", "Once upon a time",
         "--temperature", "0", "--max-tokens", "40", "--dtype", "float32", *flags],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Once upon a time" + STORIES_REFERENCE["Once upon a time"] in result.stdout


def test_generate_cli_bad_flag_value(stories_path):
    result = subprocess.run(
        [sys.executable, "-m", "pagedllm.cli", "generate", "--model", stories_path, "--prompt", "x",
         "--temperature", "-1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "temperature" in result.stdout
