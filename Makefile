# The two commands of the README's quick start: `make run` and `make test`.
VENV := .venv
SETUP := $(VENV)/.installed

.PHONY: run test bench

$(SETUP): pyproject.toml deploy/install.sh
	bash deploy/install.sh
	touch $@

# Until the node's listener lands, running the node means making a case with known nodules.
run: $(SETUP)
	rm -rf var/demo-case
	$(VENV)/bin/cad-node synth --out var/demo-case --seed 1 --nodules 5 --preview

test: $(SETUP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -rs; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: $(SETUP)
	$(VENV)/bin/python benchmarks/bench_synth.py
	$(VENV)/bin/python benchmarks/bench_pipeline.py
