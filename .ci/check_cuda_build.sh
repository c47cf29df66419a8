#!/usr/bin/env bash
# CI check of the compiled backend spectral_kernels._C, on a machine with nvcc (no GPU needed):
#   1. build it in place through pip (editable install, isolated build environment) and import it;
#   2. check that the cuda backend refuses CPU tensors with a clear error;
#   3. build the wheel (pip wheel . -w dist --no-deps), check it is a platform wheel holding _C;
#   4. install it in a fresh venv next to torch 2.13.0 and import it there, outside the source tree.
# Self-contained and idempotent: run it from any directory, as often as you like. One architecture
# (SPECTRAL_KERNELS_CUDA_ARCHS, default 90) keeps the two builds to seconds; the compiled kernels are
# shared between them through build/cmake-*.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
PYTHON=${PYTHON:-python}
export SPECTRAL_KERNELS_CUDA=1
export SPECTRAL_KERNELS_CUDA_ARCHS=${SPECTRAL_KERNELS_CUDA_ARCHS:-90}

if ! command -v nvcc >/dev/null && [ ! -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
  echo "check_cuda_build: nvcc not found (PATH or CUDA_HOME); the CUDA build cannot be checked" >&2
  exit 1
fi

echo "== 1. in-place build (pip install -e ., SPECTRAL_KERNELS_CUDA_ARCHS=$SPECTRAL_KERNELS_CUDA_ARCHS)"
"$PYTHON" -m pip install -q --no-deps -e .
"$PYTHON" - <<'EOF'
from spectral_kernels import _ext
assert _ext._C is not None, f"spectral_kernels._C did not import: {_ext.IMPORT_ERROR}"
print("  ", _ext.extension_summary())
EOF
echo "   build + import: $((SECONDS - start)) s"

echo "== 2. CPU tensors are refused with a clear error"
"$PYTHON" - <<'EOF'
import torch
from spectral_kernels.ops.spectral_linear_cuda import spectral_linear_fwd_cuda
try:
    spectral_linear_fwd_cuda(torch.randn(3, 8), torch.randn(5, 2), torch.randn(2), torch.randn(8, 2), None, None)
except ValueError as exc:
    assert "x must be a CUDA tensor" in str(exc), exc
    print("   ValueError:", exc)
else:
    raise AssertionError("CPU tensors were not refused")
EOF

echo "== 3. wheel"
rm -rf dist/spectral_kernels-*.whl
"$PYTHON" -m pip wheel -q . -w dist --no-deps
wheel=$(ls dist/spectral_kernels-*.whl)
"$PYTHON" - "$wheel" <<'EOF'
import sys, zipfile
path = sys.argv[1]
names = zipfile.ZipFile(path).namelist()
so = [n for n in names if n.startswith("spectral_kernels/_C.") and n.endswith(".so")]
assert so, f"{path} holds no spectral_kernels/_C*.so"
assert not path.endswith("-none-any.whl"), f"{path} is not a platform wheel"
print(f"   {path}: {so[0]}")
EOF
echo "   wheel: $((SECONDS - start)) s"

echo "== 4. fresh venv: torch 2.13.0 + the wheel"
venv=build/wheel-check-venv
rm -rf "$venv"
"$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install -q torch==2.13.0
# --no-deps: torch is already there; the wheel's other dependency (triton) is not needed to import.
"$venv/bin/python" -m pip install -q --no-deps "$wheel"
(
  cd "$(mktemp -d)"  # outside the source tree, so the installed copy is the one imported
  "$OLDPWD/$venv/bin/python" -W "ignore:Failed to initialize NumPy" - <<'EOF'
import torch
import spectral_kernels
from spectral_kernels import _ext
assert _ext._C is not None, f"_C did not import from the wheel: {_ext.IMPORT_ERROR}"
assert "site-packages" in _ext._C.__file__, _ext._C.__file__
from spectral_kernels.ops.spectral_linear_cuda import coeff_and_bias_grads
try:
    coeff_and_bias_grads(torch.randn(3, 5), torch.randn(3, 2), torch.randn(3, 2))
except ValueError as exc:
    assert "CUDA tensor" in str(exc), exc
else:
    raise AssertionError("CPU tensors were not refused")
print(f"   torch {torch.__version__}: {_ext.extension_summary()}")
EOF
)
echo "check_cuda_build: OK in $((SECONDS - start)) s"
