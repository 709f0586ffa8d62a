# The two commands of the README's quick start: `make run` and `make test`.
VENV := .venv
SETUP := $(VENV)/.installed

.PHONY: run demo test bench

$(SETUP): pyproject.toml deploy/install.sh
	bash deploy/install.sh
	touch $@

# The node on its embedded defaults (filesystem queue, SQLite) with its data in var/node.
run: $(SETUP)
	$(VENV)/bin/cad-node up --data-dir var/node

# The whole flow once: a synthetic case through the node to a throwaway PACS.
demo: $(SETUP)
	$(VENV)/bin/cad-node demo

test: $(SETUP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -rs; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: $(SETUP)
	$(VENV)/bin/python benchmarks/bench_synth.py
	$(VENV)/bin/python benchmarks/bench_pipeline.py
	$(VENV)/bin/python benchmarks/bench_node.py
	$(VENV)/bin/python benchmarks/bench_results.py
