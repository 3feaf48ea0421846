# Source this on the GPU machine (the device tool, with `.whl` carried) before running a benchmark:
#   . benchmarks/gpu_env.sh && python3 benchmarks/model.py ...
# The machine has torch, triton and transformers but not TransformerLens: the wheels in .whl/
# (transformer-lens 4.3.0, gguf, datasets, dill, multiprocess; fetched with
# `pip download --no-deps --python-version 3.12 --only-binary=:all:`) go to /tmp/site, once per machine.
[ -d /tmp/site/transformer_lens ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -c "import torch, triton, transformers, transformer_lens; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
