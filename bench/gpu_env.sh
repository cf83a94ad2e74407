# Sourced by the GPU scripts (gpu_check.sh, bytes_gpu.sh) from the repository root: a device
# machine's Python may lack mlxtend / kornia, so their wheels, put in .whl/ and carried, are
# installed into /tmp/site for this run only; PYTHONPATH points at this checkout first.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/site
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
