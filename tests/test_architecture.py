"""One-way dependencies: the kernels and the pattern import nothing from the TransformerLens layer."""

import subprocess
import sys


def test_kernels_import_without_transformer_lens():
    code = "import sys, sparse_lens.kernels, sparse_lens.pattern, sparse_lens.data; print('transformer_lens' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
