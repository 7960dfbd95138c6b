# rproxy: the commands README.md shows.  Everything runs from a virtualenv this Makefile creates.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The oldest dependencies setup.py admits (requirements/oldest.txt): the suite runs on them too.
OLDEST := .venv-oldest
UPSTREAM ?=
LISTEN ?= tcp:8080:interface=127.0.0.1
# Arguments for benchmarks/run.py, e.g. BENCH_ARGS="--baseline /path/to/venv" (see benchmarks/README.md).
BENCH_ARGS ?=

# Seconds of coverage-guided fuzzing for `make fuzz` (fuzz/README.md); the suite runs a few seconds of it.
FUZZ_SECONDS ?= 300
# Seconds of `make soak` (benchmarks/soak.py); SOAK_ARGS for its other options.
SOAK_SECONDS ?= 300
SOAK_ARGS ?=

.PHONY: run test lint typecheck bench docs clean fuzz soak

# The editable install uses "compat" mode so that twisted/plugins/rproxy_plugin.py is found on sys.path
# (twist discovers plugins by scanning sys.path entries, which the default editable finder bypasses).
$(BIN)/twist: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,dev]' --config-settings editable_mode=compat
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	$(BIN)/python -c "from rproxy.proxy.balancers import balancerFactories; balancerFactories()"
	touch $@

run: $(BIN)/twist
ifeq ($(UPSTREAM),)
	@echo "rproxy on http://127.0.0.1:8080 in front of the demo upstream on 127.0.0.1:9000. Try:"
	@echo "  curl -i http://127.0.0.1:8080/echo -d hello"
	@echo "  curl -N 'http://127.0.0.1:8080/stream?n=5&interval=1'"
	@echo "  curl -o /dev/null http://127.0.0.1:8080/large?size=1G"
	@echo "  curl http://127.0.0.1:8080/slow?delay=2"
	@echo "  curl --http2-prior-knowledge http://127.0.0.1:8080/echo -d hello   (HTTP/2, h2c)"
	$(BIN)/twist --log-format=text rproxy --listen $(LISTEN) --demo-upstream tcp:9000:interface=127.0.0.1
else
	@echo "rproxy on http://127.0.0.1:8080 in front of $(UPSTREAM). Try: curl -i http://127.0.0.1:8080/"
	$(BIN)/twist --log-format=text rproxy --listen $(LISTEN) --upstream $(UPSTREAM)
endif

$(OLDEST)/bin/trial: setup.py requirements/oldest.txt
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install --quiet --upgrade pip
	$(OLDEST)/bin/pip install --quiet -c requirements/oldest.txt -e '.[test]' --config-settings editable_mode=compat
	touch $@

# Debian packages some tests run, installed when missing (CI machines lack them and run as root).  The package
# lists are refreshed only if the install fails without.
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends
aptInstall = $(APT_INSTALL) $(1) || (apt-get update && $(APT_INSTALL) $(1))

# The CORS browser test (rproxy/test/test_filter_cors.py) drives Debian's headless Chromium.
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	$(call aptInstall,chromium)

# The metrics tests scrape rproxy with Debian's Prometheus server (rproxy/test/prometheus.py).  Where systemd
# runs, the package also starts a system-wide server on port 9090; the tests start their own on a free port.
PROMETHEUS := /usr/bin/prometheus
$(PROMETHEUS):
	$(call aptInstall,prometheus)

# The soak test (rproxy/test/test_soak.py, benchmarks/soak.py) loads the proxy with wrk and h2load.
WRK := /usr/bin/wrk
$(WRK):
	$(call aptInstall,wrk)
H2LOAD := /usr/bin/h2load
$(H2LOAD):
	$(call aptInstall,nghttp2-client)

# The cluster tests (rproxy/test/test_cluster*.py, rproxy/test/stores.py) run real etcd and Redis servers.
ETCD := /usr/bin/etcd
$(ETCD):
	$(call aptInstall,etcd-server)
REDIS := /usr/bin/redis-server
$(REDIS):
	$(call aptInstall,redis-server)

# The HTTP/2 conformance tests (rproxy/test/test_h2spec.py) run h2spec, built from its source in third_party/
# with Debian's Go toolchain and Go library packages, in GOPATH mode: nothing is downloaded.
H2SPEC := build/h2spec/h2spec
H2SPEC_DEBS := golang-go golang-golang-x-net-dev golang-github-spf13-cobra-dev golang-github-fatih-color-dev
H2SPEC_SOURCE := build/h2spec/src/github.com/summerwind/h2spec
$(H2SPEC): $(shell find third_party/h2spec -name '*.go')
	dpkg -s $(H2SPEC_DEBS) >/dev/null 2>&1 || $(call aptInstall,$(H2SPEC_DEBS))
	rm -rf $(dir $(H2SPEC_SOURCE))
	mkdir -p $(dir $(H2SPEC_SOURCE))
	cp -r third_party/h2spec $(H2SPEC_SOURCE)
	cd $(H2SPEC_SOURCE) && GO111MODULE=off GOPATH=$(CURDIR)/build/h2spec:/usr/share/gocode \
		GOCACHE=$(CURDIR)/build/h2spec/cache GOFLAGS= go build -o $(CURDIR)/$(H2SPEC) ./cmd/h2spec

# The whole suite on rproxy's reactor (the one `twist rproxy` installs), with the newest dependencies and
# with the oldest that setup.py admits.
test: $(BIN)/twist $(OLDEST)/bin/trial $(CHROMIUM) $(PROMETHEUS) $(H2SPEC) $(WRK) $(H2LOAD) $(ETCD) $(REDIS)
	$(BIN)/trial --reactor=rproxy --jobs=2 rproxy
	$(OLDEST)/bin/trial --reactor=rproxy --jobs=2 rproxy

lint: $(BIN)/twist
	$(BIN)/ruff check rproxy benchmarks fuzz twisted docs/examples
	$(BIN)/ruff format --check rproxy benchmarks fuzz twisted docs/examples

typecheck: $(BIN)/twist
	$(BIN)/mypy rproxy

# The API reference of rproxy's public API (pydoctor's settings are in pyproject.toml).
docs: $(BIN)/twist
	$(BIN)/python -m pydoctor --quiet
	@echo "API reference: build/apidocs/index.html"

bench: $(BIN)/twist $(REDIS)
	$(BIN)/pip install --quiet -e '.[bench]' --config-settings editable_mode=compat
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

# Fuzz a live proxy for FUZZ_SECONDS: new inputs that add coverage go to build/fuzz/corpus, and an input
# that breaks a property (crash, hang, leaked connection or descriptor) to build/fuzz/ as crash-*.
fuzz: $(BIN)/twist
	mkdir -p build/fuzz/corpus
	PYTHONPATH=. $(BIN)/python fuzz/harness.py -max_total_time=$(FUZZ_SECONDS) -timeout=30 -max_len=4096 \
		-dict=fuzz/http.dict -artifact_prefix=build/fuzz/ build/fuzz/corpus fuzz/seeds
	RPROXY_PROPERTY_RANDOM=1 RPROXY_PROPERTY_EXAMPLES=2000 $(BIN)/trial --reactor=rproxy rproxy.test.test_properties

# HTTP/1.1, HTTP/2 and WebSocket load at once for SOAK_SECONDS while upstreams die and return and the
# config reloads; the report (curves of RSS and descriptors) goes to build/soak/.
soak: $(BIN)/twist $(WRK) $(H2LOAD)
	$(BIN)/python benchmarks/soak.py --seconds $(SOAK_SECONDS) --report build/soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) $(OLDEST) build/apidocs build/h2spec _trial_temp* *.egg-info
