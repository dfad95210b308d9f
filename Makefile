# Two entry points for a fresh machine: `make serve` and `make test`. Both are idempotent.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := espeak-ng libespeak-ng1 festival festvox-us-slt-hts festvox-kallpc16k flite sox ffmpeg libportaudio2 libgl1 libglib2.0-0 \
  chromium chromium-driver coturn

.PHONY: setup system-deps serve test

# Debian packages are checked every time (dpkg -s is cheap), installed only when missing.
system-deps:
	@if [ "$$(id -u)" = 0 ]; then \
	  missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi; \
	else echo "not root: assuming these Debian packages are installed: $(APT_PACKAGES)"; fi

setup: system-deps .stamp-venv
.stamp-venv: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	@# Exactly one OpenCV: an older checkout's opencv-python-headless would share cv2/ with opencv-contrib-python.
	@if $(BIN)/pip show -q opencv-python-headless 2>/dev/null; then \
	  $(BIN)/pip uninstall -y -q opencv-python-headless && \
	  $(BIN)/pip install -q --disable-pip-version-check --force-reinstall --no-deps 'opencv-contrib-python>=4.10,<5'; fi
	touch $@

serve: setup
	$(BIN)/emote serve

test: setup
	$(BIN)/python -m pytest -q
